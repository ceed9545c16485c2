"""Evaluating on ShapesWorld: what a generic VQA score cannot see without the scene.

- POPE (Li et al., 2023): yes/no probes about objects that are and are not in the image, the absent ones chosen
  at random, among the most frequent ("popular") or sharing a shape with a present one ("adversarial");
- captions: which objects a caption mentions (`caption_mentions`), and how many are really there;
- `object_prompts`: every object phrase per colour or shape, for CLIP's zero-shot classification;
- `evaluate(model, processor, records, kind)`: the four kinds `minillava eval` offers (vqa, multi-image, pope,
  caption), the last two reading each record's scene.
"""

from __future__ import annotations

import re

import numpy as np

from ...evaluation import answer, evaluate_vqa, format_table, pope_metrics, questions
from ...model import LlavaModel
from ...processor import Processor
from ..records import Record
from .scenes import (
    COLORS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    _cap,
    absent_objects,
    combo_frequencies,
    objects_present,
)


def object_prompts(attr: str, values) -> dict[str, list[str]]:
    """{value: every object phrase of ShapesWorld whose `attr` ("color", "shape") is value, as a caption}."""
    objs = [Obj(s, c, z, (r, q)) for s in SHAPES for c in COLORS for z in SIZES for r in range(3) for q in range(3)]
    return {v: [f"{_cap(o.phrase())}." for o in objs if getattr(o, attr) == v] for v in values}


# ---- hallucination: POPE-style yes/no probes --------------------------------------------------------------
POPE_STRATEGIES = ("random", "popular", "adversarial")


def pope_records(records: list[Record], strategy: str = "random", k: int = 3, seed: int = 0,
                 freq=None) -> list[Record]:
    """POPE (Li et al., 2023) on ShapesWorld: per image, up to k objects that are there ("Yes") and as many
    that are not ("No"), chosen at random, among the most frequent in training ("popular"; pass `freq`), or
    sharing a shape with a present object ("adversarial"). One single-turn record per question."""
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"POPE strategy '{strategy}': expected one of {', '.join(POPE_STRATEGIES)}")
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        scene = r.meta.get("scene")
        if not isinstance(scene, dict) or len(r.images) != 1:
            continue  # POPE asks about one image
        scene = Scene.from_dict(scene)
        present = objects_present(scene)
        present = [present[i] for i in rng.permutation(len(present))[:k]]
        absent = absent_objects(scene, rng, k=len(present), strategy=strategy, freq=freq,
                                   exclude=HELD_OUT)
        for (color, shape), label in [(p, "Yes.") for p in present] + [(a, "No.") for a in absent]:
            q = f"<image>\nIs there a {color} {shape} in the image?"
            out.append(Record(f"{r.id}-pope-{color}-{shape}", list(r.images),
                              [{"role": "user", "content": q}, {"role": "assistant", "content": label}],
                              {"qtypes": [f"pope_{strategy}"], "scene": r.meta["scene"]}))
    return out


# ---- captions: which objects does a caption mention, and are they there? -------------------------------------
def caption_mentions(caption: str) -> list[dict]:
    """Objects a ShapesWorld-style caption or description mentions: [{"size", "color", "shape", "position"}]
    (None if unsaid). Counts and plurals ("1 circle", "2 circles", "no red squares") name no single object
    and are left out."""
    sizes, colors, shapes = "|".join(SIZES), "|".join(COLORS), "|".join(SHAPES)
    positions = "|".join(sorted(POSITIONS, key=len, reverse=True))
    pattern = (rf"\b(?:(\d+|no|one|two|three|four|five) )?(?:({sizes}) )?(?:({colors}) )?({shapes})(s?)\b"
               rf"(?: (?:is )?(?:at|in|on) the ({positions})\b)?")  # "... circle (is) at the top left"
    return [{"size": m[1] or None, "color": m[2] or None, "shape": m[3], "position": m[5] or None}
            for m in re.findall(pattern, caption.lower()) if not (m[0] or m[4])]  # counts and plurals: no object


