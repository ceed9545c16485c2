"""Evaluating on ShapesWorld: what a generic VQA score cannot see without the scene.

- POPE (Li et al., 2023): yes/no probes about objects that are and are not in the image, the absent ones chosen
  at random, among the most frequent ("popular") or sharing a shape with a present one ("adversarial");
- captions: which objects a caption mentions (`caption_mentions`), and how many are really there;
- `object_prompts`: every object phrase per colour or shape, for CLIP's zero-shot classification;
- `evaluate(model, processor, records, kind)`: the kinds `minillava eval` offers (vqa, multi-image, pope,
  caption, multiturn, false-premise), pope and caption reading each record's scene;
- natural use: `short_answer_records` (LLaVA-1.5's suffix on the short questions, one-word references),
  `multiturn` scores per variant (a question asked first, fifth, fifth with a late image), `no_image` (questions
  about an image that was never given).
"""

from __future__ import annotations

import re

import numpy as np

from ...evaluation import answer, evaluate_vqa, format_table, pope_metrics, questions, rule_holds, score
from ...model import LlavaModel
from ...processor import Processor
from ..records import Record
from .questions import NO_IMAGE_HELD_OUT, NO_IMAGE_QUESTIONS, short_form
from .scenes import (
    COLORS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SHORT_ANSWER,
    SIZES,
    Obj,
    Scene,
    _cap,
    absent_objects,
    combo_frequencies,
    cooccurrence_counts,
    objects_present,
)


def object_prompts(attr: str, values) -> dict[str, list[str]]:
    """{value: every object phrase of ShapesWorld whose `attr` ("color", "shape") is value, as a caption}."""
    objs = [Obj(s, c, z, (r, q)) for s in SHAPES for c in COLORS for z in SIZES for r in range(3) for q in range(3)]
    return {v: [f"{_cap(o.phrase())}." for o in objs if getattr(o, attr) == v] for v in values}


# ---- hallucination: POPE-style yes/no probes --------------------------------------------------------------
POPE_STRATEGIES = ("random", "popular", "adversarial")


def pope_records(records: list[Record], strategy: str = "random", k: int = 3, seed: int = 0,
                 freq=None, pairs=None) -> list[Record]:
    """POPE (Li et al., 2023) on ShapesWorld: per image, up to k objects that are there ("Yes") and as many
    that are not ("No"), chosen at random, among the most frequent ("popular"; pass `freq`), or among those
    that co-occur most with the present ones ("adversarial"; pass `pairs`, see `absent_objects`). One
    single-turn record per question."""
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
                                exclude=HELD_OUT, pairs=pairs)
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
EVAL_KINDS = ("vqa", "pope", "caption", "multi-image", "multiturn", "false-premise")
SHORT_TYPES = ("color", "shape", "count", "exist", "position", "size", "relation", "compare", "compare_named",
               "followup", "multi_more", "multi_count")  # the questions LLaVA-1.5's suffix goes with


def short_answer_records(records: list[Record]) -> list[Record]:
    """The records with LLaVA-1.5's short-answer suffix on every short question (`SHORT_TYPES`) and its
    one-word answer as the reference ("Circle", "3"); other turns become "context" (given, not asked)."""
    out = []
    for r in records:
        qtypes, msgs, turn = list(r.meta.get("qtypes") or []), [dict(m) for m in r.messages], 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            if turn < len(qtypes) and qtypes[turn] in SHORT_TYPES:
                if not msgs[i - 1]["content"].endswith(SHORT_ANSWER):
                    msgs[i - 1]["content"] += SHORT_ANSWER
                m["content"] = short_form(m["content"])
            elif turn < len(qtypes):
                qtypes[turn] = "context"
            turn += 1
        if any(t != "context" for t in qtypes):
            out.append(Record(r.id, r.images, msgs, {**r.meta, "qtypes": qtypes}))
    return out


MULTITURN_VARIANTS = ("first", "fifth", "late")  # the multiturn split's record ids end in one of these


