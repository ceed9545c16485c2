"""Measure smol-llava for its model cards and the book: `python -m minillava.tools.build_smol --eval-only`.

- `world_questions`: the candidate text-only questions (`data/world_questions.py`) asked to the base model
  (`smol-llava-stage1`, whose stage leaves the LM untouched), in its own template; those it answers right form
  the fixed set that measures forgetting;
- `forgetting`: that set asked to `smol-llava` (LoRA merged): the share still answered right;
- `vqa_test`, `vqa_compositional`: ShapesWorld visual questions in its own `smollm2` template;
- `vqa_test_vicuna_v1`, `vqa_test_chatml_direct`: the same test questions in a layout it was not trained on;
- `variants`: forgetting and test VQA of the stage-2 variants `build_smol --variants` trained (full fine-tune,
  text-only chats mixed in), beside the shipped LoRA build.

Everything goes into the cards and into `data/results/smol_llava.json` (answers included), which chapter 9 reads.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..checkpoints import load
from ..data import shapesworld as sw
from ..data.records import load_records
from ..data.world_questions import candidates
from ..evaluation import evaluate_rules, evaluate_vqa
from ..utils import read_json, write_json
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
    "variants": "Stage 2 changed in one way each, from the same stage 1 (`build_smol --variants`, not shipped): the "
                "language model fully fine-tuned (lr 2e-5), and the LoRA recipe with text-only chats mixed in (the "
                "base model's own answers to 320 open prompts, LLaVA-1.5's remedy against forgetting); share of the "
                "forgetting set still right, and test VQA exact match. Each is trained on the ShapesWorld data its own "
                "run generated: where the generator changed between the shipped build and a variant (the cpu "
                "text_mix was trained after the natural-use questions came, the shipped cpu build before), the "
                "comparison is not a controlled one.",
}


def evaluate(out: str | Path = "data", work: str | Path = "build/shapesworld-smol", seed: int = 0,
             progress: bool = True, device: str | None = None, n_eval: int | None = None) -> dict:
    """Every measurement above; returns the summary written to `data/results/smol_llava.json`."""
    out, work, t0 = Path(out), Path(work), time.time()
    if not sw.built_with(work, seed=seed, **HELD_OUT):  # the held-out splits (the same with or without train)
        sw.ensure_built(work, n_train=0, n_text=0, seed=seed, **HELD_OUT)
    test = load_records(work / "instruct_test.json")[:n_eval]
    comp = load_records(work / "instruct_compositional.json")[:n_eval and n_eval // 2]
    kw = dict(progress=progress)

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
    variants = {}
    for folder in sorted((work / "variants").glob("*/variant.json")):  # `build_smol --variants` trained them
        v_model, v_proc = load(folder.parent, device=device)
        v_after = evaluate_rules(v_model, v_proc, kept, **kw)
        variants[folder.parent.name] = {**read_json(folder, what="variant"), "forgetting": _rules_summary(v_after),
                                        "answers": v_after["answers"],
                                        "vqa_test": _overall(evaluate_vqa(v_model, v_proc, test, **kw))}
        del v_model
    card = {k: {kk: vv for kk, vv in v.items() if kk not in ("predictions", "answers")} for k, v in results.items()}
    if variants:
        card["variants"] = {"lora (shipped)": {"forgetting": card["forgetting"]["correct"],
                                               "vqa_test": card["vqa_test"]["overall"]["exact"]},
                            **{k: {"forgetting": v["forgetting"]["correct"], "vqa_test": v["vqa_test"]["exact"],
                                   **{kk: v[kk] for kk in ("steps", "seconds", "hardware", "precision") if kk in v}}
                               for k, v in variants.items()}}
    update_card(out / "smol-llava", {k: v for k, v in card.items() if k != "world_questions"})
    update_card(out / "smol-llava-stage1", {"world_questions": card["world_questions"]})
    summary = {"n_eval": n_eval, "held_out": HELD_OUT, "eval_seconds": round(time.time() - t0),
               "questions": {q["id"]: q for q in asked}, "base_answers": before["answers"],
               "after_answers": after["answers"], **card,
               "variant_forgetting": {k: {**v["forgetting"], "answers": v["answers"]} for k, v in variants.items()},
               "predictions": {k: v["predictions"][:200] for k, v in results.items() if "predictions" in v}}
    write_json(out / "results" / "smol_llava.json", summary)
    return card


def _overall(result: dict) -> dict:
    return {"n": result["overall"]["n"], "exact": result["overall"]["exact"]}


def _rules_summary(result: dict) -> dict:
    return {"n": result["n"], "correct": result["correct"], "by_kind": result["by_kind"]}
