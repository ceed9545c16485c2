"""The training loop: `train(cfg)` = `setup` (model, data, optimizer), `train_step` per step, `save_result`.

Plain PyTorch, as LLaVA-1.5's `llava/train/train.py` does it through the HF Trainer: AdamW, cosine schedule with
warmup, gradient accumulation and clipping, bf16 autocast on a GPU, DDP when launched by `torchrun`, resumable
checkpoints (`resume.py`) and exact resume. Losses are summed over supervised tokens and divided by the global
batch's count, so accumulation and processes change nothing but speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoints
from ..data.records import DataError, load_records
from ..model import LlavaModel
from ..processor import Processor
from ..utils import (
    atomic_dir,
    check_replaceable,
    lr_at,
    output_lock,
    pick_device,
    read_json,
    remove_leftovers,
    write_json,
)
from .cache import FeatureCache
from .config import COMPILE_BACKEND, TrainConfig, apply_recipe
from .data import check_images, collate, encode_all, epoch_order
from .resume import restore_state, resume_settings, save_state


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    seconds: float
    metrics: list[dict]
    summary: str


@dataclass
class Run:
    """Everything a run holds between steps (what `setup` builds and `train_step` uses)."""

    cfg: TrainConfig
    model: LlavaModel
    net: torch.nn.Module  # the model as the steps call it: wrapped by DDP and/or torch.compile
    processor: Processor
    examples: list[dict]
    opt: torch.optim.Optimizer
    trainable: list[tuple[str, torch.nn.Parameter]]
    cache: FeatureCache | None
    device: torch.device
    rank: int
    world: int
    batch: int
    accum: int
    steps_per_epoch: int
    total: int
    warmup: int
    lr: float
    report: list[str]


# ---- setup -----------------------------------------------------------------------------------------------------
def initial_model(cfg: TrainConfig) -> tuple[LlavaModel, Processor]:
    """Where a run starts: backbones + a fresh projector (stage 1, or stage 2 without `init`, which skips
    feature alignment), else the `init` checkpoint (a stage-1 output or a full minillava model folder)."""
    template, aspect = cfg.resolved_template(), cfg.recipe.aspect
    if cfg.stage == 1 or cfg.init is None:
        return checkpoints.assemble(cfg.vision, cfg.lm, cfg.projector, cfg.feature_layer, aspect, template)
    path = Path(cfg.init)
    if not path.is_dir():
        raise FileNotFoundError(f"init checkpoint '{path}': not found")
    meta = read_json(path / "config.json", what="init checkpoint config")
    if meta.get("format") == checkpoints.STAGE1_FORMAT:
        _check_init_matches(cfg, path, {k: meta.get(k) for k in ("vision", "lm", "projector", "feature_layer")})
        return checkpoints.load_stage1(path, template, aspect)
    if meta.get("format") != checkpoints.FORMAT:
        raise ValueError(f"init checkpoint '{path}': not a stage-1 output or a full minillava model folder")
    model, processor = checkpoints.load(path, device="cpu", template=template)
    _check_init_matches(cfg, path, {"vision": None, "lm": None, "projector": model.projector.kind,
                                    "feature_layer": model.vision_tower.feature_layer})
    processor.image_processor.aspect = aspect
    return model, processor


def _check_init_matches(cfg: TrainConfig, path: Path, made_with: dict) -> None:
    """An `init` checkpoint fixes the backbones, projector and feature layer: a setting asked for that differs
    from it (None: the checkpoint holds its own backbones, so none may be named) is an error, not ignored."""
    for part, there in made_with.items():
        asked = getattr(cfg, part)
        if asked != TrainConfig.__dataclass_fields__[part].default and asked != there:
            held = f"was made with {part} {there!r}" if there is not None else f"holds its own {part}"
            raise ValueError(f"init checkpoint '{path}' {held}, but {part} {asked!r} was asked for; leave "
                             f"{part} out when starting from init")


def _dist() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def setup(cfg: TrainConfig) -> Run:
    """Check the settings, load the data (every record encoded, every image checked), build the model as the
    stage's recipe says, and the optimizer."""
    rank, world = _dist()
    cfg.check(world)
    tune = dict(cfg.recipe.tune)
    if cfg.lora or cfg.freeze_lm:
        tune["language_model"] = "lora" if cfg.lora else "frozen"
    records = load_records(cfg.data, cfg.images)
    torch.manual_seed(cfg.seed)  # the new projector's initialisation
    model, processor = initial_model(cfg)
    if cfg.max_length:
        if model.max_length and cfg.max_length > model.max_length:
            raise ValueError(f"max length {cfg.max_length}: longer than the language model's context of "
                             f"{model.max_length} tokens")
        processor.max_length = cfg.max_length
    examples = encode_all(records, processor, cfg.progress and rank == 0)
    check_images(records, cfg.progress and rank == 0)
    report = apply_recipe(model, tune, cfg)
    device = pick_device(cfg.device) if world == 1 else torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    cache = None
    if cfg.feature_cache != "off":
        cache = FeatureCache(model.vision_tower, processor.image_processor,
                             cfg.cache_dir if cfg.feature_cache == "disk" else None)
    batch = cfg.resolved_batch_size()
    steps_per_epoch = len(examples) // batch  # a partial last batch is dropped: every step sees a full batch
    if steps_per_epoch == 0:
        raise DataError(f"data '{cfg.data}': {len(examples)} samples is fewer than one batch of {batch}")
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    lr = cfg.resolved_lr()
    opt = torch.optim.AdamW([p for _, p in trainable], lr=lr, weight_decay=cfg.weight_decay)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net, dynamic=True, backend=COMPILE_BACKEND)  # padded batches vary in length
    return Run(cfg, model, net, processor, examples, opt, trainable, cache, device, rank, world, batch,
               batch // (cfg.micro_batch_size * world), steps_per_epoch, total, math.ceil(cfg.warmup_ratio * total),
               lr, report)