def multiturn(result: dict) -> dict:
    """Exact match per variant of the multiturn split ("first", "fifth", "late": the record id's last part),
    from an `evaluate_vqa` result, and the differences from "first", over the scenes asked all three ways (a
    `--limit` can cut a scene's three records apart: the others are left out and counted)."""
    scenes: dict[str, dict] = {}
    for p in result["predictions"]:
        scene, variant = p["id"].rsplit("-", 1)
        scenes.setdefault(scene, {}).setdefault(variant, []).append(p)
    whole = [v for v in scenes.values() if set(v) == set(MULTITURN_VARIANTS)]
    by: dict[str, list] = {}
    for variants in whole:
        for variant, ps in variants.items():
            by.setdefault(variant, []).extend(ps)
    out = {v: score([{"qtype": p["qtype"], "reference": p["reference"]} for p in ps], [p["answer"] for p in ps])
           for v, ps in sorted(by.items())}
    first = out.get("first", {}).get("overall", {}).get("exact")
    return {"by_variant": out, "gap_points": {v: 100 * (first - r["overall"]["exact"]) for v, r in out.items()
                                              if first is not None and v != "first"},
            "scenes": len(whole), "incomplete_scenes": len(scenes) - len(whole)}


_REJECTION = re.compile(r"^(?:no\b|there (?:is|are) no\b|there (?:isn't|isn t|aren't|aren t)\b|i (?:do not|don't|don t"
                        r"|cannot|can't|can t) see\b|i see no\b)|\bno \w+(?: \w+)? in (?:the|this) (?:image|picture)\b|"
                        r"\bnot in (?:the|this) (?:image|picture)\b")


def rejects_premise(answer_text: str) -> bool:
    """Whether an answer's first sentence rejects a question's premise in any usual wording ("No.", "There is no
    red star.", "I don't see a star.", "The star is not in the image."), not only ShapesWorld's own sentence."""
    first = re.split(r"(?<=[.!?])\s+|\n", answer_text.strip().lower(), maxsplit=1)[0]
    return _REJECTION.search(re.sub(r"\s+", " ", first)) is not None


NO_IMAGE_RULE = {"accept": ["don't see an image", "no image", "attach"]}


def no_image(model: LlavaModel, processor: Processor, batch_size: int = 16, progress: bool = True) -> dict:
    """Questions about an image, asked with none given: the share answered by saying there is no image
    (`NO_IMAGE_RULE`), for the phrasings training used and for held-out ones, with every answer."""
    qs = [{"id": f"{which}-{i}", "messages": [{"role": "user", "content": q}], "images": []}
          for which, group in (("train", NO_IMAGE_QUESTIONS), ("held_out", NO_IMAGE_HELD_OUT))
          for i, q in enumerate(group)]
    answers = answer(model, processor, qs, batch_size, max_new_tokens=24, progress=progress)
    right = [rule_holds(a, NO_IMAGE_RULE) for a in answers]
    return {"n": len(qs), "says_no_image": sum(right) / len(qs),
            "by_phrasing": {w: sum(r for r, q in zip(right, qs) if q["id"].startswith(w))
                            / sum(q["id"].startswith(w) for q in qs) for w in ("train", "held_out")},
            "answers": [{"question": q["messages"][0]["content"], "answer": a, "says_no_image": r}
                        for q, a, r in zip(qs, answers, right)]}