def caption_metrics(captions: list[str], scenes: list) -> dict:
    """Object precision (mentioned objects that are in the scene, matched by colour and shape), object recall
    (scene objects mentioned), and the accuracy of the size and position said for the objects that match.
    Matching is one to one: an object said twice (or two red circles said where there is one) counts once."""
    mentioned = correct = recalled = total = 0
    attr = {"size": [0, 0], "position": [0, 0]}
    for caption, scene in zip(captions, scenes, strict=True):
        free = list(scene.objects)  # not matched yet
        for m in sorted(caption_mentions(caption), key=lambda m: m["position"] is None):  # placed ones first
            mentioned += 1
            same = [o for o in free if o.shape == m["shape"] and m["color"] in (None, o.color)]
            match = next((o for o in same if m["position"] in (None, o.position)), same[0] if same else None)
            if match is None:
                continue
            correct += 1
            free.remove(match)
            for a in attr:
                if m[a] is not None:
                    attr[a][0] += m[a] == getattr(match, a)
                    attr[a][1] += 1
        recalled += len(scene.objects) - len(free)
        total += len(scene.objects)
    return {"n": len(captions), "object_precision": correct / mentioned if mentioned else 0.0,
            "object_recall": recalled / total if total else 0.0,
            **{f"{a}_accuracy": c / n if n else 0.0 for a, (c, n) in attr.items()},
            "mentions_per_caption": mentioned / max(len(captions), 1)}


# ---- one entry point for the command line and for Python ---------------------------------------------------
EVAL_KINDS = ("vqa", "pope", "caption", "multi-image")


def evaluate(model: LlavaModel, processor: Processor, records: list[Record], kind: str = "vqa",
             suffix: str = "", batch_size: int = 32, progress: bool = True, seed: int = 0) -> dict:
    """Evaluate one kind on LLaVA-format records (with reference answers; POPE and captions also need the
    ShapesWorld scene of each record). Returns a JSON-able dict with a "table" string for printing."""
    if kind not in EVAL_KINDS:
        raise ValueError(f"eval kind '{kind}': expected one of {', '.join(EVAL_KINDS)}")
    if kind == "multi-image":
        records = [r for r in records if len(r.images) > 1]
        if not records:
            raise ValueError("multi-image evaluation: no record has more than one image")
    if kind in ("vqa", "multi-image"):
        result = evaluate_vqa(model, processor, records, suffix, batch_size, progress=progress)
        result["table"] = format_table(result)
        return result
    if not any(isinstance(r.meta.get("scene"), dict) for r in records):
        raise ValueError(f"{kind} evaluation needs scene annotations (ShapesWorld records carry 'scene')")
    if kind == "pope":
        out = {}
        scenes = [Scene.from_dict(r.meta["scene"]) for r in records if isinstance(r.meta.get("scene"), dict)]
        freq = combo_frequencies(scenes)  # "popular": the most frequent objects of this data set
        for strategy in POPE_STRATEGIES:
            probes = pope_records(records, strategy, seed=seed, freq=freq)
            qs = questions(probes, suffix)
            answers = answer(model, processor, qs, batch_size, max_new_tokens=8, progress=progress)
            out[strategy] = pope_metrics(answers, [q["reference"] for q in qs])
        lines = [f"{'POPE':<12}{'n':>6}{'acc':>8}{'prec':>8}{'recall':>8}{'F1':>8}{'yes':>8}"]
        lines += [f"{k:<12}{v['n']:>6}{v['accuracy']:>8.1%}{v['precision']:>8.1%}{v['recall']:>8.1%}"
                  f"{v['f1']:>8.1%}{v['yes_ratio']:>8.1%}" for k, v in out.items()]
        return {"pope": out, "table": "\n".join(lines)}
    recs = [r for r in records if isinstance(r.meta.get("scene"), dict) and len(r.images) == 1]
    qs = [{"messages": [{"role": "user", "content": "<image>\nDescribe the image briefly."}], "images": r.images}
          for r in recs]
    captions = answer(model, processor, qs, batch_size, max_new_tokens=64, progress=progress)
    scenes = [Scene.from_dict(r.meta["scene"]) for r in recs]
    metrics = caption_metrics(captions, scenes)
    table = "\n".join(f"{k:<24}{v:>8.1%}" if isinstance(v, float) and k != "mentions_per_caption"
                      else f"{k:<24}{v:>8}" for k, v in metrics.items())
    return {"caption": metrics, "examples": [{"id": r.id, "objects": "; ".join(o.phrase() for o in scene.objects),
                                              "caption": c} for r, c, scene in zip(recs[:10], captions, scenes)],
            "table": table}
