"""The training loop: `train(cfg)` = `setup` (model, data, optimizer), `train_step` per step, `save_result`.

Plain PyTorch, as LLaVA-1.5's `llava/train/train.py` does it through the HF Trainer: AdamW, cosine schedule with
warmup, gradient accumulation and clipping, bf16 on a GPU, DDP or FSDP2 when launched by `torchrun`
(`distributed.py`), activation checkpointing, resumable checkpoints (`resume.py`) and exact resume, a metrics log
(`logs.py`). Losses are summed over supervised tokens and divided by the global batch's count, so accumulation
and processes change nothing but speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoints, zoo
from ..data.records import DataError, load_records
from ..model import LlavaModel
from ..outputs import atomic_dir, check_replaceable, output_lock, remove_leftovers
from ..processor import Processor
from ..utils import lr_at, pick_device, read_json, write_json
from . import distributed, logs
from .cache import FeatureCache, choose_cache, default_cache_dir
from .config import COMPILE_BACKEND, TrainConfig, apply_recipe
from .data import LazyData, check_images, collate, encode_all, epoch_order, step_counts
from .resume import restore_sharded_state, restore_state, resume_settings, save_sharded_state, save_state


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
    net: torch.nn.Module  # the model as the steps call it: wrapped by DDP (or sharded) and/or compiled
    processor: Processor
    examples: list[dict] | None  # every sample encoded up front; None with lazy_data (then `data`)
    data: LazyData | None
    n_samples: int
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
    precision: str  # "fp32" or "bf16" (TrainConfig.resolved_precision)
    sizes: dict  # parameter counts for the FLOP count (logs.model_sizes)
    peak_tflops: float | None  # one accelerator's peak, for mfu (logs.peak_tflops)


# ---- setup -----------------------------------------------------------------------------------------------------
def initial_model(cfg: TrainConfig) -> tuple[LlavaModel, Processor]:
    """Where a run starts: backbones + a fresh projector (stage 1, or stage 2 without `init`, which skips
    feature alignment), else the `init` checkpoint (a stage-1 output or a full minillava model folder)."""
    aspect = cfg.recipe.aspect
    if cfg.stage == 1 or cfg.init is None:
        template = cfg.resolved_template(cfg.lm)
        return checkpoints.assemble(cfg.vision, cfg.lm, cfg.projector, cfg.feature_layer, aspect, template)
    path = init_folder(cfg)
    if not path.is_dir():
        raise FileNotFoundError(f"init checkpoint '{path}': not found")
    meta = read_json(path / "config.json", what="init checkpoint config")
    template = cfg.resolved_template(meta.get("lm"))
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


def init_folder(cfg: TrainConfig) -> Path:
    """The folder of `cfg.init`: a zoo name (`tiny-llava-stage1`) or a path."""
    return Path(zoo.resolve(cfg.init) if cfg.init in zoo.LLAVAS else cfg.init)


def _check_init_matches(cfg: TrainConfig, path: Path, made_with: dict) -> None:
    """An `init` checkpoint fixes the backbones, projector and feature layer: a setting asked for that differs
    from it (None: the checkpoint holds its own backbones, so none may be named) is an error, not ignored."""
    for part, there in made_with.items():
        asked = getattr(cfg, part)
        if asked != TrainConfig.__dataclass_fields__[part].default and asked != there:
            held = f"was made with {part} {there!r}" if there is not None else f"holds its own {part}"
            raise ValueError(f"init checkpoint '{path}' {held}, but {part} {asked!r} was asked for; leave "
                             f"{part} out when starting from init")


def load_model_and_data(cfg: TrainConfig, rank: int) -> tuple[LlavaModel, Processor, tuple, list[str]]:
    """The model as the stage's recipe says (frozen, full or LoRA parts) and the data: every record encoded and
    every image checked, or with lazy_data a `LazyData` that encodes them as the steps need them. Returns
    (model, processor, (examples or None, LazyData or None), the recipe's report)."""
    tune = dict(cfg.recipe.tune)
    if cfg.lora or cfg.freeze_lm:
        tune["language_model"] = "lora" if cfg.lora else "frozen"
    if cfg.vision_lr is not None:
        tune["vision_tower"] = "full"
    # read before the model loads: a missing or malformed file fails at once
    source = LazyData.open(cfg.data, cfg.images, cfg.skip_bad_samples) if cfg.lazy_data else load_records(
        cfg.data, cfg.images)
    torch.manual_seed(cfg.seed)  # the new projector's initialisation
    model, processor = initial_model(cfg)
    if cfg.max_length:
        if model.max_length and cfg.max_length > model.max_length:
            raise ValueError(f"max length {cfg.max_length}: longer than the language model's context of "
                             f"{model.max_length} tokens")
        processor.max_length = cfg.max_length
    if cfg.lazy_data:
        examples, data = None, source.encode_with(processor)
    else:
        examples, data = encode_all(source, processor, cfg.progress and rank == 0), None
        check_images(source, cfg.progress and rank == 0)
    report = apply_recipe(model, tune, cfg)
    return model, processor, (examples, data), report


def setup(cfg: TrainConfig) -> Run:
    """Check the settings, load the model and data (`load_model_and_data`), put the model on its device and
    wrap it for the strategy (`distributed.wrap`: DDP, or FSDP2 sharding), and build the optimizer."""
    rank, world = distributed.init(cfg.strategy)
    cfg.check(world)
    logs.check_report_to(cfg.report_to)
    model, processor, (examples, data), report = load_model_and_data(cfg, rank)
    n_samples = len(data) if data is not None else len(examples)
    n_images = data.n_images if data is not None else len({p for e in examples for p in e["images"]})
    device = pick_device(cfg.device) if world == 1 else torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    precision = cfg.resolved_precision(device)
    model.to(device).train()
    distributed.store_frozen(model, cfg.strategy, precision)  # before the feature cache fingerprints the tower
    if cfg.gradient_checkpointing:
        distributed.enable_checkpointing(model)
    batch = cfg.resolved_batch_size()
    steps_per_epoch = n_samples // batch  # a partial last batch is dropped: every step sees a full batch
    if steps_per_epoch == 0:
        raise DataError(f"data '{cfg.data}': {n_samples} samples is fewer than one batch of {batch}")
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    cache = feature_cache(cfg, model, processor, n_images, total * batch / n_samples, report)
    sizes = logs.model_sizes(model, tower_runs=cache is None)  # (whole counts: before sharding)
    net = distributed.wrap(model, cfg.strategy, device, world, precision)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # after: FSDP swaps in shards
    lr = cfg.resolved_lr()
    tower = {id(p) for p in model.vision_tower.parameters()}
    groups = [{"params": [p for _, p in trainable if id(p) not in tower], "peak_lr": lr},  # (first: the lr logged)
              {"params": [p for _, p in trainable if id(p) in tower], "peak_lr": cfg.vision_lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=cfg.weight_decay)
    if cfg.compile:
        net = torch.compile(net, dynamic=True, backend=COMPILE_BACKEND)  # padded batches vary in length
    return Run(cfg, model, net, processor, examples, data, n_samples, opt, trainable, cache, device, rank, world, batch,
               batch // (cfg.micro_batch_size * world), steps_per_epoch, total, math.ceil(cfg.warmup_ratio * total),
               lr, report, precision, sizes, logs.peak_tflops(device, precision, cfg.peak_tflops))


def feature_cache(cfg: TrainConfig, model: LlavaModel, processor: Processor, n_images: int, epochs: float,
                  report: list[str]) -> FeatureCache | None:
    """The feature cache `choose_cache` picks for `n_images` images over `epochs` passes (its reason goes into
    `report`), or None; the processes on this machine each hold their own memory cache."""
    tower = model.vision_tower
    if not tower.frozen:
        report.append("feature cache: off (the vision tower trains: its features change at every step)")
        return None
    choice = choose_cache(cfg.feature_cache, n_images, tower.num_tokens, tower.hidden_size,
                          next(tower.parameters()).dtype, epochs, cfg.cache_dir or default_cache_dir(cfg.out),
                          copies=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    report.append(choice.reason)
    return FeatureCache(tower, processor.image_processor, choice.directory) if choice.kind != "off" else None


# ---- one step ----------------------------------------------------------------------------------------------------
def train_step(run: Run, step: int, order: list[int], loaded: list[dict] | None = None) -> dict:
    """One optimizer step on the global batch `step` of the epoch order `order`; returns its metrics row
    (`logs.py` lists its fields). `loaded`: with lazy_data, this process's micro-batches (`LazyData.steps`).

    The global batch of B samples is cut into micro-batches of m per process; process r takes the r-th slice of
    each run of m x world, so the union over processes and micro-steps is the whole batch."""
    cfg, world, rank, m = run.cfg, run.world, run.rank, run.cfg.micro_batch_size
    within = step % run.steps_per_epoch
    ids = order[within * run.batch:(within + 1) * run.batch]
    counts = batch_counts(run, ids, loaded)
    n_tokens = counts["supervised"]  # the whole global batch's supervised tokens
    if loaded is None:
        micro = [ids[(k * world + rank) * m:(k * world + rank + 1) * m] for k in range(run.accum)]
    else:
        micro = loaded
    if n_tokens == 0 and loaded is not None and not run.data.skip_bad:  # what is wrong with the first bad sample
        run.data.raise_first_bad(loaded)
    if n_tokens == 0:  # (lazy_data with skip_bad_samples: all processes agree, the counts are all-reduced)
        raise DataError(f"step {step + 1}: every sample of the global batch of {run.batch} was bad and skipped; "
                        "check the data with `minillava data check`")
    for g in run.opt.param_groups:  # each group its own peak (the vision tower's `vision_lr`), one schedule
        g["lr"] = g["peak_lr"] * lr_at(step, run.total, run.warmup)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    step_loss = torch.zeros((), device=run.device)
    t0 = time.perf_counter()
    for k, mb in enumerate(micro):
        weight = 1.0
        if loaded is None:
            inputs = collate([run.examples[i] for i in mb], run.processor, run.cache, run.device, cfg.packing)
        else:
            inputs = run.data.inputs(mb, run.cache, run.device)  # a bad sample: DataError, or left out
            if inputs is None and world == 1:
                continue
            if inputs is None:  # every process must take part in the collectives: a stand-in, weighted 0
                inputs, weight = run.data.stand_in(run.cache, run.device), 0.0
        # DDP averages gradients once, after the last micro-batch. FSDP reduce-scatters after each: keeping whole
        # gradients until the last would undo the memory that sharding saves.
        defer = cfg.strategy == "ddp" and world > 1 and k < len(micro) - 1
        sync = run.net.no_sync() if defer else contextlib.nullcontext()
        with sync, distributed.autocast(run.device, run.precision):
            out = run.net(**inputs, return_logits=False)
            loss_sum = out.loss * out.num_tokens * weight
        (loss_sum * world / n_tokens).backward()  # DDP and FSDP average over processes; this undoes it
        step_loss += loss_sum.detach()
    if world > 1:
        torch.distributed.all_reduce(step_loss)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in run.trainable], cfg.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor; its full value is the norm over every shard
        grad_norm = grad_norm.full_tensor()
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # the step's kernels have run: the time below is the step's
    return metrics_row(run, step, counts, float(step_loss) / n_tokens, float(grad_norm), time.perf_counter() - t0)


def batch_counts(run: Run, ids: list[int], loaded: list[dict] | None) -> dict:
    """The global batch's samples, supervised tokens, tokens (image tokens included, padding not) and images:
    from the encoded examples, or (lazy_data) from what each process loaded, summed over processes."""
    if loaded is None:
        n = [len(ids), sum(run.examples[i]["n_supervised"] for i in ids),
             sum(len(run.examples[i]["input_ids"]) for i in ids), sum(len(run.examples[i]["images"]) for i in ids)]
    else:
        n = step_counts(loaded).to(run.device)
        if run.world > 1:
            torch.distributed.all_reduce(n)
        n = n.tolist()
    return dict(zip(("samples", "supervised", "tokens", "images"), n))


def metrics_row(run: Run, step: int, counts: dict, loss: float, grad_norm: float, seconds: float) -> dict:
    """The metrics of step `step` (0-based) on a global batch of `counts` (`batch_counts`), which took `seconds`."""
    tokens, supervised = counts["tokens"], counts["supervised"]
    row = {"step": step + 1, "epoch": round((step + 1) / run.steps_per_epoch, 4), "loss": loss,
           "lr": run.opt.param_groups[0]["lr"], "grad_norm": grad_norm, "samples_per_s": counts["samples"] / seconds,
           "tokens_per_s": tokens / seconds, "tokens": supervised}
    if run.device.type == "cuda":
        image_tokens = counts["images"] * run.model.num_image_tokens
        flops = logs.step_flops(run.sizes, tokens, supervised, image_tokens)
        row.update(logs.cuda_metrics(run.device, flops, seconds, run.world, run.peak_tflops))
    return row


# ---- the whole run -----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainResult:
    """Run one training stage as `cfg` says; returns where the result went and the per-step metrics. The output
    is held (`output_lock`) while the run goes: a second run into it is refused."""
    writer = int(os.environ.get("RANK", "0")) == 0  # process 0 alone writes the output
    try:
        with output_lock(cfg.out) if writer else contextlib.nullcontext():
            return run_stage(cfg)
    finally:
        distributed.finish()  # (a single-process fsdp run's group of one)


def run_stage(cfg: TrainConfig) -> TrainResult:
    """`train` without the lock: setup, the steps (with resumable checkpoints), the result and the clean-up."""
    run = setup(cfg)
    out = Path(cfg.out)
    partial = Path(f"{out}.partial")  # (through Path: "runs/x/" has it beside the folder too, not inside)
    settings = resume_settings(cfg, run.n_samples, run.world, run.precision)
    start, metrics = 0, []
    if cfg.resume and (partial / "state.json").is_file():
        start, metrics = restore(run, partial, settings)
    log = logs.MetricsLog(logs.log_dir(out, cfg.log_dir), cfg.report_to, metrics) if run.rank == 0 else None
    if run.rank == 0:
        plural = lambda n, word, s="s": f"{n} {word}{s * (n != 1)}"  # noqa: E731
        print(f"stage {cfg.stage}: {run.n_samples} samples, {plural(run.total, 'step')} of {run.batch} "
              f"({plural(run.accum, 'micro-batch', 'es')} of {cfg.micro_batch_size} on each of "
              f"{plural(run.world, 'process', 'es')}, {cfg.strategy}, {run.precision}), lr {run.lr:g}, "
              f"template {run.processor.template.name}")
        print("\n".join(run.report))
        print(f"step metrics: {log.path}" + (f" (TensorBoard: {log.path.parent / 'tensorboard'})"
                                               if cfg.report_to == "tensorboard" else ""))
        if start:
            print(f"resuming from step {start} ({partial})")
    t0 = time.perf_counter()
    try:
        run_steps(run, start, metrics, log, partial, settings)
    finally:
        if log is not None:
            log.close()
    seconds = time.perf_counter() - t0
    finish(run, out, partial, metrics)
    final = metrics[-1]["loss"] if metrics else float("nan")
    hits = f", feature cache {run.cache.hits} hits / {run.cache.misses} misses" if run.cache else ""
    if run.data is not None and run.data.skipped_report():  # (each process lists the bad samples it met)
        print("\n".join(run.data.skipped_report()), file=sys.stderr)
    took = (f"{len(metrics)} steps, the last {len(metrics) - start} in {seconds:.1f} s (resumed at step {start})"
            if start else f"{len(metrics)} steps in {seconds:.1f} s")
    summary = f"stage {cfg.stage} done: {took}, final loss {final:.4f}{hits} -> {out}"
    if run.rank == 0:
        print(summary)
    return TrainResult(out, len(metrics), final, seconds, metrics, summary)


def run_steps(run: Run, start: int, metrics: list[dict], log: logs.MetricsLog | None, partial: Path,
              settings: dict) -> None:
    """Steps `start` .. total, each row appended to `metrics` and logged; a checkpoint every `save_every`."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    bar = tqdm(total=run.total, initial=start, desc=f"stage {cfg.stage}", disable=not (cfg.progress and run.rank == 0))
    order, order_epoch, loaded = None, None, None
    for step in range(start, run.total):
        epoch = step // run.steps_per_epoch
        if epoch != order_epoch:
            (order, loaded), order_epoch = epoch_plan(run, epoch, step), epoch
        row = train_step(run, step, order, next(loaded) if loaded is not None else None)
        metrics.append(row)
        if log is not None:
            log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < run.total:
            checkpoint(run, partial, step + 1, metrics, settings)
    bar.close()


def epoch_plan(run: Run, epoch: int, step: int) -> tuple[list[int], Iterator | None]:
    """The order of `epoch` and, with lazy_data, an iterator over this process's micro-batches of its steps from
    `step` (a resumed run starts mid-epoch) to the end of the epoch or of the run. Length groups are one global
    batch, as LLaVA's LengthGroupedSampler makes them (per-device batch x processes x accumulation steps), so
    the order, and with it the losses, do not depend on how the batch is split."""
    cfg, group = run.cfg, run.batch
    if run.data is None:
        return epoch_order(run.examples, cfg, epoch, group), None
    order = run.data.order(cfg.seed, epoch, group, cfg.group_by_length)
    first, last = step - epoch * run.steps_per_epoch, min(run.steps_per_epoch, run.total - epoch * run.steps_per_epoch)
    return order, run.data.steps(order, first, last, run.batch, cfg.micro_batch_size, run.rank, run.world,
                                 cfg.num_workers, run.cache, cfg.packing)


def checkpoint(run: Run, partial: Path, step: int, metrics: list[dict], settings: dict) -> None:
    """A resumable checkpoint after `step` steps: process 0 writes it (ddp), or every process its shards (fsdp)."""
    if run.cfg.strategy == "fsdp":
        save_sharded_state(partial, run.model, run.opt, step, metrics, settings)
        return
    rng = distributed.gather(torch.get_rng_state(), run.world)  # each process draws its own LoRA dropout masks
    if run.rank == 0:
        save_state(partial, run.opt, run.trainable, step, metrics, settings, rng)


def restore(run: Run, partial: Path, settings: dict) -> tuple[int, list[dict]]:
    """Load the checkpoint `partial` (as `checkpoint` wrote it) into the run; returns (step, metrics so far)."""
    if run.cfg.strategy == "fsdp":
        return restore_sharded_state(partial, run.model, run.opt, settings)
    return restore_state(partial, run.opt, run.trainable, settings, run.rank)


def finish(run: Run, out: Path, partial: Path, metrics: list[dict]) -> None:
    """Process 0 saves the result in the ordinary single-file format (an FSDP model is first gathered whole, every
    process taking part) and cleans up (the default log folder too); then every process waits for it."""
    model = run.model
    if run.cfg.strategy == "fsdp":
        state = distributed.full_state_dict(run.model)
        model = distributed.unsharded_copy(run.model, state) if run.rank == 0 else None
    if run.rank == 0:
        save_result(out, run.cfg, model, run.processor, metrics)
        clean_up(out, partial)
        if run.cache is not None and run.cache.directory is not None and not run.cfg.cache_dir:
            remove_own_cache(run.cache.directory)  # the run's own disk cache (none was named)
        if run.cfg.log_dir is None and run.cfg.report_to is None:  # the default log was a live view (`logs.py`)
            logs.remove_live_log(logs.log_dir(out, None))
    distributed.barrier(run.world)


def remove_own_cache(directory: Path) -> None:
    """Delete the features a run kept in its default cache folder (`<out>.features/<tower fingerprint>`), and
    `<out>.features` if that empties it: anything else a user put there stays."""
    shutil.rmtree(directory, ignore_errors=True)
    if directory.parent.is_dir() and not any(directory.parent.iterdir()):
        directory.parent.rmdir()


def save_result(out: Path, cfg: TrainConfig, model: LlavaModel, processor: Processor, metrics: list[dict]) -> None:
    """Stage 1: the projector alone (+ backbone names). Stage 2: the full model, or the LoRA adapter. Beside it
    `run.json`: the settings and every step's metrics."""
    with atomic_dir(out, marker="config.json") as tmp:
        if cfg.stage == 1:
            checkpoints.save_stage1(model, cfg.vision, cfg.lm, tmp)
        elif cfg.lora:
            vision, lm = cfg.vision, cfg.lm
            if cfg.init:  # the backbones are the init checkpoint's (a full model folder names none)
                meta = read_json(init_folder(cfg) / "config.json", what="init checkpoint config")
                vision, lm = meta.get("vision"), meta.get("lm")
            checkpoints.save_lora(model, processor, cfg.init, vision, lm, tmp)
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
