"""Ablations at tiny scale: which of LLaVA's design choices matter, measured on ShapesWorld.

Each variant changes one thing from the baseline (stage 1 then stage 2, `mlp2x_gelu`, vision layer -2, full
fine-tune of the LM, single- and multi-image data), trains both stages from the zoo's tiny-clip and tiny-lm with
identical data, steps and seeds, and is scored on the same held-out questions:

    python -m minillava.tools.ablations --out data/results/ablations.json [--device cuda] [--jobs 7]

The shipped results took 87 minutes on 2 CPU cores, one variant after another; on a GPU, `--jobs 7` trains them
side by side in minutes. Each variant is scored question by question, and `bootstrap` turns that into paired
95% intervals and a verdict against the papers' findings.

The limitations chapter reads the JSON and tabulates it beside the paper's findings, agreeing or not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import evaluation as ev
from ..data import shapesworld as sw
from ..data.records import load_records
from ..training import TrainConfig, train
from ..utils import read_json, write_json
from ..zoo import data_dir, weights_digest

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

# The direction each finding predicts for the variant against the baseline; `single_image_only` is judged on the
# two-image questions, the only ones it never trained on.
EXPECTED = {"no_stage1": "lower", "linear_projector": "lower", "vision_layer_-1": "lower", "lora": "similar",
            "frozen_lm": "lower", "single_image_only": "lower"}
SIMILAR = 0.03  # "similar" means the whole 95% interval of the difference lies within 3 points of zero


@dataclass
class AblationScale:
    """The shipped model's first round scaled down (8,000 of its 30,000 scenes, 2 of its 8 stage-2 epochs), and
    every turn of 600 test conversations (1,692 questions): enough questions that a difference of a few
    points shows through the bootstrap interval (`bootstrap`)."""

    n_train: int = 8000
    n_test: int = 600
    stage1: dict = field(default_factory=lambda: dict(batch_size=64, micro_batch_size=64, epochs=1.0, lr=1e-3))
    stage2: dict = field(default_factory=lambda: dict(batch_size=64, micro_batch_size=64, epochs=2.0, lr=1e-3))


SCALES = {"full": AblationScale(),
          "toy": AblationScale(n_train=24, n_test=8, stage1=dict(batch_size=8, micro_batch_size=8, max_steps=2),
                               stage2=dict(batch_size=8, micro_batch_size=8, max_steps=2))}


def _data(work: Path, kinds: tuple, scale: AblationScale, seed: int) -> Path:
    """The ShapesWorld data of the instruction `kinds` (built once in `work`); every variant is scored on the
    test split of the full-kinds data."""
    data = work / f"data-{'-'.join(kinds)}"
    sw.ensure_built(data, n_train=scale.n_train, n_val=0, n_test=scale.n_test, n_comp=0, n_text=500, n_text_val=0,
                    seed=seed, kinds=tuple(kinds))
    return data


def run_variant(name: str, change: dict, work: Path, scale: AblationScale, seed: int = 0,
                device: str | None = None) -> dict:
    """Train one variant (both stages) in `work` and score it on the test and multi-image questions."""
    data = _data(work, change.get("kinds", sw.KINDS), scale, seed)
    common = {k: v for k, v in change.items() if k in ("projector", "feature_layer")}
    t0 = time.perf_counter()
    init = None
    if not change.get("skip_stage1"):
        s1 = train(TrainConfig(stage=1, data=str(data / "captions_train.json"), out=str(work / name / "stage1"),
                               seed=seed, progress=False, device=device, **common, **scale.stage1))
        init = str(s1.out)
    tune = {k: v for k, v in change.items() if k in ("lora", "freeze_lm")}
    if tune.get("lora"):
        tune.update(lora_r=16, lora_alpha=32, lr=1e-3)
    s2 = train(TrainConfig(stage=2, data=str(data / "instruct_train.json"), out=str(work / name / "stage2"),
                           init=init, seed=seed, progress=False, device=device, **common,
                           **{**scale.stage2, **tune}))
    seconds = time.perf_counter() - t0
    out = s2.out
    if tune.get("lora"):
        from ..checkpoints import merge_lora

        out = merge_lora(s2.out, work / name / "merged")
    from ..checkpoints import load

    model, processor = load(out, device=device, dtype=torch.float32)  # scored as on a CPU, as the zoo is
    # every variant is scored on the same questions: the full-kinds test split
    test = load_records(_data(work, sw.KINDS, scale, seed) / "instruct_test.json")
    result = ev.evaluate_vqa(model, processor, test, progress=False)
    # one 0/1 per question, in the test split's order (the same for every variant): the bootstrap pairs them
    correct = "".join("1" if ev.exact_match(p["answer"], p["reference"]) else "0" for p in result["predictions"])
    return {"change": {k: list(v) if isinstance(v, tuple) else v for k, v in change.items()},
            "overall": result["overall"], "by_type": result["by_type"], "exact_by_question": correct,
            "qtypes": [p["qtype"] for p in result["predictions"]], "train_seconds": seconds,
            "final_loss": s2.final_loss, "paper": PAPER.get(name, "")}


def _outcome(fn, name: str) -> dict:
    """A variant's result, or {"error": ...} when it failed: one broken variant must not lose the others."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- reported in the results file and on the console
        return {"change": VARIANTS[name], "error": f"{type(e).__name__}: {e}", "paper": PAPER.get(name, "")}


