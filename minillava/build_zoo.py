"""Rebuild every shipped component from scratch, with fixed seeds: `python -m minillava.build_zoo --out data`.

1. ShapesWorld datasets (images + LLaVA JSON) in a work folder;
2. the tokenizer, the tiny CLIP and the tiny chat LM (`pretrain.py`), each evaluated;
3. LLaVA's two stages with `train.py`: `tiny-llava-stage1` (projector only) and `tiny-llava`;
4. evaluation of the tiny LLaVA, and a model card (README.md + metrics.json) per component.

`--scale toy` runs the same pipeline at toy size in seconds (the test suite does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import eval as ev
from . import pretrain as pt
from .data import shapesworld as sw
from .data.records import load_records, save_records
from .train import TrainConfig, load_stage1, train
from .utils import atomic_dir, write_json


@dataclass
class Scale:
    """How big everything is. FULL is what ships; TOY checks the pipeline in seconds."""

    n_train: int = 8000
    n_val: int = 500
    n_test: int = 1000
    n_comp: int = 500
    n_text: int = 20000
    n_text_val: int = 1000
    vocab: int = 1024
    clip: pt.ClipConfig = field(default_factory=pt.ClipConfig)
    lm: pt.LMConfig = field(default_factory=pt.LMConfig)
    stage1: dict = field(default_factory=lambda: dict(batch_size=32, micro_batch_size=32, epochs=1.0, lr=1e-3))
    stage2: dict = field(default_factory=lambda: dict(batch_size=32, micro_batch_size=16, epochs=2.0, lr=1e-3))
    text_in_stage2: int = 2000  # text-only chats mixed into stage 2, as llava_v1_5_mix665k has
    n_eval: int | None = None  # evaluate on this many test records (None: all)


FULL = Scale()
TOY = Scale(n_train=24, n_val=4, n_test=8, n_comp=4, n_text=64, n_text_val=8, vocab=400,
            clip=pt.ClipConfig(width=32, layers=1, heads=2, text_width=32, text_layers=1, projection=32, steps=2,
                               batch_size=8),
            lm=pt.LMConfig(width=32, layers=1, heads=2, kv_heads=1, ffn=64, steps=2, batch_size=4),
            stage1=dict(batch_size=8, micro_batch_size=8, max_steps=2, lr=1e-3),
            stage2=dict(batch_size=8, micro_batch_size=8, max_steps=2, lr=1e-3), text_in_stage2=4, n_eval=4)
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


def hardware() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_card(folder: Path, title: str, summary: str, facts: dict, metrics: dict) -> None:
    """README.md (a model card) + metrics.json in `folder`. Every number comes from this build."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    mrows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in
                      _flatten(metrics).items())
    text = (f"# {title}\n\n{summary}\n\n| | |\n|---|---|\n{rows}\n\n## Metrics\n\n| metric | value |\n|---|---|\n"
            f"{mrows}\n\nRebuild: `python -m minillava.build_zoo --out data` (fixed seeds).\n")
    (folder / "README.md").write_text(text)
    write_json(folder / "metrics.json", metrics)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def clip_metrics(clip, tokenizer, image_size: int, n: int = 600, seed: int = 1234) -> dict:
    """Zero-shot colour and shape accuracy on single-object test scenes, with prompt ensembles over the other
    attributes ("a large red circle at the top left", ...), and image-to-text retrieval R@1 on test captions."""
    rng = np.random.default_rng(seed)
    scenes = [sw.sample_scene(rng, n_objects=1, image_size=image_size) for _ in range(n)]
    pixels = pt.render_pixels([sw.render(s) for s in scenes], image_size)

    def prompts(attr: str, values) -> dict:
        out = {}
        for v in values:
            objs = [sw.Obj(s, c, z, (r, q)) for s in sw.SHAPES for c in sw.COLORS for z in sw.SIZES
                    for r in range(3) for q in range(3) if {"shape": s, "color": c}[attr] == v]
            out[v] = [f"{sw._cap(o.phrase())}." for o in objs]
        return out

    colour = pt.zero_shot(clip, tokenizer, pixels, [s.objects[0].color for s in scenes], prompts("color", sw.COLORS))
    shape = pt.zero_shot(clip, tokenizer, pixels, [s.objects[0].shape for s in scenes], prompts("shape", sw.SHAPES))
    return {"zero_shot_color_acc": colour, "zero_shot_shape_acc": shape, "n_single_object_images": n}


