"""Measure smol-llava for its model cards and the book: `python -m minillava.tools.build_smol --eval-only`.

- `world_questions`: the candidate text-only questions (`data/world_questions.py`) asked to the base model
  (`smol-llava-stage1`, whose stage leaves the LM untouched), in its own template; those it answers right form
  the fixed set that measures forgetting;
- `forgetting`: that set asked to `smol-llava` (LoRA merged): the share still answered right;
- `vqa_test`, `vqa_compositional`: ShapesWorld visual questions in its own `smollm2` template;
- `vqa_test_vicuna_v1`, `vqa_test_chatml_direct`: the same test questions in a layout it was not trained on;
- `variants`: forgetting and test VQA of the stage-2 variants `build_smol --variants` trained (full fine-tune,
  no text-only chats, every chat prompt), beside the shipped build.

Everything goes into the cards and into `data/results/smol_llava.json` (answers included), which chapter 9 reads.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..checkpoints import load
from ..data import shapesworld as sw
from ..data.records import load_records
from ..data.world_questions import candidates
from ..evaluation import evaluate_rules, evaluate_vqa, questions, rules_report
from ..utils import pick_device, read_json, write_json
from .build_zoo import update_card

HELD_OUT = dict(n_val=500, n_test=1000, n_comp=500, n_text_val=1000)  # the tiny zoo's held-out splits
WRONG_TEMPLATES = ("vicuna_v1", "chatml_direct")
SECTIONS = {
    "world_questions": "Text-only questions about the world (capitals, facts, arithmetic, instructions; each with "
                       "the rule that checks its answer's first sentence), asked to the base model in its own "
                       "template, greedily: those it answers right form the forgetting set.",
    "forgetting": "The forgetting set asked after stage 2 (the same prompts, LoRA merged): the share of what the "
                  "base model knew that it still answers right.",
    "final_train_loss": "The last step's training loss.",
    "vqa_test": "ShapesWorld test questions in SmolLM2's own template (`smollm2`), greedy, earlier turns given with "
                "their reference answers.",
    "vqa_compositional": "Scenes that always hold a colour-shape pair training never drew (purple star, orange "
                         "triangle).",
    **{f"vqa_test_{t}": f"The same test questions in the `{t}` layout instead of the model's own (template "
                        "sensitivity)." for t in WRONG_TEMPLATES},
    "variants": "Stage 2 changed in one way each (its recipe or its text-only chats), from the same stage 1, on the "
                "same scenes and in the same precision as the shipped build (`build_smol --variants`, not shipped): "
                "`full`, the language model fully fine-tuned (lr 2e-5) on the same records; `no_text`, the shipped "
                "LoRA recipe without the text-only chats (what LLaVA-1.5's remedy against forgetting buys); "
                "`all_chats` (where the shipped build has only the open prompts), with short questions and tasks "
                "added to the chats. Share of the forgetting set still right, and test VQA exact match.",
}


def evaluate(out: str | Path = "data", work: str | Path = "build/shapesworld-smol", seed: int = 0,
             progress: bool = True, device: str | None = None, n_eval: int | None = None) -> dict:
    """Every measurement above; returns the summary written to `data/results/smol_llava.json`."""
    out, work, t0 = Path(out), Path(work), time.time()
    if not sw.built_with(work, seed=seed, **HELD_OUT):  # the held-out splits (the same with or without train)
        sw.ensure_built(work, n_train=0, n_text=0, seed=seed, **HELD_OUT)
    test = load_records(work / "instruct_test.json")[:n_eval]
    comp = load_records(work / "instruct_compositional.json")[:n_eval and n_eval // 2]
    kw = answering(device, progress)

    base, base_proc = load(out / "smol-llava-stage1", device=device, template="smollm2")
    asked = candidates()
    before = evaluate_rules(base, base_proc, asked, **kw)
    kept = [q for q, a in zip(asked, before["answers"]) if a["correct"]]
    del base
    model, processor = load(out / "smol-llava", device=device)
    after = evaluate_rules(model, processor, kept, **kw)
    results = {"world_questions": _rules_summary(before), "forgetting": _rules_summary(after)}
    results["vqa_test"] = evaluate_vqa(model, processor, test, **kw)
    results["vqa_compositional"] = evaluate_vqa(model, processor, comp, **kw)
    for t in WRONG_TEMPLATES:
        results[f"vqa_test_{t}"] = evaluate_vqa(model, processor.with_template(t), test, **kw)
    del model
    variants = _measure_variants(work, kept, test, device, kw)
    card = {k: {kk: vv for kk, vv in v.items() if kk not in ("predictions", "answers")} for k, v in results.items()}
    if variants:
        card["variants"] = _variants_card(card["forgetting"]["correct"], card["vqa_test"]["overall"]["exact"], variants)
    update_card(out / "smol-llava", {k: v for k, v in card.items() if k != "world_questions"})
    update_card(out / "smol-llava-stage1", {"world_questions": card["world_questions"]})
    summary = {"n_eval": n_eval, "held_out": HELD_OUT, "eval_seconds": round(time.time() - t0),
               "questions": {q["id"]: q for q in asked}, "base_answers": before["answers"],
               "after_answers": after["answers"], **card,
               "variant_forgetting": _variant_answers(variants), "variant_vqa": _variant_vqa(variants),
               "predictions": {k: v["predictions"][:200] for k, v in results.items() if "predictions" in v}}
    write_json(out / "results" / "smol_llava.json", summary)
    return card


def evaluate_variants(out: str | Path = "data", work: str | Path = "build/shapesworld-smol", progress: bool = True,
                      device: str | None = None, names: tuple[str, ...] | None = None) -> dict:
    """Only the variants (those in `names`, or every one trained), beside the shipped build's stored measurements
    (`data/results/smol_llava.json`, from a whole `evaluate` run, whose forgetting set and `n_eval` it reuses):
    minutes instead of the whole evaluation's hour on 2 CPU cores. Updates the results file and the card, keeping
    the stored measurements of variants not named; returns the card's `variants`."""
    out, work = Path(out), Path(work)
    path = out / "results" / "smol_llava.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stored measurements of smol-llava to put the variants beside; measure "
                                f"it first: python -m minillava.tools.build_smol --out {out} --eval-only")
    summary = read_json(path, what="smol-llava results")
    kept = [summary["questions"][a["id"]] for a in summary["base_answers"] if a["correct"]]
    test = load_records(work / "instruct_test.json")[: summary["n_eval"]]
    n_test, n_stored = len(questions(test)), summary["vqa_test"]["overall"]["n"]
    if n_test != n_stored:  # checked before the minutes of measuring
        raise ValueError(f"{n_test} test questions in {work}, but the stored measurement asked {n_stored}: the test "
                         f"split changed since; measure everything again: python -m minillava.tools.build_smol "
                         f"--out {out} --eval-only")
    untrained = [n for n in names or () if not (work / "variants" / n / "variant.json").is_file()]
    if untrained:  # checked before the minutes of measuring the others
        raise FileNotFoundError(f"{work / 'variants'}: variant {', '.join(untrained)} not trained; train it first: "
                                f"python -m minillava.tools.build_smol --out {out} --variants {' '.join(untrained)}")
    variants = _measure_variants(work, kept, test, device, answering(device, progress), names)
    if not variants:
        raise FileNotFoundError(f"{work / 'variants'}: no variants to measure; train them first: "
                                f"python -m minillava.tools.build_smol --out {out} --variants")
    card = {**summary.get("variants", {}),
            **_variants_card(summary["forgetting"]["correct"], summary["vqa_test"]["overall"]["exact"], variants)}
    update_card(out / "smol-llava", {"variants": card}, {"variants": SECTIONS["variants"]})
    write_json(path, {**summary, "variants": card,
                      "variant_forgetting": {**summary.get("variant_forgetting", {}), **_variant_answers(variants)},
                      "variant_vqa": {**summary.get("variant_vqa", {}), **_variant_vqa(variants)}})
    return card


