"""Ablations at tiny scale: which of LLaVA's design choices matter, measured on ShapesWorld.

Each variant changes one thing from the baseline (stage 1 then stage 2, `mlp2x_gelu`, vision layer -2, full
fine-tune of the LM, single- and multi-image data), trains both stages from the zoo's tiny-clip and tiny-lm with
identical data, steps and seeds, and is scored on the same held-out questions:

    python -m minillava.ablations --out data/results/ablations.json

The limitations chapter reads the JSON and tabulates it beside the paper's findings, agreeing or not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import eval as ev
from .data import shapesworld as sw
from .data.records import load_records
from .train import TrainConfig, train
from .utils import write_json

VARIANTS = {
    "baseline": {},
    "no_stage1": {"skip_stage1": True},
    "linear_projector": {"projector": "linear"},
    "vision_layer_-1": {"feature_layer": -1},
    "lora": {"lora": True},
    "frozen_lm": {"freeze_lm": True},
    "single_image_only": {"kinds": ("conversation", "detail", "reasoning")},
}
# What the papers report for the same question (from the LLaVA and LLaVA-1.5 papers; see the book's references).
PAPER = {
    "no_stage1": "LLaVA: skipping stage 1 lowers ScienceQA from 90.92 to 85.81.",
    "linear_projector": "LLaVA-1.5: the MLP projector beats the linear one of LLaVA.",
    "vision_layer_-1": "LLaVA: the second-to-last layer's features work better than the last layer's.",
    "lora": "LLaVA-1.5 offers LoRA (r=128) as a cheaper alternative to the full fine-tune.",
    "frozen_lm": "LLaVA trains the LM in stage 2; a frozen LM is what stage 1 alone gives.",
    "single_image_only": "LLaVA-1.5 is trained on single images only (multi-image is minillava's extension).",
}


@dataclass
class AblationScale:
    n_train: int = 2000
    n_test: int = 300
    stage1: dict = field(default_factory=lambda: dict(batch_size=32, micro_batch_size=32, max_steps=60, lr=1e-3))
    stage2: dict = field(default_factory=lambda: dict(batch_size=16, micro_batch_size=16, max_steps=250, lr=1e-3))


def run_variant(name: str, change: dict, work: Path, scale: AblationScale, seed: int = 0) -> dict:
    """Train one variant (both stages) in `work` and score it on the test and multi-image questions."""
    kinds = change.get("kinds", sw.KINDS)
    data = work / f"data-{'-'.join(kinds)}"
    if not (data / "manifest.json").is_file():
        sw.build(data, n_train=scale.n_train, n_val=0, n_test=scale.n_test, n_comp=0, n_text=500, n_text_val=0,
                 seed=seed, kinds=tuple(kinds))
    common = {k: v for k, v in change.items() if k in ("projector", "feature_layer")}
    t0 = time.perf_counter()
    init = None
    if not change.get("skip_stage1"):
        s1 = train(TrainConfig(stage=1, data=str(data / "captions_train.json"), out=str(work / name / "stage1"),
                               seed=seed, progress=False, **common, **scale.stage1))
        init = str(s1.out)
    tune = {k: v for k, v in change.items() if k in ("lora", "freeze_lm")}
    if tune.get("lora"):
        tune.update(lora_r=16, lora_alpha=32, lr=1e-3)
    s2 = train(TrainConfig(stage=2, data=str(data / "instruct_train.json"), out=str(work / name / "stage2"),
                           init=init, seed=seed, progress=False, **common, **{**scale.stage2, **tune}))
    seconds = time.perf_counter() - t0
    out = s2.out
    if tune.get("lora"):
        from .train import merge_lora

        out = merge_lora(s2.out, work / name / "merged")
    from .zoo import load_model

    model, processor = load_model(out, device="cpu")
    # every variant is scored on the same questions: the full-kinds test split
    test = load_records(work / f"data-{'-'.join(sw.KINDS)}" / "instruct_test.json")
    result = ev.evaluate_vqa(model, processor, test, progress=False)
    return {"change": {k: list(v) if isinstance(v, tuple) else v for k, v in change.items()},
            "overall": result["overall"], "by_type": result["by_type"], "train_seconds": seconds,
            "final_loss": s2.final_loss, "paper": PAPER.get(name, "")}


def run(out: str | Path, variants: list[str] | None = None, scale: AblationScale | None = None,
        work: str | Path | None = None, seed: int = 0) -> dict:
    """Run the variants (default: all) and write their results to `out` (JSON)."""
    scale = scale or AblationScale()
    names = variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        base = work / f"data-{'-'.join(sw.KINDS)}"
        if not (base / "manifest.json").is_file():  # the shared test set, built first
            sw.build(base, n_train=scale.n_train, n_val=0, n_test=scale.n_test, n_comp=0, n_text=500,
                      n_text_val=0, seed=seed)
        results = {}
        for name in names:
            results[name] = run_variant(name, VARIANTS[name], work, scale, seed)
            r = results[name]["overall"]
            print(f"{name:<20} exact {r['exact']:.1%}  contains {r['contains']:.1%}  "
                  f"({results[name]['train_seconds']:.0f} s)")
    summary = {"scale": {"n_train": scale.n_train, "n_test": scale.n_test, "stage1": scale.stage1,
                         "stage2": scale.stage2}, "seed": seed, "results": results}
    write_json(out, summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m minillava.ablations", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/results/ablations.json")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS))
    p.add_argument("--work", default=None, help="keep the runs here (default: a temporary folder)")
    a = p.parse_args(argv)
    return run(a.out, a.only, work=a.work)


if __name__ == "__main__":
    main()
