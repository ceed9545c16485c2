"""Rebuild every shipped component from scratch, with fixed seeds: `python -m minillava.tools.build_zoo --out data`.

1. ShapesWorld datasets (images + LLaVA JSON) in a work folder;
2. the tokenizer, the tiny CLIP and the tiny chat LM (`pretrain.py`), each evaluated;
3. LLaVA's two stages with `train.py`: `tiny-llava-stage1` (projector only) and `tiny-llava`;
4. evaluation of both LLaVA stages (`evaluate`), and a model card (README.md + metrics.json) per component.

The shipped zoo was built on one GPU (`--device cuda`, minutes); the same command runs on a CPU, in hours.
`--eval-only` re-runs step 4 on the weights in `--out` (it rebuilds the ShapesWorld data first if the work
folder lacks it: the data is deterministic). `--scale toy` runs the whole pipeline at toy size in seconds (the
test suite does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import pretrain as pt
from ..checkpoints import load, load_stage1
from ..data import shapesworld as sw
from ..data.records import load_records, save_records
from ..outputs import atomic_dir, check_replaceable, mark_written
from ..training import TrainConfig, train
from ..utils import device_name, load_tensors, pick_device, read_json, save_tensors, write_json
from ..zoo import TINY


@dataclass
class Scale:
    """How big everything is. FULL is what ships; TOY checks the pipeline in seconds."""

    n_train: int = 30000  # train scenes: CLIP, the tokenizer, stage 1 and stage 2's first round see these
    n_fresh: int = 270000  # more train scenes, seen by stage 2's later rounds alone, once each
    fresh_rounds: int = 3  # n_fresh is split evenly over this many later rounds, each from where the last ended
    n_val: int = 500
    n_test: int = 1000
    n_comp: int = 500
    n_para: int = 500  # test scenes asked with held-out phrasings
    n_multiturn: int = 300  # test scenes, each question asked first, fifth, fifth with a late image
    n_cooccur: int = 500  # test scenes with the co-occurrence bias (POPE)
    n_text: int = 40000
    n_text_val: int = 1000
    vocab: int = 1024
    clip: pt.ClipConfig = field(default_factory=lambda: pt.ClipConfig(steps=3000, batch_size=256))
    lm: pt.LMConfig = field(default_factory=lambda: pt.LMConfig(steps=4000, batch_size=64, sft_steps=4000))
    stage1: dict = field(default_factory=lambda: dict(batch_size=64, micro_batch_size=64, epochs=2.0, lr=1e-3))
    stage2: dict = field(default_factory=lambda: dict(batch_size=32, micro_batch_size=32, epochs=8.0, lr=1e-3,
                                                      save_every=500))  # resumable: hours on a CPU
    text_in_stage2: int = 4000  # text-only chats mixed into stage 2, as llava_v1_5_mix665k has
    stage2_fresh: dict = field(default_factory=lambda: dict(batch_size=32, micro_batch_size=32, epochs=1.0, lr=3e-4,
                                                            save_every=500))  # each later round
    text_in_fresh: int = 10000  # text-only chats mixed into each later round (the same ones)
    n_natural: int = 56000  # train scenes of each natural-use round, with the co-occurrence bias
    natural_rounds: int = 9  # the last rounds: natural use, each on scenes of its own
    text_in_natural: int = 6000  # text-only chats of each natural-use round (its own: some ask of an absent image)
    natural_short_p: float = 0.35  # the share of short-answer questions with LLaVA-1.5's suffix in those rounds
    reasoned: bool = False  # named comparisons answered step by step in every split (`minillava.tools.reasoned`)
    rows: bool = False  # ... with a place said by its row or column (chapter 7.6's told runs)
    value_first: bool = False  # ... with the winner's value said before it is named
    value_led: bool = False  # ... with each value said before its object
    stage2_natural: dict = field(default_factory=lambda: dict(batch_size=32, micro_batch_size=32, epochs=1.0,
                                                              lr=3e-4, save_every=500))
    caption_docs: int = 4000  # documents of captions, one a line, in the LM's pretraining text (see `lm_corpus`)
    n_eval: int | None = None  # evaluate on this many test (and told-scene) records (None: all)


FULL = Scale()
TOY = Scale(n_train=24, n_val=4, n_test=8, n_comp=4, n_para=4, n_multiturn=2, n_cooccur=4, n_text=64, n_text_val=8,
            vocab=400,
            clip=pt.ClipConfig(width=32, layers=1, heads=2, text_width=32, text_layers=1, projection=32, steps=2,
                               batch_size=8),
            lm=pt.LMConfig(width=32, layers=1, heads=2, kv_heads=1, ffn=64, steps=2, batch_size=4, sft_steps=2,
                           sft_batch_size=4),
            stage1=dict(batch_size=8, micro_batch_size=8, max_steps=2, lr=1e-3),
            stage2=dict(batch_size=8, micro_batch_size=8, max_steps=2, lr=1e-3), text_in_stage2=4, caption_docs=4,
            n_eval=4, n_fresh=8, fresh_rounds=2, text_in_fresh=4, natural_rounds=2,
            stage2_fresh=dict(batch_size=8, micro_batch_size=8, max_steps=2, lr=3e-4), n_natural=8,
            text_in_natural=4, stage2_natural=dict(batch_size=8, micro_batch_size=8, max_steps=2, lr=3e-4))
SCALES = {"full": FULL, "toy": TOY}


@contextlib.contextmanager
def zoo_at(folder: Path):
    """Point `minillava.zoo` at `folder` while building into it (stage 1 names its backbones by zoo name)."""
    old = os.environ.get("MINILLAVA_DATA")
    os.environ["MINILLAVA_DATA"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINILLAVA_DATA", None)
        else:
            os.environ["MINILLAVA_DATA"] = old


def hardware(device: torch.device) -> str:
    return f"{device_name(device)}, torch {torch.__version__}"


REBUILD = ("Rebuild: `python -m minillava.tools.build_zoo --out data` (fixed seeds); measure again: "
           "`python -m minillava.tools.build_zoo --out data --eval-only`.")


def write_card(folder: Path, title: str, summary: str, facts: dict, metrics: dict, rebuild: str = REBUILD,
               sections: dict | None = None) -> None:
    """README.md (a model card) + metrics.json + card.json (what `update_card` needs to rewrite it) in `folder`.
    Every number comes from this build. `rebuild`: how to make it again; `sections`: what each measurement is."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    text = (f"# {title}\n\n{summary}\n\n| | |\n|---|---|\n{rows}\n\n## Metrics\n\n"
            f"{_metrics_md(metrics, sections or SECTIONS)}\n\n{rebuild}\n")
    (folder / "README.md").write_text(text)
    write_json(folder / "metrics.json", metrics)
    write_json(folder / "card.json", {"title": title, "summary": summary, "facts": facts, "rebuild": rebuild,
                                      **({"sections": sections} if sections else {})})
    mark_written(folder, ["README.md", "metrics.json", "card.json"])  # the card is minillava's too