def rescore(out: str | Path = "data") -> dict:
    """The stored answers of `data/results/smol_llava.json` checked again with today's rules (`candidates()`), after
    a rule is fixed: the base model, the shipped build and the variants answer greedily, so this gives what a new
    `--eval-only` would, in a second instead of an hour. The forgetting set is chosen again from the base model's
    answers (a stricter rule can only shrink it). Updates the results file and the cards; returns what they gained."""
    out = Path(out)
    path = out / "results" / "smol_llava.json"
    summary = read_json(path, what="smol-llava results")
    rules = {q["id"]: q for q in candidates()}
    moved = [i for i, q in summary["questions"].items() if rules.get(i, {}).get("question") != q["question"]]
    if moved:
        raise ValueError(f"{path}: {len(moved)} stored questions (e.g. {moved[:3]}) are no longer those of "
                         f"candidates(); measure again: python -m minillava.tools.build_smol --out {out} --eval-only")

    def check(answers: list[dict], only: set | None = None) -> dict:
        kept = [a for a in answers if only is None or a["id"] in only]
        return rules_report([rules[a["id"]] for a in kept], [a["answer"] for a in kept])

    before = check(summary["base_answers"])
    kept = {a["id"] for a in before["answers"] if a["correct"]}
    unasked = kept - {a["id"] for a in summary["after_answers"]}
    if unasked:
        raise ValueError(f"{path}: the base model now passes {len(unasked)} questions that were not asked after "
                         f"stage 2 (a rule was loosened); measure again: python -m minillava.tools.build_smol "
                         f"--out {out} --eval-only")
    after = check(summary["after_answers"], kept)
    variants = {k: check(v["answers"], kept) for k, v in summary.get("variant_forgetting", {}).items()}
    card = {"world_questions": _rules_summary(before), "forgetting": _rules_summary(after)}
    stored = summary.get("variants", {})
    if stored:
        card["variants"] = {k: {**v, "forgetting": (after if k == "shipped" else variants[k])["correct"]}
                            for k, v in stored.items()}
    update_card(out / "smol-llava", {k: v for k, v in card.items() if k != "world_questions"})
    update_card(out / "smol-llava-stage1", {"world_questions": card["world_questions"]})
    write_json(path, {**summary, **card, "questions": {i: rules[i] for i in summary["questions"]},
                      "base_answers": before["answers"], "after_answers": after["answers"],
                      "variant_forgetting": {k: {**_rules_summary(v), "answers": v["answers"]}
                                             for k, v in variants.items()}})
    return card