# ---- one step ----------------------------------------------------------------------------------------------------
def train_step(run: Run, step: int, order: list[int]) -> dict:
    """One optimizer step on the global batch `step` of the epoch order `order`; returns its metrics row.

    The global batch of B samples is cut into micro-batches of m per process; process r takes the r-th slice of
    each run of m x world, so the union over processes and micro-steps is the whole batch."""
    cfg, world, rank, m = run.cfg, run.world, run.rank, run.cfg.micro_batch_size
    within = step % run.steps_per_epoch
    ids = order[within * run.batch:(within + 1) * run.batch]
    n_tokens = sum(run.examples[i]["n_supervised"] for i in ids)  # the whole global batch's supervised tokens
    micro = [ids[(k * world + rank) * m:(k * world + rank + 1) * m] for k in range(run.accum)]
    for g in run.opt.param_groups:
        g["lr"] = run.lr * lr_at(step, run.total, run.warmup)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if run.device.type == "cuda"
                else contextlib.nullcontext())
    step_loss = torch.zeros((), device=run.device)
    t0 = time.perf_counter()
    for k, mb in enumerate(micro):
        inputs = collate([run.examples[i] for i in mb], run.processor, run.cache, run.device)
        sync = k == len(micro) - 1 or world == 1
        with (run.net.no_sync() if not sync else contextlib.nullcontext()), autocast:
            out = run.net(**inputs, return_logits=False)
            loss_sum = out.loss * out.num_tokens
        (loss_sum * world / n_tokens).backward()  # DDP averages over processes; this undoes it
        step_loss += loss_sum.detach()
    if world > 1:
        torch.distributed.all_reduce(step_loss)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in run.trainable], cfg.max_grad_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {"step": step + 1, "epoch": round((step + 1) / run.steps_per_epoch, 4),
            "loss": float(step_loss) / n_tokens, "lr": run.opt.param_groups[0]["lr"],
            "grad_norm": float(grad_norm), "samples_per_s": len(ids) / dt, "tokens": n_tokens}