OTHER_TEMPLATES = ("llava_hf", "llava_llama_2", "chatml_direct")  # prompt sensitivity: the test VQA under these
SECTIONS = {  # what each measurement of `evaluate` is, for the model cards
    "text_qa_val": "The questions of held-out text-only chats, whose scene is told in words (\"In a picture there "
                   "is a large red circle at the top left ...\"), with no image (greedy, `vicuna_v1`): how well "
                   "the language model reasons about a scene it is told rather than shown.",
    "vqa_test": "Exact match and \"answer contains the reference\" on the held-out test scenes, with the trained "
                "`vicuna_v1` prompt (greedy; earlier turns given with their reference answers).",
    "vqa_test_short": "The short questions of the test split (`SHORT_TYPES`: not boxes, descriptions, changes or "
                      "false premises) with LLaVA-1.5's short-answer suffix (\"Answer the question using a single "
                      "word or phrase.\"), scored against the one-word answer (\"Circle\", \"3\").",
    "vqa_paraphrase": "Test scenes asked only with phrasings training never used (`PHRASINGS`' held-out half): "
                      "understanding a question, not recognising its wording.",
    "multiturn_test": "One question asked three ways on the same scene: first, as the fifth turn (the images at the "
                      "start), and as the fifth turn with an image attached at a later turn (earlier turns given "
                      "with their reference answers); `gap_points`: accuracy first minus accuracy fifth.",
    "pope_cooccur": "POPE on 300 test scenes drawn with the world's co-occurrence bias (`COOCCUR`, as COCO's "
                    "objects co-occur): popular = the most frequent objects, adversarial = those that co-occur most "
                    "with the ones present (POPE's definition).",
    "no_image": "Questions about an image asked with none given: the share answered by saying there is no image.",
    "vqa_redrawn": "The test questions on the same scenes painted by other code (`minillava.tools.redrawn`: other "
                   "backgrounds, shades, sizes, positions within the cell, image sizes 48-128 px); box questions "
                   "left out.",
    "vqa_compositional": "Scenes that always hold a colour-shape pair training never drew (purple star, orange "
                         "triangle).",
    "multi_image_test": "The two-image questions of the test split.",
    "pope_test": "POPE-style yes/no probes on 300 test images: absent objects drawn at random, among the most "
                 "frequent, or adversarially (those that co-occur most with the present ones; in this unbiased "
                 "split that is near chance, then the same shape in another colour).",
    "caption_test": "Captions of held-out test images (after stage 2 the model is asked \"Describe the image "
                    "briefly.\"; after stage 1, whose `plain` template drops the instruction, it is shown the image "
                    "alone): objects named that are in the scene (precision), objects in "
                    "the scene that are named (recall), and the size and position said for them.",
    **{f"vqa_test_{t}": f"The test questions prompted with `{t}` instead of the trained `vicuna_v1` (prompt "
                        "sensitivity)." for t in OTHER_TEMPLATES},
}