def build(out: str | Path = "data", scale: Scale = FULL, work: str | Path = "build/shapesworld", seed: int = 0,
          progress: bool = True) -> dict:
    """Build all four components into `out`; returns every metric. Takes minutes at FULL scale on 2 cores."""
    out, work = Path(out), Path(work)
    t_all = time.perf_counter()
    times = {}
    torch.manual_seed(seed)

    t = time.perf_counter()
    manifest = sw.build(work, scale.n_train, scale.n_val, scale.n_test, scale.n_comp, scale.n_text,
                        scale.n_text_val, seed=seed, image_size=scale.clip.image_size)
    times["data"] = time.perf_counter() - t
    captions = load_records(work / "captions_train.json")
    text_train = load_records(work / "text_train.json", check_files=False)
    text_val = load_records(work / "text_val.json", check_files=False)
    instruct = load_records(work / "instruct_train.json")

    # ---- tokenizer and tiny CLIP
    t = time.perf_counter()
    corpus = pt.chat_texts(text_train) + pt.chat_texts(instruct) + [r.messages[1]["content"] for r in captions]
    tokenizer = pt.train_tokenizer(corpus, scale.vocab, max_length=scale.lm.context)
    pixels = pt.render_pixels([p for r in captions for p in r.images], scale.clip.image_size)
    clip, clip_run = pt.train_clip(pixels, [r.messages[1]["content"] for r in captions], tokenizer, scale.clip,
                                   progress)
    test_caps = load_records(work / "captions_test.json")
    clip_eval = clip_metrics(clip, tokenizer, scale.clip.image_size, n=600 if scale is FULL else 12)
    clip_eval["retrieval_r1_test"] = pt.retrieval_at_1(
        clip, tokenizer, pt.render_pixels([r.images[0] for r in test_caps], scale.clip.image_size),
        [r.messages[1]["content"] for r in test_caps])
    with atomic_dir(out / "tiny-clip") as tmp:
        clip.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_card(tmp, "tiny-clip", "A transformers `CLIPModel` (vision + text towers) trained contrastively on "
                   "ShapesWorld image-caption pairs; minillava's stand-in for CLIP ViT-L/14-336.",
                   {"parameters": f"{sum(p.numel() for p in clip.parameters()):,}",
                    "vision": f"{scale.clip.image_size} px, patch {scale.clip.patch_size}, width {scale.clip.width}, "
                              f"{scale.clip.layers} layers", "training pairs": len(captions),
                    "steps x batch": f"{scale.clip.steps} x {scale.clip.batch_size}",
                    "train time": f"{clip_run['train_seconds']:.0f} s", "hardware": hardware()},
                   clip_eval)
    times["tiny-clip"] = time.perf_counter() - t

    # ---- tiny chat LM
    t = time.perf_counter()
    lm, lm_run = pt.train_lm(pt.chat_texts(text_train), tokenizer, scale.lm, progress)
    lm_eval = {"perplexity_text_val": pt.perplexity(lm, tokenizer, pt.chat_texts(text_val), scale.lm.context)}
    with atomic_dir(out / "tiny-lm") as tmp:
        lm.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_card(tmp, "tiny-lm", "A transformers `LlamaForCausalLM` pretrained on ShapesWorld's text-only chats in "
                   "the `vicuna_v1` template, with its byte-level BPE tokenizer; minillava's stand-in for Vicuna.",
                   {"parameters": f"{sum(p.numel() for p in lm.parameters()):,}",
                    "shape": f"width {scale.lm.width}, {scale.lm.layers} layers, {scale.lm.heads} heads "
                             f"({scale.lm.kv_heads} kv), context {scale.lm.context}",
                    "vocabulary": len(tokenizer), "training chats": len(text_train),
                    "steps x batch": f"{scale.lm.steps} x {scale.lm.batch_size}",
                    "train time": f"{lm_run['train_seconds']:.0f} s", "hardware": hardware()}, lm_eval)
    times["tiny-lm"] = time.perf_counter() - t

    with zoo_at(out):
        # ---- stage 1: feature alignment
        t = time.perf_counter()
        s1 = train(TrainConfig(stage=1, data=str(work / "captions_train.json"), out=str(out / "tiny-llava-stage1"),
                               vision="tiny-clip", lm="tiny-lm", seed=seed, progress=progress, **scale.stage1))
        times["stage1"] = time.perf_counter() - t
        model1, proc1 = load_stage1(s1.out, template="plain", aspect="square")
        cap_recs = load_records(work / "captions_test.json")[: scale.n_eval or 200]
        cap_eval = ev.evaluate_vqa(model1, proc1, cap_recs, progress=progress)
        s1_metrics = {"final_train_loss": s1.final_loss, "caption_exact_match_test": cap_eval["overall"]["exact"],
                      "examples": [{"reference": p["reference"], "caption": p["answer"]}
                                   for p in cap_eval["predictions"][:5]]}
        write_card(s1.out, "tiny-llava-stage1", "The projector after LLaVA's stage 1 (feature alignment): trained "
                   "on ShapesWorld captions with the `plain` template, vision tower and LM frozen. Holds the "
                   "projector alone; its backbones are the zoo's `tiny-clip` and `tiny-lm`.",
                   {"projector": model1.projector.kind, "steps": s1.steps, "train time": f"{s1.seconds:.0f} s",
                    "hardware": hardware(), **{k: v for k, v in scale.stage1.items()}}, s1_metrics)

        # ---- stage 2: visual instruction tuning, with some text-only chats mixed in
        t = time.perf_counter()
        mix = instruct + text_train[: scale.text_in_stage2]
        save_records(mix, work / "mix_train.json", image_dir=work)
        s2 = train(TrainConfig(stage=2, data=str(work / "mix_train.json"), out=str(out / "tiny-llava"),
                               init=str(s1.out), seed=seed, progress=progress, **scale.stage2))
        times["stage2"] = time.perf_counter() - t

    from .model import LlavaModel
    from .processor import Processor

    model = LlavaModel.from_pretrained(s2.out, device="cpu")
    processor = Processor.from_pretrained(s2.out)
    t = time.perf_counter()
    results = {}
    for split in ("test", "compositional"):
        recs = load_records(work / f"instruct_{split}.json")[: scale.n_eval]
        r = ev.evaluate_vqa(model, processor, recs, progress=progress)
        results[split] = {"overall": r["overall"], "by_type": r["by_type"]}
        print(f"tiny-llava on {split}:\n{ev.format_table(r)}")
    times["eval"] = time.perf_counter() - t
    s2_metrics = {"final_train_loss": s2.final_loss, "vqa": results}
    write_card(s2.out, "tiny-llava", "The tiny LLaVA after stage 2 (visual instruction tuning, `vicuna_v1`): "
               "tiny-clip's tower (frozen), the stage-1 projector and tiny-lm, projector and LM trained on "
               "ShapesWorld instructions plus some text-only chats. Exact match is measured with "
               "`minillava.eval` on held-out test scenes (greedy decoding, teacher-forced history).",
               {"steps": s2.steps, "train time": f"{s2.seconds:.0f} s", "training records": len(mix),
                "hardware": hardware(), **{k: v for k, v in scale.stage2.items()}}, s2_metrics)
    times["total"] = time.perf_counter() - t_all
    summary = {"seconds": times, "tiny-clip": clip_eval, "tiny-lm": lm_eval, "tiny-llava-stage1": s1_metrics,
               "tiny-llava": s2_metrics, "data": manifest["splits"], "scale": asdict(scale)}
    write_json(out / "zoo_build.json", summary)
    print("zoo built in " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f" -> {out}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m minillava.build_zoo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data")
    p.add_argument("--work", default="build/shapesworld")
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return build(a.out, SCALES[a.scale], a.work, a.seed, progress=not a.no_progress)


if __name__ == "__main__":
    summary = main()
    print(json.dumps(summary["seconds"], indent=1))
