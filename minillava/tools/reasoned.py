"""Named comparisons answered step by step, as an ablation: is the comparison learnable once each object's size
or place is said first?

Chapter 7.6 finds that tiny-llava locates each of two named objects, yet compares them little better than always
giving the commonest answer, and that its 4-layer language model does not learn that step even from scenes told
in words (`minillava.tools.told_comparisons`). In one answer word the model must find both objects, read the
compared attribute of each and order them, all inside one forward pass. Answered step by step, each part is one
it already does: the attribute of each named object (the lookups it gets right), then the order of two words it
has just written:

    Which is bigger, the circle or the red square?
        one step:      The red square.
        step by step:  The circle is small and the red square is large, so the red square is bigger.

(chain of thought, Wei et al., 2022; LLaVA's complex-reasoning answers reason step by step, LLaVA-CoT trains whole
stages of it; under LLaVA-1.5's short-answer suffix the answer stays one word, as `Ctx.reasoned` keeps it.)

From tiny-llava, two arms train on the first `--steps` x `--batch-size` records of a natural-use round for the same
steps with the same seed: `control` on the round as built, `reasoned` on the same round built with `reasoned=True`
(the same scenes, questions and answers but for the named comparisons'; checked before training). Each arm answers
the test, paraphrase and multi-turn splits and the test's short questions with the suffix, each as its training
asked: the control the splits as built, the reasoned arm the same splits built with `reasoned=True`. Exact match
of the whole answer; for named comparisons also in parts (`told_comparisons.conclusions`): the conclusion alone
(`conclusion`: the object named, yes, no or a tie) against the one-step answer, the steps, and the conclusion
where the steps were right.

    python -m minillava.tools.reasoned --steps 600 --out data/results/reasoned_ablation.json

builds what it needs (natural-use round 9's records both ways with `build_zoo`'s settings, the held-out splits
both ways) under `--work`; about 55 minutes on 2 CPU cores, 38 of them training.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import torch

from ..data import shapesworld as sw
from ..data.records import Record, load_records, save_records
from ..data.shapesworld.questions import conclusion, reasoning
from ..utils import write_json
from ..zoo import weights_digest
from .build_zoo import FULL, natural_mix
from .negatives import train_arms
from .told_comparisons import conclusions

ARMS = ("control", "reasoned")
SPLITS = {"test": "vqa", "paraphrase": "vqa", "multiturn": "multiturn"}


def held_out(work: Path, reasoned: bool) -> Path:
    """The test, paraphrase and multi-turn splits as `build_zoo` builds them (`reasoned`: named comparisons answered
    step by step), in a folder of their own under `work`."""
    folder = work / ("held-out-reasoned" if reasoned else "held-out")
    sw.ensure_built(folder, n_train=0, n_val=0, n_test=FULL.n_test, n_comp=0, n_text=0, n_text_val=0,
                    n_para=FULL.n_para, n_multiturn=FULL.n_multiturn, n_cooccur=0, seed=0,
                    image_size=FULL.clip.image_size, reasoned=reasoned)
    return folder


def aligned(plain: list[Record], stepwise: list[Record]) -> int:
    """The number of named comparisons answered differently; raises unless the two lists are the same records
    (ids, image file names, meta, questions, other answers) but for named comparisons answered step by step whose
    conclusion is the one-step answer."""
    if [r.id for r in plain] != [r.id for r in stepwise]:
        raise ValueError("the plain and the reasoned records differ in ids or order")
    changed = 0
    for a, b in zip(plain, stepwise):
        if [p.name for p in a.images] != [p.name for p in b.images] or a.meta != b.meta:
            raise ValueError(f"record '{a.id}': the two builds differ in images or meta")
        if len(a.messages) != len(b.messages):
            raise ValueError(f"record '{a.id}': the two builds differ in their number of turns")
        for m, n in zip(a.messages, b.messages):
            if m == n:
                continue
            if (m["role"] != "assistant" or reasoning(n["content"]) is None
                    or conclusion(n["content"]) != m["content"]):
                raise ValueError(f"record '{a.id}': {m['content']!r} and {n['content']!r} differ otherwise than "
                                 "in a step-by-step named comparison")
            changed += 1
    return changed


def measure(model_dir: Path, folder: Path, progress: bool = True) -> dict:
    """Exact match per question type on `folder`'s test, paraphrase and multi-turn splits and on the test's short
    questions with the suffix; named comparisons also in parts (`conclusions`)."""
    from ..checkpoints import load

    model, processor = load(model_dir, dtype=torch.float32)
    test = load_records(folder / "instruct_test.json")
    runs = {name: (load_records(folder / f"instruct_{name}.json"), kind) for name, kind in SPLITS.items()}
    runs["test_short"] = (sw.short_answer_records(test), "vqa")
    out = {}
    for name, (records, kind) in runs.items():
        r = sw.evaluate(model, processor, records, kind, progress=progress)
        named = [p for p in r["predictions"] if p["qtype"] == "compare_named"]
        parts = conclusions(named)
        out[name] = {**{k: r[k] for k in ("overall", "by_type", "by_variant", "gap_points") if k in r},
                     "compare_named_parts": parts, "examples": named[:6]}
        print(f"{model_dir.name}, {name}: overall {r['overall']['exact']:.1%}, named comparisons "
              + ", ".join(f"{k.removeprefix('compare_named ')} {v:.1%}" for k, v in parts.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m minillava.tools.reasoned", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="tiny-llava", help="both arms' start")
    p.add_argument("--round", type=int, default=9, help="the natural-use round whose records both arms train on")
    p.add_argument("--work", default="build/reasoned", help="where the records and the arms are built")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of each arm")
    p.add_argument("--batch-size", type=int, default=32, help="as the natural-use rounds")
    p.add_argument("--lr", type=float, default=3e-4, help="as the natural-use rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data/results/reasoned_ablation.json")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1:
        p.error(f"--steps and --batch-size must be at least 1, got {a.steps} and {a.batch_size}")
    if not 1 <= a.round <= FULL.natural_rounds:
        p.error(f"--round: the natural-use rounds are 1 to {FULL.natural_rounds}, got {a.round}")
    work, n = Path(a.work), a.steps * a.batch_size
    a.arms = work
    t0 = time.perf_counter()
    mixes = {arm: load_records(natural_mix(work / arm, dataclasses.replace(FULL, reasoned=arm == "reasoned"),
                                           0, a.round - 1))[:n] for arm in ARMS}
    if len(mixes["control"]) < n:
        p.error(f"--steps {a.steps} x --batch-size {a.batch_size} = {n} records; round {a.round} has "
                f"{len(mixes['control'])}")
    changed = aligned(mixes["control"], mixes["reasoned"])
    runs = {}
    for arm, records in mixes.items():
        path = work / f"mix_{arm}.json"
        save_records(records, path, image_dir=path.parent)
        runs[arm] = (path, {})
    print(f"{len(mixes['control'])} records each, {changed} named comparisons answered step by step "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = train_arms(a, runs)
    folders = {arm: held_out(work, arm == "reasoned") for arm in ARMS}
    for split in SPLITS:
        aligned(*(load_records(f / f"instruct_{split}.json") for f in folders.values()))
    digest = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()  # noqa: E731
    result = {"about": __doc__.split("\n\n")[0].replace("\n", " "),
              "command": "python -m minillava.tools.reasoned " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {"before": str(a.before), "before_sha256": weights_digest(a.before), "round": a.round,
                           "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed},
              "records_sha256": {arm: digest(path) for arm, (path, _) in runs.items()},
              "held_out_sha256": {arm: {s: digest(f / f"instruct_{s}.json") for s in SPLITS}
                                  for arm, f in folders.items()},
              "records": n, "named_comparisons_reasoned": changed, "train_seconds": seconds,
              "arms": {arm: measure(work / arm, folders[arm], not a.no_progress) for arm in ARMS}}
    write_json(a.out, result)
    for arm, m in result["arms"].items():
        print(f"{arm:9s} " + "  ".join(f"{s} {m[s]['overall']['exact']:.1%} (named comparisons "
                                       f"{m[s]['by_type'].get('compare_named', {}).get('exact', 0):.0%})" for s in m))
    return result


if __name__ == "__main__":
    main()