def backbones() -> dict:
    """Which zoo backbones the variants start from: {name: {"sha256": first 16 hex digits of the weights, and
    the card's "steps x batch" (None without a card)}, or None without weights}, recorded with the results so a
    reader can tell whether they predate the shipped zoo."""
    found = {}
    for name in ("tiny-clip", "tiny-lm"):
        folder = data_dir() / name
        try:
            digest = weights_digest(folder)
        except OSError:  # no weights: every variant fails then, each with the zoo's error
            found[name] = None
            continue
        card = folder / "card.json"
        facts = read_json(card).get("facts", {}) if card.is_file() else {}
        found[name] = {"sha256": digest, "steps x batch": facts.get("steps x batch")}
    return found


def bootstrap(results: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """Exact-match accuracy with 95% intervals (`evaluation.paired_bootstrap`) for each variant that has
    per-question results: its own, and its difference from the baseline paired on the same questions, overall and
    on the two-image questions, with the verdict against `EXPECTED`.

    Returns {variant: {"overall": {"n", "exact", "ci", "diff", "diff_ci"}, "two_image": {...}, "judged_on",
    "expected", "verdict"}}; the baseline has no diff or verdict."""
    scored = {k: r for k, r in results.items() if "exact_by_question" in r}
    if "baseline" not in scored:
        raise ValueError("the bootstrap needs the baseline's per-question results ('exact_by_question')")
    qtypes = scored["baseline"]["qtypes"]
    for name, r in scored.items():
        if r["qtypes"] != qtypes:
            raise ValueError(f"ablation '{name}' was scored on other questions than the baseline")
    parts = {"overall": torch.ones(len(qtypes), dtype=torch.bool),
             "two_image": torch.tensor([t.startswith("multi_") for t in qtypes])}
    parts = {part: keep for part, keep in parts.items() if keep.any()}
    correct = {k: torch.tensor([c == "1" for c in r["exact_by_question"]]) for k, r in scored.items()}
    out = {}
    for name, c in correct.items():
        reference = None if name == "baseline" else correct["baseline"]
        out[name] = {part: ev.paired_bootstrap(c[keep], None if reference is None else reference[keep],
                                               resamples, seed) for part, keep in parts.items()}
        if reference is not None and name in EXPECTED:
            part = "two_image" if name == "single_image_only" else "overall"
            out[name].update(judged_on=part, expected=EXPECTED[name],
                             verdict=verdict(EXPECTED[name], out[name][part]["diff_ci"]))
    return out


def verdict(expected: str, diff_ci: list[float]) -> str:
    """Whether a difference's 95% interval agrees with the direction a paper finding predicts: "lower" agrees when
    the whole interval is below zero, disagrees when it is above; "similar" agrees when it lies within `SIMILAR`
    of zero, disagrees when it lies wholly outside; anything else is "within noise"."""
    lo, hi = diff_ci
    if expected == "similar":
        return "agrees" if -SIMILAR <= lo and hi <= SIMILAR else "disagrees" if hi < -SIMILAR or lo > SIMILAR \
            else "within noise"
    return "agrees" if hi < 0 else "disagrees" if lo > 0 else "within noise"


def run(out: str | Path, variants: list[str] | None = None, scale: AblationScale | None = None,
        work: str | Path | None = None, seed: int = 0, device: str | None = None, jobs: int = 1) -> dict:
    """Run the variants (default: all), `jobs` at a time in separate processes, and write their results to
    `out` (JSON)."""
    scale = scale or AblationScale()
    names = variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; known: {', '.join(VARIANTS)}")
    started_from = backbones()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        for kinds in {sw.KINDS} | {VARIANTS[n].get("kinds", sw.KINDS) for n in names}:  # before any worker
            _data(work, kinds, scale, seed)
        args = {n: (n, VARIANTS[n], work, scale, seed, device) for n in names}
        if jobs > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {n: pool.submit(run_variant, *a) for n, a in args.items()}
                results = {n: _outcome(f.result, n) for n, f in futures.items()}
        else:
            results = {n: _outcome(lambda a=a: run_variant(*a), n) for n, a in args.items()}
        for name, r in results.items():
            if "error" in r:
                print(f"{name:<20} failed: {r['error']}")
                continue
            print(f"{name:<20} exact {r['overall']['exact']:.1%}  contains {r['overall']['contains']:.1%}  "
                  f"({r['train_seconds']:.0f} s)")
    from ..utils import pick_device
    from .build_zoo import hardware

    summary = {"scale": {"n_train": scale.n_train, "n_test": scale.n_test, "stage1": scale.stage1,
                         "stage2": scale.stage2}, "seed": seed, "hardware": hardware(pick_device(device)),
               "eval_dtype": "float32", "jobs": jobs, "backbones": started_from, "results": results}
    if "exact_by_question" in results.get("baseline", {}):
        summary["bootstrap"] = bootstrap(results)
    write_json(out, summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m minillava.tools.ablations", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/results/ablations.json")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS))
    p.add_argument("--work", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained side by side, each in its own process")
    p.add_argument("--scale", choices=sorted(SCALES), default="full", help="toy: checks the pipeline in seconds")
    a = p.parse_args(argv)
    return run(a.out, a.only, SCALES[a.scale], a.work, device=a.device, jobs=a.jobs)


if __name__ == "__main__":
    main()
