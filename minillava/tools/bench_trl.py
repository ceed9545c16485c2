"""The benchmark's TRL anchor: minillava's trainer against TRL's `SFTTrainer`, stage 2 on the same conversations.

What a user would otherwise run to fine-tune a Llava model on their own LLaVA-format data is TRL's `SFTTrainer`
with transformers' `LlavaForConditionalGeneration` and its processor. Both sides here start from the same weights
(the benchmark's model and its `export_hf` export), train the projector and the language model with the vision
tower frozen (LLaVA's stage 2), on the same records of varied length (one-word answers beside long
descriptions and multi-turn chats), with the same global batch, micro-batch, learning-rate schedule, gradient
clipping and precision, and supervise the same tokens: TRL's processor gets the exported chat template with each
answer marked by `{% generation %}` (`Template.to_jinja(assistant_masks=True)`), so its `assistant_only_loss`
labels exactly what minillava's template labels (checked on the first batch; TRL renders without the BOS token,
one token per sample).

Each side as its users run it: minillava's `train` (records tokenized once up front, LLaVA's modality-length
grouping, the LM head only at supervised positions; `--packing` if asked) and `SFTTrainer` with its defaults
(a random order, each batch rendered, tokenized and its images decoded by TRL's collator, every logit).
Throughput is steady state: the samples of steps 2..N over their wall time, from the end of step 1 to the end of
step N on TRL's side (its callbacks), and the sum of steps 2..N on minillava's (its metrics rows; a step's time
includes collating its batch and decoding its images). `run_s` is the whole call, set-up and model loading
included, for what a user waits. Memory is each run's peak (see `bench.peak_memory`).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from pathlib import Path

import torch

LABEL = "train_stage2_trl"


def available() -> str | None:
    """None when TRL can be imported, else why not (the phase is then skipped and the reason noted)."""
    try:
        import trl  # noqa: F401
    except ImportError as e:
        return f"TRL is not installed ({e}); pip install 'minillava[bench]'"
    return None


def records_file(pair, n: int) -> tuple[Path, list]:
    """`n` stage-2 records (the benchmark's instruction records, cycled with new ids) in a LLaVA JSON file next
    to their images; returns the file and the raw records."""
    source = json.loads((pair.workdir / "shapes" / "instruct_train.json").read_text())
    raw = [{**source[i % len(source)], "id": f"r{i}"} for i in range(n)]
    path = pair.workdir / "shapes" / "trl_bench.json"
    path.write_text(json.dumps(raw))
    return path, raw


def trl_example(record: dict, image_dir: Path) -> dict:
    """A LLaVA record as TRL's vision collator reads it: {"images": [PIL], "messages": typed parts}."""
    from PIL import Image

    from ..data.records import parse_record
    from ..templates import IMAGE_PLACEHOLDER

    parsed = parse_record(record, image_dir, "TRL benchmark data")
    messages = []
    for m in parsed.messages:
        pieces = m["content"].split(IMAGE_PLACEHOLDER)
        parts = [{"type": "text", "text": pieces[0]}]
        for piece in pieces[1:]:
            parts += [{"type": "image"}, {"type": "text", "text": piece}]
        messages.append({"role": m["role"], "content": [p for p in parts if p["type"] == "image" or p["text"]]})
    return {"images": [Image.open(p).convert("RGB") for p in parsed.images], "messages": messages}


def phase_trl(pair, repeats: int, steps: int, micro: int, packing: bool = False) -> dict:
    """Both trainers, `repeats` runs each of `steps` optimizer steps of `pair.cfg.batch` samples, alternating
    which goes first. Returns a phase result as `bench._phase` makes them (ratio = throughput ratio)."""
    from .measure import peak_memory, phase_result, spread

    cfg, device = pair.cfg, pair.device
    if cfg.batch % micro:
        raise ValueError(f"TRL phase: micro batch {micro} does not divide the batch of {cfg.batch}")
    if steps < 2:
        raise ValueError(f"TRL phase: needs at least 2 steps (the first is a warm-up), got {steps}")
    data, raw = records_file(pair, cfg.batch * steps)
    init = pair.workdir / "ml-init"
    if not init.exists():
        from ..checkpoints import save

        pair.restore()
        save(pair.model, pair.processor, init)
    runs = {"ml": [], "trl": []}
    check = {}
    for r in range(repeats):
        for side in (("ml", "trl") if r % 2 == 0 else ("trl", "ml")):
            run, box = (_ml_run if side == "ml" else _trl_run), {}
            args = (pair, data, raw, init, steps, micro, packing, check, r)
            memory = peak_memory(lambda run=run, box=box, args=args: box.update(run(*args)), device)
            runs[side].append({**box, "memory": memory})
    ml_t = [x["seconds"] for x in runs["ml"]]
    trl_t = [x["seconds"] for x in runs["trl"]]
    mem = {side: {k: min(x["memory"][k] for x in rs) if rs[0]["memory"][k] is not None else None
                  for k in ("peak_mb", "growth_mb")} for side, rs in runs.items()}  # the least of the runs
    sizes = [len(t) for t in check.pop("lengths")]
    lengths = sorted(sizes)
    per_run = {"samples": cfg.batch * (steps - 1)}
    result = phase_result(ml_t, trl_t, mem["ml"], mem["trl"], per_run, throughput=True,
                    what=f"stage-2 training, {steps} steps of {cfg.batch} conversations ({cfg.batch // micro} x "
                         f"{micro}) of {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), "
                         "projector + LM, vision frozen; minillava `train` vs TRL `SFTTrainer`; throughput over "
                         "steps 2..N" + (", minillava packed" if packing else ""),
                    extra={"same_supervision": check.get("same"), "packing": packing,
                           "padding_share": padding_share(sizes, cfg.batch, micro, steps),
                           "collate_s_per_step": check.get("collate_s"),
                           "run_s": {"minillava": spread([x["run_s"] for x in runs["ml"]]),
                                     "transformers": spread([x["run_s"] for x in runs["trl"]])},
                           "final_loss": {"minillava": runs["ml"][0]["loss"], "transformers": runs["trl"][0]["loss"]},
                           "trl_version": _trl_version()})
    return result


def padding_share(lengths: list[int], batch: int, micro: int, steps: int, draws: int = 200) -> dict:
    """The share of padding in the micro-batches of `steps` steps: minillava's order (LLaVA's length grouping,
    seed 0, as `train` orders them) and TRL's (a random order, padded to each micro-batch's longest: the mean
    over `draws` shuffles)."""
    from ..training.data import sample_order

    def share(order: list[int]) -> float:
        runs = [order[k:k + micro] for k in range(0, batch * steps, micro)]
        used = sum(lengths[i] for run in runs for i in run)
        return 1 - used / sum(len(run) * max(lengths[i] for i in run) for run in runs)

    grouped = sample_order(lengths, [True] * len(lengths), 0, 0, micro, True)
    g = torch.Generator().manual_seed(0)
    shuffled = [share(torch.randperm(len(lengths), generator=g).tolist()) for _ in range(draws)]
    return {"minillava": share(grouped), "transformers": sum(shuffled) / draws}


def _trl_version() -> str:
    import trl

    return trl.__version__


def _ml_run(pair, data: Path, raw: list, init: Path, steps: int, micro: int, packing: bool, check: dict,
            r: int) -> dict:
    """minillava's `train`, as `minillava train --stage 2 --init ...` runs it."""
    from ..training import TrainConfig, train

    cfg = TrainConfig(stage=2, data=str(data), init=str(init), out=str(pair.workdir / f"ml-run-{r}"),
                      batch_size=pair.cfg.batch, micro_batch_size=micro, max_steps=steps, lr=2e-5,
                      device=str(pair.device), packing=packing, progress=False, seed=0)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        res = train(cfg)
    run_s = time.perf_counter() - start
    seconds = sum(pair.cfg.batch / row["samples_per_s"] for row in res.metrics[1:])  # (every sample is good)
    return {"seconds": seconds, "run_s": run_s, "loss": res.metrics[-1]["loss"]}


def _trl_run(pair, data: Path, raw: list, init: Path, steps: int, micro: int, packing: bool, check: dict,
             r: int) -> dict:
    """TRL's `SFTTrainer` on the exported Llava, as its documentation's VLM example runs it."""
    from datasets import Dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    device = pair.device
    model = LlavaForConditionalGeneration.from_pretrained(pair.workdir / "hf", dtype=torch.float32,
                                                          attn_implementation="sdpa").to(device)
    model.model.vision_tower.requires_grad_(False)  # LLaVA's stage 2: the tower stays frozen
    processor = AutoProcessor.from_pretrained(pair.workdir / "hf")
    processor.chat_template = pair.processor.template.to_jinja(assistant_masks=True)  # the answers marked
    dataset = Dataset.from_list([trl_example(x, data.parent) for x in raw])
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ends.append(time.perf_counter())

    with warnings.catch_warnings():  # (SFTConfig passes on arguments transformers has renamed)
        warnings.simplefilter("ignore", FutureWarning)
        args = SFTConfig(output_dir=str(pair.workdir / f"trl-run-{r}"), per_device_train_batch_size=micro,
                         gradient_accumulation_steps=pair.cfg.batch // micro, learning_rate=2e-5,
                         lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, max_grad_norm=1.0,
                         max_steps=steps, save_strategy="no", report_to="none", logging_steps=1,
                         bf16=device.type == "cuda", use_cpu=device.type == "cpu", dataloader_num_workers=0,
                         assistant_only_loss=True, max_length=None, seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         callbacks=[Clock()])
    if "same" not in check:
        check.update(_same_supervision(pair, trainer, raw, data.parent))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    run_s = time.perf_counter() - start
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    return {"seconds": ends[-1] - ends[0], "run_s": run_s, "loss": losses[-1] if losses else None}


def _same_supervision(pair, trainer, raw: list, image_dir: Path) -> dict:
    """Whether TRL's collator gives the first micro-batch's samples minillava's token ids and supervised
    positions (minillava's with its BOS dropped: TRL renders without special tokens); every sample's length in
    minillava's tokens; and the seconds each side takes to make one step's batch of its samples."""
    from ..data.records import parse_record
    from ..training.data import encode_record

    processor = pair.processor.with_template("vicuna_v1")
    ours = [encode_record(parse_record(x, image_dir, "bench"), processor) for x in raw]
    k = min(4, len(raw))
    theirs = trainer.data_collator([trl_example(x, image_dir) for x in raw[:k]])
    bos = int(ours[0]["input_ids"][0] == processor.tokenizer.bos_token_id)
    same = True
    for i in range(k):
        ids, labels = ours[i]["input_ids"][bos:], ours[i]["labels"][bos:]
        n = len(ids)
        same &= bool(torch.equal(theirs["input_ids"][i, :n], ids) and torch.equal(theirs["labels"][i, :n], labels)
                     and (theirs["labels"][i, n:] == -100).all())
    from ..training.data import collate

    n = pair.cfg.batch  # one step's samples, collated as each side's loader does it (images decoded on both)
    examples = [trl_example(x, image_dir) for x in raw[:n]]
    start = time.perf_counter()
    trainer.data_collator(examples)
    theirs_s = time.perf_counter() - start
    start = time.perf_counter()
    collate(ours[:n], processor, None, "cpu")
    ours_s = time.perf_counter() - start
    return {"same": same, "lengths": [e["input_ids"] for e in ours],
            "collate_s": {"minillava": ours_s, "transformers": theirs_s}}
