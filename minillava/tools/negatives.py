"""The remedy for false premises, as an ablation: the natural-use round with and without negative instructions.

LRV-Instruction (Liu et al., 2024) found that instruction data with negative instructions (questions about
objects that are not there, answered with their absence) beside the positive ones reduces hallucination, and
that a balanced mix works best. Here the same model (tiny-llava before its natural-use round) is trained twice
on the natural-use round's records, for the same number of steps with the same seed: once as they are, once
with every false-premise turn removed (`drop_negatives`: the same records and scenes otherwise). Both arms, and
the start, are measured on the false premises of the test split, on POPE over scenes with the co-occurrence
bias, and on the true-premise questions:

    python -m minillava.tools.negatives --before build/tiny-llava-round4 \
        --data build/shapesworld-natural/mix_natural.json --steps 500 --out data/results/negatives_ablation.json

`--steps` keeps the two runs short (the shipped round is 1,937 steps); on 2 CPU cores each 500 steps take
about 12 minutes. Arms already in `--arms` are measured again, not retrained, if their `arm.json` says they were
trained as this run asks; a folder trained otherwise, or before the tool wrote that record, is refused (remove it).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

from ..data import shapesworld as sw
from ..data.records import Record, load_records, save_records
from ..evaluation import exact_match
from ..utils import read_json, write_json
from ..zoo import weights_digest

LRV = ("LRV-Instruction (Liu et al., ICLR 2024): LMMs hallucinate most on negative instructions; fine-tuning on a "
       "mix of positive and negative instructions reduces hallucination while keeping or improving accuracy on "
       "public benchmarks, and a balanced ratio of positive to negative instances gives the most robust model.")


def drop_negatives(records: list[Record]) -> list[Record]:
    """The records without their false-premise turns (question and answer); an image placeholder that opened a
    dropped question moves to the next question; records left with no turn are dropped."""
    out = []
    for r in records:
        qtypes = r.meta.get("qtypes") or []
        msgs, keep, carry, turn = [], [], "", 0
        for i in range(0, len(r.messages), 2):
            q, a = dict(r.messages[i]), r.messages[i + 1]
            t = qtypes[turn] if turn < len(qtypes) else None
            turn += 1
            if t == "false_premise":
                k = q["content"].rfind("<image>\n")
                carry += q["content"][: k + len("<image>\n")] if k >= 0 else ""
                continue
            q["content"], carry = carry + q["content"], ""
            msgs += [q, a]
            keep.append(t)
        if msgs and not carry:
            out.append(Record(r.id, r.images, msgs, {**r.meta, "qtypes": keep}))
    return out


def train_arms(a: argparse.Namespace, runs: dict[str, tuple[Path, dict]], keep=()) -> dict[str, float | None]:
    """An ablation's arms: {arm: (records file, more TrainConfig settings)} -> stage 2 from `a.before`, `a.steps`
    steps of `a.batch_size` at peak rate `a.lr`, each into `a.arms / arm`, with their seconds. An arm whose folder
    already holds a model, or named in `keep` (measured by an earlier run), is not trained again and keeps the
    seconds that the results file `a.out` has for it, if any. Each arm's folder records how it was trained
    (`arm.json`: its start and the start's weights, its records' sha256, the settings); a folder trained otherwise,
    or with no such record (trained before the tools wrote one), is refused, not mixed into this run."""
    from ..training import TrainConfig, train

    out = Path(a.out)
    seconds = read_json(out, what="results file").get("train_seconds", {}) if out.is_file() else {}
    start = {"before": str(a.before), "before_sha256": weights_digest(a.before)}
    for arm, (data, settings) in runs.items():
        folder = Path(a.arms) / arm
        how = {**start,
               "records_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
               "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed, **settings}
        if (folder / "model.safetensors").is_file():
            had = read_json(folder / "arm.json", what="arm record") if (folder / "arm.json").is_file() else None
            if had != how:
                raise SystemExit(f"arm '{arm}' in {folder}: trained {'otherwise' if had else 'by an unknown run'} "
                                 f"({had}), not as this run asks ({how}); remove the folder to train it again")
            continue
        if arm in keep:
            continue
        t = time.perf_counter()
        train(TrainConfig(stage=2, data=str(data), out=str(folder), init=a.before, seed=a.seed, device=a.device,
                          batch_size=a.batch_size, micro_batch_size=a.batch_size, max_steps=a.steps, lr=a.lr,
                          **settings))
        seconds[arm] = time.perf_counter() - t
        write_json(folder / "arm.json", how)
    return {arm: seconds.get(arm) for arm in runs}


def measure(model_dir: str | Path, work: Path, n: int, progress: bool = True) -> dict:
    """False premises rejected (test split), POPE on co-occurring scenes, and true-premise accuracy."""
    from ..checkpoints import load

    model, processor = load(model_dir, dtype=torch.float32)
    test = load_records(work / "instruct_test.json")[:n]
    cooccur = load_records(work / "instruct_cooccur.json")[:300]
    fp = sw.evaluate(model, processor, test, "false-premise", progress=progress)
    vqa = sw.evaluate(model, processor, test, "vqa", progress=progress)
    true = [p for p in vqa["predictions"] if p["qtype"] != "false_premise"]
    pope = sw.evaluate(model, processor, cooccur, "pope", progress=progress)
    return {"false_premises_rejected": fp["overall"]["exact"], "n_false_premises": fp["overall"]["n"],
            "true_premise_exact": sum(exact_match(p["answer"], p["reference"]) for p in true) / max(len(true), 1),
            "n_true_premises": len(true), "pope_cooccur": pope["pope"], "examples": fp["predictions"][:8]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m minillava.tools.negatives", description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="tiny-llava before its natural-use round (both arms' start)")
    p.add_argument("--data", required=True, help="the natural-use round's records (mix_natural.json)")
    p.add_argument("--work", default="build/shapesworld", help="the ShapesWorld build with the test splits")
    p.add_argument("--arms", default="build/negatives", help="where the two arms are trained")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps of each arm")
    p.add_argument("--batch-size", type=int, default=32, help="as the natural-use round")
    p.add_argument("--lr", type=float, default=3e-4, help="as the natural-use round")
    p.add_argument("--n-eval", type=int, default=1000, help="test records measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data/results/negatives_ablation.json")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    data, arms = Path(a.data), Path(a.arms)
    records = load_records(data)
    mixes = {"with": records, "without": drop_negatives(records)}
    runs = {}
    for arm, records in mixes.items():
        path = data.with_name(f"mix_natural_{arm}_negatives.json")
        save_records(records, path, image_dir=path.parent)
        runs[arm] = (path, {})
    seconds = train_arms(a, runs)
    work = Path(a.work)
    result = {"lrv": LRV, "steps": a.steps, "lr": a.lr, "batch_size": a.batch_size, "train_seconds": seconds,
              "records": {k: len(v) for k, v in mixes.items()},
              "turns": {k: sum(len(r.meta["qtypes"]) for r in v) for k, v in mixes.items()},
              "arms": {"before": measure(a.before, work, a.n_eval),
                       **{arm: measure(arms / arm, work, a.n_eval) for arm in mixes}},
              "command": "python -m minillava.tools.negatives " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_json(a.out, result)
    for arm, m in result["arms"].items():
        print(f"{arm:8s} false premises rejected {m['false_premises_rejected']:.1%}  true premises "
              f"{m['true_premise_exact']:.1%}  POPE adversarial F1 {m['pope_cooccur']['adversarial']['f1']:.1%}")
    return result


if __name__ == "__main__":
    main()