def evaluate(model: LlavaModel, processor: Processor, records: list[Record], kind: str = "vqa",
             suffix: str = "", batch_size: int = 32, progress: bool = True, seed: int = 0,
             compile: bool = False) -> dict:
    """Evaluate one kind on LLaVA-format records (with reference answers; POPE and captions also need the
    ShapesWorld scene of each record). Returns a JSON-able dict with a "table" string for printing.
    `compile`: decode with the static cache and the compiled one-token step (the same answers, faster on a GPU)."""
    if kind not in EVAL_KINDS:
        raise ValueError(f"eval kind '{kind}': expected one of {', '.join(EVAL_KINDS)}")
    if kind == "multi-image":
        records = [r for r in records if len(r.images) > 1]
        if not records:
            raise ValueError("multi-image evaluation: no record has more than one image")
    if kind == "false-premise":  # the false-premise questions alone: the share rejected ("There is no ...")
        records = [r for r in records if "false_premise" in (r.meta.get("qtypes") or [])]
        records = [Record(r.id, r.images, r.messages, {**r.meta, "qtypes": [
            t if t == "false_premise" else "context" for t in r.meta["qtypes"]]}) for r in records]
        if not records:
            raise ValueError("false-premise evaluation: no record has a turn tagged 'false_premise'")
    other = next((r.id for r in records if r.id.rsplit("-", 1)[-1] not in MULTITURN_VARIANTS), None)
    if kind == "multiturn" and other is not None:
        raise ValueError(f"multiturn evaluation: record '{other}' is not of ShapesWorld's multiturn split (its ids "
                         f"end in -{', -'.join(MULTITURN_VARIANTS)})")
    if kind in ("vqa", "multi-image", "multiturn", "false-premise"):
        result = evaluate_vqa(model, processor, records, suffix, batch_size, progress=progress, compile=compile)
        result["table"] = format_table(result)
        if kind == "false-premise":
            said_no = [rejects_premise(p["answer"]) for p in result["predictions"]]
            result["rejected"] = sum(said_no) / len(said_no)
            result["table"] += f"\nrejected, in any wording ('There is no ...', 'No, ...'): {result['rejected']:.1%}"
        if kind == "multiturn":
            result.update(multiturn(result))
            result["table"] += "\n" + "\n".join(
                f"{v:<16}{r['overall']['n']:>6}{r['overall']['exact']:>9.1%}" for v, r in result["by_variant"].items())
        return result
    if not any(isinstance(r.meta.get("scene"), dict) for r in records):
        raise ValueError(f"{kind} evaluation needs scene annotations (ShapesWorld records carry 'scene')")
    if kind == "pope":
        out = {}
        scenes = [Scene.from_dict(r.meta["scene"]) for r in records if isinstance(r.meta.get("scene"), dict)]
        freq = combo_frequencies(scenes)  # "popular": the most frequent objects of this data set
        pairs = cooccurrence_counts(scenes)  # "adversarial": the objects seen most often beside the present ones
        for strategy in POPE_STRATEGIES:
            probes = pope_records(records, strategy, seed=seed, freq=freq, pairs=pairs)
            qs = questions(probes, suffix)
            answers = answer(model, processor, qs, batch_size, max_new_tokens=8, progress=progress, compile=compile)
            out[strategy] = pope_metrics(answers, [q["reference"] for q in qs])
        lines = [f"{'POPE':<12}{'n':>6}{'acc':>8}{'prec':>8}{'recall':>8}{'F1':>8}{'yes':>8}"]
        lines += [f"{k:<12}{v['n']:>6}{v['accuracy']:>8.1%}{v['precision']:>8.1%}{v['recall']:>8.1%}"
                  f"{v['f1']:>8.1%}{v['yes_ratio']:>8.1%}" for k, v in out.items()]
        return {"pope": out, "table": "\n".join(lines)}
    recs = [r for r in records if isinstance(r.meta.get("scene"), dict) and len(r.images) == 1]
    qs = [{"messages": [{"role": "user", "content": "<image>\nDescribe the image briefly."}], "images": r.images}
          for r in recs]
    captions = answer(model, processor, qs, batch_size, max_new_tokens=64, progress=progress, compile=compile)
    scenes = [Scene.from_dict(r.meta["scene"]) for r in recs]
    metrics = caption_metrics(captions, scenes)
    table = "\n".join(f"{k:<24}{v:>8.1%}" if isinstance(v, float) and k != "mentions_per_caption"
                      else f"{k:<24}{v:>8}" for k, v in metrics.items())
    return {"caption": metrics, "examples": [{"id": r.id, "objects": "; ".join(o.phrase() for o in scene.objects),
                                              "caption": c} for r, c, scene in zip(recs[:10], captions, scenes)],
            "table": table}
