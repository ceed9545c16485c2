"""Named comparisons told in words: how much data does the comparison step alone take a model of this size?

Chapter 7.6 finds that tiny-llava locates each of two named objects, yet compares them no better than always
giving the commonest answer. Here the eyes are taken out: the scene is told in words, as ShapesWorld's text-only
chats tell it (`shapesworld.tell`), and the question is the generator's own named comparison
(`questions.q_compare_named`: training phrasings, no false premises), its answer computed from the scene:

    In a picture there is a large red circle at the top left and a small blue square at the bottom. Which is
    higher, the circle or the square?  ->  The circle.

The language model of a zoo model is fine-tuned on such chats alone, a fresh batch each step (AdamW at stage 2's
natural-use learning rate, `pretrain.fit`), and scored on held-out ones every `--every` steps: exact match of
the greedy answer, for size, position and count comparisons apart. Starts: `tiny-llava-stage1`, whose language
model is tiny-lm as it was before any image (stage 1 freezes it), and `tiny-llava`, after visual instruction
tuning (whose chats compared shown objects, never told ones).

    python -m minillava.tools.told_comparisons [--start tiny-llava-stage1 tiny-llava] [--steps 2000]
        [--reasoned [--rows] [--value-first] [--value-led]] [--out data/results/told_comparisons.json]

`--reasoned` answers step by step instead ('The circle is at the top left and the square is at the bottom, so the
circle is higher.', `Ctx.reasoned`), and each curve row also scores the answers in parts (`conclusions`). On 2
CPU cores `--steps 3000` takes about 36 minutes a start (the shipped result file: 73 minutes for both); the shipped
step-by-step file, `--start tiny-llava --steps 1500 --reasoned`, 19 minutes. `--rows` says a place by the one line
of the grid the comparison needs ('The circle is in the top row and the square is in the bottom row, so the circle
is higher.', `Ctx.rows`): told_comparisons_rows.json, 21 minutes. `--value-first` also says the winner's value
before naming it in the answer to a 'which' question ('..., so the one in the top row, the circle, is higher.',
`Ctx.value_first`): told_comparisons_value_first.json (with `--rows`), 24 minutes. `--value-led` says each value
before its object, in the steps and in that conclusion ('In the top row is the circle and in the bottom row is the
square, so in the top row is the circle, which is higher.', `Ctx.value_led`), so naming the winner copies the words
that followed its value: told_comparisons_value_led.json (with `--rows --value-first`), 28 minutes. Each run keeps
its last step's size and position answers ("last answers") for reading what fails.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .. import zoo
from ..data import shapesworld as sw
from ..data.records import Record
from ..data.shapesworld import questions as swq
from ..evaluation import exact_match
from ..pretrain import chat_loss, fit
from ..utils import write_json

GROUPS = {"size": ("bigger", "larger", "smaller"), "position": ("higher", "lower", "further left", "further right")}


def group(question: str) -> str:
    """What a named comparison compares, from its comparison word: "size", "position", or "count" ('Are there
    more circles or squares?')."""
    for name, words in GROUPS.items():
        if any(re.search(rf"\b{w}\b", question) for w in words):
            return name
    return "count"


FORMS = ("reasoned", "rows", "value_first", "value_led")  # how the answers are said: `swq.Ctx`'s fields


def told_stream(seed: int, **form: bool) -> Iterator[Record]:
    """One-turn chats without end: a scene told in words, then a named comparison about it (`q_compare_named`),
    tagged with its `group` as the question type. `form`: reasoned=True answers step by step (`swq.Ctx.reasoned`),
    and then rows=True says a place by its row or column (`swq.Ctx.rows`), value_first=True names the winning value
    before the object (`swq.Ctx.value_first`), value_led=True says each value before its object
    (`swq.Ctx.value_led`); the same chats otherwise. Deterministic in `seed`."""
    if set(form) - set(FORMS):
        raise ValueError(f"told comparisons: unknown answer form {sorted(set(form) - set(FORMS))}; known: {FORMS}")
    rng, ctx, k = np.random.default_rng([seed, 7]), swq.Ctx(negatives=False, **form), 0
    while True:
        scene = sw.sample_scene(rng)
        qa = swq.q_compare_named(scene, rng, ctx)
        if qa is None:  # one object: nothing to compare
            continue
        question, answer = qa[:2]
        messages = [{"role": "user", "content": f"{sw.tell(scene, rng)} {question}"},
                    {"role": "assistant", "content": answer}]
        yield Record(f"told-{seed}-{k:06d}", [], messages,
                     {"kind": "text", "qtypes": [group(question)], "scene": scene.to_dict()})
        k += 1


def told_chats(n: int, seed: int, **form: bool) -> list[Record]:
    """The first n chats of `told_stream(seed, **form)`."""
    return list(itertools.islice(told_stream(seed, **form), n))


def learning_curve(start: str, steps: int, every: int, batch: int, lr: float, eval_records: list[Record],
                   seed: int = 0, progress: bool = True, **form: bool) -> dict:
    """Fine-tune the language model of zoo model `start` on fresh told chats (`batch` a step, drawn with `seed`)
    and score `eval_records` at step 0 and every `every` steps. Returns {"curve": [{"step", "chats seen",
    "size", "position", "count", "overall"}], "seconds", "final_loss", "weights", "last answers"} ("weights":
    `lm_digest` of the language model before fine-tuning, so a reader can tell whether the curve predates the
    shipped model; "last answers": the size and position comparisons at the last step, {"question", "group",
    "answer", "reference"}, for reading what fails).
    `form` (`told_stream`'s): with reasoned=True, trained on step-by-step answers, and each row also scores their
    conclusions alone against the one-step answers ("size conclusion", ...)."""
    from .. import load

    model, processor = load(start)
    if processor.template.name == "plain":  # stage 1's caption template; tiny-lm chats in vicuna_v1 (`chat_sft`)
        processor = processor.with_template("vicuna_v1")
    lm, template, tok = model.language_model, processor.template, processor.tokenizer
    curve, digest, last = [], lm_digest(lm), []
    questions = {r.id: r.messages[0]["content"].split(". ", 1)[1] for r in eval_records}  # without the scene told

    def measure(step: int) -> None:
        if step % every and step != steps:
            return
        lm.eval()
        result = sw.evaluate(model, processor, eval_records, kind="vqa", progress=False)
        lm.train()
        row = {"step": step, "chats seen": step * batch,
               **{k: v["exact"] for k, v in result["by_type"].items()}, "overall": result["overall"]["exact"]}
        if form.get("reasoned"):
            row.update(conclusions(result["predictions"]))
        curve.append(row)
        last[:] = [{"question": questions[p["id"]], "group": p["qtype"], "answer": p["answer"],
                    "reference": p["reference"]} for p in result["predictions"] if p["qtype"] != "count"]
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)

    stream = told_stream(seed, **form)  # drawn as the steps need them

    def loss(_generator) -> torch.Tensor:
        rows = [template.tokenize(r.messages, tok, sample_id=r.id) for r in (next(stream) for _ in range(batch))]
        return chat_loss(lm, rows, tok.pad_token_id)

    for p in model.parameters():
        p.requires_grad_(False)
    for p in lm.parameters():
        p.requires_grad_(True)
    measure(0)  # (leaves the language model in training mode)
    run = fit(lm, loss, steps, lr, (0.9, 0.95), seed, f"{start} on told comparisons", progress, on_step=measure)
    return {"curve": curve, "seconds": round(run["train_seconds"]), "final_loss": run["curve"][-1]["loss"],
            "weights": digest, "last answers": last}