def answering(device: str | None, progress: bool) -> dict:
    """How smol-llava's builds and measurements batch their questions: 128 at a time on a GPU, where a batch's
    decoding step costs about what one question's does (on a CPU, the defaults of `evaluation`'s functions)."""
    return dict(progress=progress, **({"batch_size": 128} if pick_device(device).type == "cuda" else {}))


def _measure_variants(work: Path, kept: list[dict], test: list, device: str | None, kw: dict,
                      names: tuple[str, ...] | None = None) -> dict:
    """Forgetting and test VQA of each variant `build_smol --variants` left in `work/variants` (those in `names`)."""
    variants = {}
    for folder in sorted((work / "variants").glob("*/variant.json")):
        if names and folder.parent.name not in names:
            continue
        v_model, v_proc = load(folder.parent, device=device)
        v_after = evaluate_rules(v_model, v_proc, kept, **kw)
        variants[folder.parent.name] = {**read_json(folder, what="variant"), "forgetting": _rules_summary(v_after),
                                        "answers": v_after["answers"],
                                        "vqa_test": evaluate_vqa(v_model, v_proc, test, **kw)}
        del v_model
    return variants


def _variants_card(forgetting: float, vqa_test: float, variants: dict) -> dict:
    return {"shipped": {"forgetting": forgetting, "vqa_test": vqa_test},
            **{k: {"forgetting": v["forgetting"]["correct"], "vqa_test": v["vqa_test"]["overall"]["exact"],
                   **{kk: v[kk] for kk in ("steps", "seconds", "hardware", "precision") if kk in v}}
               for k, v in variants.items()}}


def _variant_answers(variants: dict) -> dict:
    return {k: {**v["forgetting"], "answers": v["answers"]} for k, v in variants.items()}


def _variant_vqa(variants: dict) -> dict:
    """Each variant's test VQA, overall and by question type (false premises, follow-ups, ...)."""
    return {k: {kk: v["vqa_test"][kk] for kk in ("overall", "by_type")} for k, v in variants.items()}


def _rules_summary(result: dict) -> dict:
    return {"n": result["n"], "correct": result["correct"], "by_kind": result["by_kind"]}