def _metrics_md(metrics: dict, sections: dict) -> str:
    """Metrics as Markdown: plain numbers in one table, then one table per evaluation (VQA by question type,
    POPE by strategy, or its flattened fields)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    plain = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    out = ["| metric | value |", "|---|---|", *(f"| {k} | {fmt(v)} |" for k, v in plain.items())]
    for name, v in metrics.items():
        if not isinstance(v, dict):
            continue
        out += ["", f"### {name}", ""] + ([sections[name], ""] if name in sections else [])
        if "by_type" in v:
            out += ["| question type | n | exact | contains |", "|---|---|---|---|"]
            out += [f"| {t} | {r['n']} | {r['exact']:.1%} | {r['contains']:.1%} |"
                    for t, r in {**v["by_type"], "**overall**": v["overall"]}.items()]
            if "by_variant" in v:  # the multiturn split: the same questions asked first, fifth, fifth + late image
                out += ["", "| asked | n | exact | points below first |", "|---|---|---|---|"]
                out += [f"| {k} | {r['overall']['n']} | {r['overall']['exact']:.1%} | "
                        f"{v['gap_points'].get(k, 0.0):+.1f} |" for k, r in v["by_variant"].items()]
        elif "pope" in v:
            out += ["| negatives | n | accuracy | precision | recall | F1 | yes-ratio |", "|---" * 7 + "|"]
            out += [f"| {k} | {r['n']} | {r['accuracy']:.1%} | {r['precision']:.1%} | {r['recall']:.1%} | "
                    f"{r['f1']:.1%} | {r['yes_ratio']:.1%} |" for k, r in v["pope"].items()]
        else:
            out += ["| metric | value |", "|---|---|", *(f"| {k} | {fmt(x)} |" for k, x in _flatten(v).items())]
    return "\n".join(out)


def update_card(folder: Path, metrics: dict, sections: dict | None = None) -> None:
    """Merge `metrics` (and the texts of `sections`) into a card written by `write_card` and render it again."""
    card = read_json(folder / "card.json", what="model card")
    old = read_json(folder / "metrics.json", what="model metrics")
    write_card(folder, card["title"], card["summary"], card["facts"], {**old, **metrics},
               card.get("rebuild", REBUILD), {**card.get("sections", {}), **(sections or {})} or None)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


CLIP_METRICS = ("Zero-shot accuracy on single-object test scenes: the prompts of a class are every object phrase "
                "with it, their probabilities summed (`_mean_ensemble`: their embeddings averaged, as CLIP's "
                "prompt ensembles are; see `pretrain.zero_shot_probs`).")


def clip_metrics(clip, tokenizer, image_size: int, captions_test: list, n: int = 600, seed: int = 1234) -> dict:
    """Zero-shot colour and shape accuracy on `n` single-object test scenes, the prompts of a class being every
    object phrase of the world with it ("a large red circle at the top left", ...), marginalised over (and,
    for comparison, averaged as CLIP's prompt ensembles are: `pretrain.zero_shot_probs`); image-to-text
    retrieval R@1 on `captions_test` records."""
    rng = np.random.default_rng(seed)
    scenes = [sw.sample_scene(rng, n_objects=1, image_size=image_size) for _ in range(n)]
    pixels = pt.render_pixels([sw.render(s) for s in scenes], image_size)
    metrics = {}
    for ensemble, suffix in (("marginal", ""), ("mean", "_mean_ensemble")):
        for attr, values, name in (("color", sw.COLORS, "color"), ("shape", sw.SHAPES, "shape")):
            labels = [getattr(s.objects[0], attr) for s in scenes]
            metrics[f"zero_shot_{name}_acc{suffix}"] = pt.zero_shot(clip, tokenizer, pixels, labels,
                                                                    sw.object_prompts(attr, values), ensemble)
    metrics["n_single_object_images"] = n
    metrics["retrieval_r1_test"] = pt.retrieval_at_1(
        clip, tokenizer, pt.render_pixels([r.images[0] for r in captions_test], image_size),
        [r.messages[1]["content"] for r in captions_test])
    return metrics


def lm_corpus(text_chats: list, captions: list, n_docs: int, per_doc: int = 8) -> list[str]:
    """The LM's pretraining text: the text-only chats in `vicuna_v1`, plus `n_docs` documents of captions, one
    a line. The captions teach nothing new about the world; they are there because a real LM has read text in
    many forms, and LLaVA's stage 1 (the `plain` template: image, caption, newline) needs an LM that ends a
    caption with a newline on its own."""
    lines = [r.messages[1]["content"] for r in captions]
    docs = ["".join(f"{c}\n" for c in lines[i:i + per_doc]) for i in range(0, min(len(lines), n_docs * per_doc),
                                                                       per_doc)]
    return pt.chat_texts(text_chats) + docs


STEPS = TINY  # tiny-clip, tiny-lm, tiny-llava-stage1, tiny-llava: the build order


def build(out: str | Path = "data", scale: Scale = FULL, work: str | Path = "build/shapesworld", seed: int = 0,
          progress: bool = True, device: str | None = None, evaluate_after: bool = True,
          start: str = "tiny-clip", from_round: int = 1) -> dict:
    """Build the components into `out`, from `start` on (the earlier ones are kept: "tiny-llava" retrains stage 2
    alone; with `from_round` K, stage 2's rounds from K on, from the tiny-llava in `out`), then (unless
    `evaluate_after` is False) evaluate them; returns every metric. Minutes on one GPU at FULL scale, hours on 2
    CPU cores."""
    if from_round > 1 and start != "tiny-llava":
        raise ValueError(f"from_round {from_round}: only with start 'tiny-llava' (it continues stage 2)")
    if start not in STEPS:
        raise ValueError(f"start '{start}': expected one of {', '.join(STEPS)}")
    out, work, dev = Path(out), Path(work), pick_device(device)
    steps = STEPS[STEPS.index(start):]
    summary = read_json(out / "zoo_build.json", what="zoo build summary") if start != STEPS[0] else {}
    _check_kept(summary, scale, seed, STEPS[:STEPS.index(start)])
    for name in steps:  # before hours of training: each folder to rebuild must be one minillava wrote
        check_replaceable(out / name, "config.json", f"zoo component '{name}'")
    times = summary.setdefault("seconds", {})
    t_all = time.perf_counter()
    torch.manual_seed(seed)
    if tuple(steps) == ("tiny-llava",) and from_round > 1 + (scale.fresh_rounds if scale.n_fresh else 0):
        manifest, data, corpus = {"splits": summary.get("data")}, {}, []  # natural rounds alone: their own data
    else:
        manifest = build_data(work, scale, seed)
        data = {name: load_records(work / f"{name}.json", check_files=not name.startswith("text"))
                for name in ("captions_train", "captions_test", "text_train", "text_val", "instruct_train")}
        data["instruct_fresh"] = data["instruct_train"][scale.n_train:]  # stage 2's later rounds alone
        for name in ("captions_train", "instruct_train"):
            data[name] = data[name][: scale.n_train]
        corpus = lm_corpus(data["text_train"], data["captions_train"], scale.caption_docs)
    times["data"] = time.perf_counter() - t_all
    if "tiny-clip" in steps:  # the tokenizer is made with tiny-clip and shared by tiny-lm
        tokenizer = pt.train_tokenizer(corpus + pt.chat_texts(data["instruct_train"]), scale.vocab,
                                       max_length=scale.lm.context)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(out / "tiny-clip"))
    jobs = {"tiny-clip": lambda: build_clip(out, scale, data, tokenizer, dev, progress),
            "tiny-lm": lambda: build_lm(out, scale, data, corpus, tokenizer, dev, progress),
            "tiny-llava-stage1": lambda: build_stage1(out, scale, work, data, seed, dev, progress),
            "tiny-llava": lambda: build_stage2(out, scale, work, data, seed, dev, progress, from_round)}
    with zoo_at(out):  # stage 1 names its backbones by zoo name
        for name in steps:
            t = time.perf_counter()
            summary[name] = jobs[name]()
            times[name] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    kept_hw = summary.get("hardware") or {}
    if isinstance(kept_hw, str):  # an older summary: one machine for all
        kept_hw = dict.fromkeys(STEPS[:STEPS.index(start)], kept_hw)
    summary.update(hardware={**kept_hw, **dict.fromkeys(steps, hardware(dev))}, data=manifest["splits"],
                   scale=asdict(scale), seed=seed, rebuilt=list(steps))  # seconds["total"]: this run's
    write_json(out / "zoo_build.json", summary)
    print(f"zoo built ({', '.join(steps)}) in " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f" -> {out}")
    if evaluate_after:
        summary.update(evaluate(out, scale, work, seed, progress, device))
    return summary


_MADE_FROM = {"tiny-clip": ("n_train", "n_val", "n_test", "n_comp", "vocab", "clip"),
              "tiny-lm": ("n_text", "caption_docs", "lm"), "tiny-llava-stage1": ("stage1",)}


def _check_kept(summary: dict, scale: Scale, seed: int, kept: tuple) -> None:
    """Refuse to build on kept components that another scale or seed made (their settings are in the summary)."""
    old, new = summary.get("scale", {}), asdict(scale)
    differ = [f"{k} ({old.get(k)!r} there, {new[k]!r} now)" for name in kept for k in _MADE_FROM[name]
              if old.get(k) != new[k]]
    if kept and summary.get("seed", seed) != seed:
        differ.append(f"seed ({summary['seed']} there, {seed} now)")
    if differ:
        raise ValueError(f"cannot build on the kept {', '.join(kept)}: they were made with other settings: "
                         f"{'; '.join(differ)}. Rebuild from an earlier --start.")


def build_clip(out: Path, scale: Scale, data: dict, tokenizer, dev: torch.device, progress: bool) -> dict:
    """Train, measure and save tiny-clip (with the tokenizer); returns its metrics."""
    captions = data["captions_train"]
    pixels = pt.render_pixels([p for r in captions for p in r.images], scale.clip.image_size)
    clip, run = pt.train_clip(pixels, [r.messages[1]["content"] for r in captions], tokenizer, scale.clip,
                              progress, dev)
    del pixels
    metrics = clip_metrics(clip, tokenizer, scale.clip.image_size, data["captions_test"], n=clip_eval_n(scale))
    print(f"tiny-clip: {metrics}")
    with atomic_dir(out / "tiny-clip", marker="config.json") as tmp:
        clip.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_card(tmp, "tiny-clip", "A transformers `CLIPModel` (vision + text towers) trained contrastively on "
                   "ShapesWorld image-caption pairs, with one hard negative caption per image (NegCLIP); "
                   "minillava's stand-in for CLIP ViT-L/14-336. " + CLIP_METRICS,
                   {"parameters": f"{sum(p.numel() for p in clip.parameters()):,}",
                    "vision": f"{scale.clip.image_size} px, patch {scale.clip.patch_size}, width {scale.clip.width}, "
                              f"{scale.clip.layers} layers", "training pairs": len(captions),
                    "steps x batch": f"{scale.clip.steps} x {scale.clip.batch_size}",
                    "train time": f"{run['train_seconds']:.0f} s", "hardware": hardware(dev)}, metrics)
    return metrics


def clip_eval_n(scale: Scale) -> int:
    """How many single-object scenes the zero-shot accuracies are measured on."""
    return 600 if scale.n_eval is None else 12


def build_lm(out: Path, scale: Scale, data: dict, corpus: list[str], tokenizer, dev: torch.device,
             progress: bool) -> dict:
    """Train, measure and save tiny-lm; returns its metrics."""
    lm, run = pt.train_lm(corpus, tokenizer, scale.lm, progress, device=dev)
    sft, sft_facts, c = [], {}, scale.lm
    if c.sft_steps:
        lm, r = pt.chat_sft(lm, tokenizer, data["text_train"], c, progress, device=dev)
        sft, sft_facts = [r], {"chat fine-tuning": f"{c.sft_steps} x {c.sft_batch_size} chats, lr {c.sft_lr:g}, "
                                                   f"answers only, weight {c.sft_weight:g}"}
    metrics = {"perplexity_text_val": pt.perplexity(lm, tokenizer, pt.chat_texts(data["text_val"]),
                                                    scale.lm.context)}
    print(f"tiny-lm: {metrics}")
    with atomic_dir(out / "tiny-lm", marker="config.json") as tmp:
        lm.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_card(tmp, "tiny-lm", "A transformers `LlamaForCausalLM` pretrained on ShapesWorld's text-only chats in "
                   "the `vicuna_v1` template (and some plain captions, one a line)"
                   + (", then fine-tuned on the chats with the loss on the answers alone" if sft else "")
                   + ", with its byte-level BPE tokenizer; minillava's stand-in for Vicuna.",
                   {"parameters": f"{sum(p.numel() for p in lm.parameters()):,}",
                    "shape": f"width {scale.lm.width}, {scale.lm.layers} layers, {scale.lm.heads} heads "
                             f"({scale.lm.kv_heads} kv), context {scale.lm.context}",
                    "vocabulary": len(tokenizer), "training documents": len(corpus),
                    "steps x batch": f"{scale.lm.steps} x {scale.lm.batch_size}", **sft_facts,
                    "train time": " + ".join(f"{r['train_seconds']:.0f} s" for r in (run, *sft)),
                    "hardware": hardware(dev)}, metrics)
    return metrics


def build_stage1(out: Path, scale: Scale, work: Path, data: dict, seed: int, dev: torch.device,
                 progress: bool) -> dict:
    """LLaVA's stage 1 (feature alignment) from the zoo's tiny-clip and tiny-lm -> tiny-llava-stage1."""
    save_records(data["captions_train"], work / "captions_stage1.json", image_dir=work)  # the first n_train
    s1 = train(TrainConfig(stage=1, data=str(work / "captions_stage1.json"), out=str(out / "tiny-llava-stage1"),
                           vision="tiny-clip", lm="tiny-lm", seed=seed, progress=progress, device=str(dev),
                           **scale.stage1))
    model1, _ = load_stage1(s1.out, template="plain", aspect="square")
    write_card(s1.out, "tiny-llava-stage1", "The projector after LLaVA's stage 1 (feature alignment): trained "
               "on ShapesWorld captions with the `plain` template, vision tower and LM frozen. Holds the "
               "projector alone; its backbones are the zoo's `tiny-clip` and `tiny-lm`.",
               {"projector": model1.projector.kind, "steps": s1.steps, "train time": f"{s1.seconds:.0f} s",
                "hardware": hardware(dev), **scale.stage1}, {"final_train_loss": s1.final_loss})
    return {"final_train_loss": s1.final_loss}


def build_stage2(out: Path, scale: Scale, work: Path, data: dict, seed: int, dev: torch.device,
                 progress: bool, from_round: int = 1) -> dict:
    """LLaVA's stage 2 (visual instruction tuning) from tiny-llava-stage1, with some text-only chats mixed in
    as llava_v1_5_mix665k has -> tiny-llava, stored in float16. In rounds: `stage2` (several epochs over the
    scenes stage 1 saw), then, when `n_fresh`, `fresh_rounds` rounds of `stage2_fresh`, each from where the last
    ended and one pass over its share of new scenes at a lower learning rate (new scenes teach what more epochs
    of the same ones no longer do), then `natural_rounds` natural-use rounds (`natural_round`), each on scenes of
    its own, at `stage2_natural`'s settings. `from_round` > 1 trains the
    rounds from that one on, starting from the tiny-llava in `out` (which must have exactly the rounds before)."""
    rounds = [("mix_train", lambda: data["instruct_train"] + data["text_train"][: scale.text_in_stage2],
               scale.stage2)]  # (name, records, settings); the records are written as <work>/<name>.json
    fresh, n = data.get("instruct_fresh", []), scale.fresh_rounds if scale.n_fresh else 0
    for k in range(n):  # round k's share: fresh scenes [k/n, (k+1)/n) of the way through
        rounds.append((f"mix_fresh{k + 1}", lambda k=k: fresh[k * len(fresh) // n:(k + 1) * len(fresh) // n]
                       + data["text_train"][: scale.text_in_fresh], scale.stage2_fresh))
    for k in range(scale.natural_rounds if scale.n_natural else 0):
        rounds.append((f"../{natural_folder(work, k).name}/mix_natural",
                       lambda k=k: natural_round(work, scale, seed, k), scale.stage2_natural))  # beside its images
    init, facts, steps, notes = out / "tiny-llava-stage1", [], [], {}
    if from_round > 1:
        card = read_json(out / "tiny-llava" / "card.json", what="model card")
        facts = [card["facts"][f"round {i}"] for i in range(1, from_round)]  # KeyError: not that many rounds
        steps = card["facts"]["steps"].split(" + ")[: from_round - 1]
        notes = {k: v for k, v in card["facts"].items() if k != "steps" and not k.startswith("round ")}
        init = work.parent / f"{work.name}-stage2-round{from_round - 1}"  # a copy: `out` is replaced at the end
        if init.exists():
            shutil.rmtree(init)
        shutil.copytree(out / "tiny-llava", init)
    for i, (name, make, settings) in enumerate(rounds):
        if i + 1 < from_round:
            continue
        mix = make()
        path = Path(os.path.normpath(work / f"{name}.json"))
        save_records(mix, path, image_dir=path.parent)
        dest = out / "tiny-llava" if i == len(rounds) - 1 else work / f"stage2-round{i + 1}"
        r = train(TrainConfig(stage=2, data=str(path), out=str(dest), init=str(init), seed=seed,
                              progress=progress, device=str(dev), **settings))
        store_half(r.out)  # each round starts from the weights as a shipped checkpoint holds them
        if i:  # the final run.json holds the earlier rounds' runs too
            run = read_json(r.out / "run.json", what="training run")
            earlier = read_json(init / "run.json", what="training run")
            write_json(r.out / "run.json", {**run, "earlier_rounds": [*earlier.pop("earlier_rounds", []), earlier]})
        init = r.out
        facts.append(", ".join(f"{k} {v}" for k, v in {"records": len(mix), "steps": r.steps,
                                                       "train time": f"{r.seconds:.0f} s", "hardware": hardware(dev),
                                                       **settings}.items()))
        steps.append(str(r.steps))
    write_stage2_card(out / "tiny-llava", facts, steps, r.final_loss,
                      natural=scale.natural_rounds if scale.n_natural else 0, notes=notes)
    return {"final_train_loss": r.final_loss}


def natural_folder(work: Path, k: int) -> Path:
    """Where natural-use round `k` (0-based) keeps its data: `<work>-natural`, `<work>-natural2`, ..."""
    return work.parent / f"{work.name}-natural{k + 1 if k else ''}"


def natural_round(work: Path, scale: Scale, seed: int, k: int = 0) -> list:
    """Natural-use round `k`'s records: `n_natural` new train scenes drawn with the world's co-occurrence bias
    (as COCO's objects co-occur) and asked in the natural-use mix (`NATURAL_WEIGHTS`: more follow-ups and
    named comparisons, long chats with one image or two, image questions asked of no image; the short-answer
    suffix on `natural_short_p` of the short questions; the training phrasings and `MORE_PHRASINGS`), plus its
    own text-only chats; built in `natural_folder(work, k)` with seed + 1 + k, so no scene repeats an earlier
    round's."""
    folder = natural_folder(work, k)
    sw.ensure_built(folder, n_train=scale.n_natural, n_val=0, n_test=0, n_comp=0, n_para=0, n_multiturn=0,
                    n_cooccur=0, n_text=scale.text_in_natural, n_text_val=0, seed=seed + 1 + k,
                    image_size=scale.clip.image_size, cooccur=sw.COOCCUR_P, weights=sw.NATURAL_WEIGHTS,
                    short_p=scale.natural_short_p, more_phrasings=True, **answer_form(scale))
    return load_records(folder / "instruct_train.json") + load_records(folder / "text_train.json",
                                                                       check_files=False)


def natural_mix(work: Path, scale: Scale, seed: int, k: int = 0) -> Path:
    """Natural-use round `k`'s training file, `natural_folder(work, k)/mix_natural.json` beside its images, as the
    round trained on it (the round's data folder built if missing, the file written again; nothing is trained)."""
    path = natural_folder(work, k) / "mix_natural.json"
    save_records(natural_round(work, scale, seed, k), path, image_dir=path.parent)
    return path


def write_stage2_card(folder: Path, rounds: list[str], steps: list[str], final_loss: float,
                      natural: int = 1, notes: dict | None = None) -> None:
    """tiny-llava's model card; `rounds`: the settings and measurements of each round of stage 2, as text;
    the last `natural` of them are natural-use rounds; `notes`: more facts (a rebuild from a later round keeps
    the card's notes about the earlier ones)."""
    facts = {f"round {i + 1}": r for i, r in enumerate(rounds)} | (notes or {})
    later = len(rounds) - 1 - natural
    how = (f", in {len(rounds)} rounds: several epochs over the scenes stage 1 saw, then "
           + ("one pass over new scenes" if later == 1 else f"{later} more, each one pass over scenes no round saw "
              "before,") + " at a lower learning rate") if later > 0 else ""
    last = "a last round" if natural == 1 else f"{natural} last rounds"
    how += (f", and {last} on natural use (new scenes with the world's co-occurrence bias, asked with "
            "follow-ups, named comparisons, long chats, false premises and questions of no image, in the natural-use "
            "mix)" if natural else "")
    write_card(folder, "tiny-llava", "The tiny LLaVA after stage 2 (visual instruction tuning, `vicuna_v1`): "
               "tiny-clip's tower (frozen), the stage-1 projector and tiny-lm, projector and LM trained on "
               f"ShapesWorld instructions plus some text-only chats{how}; weights stored in float16 "
               "(`store_half`). Accuracy is measured with `minillava.eval` on held-out test scenes (greedy "
               "decoding, teacher-forced history, float32 compute).",
               {"steps": " + ".join(steps), **facts}, {"final_train_loss": final_loss})


def store_half(folder: Path) -> None:
    """Rewrite a minillava model's weights in float16, as LLaVA's own checkpoints are stored: half the bytes
    (the zoo stays near 30 MB); `LlavaModel.from_pretrained` casts them back to the compute dtype (float32 on a
    CPU). The model is measured after this, so its card describes the weights as shipped."""
    path = folder / "model.safetensors"
    tensors = load_tensors(path)
    save_tensors({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, path,
                 metadata={"format": "pt"})


def answer_form(scale: Scale) -> dict:
    """How `scale` has named comparisons answered, as the generator's arguments (`sw.generate_records`)."""
    return dict(reasoned=scale.reasoned, rows=scale.rows, value_first=scale.value_first, value_led=scale.value_led)


def build_data(work: Path, scale: Scale, seed: int) -> dict:
    """The ShapesWorld datasets of `scale` in `work` (reused when `work` already holds exactly them)."""
    return sw.ensure_built(work, n_train=scale.n_train + scale.n_fresh, n_val=scale.n_val, n_test=scale.n_test,
                           n_comp=scale.n_comp, n_text=scale.n_text, n_text_val=scale.n_text_val, seed=seed,
                           image_size=scale.clip.image_size, n_para=scale.n_para, n_multiturn=scale.n_multiturn,
                           n_cooccur=scale.n_cooccur, **answer_form(scale))


def eval_data(work: Path, scale: Scale, seed: int) -> dict:
    """The held-out splits that `evaluate` reads: those of the full build in `work` when it holds them, else a
    build of them alone (no train scenes nor train chats: every split is generated on its own, so its files are
    the same either way)."""
    held_out = dict(n_val=scale.n_val, n_test=scale.n_test, n_comp=scale.n_comp, n_text_val=scale.n_text_val,
                    seed=seed, image_size=scale.clip.image_size, n_para=scale.n_para, n_multiturn=scale.n_multiturn,
                    n_cooccur=scale.n_cooccur, **answer_form(scale))
    return sw.built_with(work, **held_out) or sw.ensure_built(work, n_train=0, n_text=0, **held_out)


EVALUATIONS = ("clip_zero_shot", "lm_text_qa_val", "stage1_caption_test", "text_qa_val", "vqa_test", "vqa_test_short",
               "vqa_compositional", "multi_image_test", "pope_test", "caption_test",
               *(f"vqa_test_{t}" for t in OTHER_TEMPLATES), "vqa_paraphrase", "multiturn_test", "pope_cooccur",
               "no_image", "vqa_redrawn")


def evaluate(out: str | Path = "data", scale: Scale = FULL, work: str | Path = "build/shapesworld", seed: int = 0,
             progress: bool = True, device: str | None = None, only: list[str] | None = None) -> dict:
    """Measure the built zoo on the held-out splits and write the numbers into the model cards and
    `zoo_build.json`: tiny-clip's zero-shot accuracy and retrieval (`clip_metrics`); scenes told in words
    (held-out text-only chats) answered by tiny-lm and by the stage-2 model, which separates reasoning from
    seeing; stage-1 captions; VQA exact match per question type (test, with and without LLaVA's short-answer
    suffix; compositional), multi-image accuracy, POPE (random/popular/adversarial) and caption
    precision/recall of the stage-2 model, and the test VQA prompted with `OTHER_TEMPLATES` instead of the
    trained `vicuna_v1` (prompt sensitivity).
    `only`: some of `EVALUATIONS` (the others are kept)."""
    out, work, only = Path(out), Path(work), list(only or EVALUATIONS)
    unknown = [k for k in only if k not in EVALUATIONS]
    if unknown:
        raise ValueError(f"unknown evaluation(s) {unknown}; known: {', '.join(EVALUATIONS)}")
    eval_data(work, scale, seed)
    t = time.perf_counter()
    summary = read_json(out / "zoo_build.json", what="zoo build summary")
    if "clip_zero_shot" in only:
        from transformers import AutoTokenizer, CLIPModel

        clip = CLIPModel.from_pretrained(str(out / "tiny-clip")).eval()
        m = clip_metrics(clip, AutoTokenizer.from_pretrained(str(out / "tiny-clip")), scale.clip.image_size,
                         load_records(work / "captions_test.json"), n=clip_eval_n(scale))
        print(f"tiny-clip: {m}")
        update_card(out / "tiny-clip", m)
        summary["tiny-clip"] = {**summary.get("tiny-clip", {}), **m}
    if "lm_text_qa_val" in only:  # stage 1 trains the projector alone: tiny-llava-stage1 holds tiny-lm unchanged
        with zoo_at(out):
            model0, proc0 = load_stage1(out / "tiny-llava-stage1", template="vicuna_v1")
        r = sw.evaluate(model0.to(pick_device(device)), proc0, told_scenes(work, scale), "vqa", progress=progress)
        print(f"tiny-lm, text_qa_val:\n{r['table']}")
        told = {k: r[k] for k in ("overall", "by_type")}
        update_card(out / "tiny-lm", {"text_qa_val": told})
        summary["tiny-lm"] = {**summary.get("tiny-lm", {}), "text_qa_val": told}
    if "stage1_caption_test" in only:
        with zoo_at(out):
            model1, proc1 = load_stage1(out / "tiny-llava-stage1", template="plain", aspect="square")
        caps = load_records(work / "captions_test.json")[: scale.n_eval or 300]
        cap = sw.evaluate(model1.to(pick_device(device)), proc1, caps, "caption", progress=progress)
        update_card(out / "tiny-llava-stage1", {"caption_test": cap["caption"], "examples": cap["examples"][:5]})
        summary["tiny-llava-stage1"] = {**summary.get("tiny-llava-stage1", {}), "caption_test": cap["caption"]}
        print(f"tiny-llava-stage1 captions:\n{cap['table']}")

    if set(only) - {"clip_zero_shot", "lm_text_qa_val", "stage1_caption_test"}:
        summary["tiny-llava"] = {**summary.get("tiny-llava", {}), **_evaluate_stage2(out, scale, work, seed,
                                                                                     progress, device, only)}
    summary["eval_seconds"] = time.perf_counter() - t  # of the last measurement run
    write_json(out / "zoo_build.json", summary)
    return {k: summary[k] for k in ("tiny-clip", "tiny-lm", "tiny-llava-stage1", "tiny-llava", "eval_seconds")
            if k in summary}


def told_scenes(work: Path, scale: Scale) -> list:
    """The held-out text-only chats that tell a scene in words (not the world-fact ones): `text_qa_val`'s records."""
    recs = load_records(work / "text_val.json", check_files=False)
    return [r for r in recs if r.meta.get("kind") == "text"][: scale.n_eval]


def _evaluate_stage2(out: Path, scale: Scale, work: Path, seed: int, progress: bool, device: str | None,
                     only: list[str]) -> dict:
    """The measurements of tiny-llava named in `only`, written into its card; returns them."""
    model, processor = load(out / "tiny-llava", device=device, dtype=torch.float32)  # as on a CPU
    test = load_records(work / "instruct_test.json")[: scale.n_eval]
    comp = load_records(work / "instruct_compositional.json")[: scale.n_eval]
    split = lambda name: load_records(work / f"instruct_{name}.json")[: scale.n_eval]  # noqa: E731
    runs = {"vqa_test": (test, "vqa", ""), "vqa_test_short": (sw.short_answer_records(test), "vqa", ""),
            "vqa_compositional": (comp, "vqa", ""), "multi_image_test": (test, "multi-image", ""),
            "pope_test": (test[:300], "pope", ""), "caption_test": (test, "caption", ""),
            "text_qa_val": (told_scenes(work, scale), "vqa", ""),
            **{f"vqa_test_{t}": (test, "vqa", "", t) for t in OTHER_TEMPLATES},
            "vqa_paraphrase": (lambda: split("paraphrase"), "vqa", ""),
            "multiturn_test": (lambda: split("multiturn"), "multiturn", ""),
            "pope_cooccur": (lambda: split("cooccur")[:300], "pope", "")}
    metrics = {}
    if "no_image" in only:
        metrics["no_image"] = r = sw.no_image(model, processor, progress=progress)
        print(f"tiny-llava, no_image: {r['says_no_image']:.1%} say there is no image")
    if "vqa_redrawn" in only:
        from .redrawn import evaluate as redrawn

        r = redrawn(model, processor, test, seed=seed, progress=progress)
        print(f"tiny-llava, vqa_redrawn:\n{r['table']}")
        metrics["vqa_redrawn"] = {k: r[k] for k in ("overall", "by_type")}
    for name, (recs, kind, suffix, *template) in runs.items():
        if name not in only:
            continue
        recs = recs() if callable(recs) else recs
        if name == "multi_image_test" and not any(len(r.images) > 1 for r in recs):
            print("tiny-llava, multi_image_test: skipped, no two-image record among the test records")
            continue
        proc = processor.with_template(template[0]) if template else processor
        r = sw.evaluate(model, proc, recs, kind, suffix, progress=progress, seed=seed)
        print(f"tiny-llava, {name}:\n{r['table']}")
        metrics[name] = {k: r[k] for k in ("overall", "by_type", "pope", "caption", "by_variant", "gap_points")
                         if k in r}
    update_card(out / "tiny-llava", metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m minillava.tools.build_zoo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data")
    p.add_argument("--work", default="build/shapesworld")
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--no-eval", action="store_true", help="train only; measure later with --eval-only")
    p.add_argument("--start", choices=STEPS, default=STEPS[0],
                   help="rebuild from this component on, keeping the earlier ones in --out")
    p.add_argument("--from-round", type=int, default=1,
                   help="with --start tiny-llava: train stage 2's rounds from this one on, from the tiny-llava in "
                        "--out (the shipped model's last round: `--from-round 13`)")
    p.add_argument("--eval-only", action="store_true", help="measure the weights already in --out")
    p.add_argument("--only", nargs="+", choices=EVALUATIONS, help="with --eval-only: these measurements only")
    p.add_argument("--natural-data", type=int, metavar="K",
                   help="build natural-use round K's records only (K=9: <work>-natural9/mix_natural.json, which "
                        "`make tower-ablation` retrains on), and train nothing")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.natural_data is not None:
        scale = SCALES[a.scale]
        if not 1 <= a.natural_data <= scale.natural_rounds:
            p.error(f"--natural-data: scale {a.scale} has natural-use rounds 1 to {scale.natural_rounds}, "
                    f"got {a.natural_data}")
        path = natural_mix(Path(a.work), scale, a.seed, a.natural_data - 1)
        print(f"natural-use round {a.natural_data}: {path}")
        return {"natural_data": str(path)}
    if a.only and not a.eval_only:
        p.error("--only goes with --eval-only")
    if a.eval_only and (a.no_eval or a.start != STEPS[0]):
        p.error("--eval-only trains nothing: --no-eval and --start do not apply")
    if a.eval_only:
        return evaluate(a.out, SCALES[a.scale], a.work, a.seed, not a.no_progress, a.device, a.only)
    return build(a.out, SCALES[a.scale], a.work, a.seed, not a.no_progress, a.device, not a.no_eval, a.start,
                 a.from_round)


if __name__ == "__main__":
    summary = main()
    if "natural_data" not in summary:
        print(json.dumps(summary.get("seconds") or {"eval": summary.get("eval_seconds")}, indent=1))