def conclusions(predictions: list[dict]) -> dict[str, float]:
    """Step-by-step answers read in parts, per group: the share whose conclusion (`swq.conclusion`: the object
    named, yes, no or a tie, scored as a one-step answer is) is right ("size conclusion"; an answer not in that form
    counts as its own conclusion), whose steps are the reference's word for word ("size steps": both objects' size
    or place said right), and whose conclusion is right among those with the steps right ("size conclusion, steps
    right": the comparison of two words just written)."""
    steps = lambda text: (swq.reasoning(text) or (None,))[0]  # noqa: E731
    by: dict[str, list[bool]] = {}
    for p in predictions:
        right = exact_match(swq.conclusion(p["answer"]), swq.conclusion(p["reference"]))
        by.setdefault(f"{p['qtype']} conclusion", []).append(right)
        if steps(p["reference"]) is not None:
            said_right = steps(p["answer"]) == steps(p["reference"])
            by.setdefault(f"{p['qtype']} steps", []).append(said_right)
            if said_right:
                by.setdefault(f"{p['qtype']} conclusion, steps right", []).append(right)
    return {k: sum(v) / len(v) for k, v in sorted(by.items())}


def lm_digest(lm: torch.nn.Module) -> str:
    """The first 16 hex digits of a sha256 over a language model's weights (names and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(lm.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", nargs="+", default=["tiny-llava-stage1", "tiny-llava"], choices=zoo.TINY[2:],
                    help="zoo models whose language model is fine-tuned (each from its shipped weights)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250, help="score the held-out chats every this many steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (stage 2's natural-use rounds')")
    ap.add_argument("--n-eval", type=int, default=600, help="held-out told comparisons")
    ap.add_argument("--out", type=Path, default=Path("data/results/told_comparisons.json"))
    ap.add_argument("--reasoned", action="store_true",
                    help="answers step by step: each object's size or place, then the conclusion (`Ctx.reasoned`)")
    ap.add_argument("--rows", action="store_true",
                    help="with --reasoned: a place said by its row or column ('in the top row'; `Ctx.rows`)")
    ap.add_argument("--value-first", action="store_true",
                    help="with --reasoned: 'which' says the winning value, then the object ('so the large one, the "
                         "square, is bigger'; `Ctx.value_first`)")
    ap.add_argument("--value-led", action="store_true",
                    help="with --reasoned: each value said before its object, in the steps and in --value-first's "
                         "conclusion ('the large one is the square, which is bigger'; `Ctx.value_led`)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    for name, v in (("--steps", a.steps), ("--every", a.every), ("--batch", a.batch), ("--n-eval", a.n_eval)):
        if v < 1:
            ap.error(f"{name} must be at least 1, got {v}")
    form = {k: getattr(a, k) for k in FORMS}
    torch.manual_seed(0)
    try:
        eval_records = told_chats(a.n_eval, seed=1, **form)  # another stream than training's (seed 0)
    except ValueError as e:  # a step form without --reasoned
        ap.error(str(e))
    counts = {g: sum(r.meta["qtypes"] == [g] for r in eval_records) for g in (*GROUPS, "count")}
    t0, runs = time.perf_counter(), {}
    for start in a.start:
        runs[start] = learning_curve(start, a.steps, a.every, a.batch, a.lr, eval_records,
                                     progress=not a.no_progress, **form)
    write_json(a.out, {
        "about": ("Named comparisons about scenes told in words (minillava.tools.told_comparisons): each start's "
                  "language model fine-tuned on such chats alone, exact match on held-out ones along the way."),
        "command": "python -m minillava.tools.told_comparisons " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"steps": a.steps, "batch": a.batch, "lr": a.lr, "every": a.every, **form},
        "eval": {"n": a.n_eval, "by_group": counts, "example": eval_records[0].messages},
        "runs": runs})
    last = {s: r["curve"][-1] for s, r in runs.items()}
    print(f"told comparisons: {a.steps} steps of {a.batch} per start in {time.perf_counter() - t0:.0f} s; "
          + "; ".join(f"{s}: position {c['position']:.1%}, size {c['size']:.1%} exact" for s, c in last.items())
          + f" -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