# ---- the whole run -----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainResult:
    """Run one training stage as `cfg` says; returns where the result went and the per-step metrics. The output
    is held (`output_lock`) while the run goes: a second run into it is refused."""
    writer = int(os.environ.get("RANK", "0")) == 0  # process 0 alone writes the output
    with output_lock(cfg.out) if writer else contextlib.nullcontext():
        return run_stage(cfg)


def run_stage(cfg: TrainConfig) -> TrainResult:
    """`train` without the lock: setup, the steps (with resumable checkpoints), the result and the clean-up."""
    from tqdm.auto import tqdm

    run = setup(cfg)
    out = Path(cfg.out)
    partial = Path(f"{out}.partial")  # (through Path: "runs/x/" has it beside the folder too, not inside)
    settings = resume_settings(cfg, len(run.examples), run.world)
    start, metrics = 0, []
    if cfg.resume and (partial / "state.json").is_file():
        start, metrics = restore_state(partial, run.opt, run.trainable, settings)
    if run.rank == 0:
        print(f"stage {cfg.stage}: {len(run.examples)} samples, {run.total} steps of {run.batch} ({run.accum} x "
              f"{cfg.micro_batch_size} x {run.world} processes), lr {run.lr:g}, template {cfg.resolved_template()}")
        print("\n".join(run.report))
        if start:
            print(f"resuming from step {start} ({partial})")
    bar = tqdm(total=run.total, initial=start, desc=f"stage {cfg.stage}", disable=not (cfg.progress and run.rank == 0))
    t0 = time.perf_counter()
    order, order_epoch = None, None
    for step in range(start, run.total):
        epoch = step // run.steps_per_epoch
        if epoch != order_epoch:
            order, order_epoch = epoch_order(run.examples, cfg, epoch, cfg.micro_batch_size * run.world), epoch
        row = train_step(run, step, order)
        metrics.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < run.total and run.rank == 0:
            save_state(partial, run.opt, run.trainable, step + 1, metrics, settings)
    bar.close()
    seconds = time.perf_counter() - t0
    if run.rank == 0:
        save_result(out, cfg, run.model, run.processor, metrics)
        clean_up(out, partial)
    if run.world > 1:
        torch.distributed.barrier()
    final = metrics[-1]["loss"] if metrics else float("nan")
    hits = f", feature cache {run.cache.hits} hits / {run.cache.misses} misses" if run.cache else ""
    summary = (f"stage {cfg.stage} done: {len(metrics)} steps in {seconds:.1f} s, final loss {final:.4f}"
               f"{hits} -> {out}")
    if run.rank == 0:
        print(summary)
    return TrainResult(out, len(metrics), final, seconds, metrics, summary)


def save_result(out: Path, cfg: TrainConfig, model: LlavaModel, processor: Processor, metrics: list[dict]) -> None:
    """Stage 1: the projector alone (+ backbone names). Stage 2: the full model, or the LoRA adapter. Beside it
    `run.json`: the settings and every step's metrics."""
    with atomic_dir(out, marker="config.json") as tmp:
        if cfg.stage == 1:
            checkpoints.save_stage1(model, cfg.vision, cfg.lm, tmp)
        elif cfg.lora:
            checkpoints.save_lora(model, processor, cfg.init, cfg.vision, cfg.lm, tmp)
        else:
            checkpoints.write_model_files(model, processor, tmp)
        write_json(tmp / "run.json", {"train_config": dataclasses.asdict(cfg), "metrics": metrics})


def clean_up(out: Path, partial: Path) -> None:
    """What a finished run owns goes: its resumable checkpoint `partial` (if `save_state` wrote it) and the
    temporary folders killed saves left beside `out` and `partial` (`remove_leftovers`). Prints what stays."""
    notes = []
    if partial.exists():
        try:
            check_replaceable(partial, "state.json", "resumable checkpoint")
            shutil.rmtree(partial)
        except OSError as e:
            notes.append(f"left '{partial}' ({e})")
    for note in notes + remove_leftovers(out) + remove_leftovers(partial):
        print(f"clean-up of '{out}': {note}", file=sys.stderr)
