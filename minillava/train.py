"""Two-stage training, as LLaVA-1.5 does it (`scripts/v1_5/pretrain.sh`, `finetune.sh`, `llava/train/train.py`).

Stage 1, feature alignment: only the projector learns, on image-caption pairs rendered with the `plain`
template, so that image features land where the language model expects words. Stage 2, visual instruction
tuning: projector and language model learn (fully, or with LoRA) on conversations in `vicuna_v1`. The vision
tower is frozen throughout, which is what makes the frozen-feature cache (`cache.py`) exact.

The recipes are data (`RECIPES`): which parts train, the template, the learning rate and batch size of the
paper. `TrainConfig` holds every setting of a run; the CLI builds it from its fields, so Python and the command
line take the same options. The loop is plain PyTorch: AdamW, cosine schedule with warmup, gradient
accumulation and clipping, DDP through `torchrun` when launched that way, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import FeatureCache
from .data.records import DataError, Record, load_records
from .model import LlavaModel, load_state
from .processor import Processor
from .utils import atomic_dir, check_replaceable, load_tensors, pick_device, read_json, save_tensors, write_json
from .vision import check_image_file

PARTS = ("vision_tower", "projector", "language_model")


COMPILE_BACKEND = "inductor"  # torch.compile's backend for `TrainConfig.compile` (the tests use "aot_eager")

@dataclass(frozen=True)
class Recipe:
    """One training stage of LLaVA-1.5: what trains, with which template, learning rate and global batch."""

    template: str
    tune: dict  # part -> "frozen" | "full" | "lora"
    lr: float
    batch_size: int
    aspect: str  # image preprocessing: "square" (resize + crop) or "pad" (to a square of the mean colour)


RECIPES = {
    1: Recipe("plain", {"vision_tower": "frozen", "projector": "full", "language_model": "frozen"}, 1e-3, 256,
              "square"),
    2: Recipe("vicuna_v1", {"vision_tower": "frozen", "projector": "full", "language_model": "full"}, 2e-5, 128,
              "pad"),
}
LORA_LR = 2e-4  # LLaVA-1.5's LoRA recipe: r=128, alpha=256, dropout 0.05, on every linear layer of the LM


@dataclass
class TrainConfig:
    """Every setting of a training run. None means "the stage's recipe value" (see `RECIPES`)."""

    stage: int = 1
    data: str = ""  # a LLaVA-format JSON file
    images: str | None = None  # the folder image paths are relative to (default: the JSON file's folder)
    out: str = "runs/stage1"
    vision: str = "tiny-clip"  # stage 1: vision backbone (zoo name, folder or hub id)
    lm: str = "tiny-lm"  # stage 1: language model
    projector: str = "mlp2x_gelu"
    feature_layer: int = -2
    template: str | None = None  # None: the recipe's (plain / vicuna_v1); e.g. chatml_direct for a Qwen LM
    init: str | None = None  # stage 2: a stage-1 output or a full model folder (None: skip stage 1, fresh projector)
    lora: bool = False  # stage 2: train the LM through LoRA adapters instead of fully
    freeze_lm: bool = False  # stage 2: keep the LM frozen too (an ablation: only the projector learns)
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lr: float | None = None
    batch_size: int | None = None  # global batch (samples per optimizer step, across all processes)
    micro_batch_size: int = 16  # samples per forward pass; batch_size / (micro * processes) steps accumulate
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    group_by_length: bool = True  # LLaVA's modality-length grouping
    feature_cache: str = "memory"  # "memory", "disk" (under cache_dir) or "off"
    cache_dir: str | None = None
    max_length: int | None = None  # default: the language model's context
    seed: int = 0
    save_every: int = 0  # steps between resumable checkpoints (0: none)
    resume: bool = True  # continue from `<out>.partial` if an interrupted run left one
    device: str | None = None
    compile: bool = False  # torch.compile the model's forward (pays off on GPUs for long runs; shapes vary)
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes saved with the run

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.stage]

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (LORA_LR if self.lora else self.recipe.lr)

    def resolved_template(self) -> str:
        return self.template or self.recipe.template

    def resolved_batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else self.recipe.batch_size

    def check(self, world: int = 1) -> None:
        """Refuse settings that make no sense, before anything is loaded or written."""
        if self.stage not in RECIPES:
            raise ValueError(f"stage {self.stage}: expected 1 or 2")
        lr, batch = self.resolved_lr(), self.resolved_batch_size()
        if not (0 < lr < 1):
            raise ValueError(f"learning rate {lr}: expected a number between 0 and 1 (LLaVA: 1e-3 / 2e-5)")
        if batch < 1 or self.micro_batch_size < 1:
            raise ValueError(f"batch size {batch} / micro batch {self.micro_batch_size}: must be at least 1")
        if batch % (self.micro_batch_size * world):
            raise ValueError(f"batch size {batch} is not a multiple of micro batch {self.micro_batch_size} x "
                             f"{world} processes")
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError(f"epochs {self.epochs}: must be positive")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"max steps {self.max_steps}: must be a whole number of at least 1 (or None: epochs)")
        if not (0 <= self.warmup_ratio < 1):
            raise ValueError(f"warmup ratio {self.warmup_ratio}: expected a fraction of the run in [0, 1) "
                             "(LLaVA: 0.03)")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max grad norm {self.max_grad_norm}: must be positive (LLaVA: 1.0)")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay {self.weight_decay}: must not be negative (LLaVA: 0)")
        if self.stage == 1 and self.init:
            raise ValueError("init: stage 1 starts from the backbones (vision, lm) and a new projector; init is "
                             "a stage-2 option")
        check_replaceable(self.out, "config.json", "out")
        if self.feature_cache not in ("memory", "disk", "off"):
            raise ValueError(f"feature cache '{self.feature_cache}': expected memory, disk or off")
        if self.feature_cache == "disk" and not self.cache_dir:
            raise ValueError("feature cache 'disk' needs cache_dir")
        if self.stage == 1 and self.lora:
            raise ValueError("stage 1 trains the projector only; LoRA is a stage-2 option")
        if self.lora and self.freeze_lm:
            raise ValueError("lora and freeze_lm: choose one way to treat the language model")
        if not self.data:
            raise ValueError("data: a LLaVA-format JSON file is required")


# ---- building the model for a stage ----------------------------------------------------------------------
STAGE1_FORMAT = "minillava-stage1"


def build_stage1_model(vision: str, lm: str, projector: str, feature_layer: int, aspect: str,
                       template: str) -> tuple[LlavaModel, Processor]:
    """Fresh LLaVA from backbones: pretrained vision tower + pretrained LM + a new, randomly initialised projector."""
    from .vision import VisionTower
    from .zoo import load_lm, load_vision

    vision_model, image_processor = load_vision(vision)
    image_processor.aspect = aspect
    language_model, tokenizer = load_lm(lm)
    tower = VisionTower(vision_model, feature_layer=feature_layer)
    model = LlavaModel(tower, projector, language_model, tokenizer.convert_tokens_to_ids("<image>"))
    processor = Processor(tokenizer, image_processor, model.num_image_tokens, template, model.max_length)
    return model, processor


def load_stage1(path: str | Path, template: str = "vicuna_v1", aspect: str = "pad") -> tuple[LlavaModel, Processor]:
    """A stage-1 output (projector weights + the names of its backbones) -> the assembled model."""
    path = Path(path)
    cfg = read_json(path / "config.json", what="stage-1 config")
    if cfg.get("format") != STAGE1_FORMAT:
        raise ValueError(f"'{path}': not a stage-1 output (its config.json has no format '{STAGE1_FORMAT}')")
    model, processor = build_stage1_model(cfg["vision"], cfg["lm"], cfg["projector"], cfg["feature_layer"],
                                          aspect, template)
    load_state(model.projector, load_tensors(path / "projector.safetensors"), f"stage-1 projector in '{path}'")
    return model, processor


def load_init(cfg: TrainConfig) -> tuple[LlavaModel, Processor]:
    """Stage 2's starting point: a stage-1 output, or a full minillava model folder."""
    path = Path(cfg.init)
    if not path.is_dir():
        raise FileNotFoundError(f"init checkpoint '{path}': not found")
    meta = read_json(path / "config.json", what="init checkpoint config")
    recipe = cfg.recipe
    if meta.get("format") == STAGE1_FORMAT:
        _check_init_matches(cfg, path, {k: meta.get(k) for k in ("vision", "lm", "projector", "feature_layer")})
        return load_stage1(path, cfg.resolved_template(), recipe.aspect)
    model = LlavaModel.from_pretrained(path, device="cpu")
    _check_init_matches(cfg, path, {"vision": None, "lm": None, "projector": model.projector.kind,
                                    "feature_layer": model.vision_tower.feature_layer})
    processor = Processor.from_pretrained(path).with_template(cfg.resolved_template())
    processor.image_processor.aspect = recipe.aspect
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


def initial_model(cfg: TrainConfig) -> tuple[LlavaModel, Processor]:
    """Where a run starts: backbones + a fresh projector (stage 1, or stage 2 without `init`, which skips
    feature alignment), else the `init` checkpoint."""
    if cfg.stage == 1 or cfg.init is None:
        return build_stage1_model(cfg.vision, cfg.lm, cfg.projector, cfg.feature_layer, cfg.recipe.aspect,
                                  cfg.resolved_template())
    return load_init(cfg)


def apply_recipe(model: LlavaModel, tune: dict, cfg: TrainConfig) -> list[str]:
    """Freeze or unfreeze each part as the recipe says (LoRA wraps the LM with peft); returns a report."""
    if tune["language_model"] == "lora":
        from peft import LoraConfig, get_peft_model

        model.language_model.requires_grad_(False)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules="all-linear", bias="none")
        model.language_model = get_peft_model(model.language_model, lora)
    for part in PARTS:
        if tune[part] != "lora":
            getattr(model, part).requires_grad_(tune[part] == "full")
    report = []
    for part in PARTS:
        params = list(getattr(model, part).parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        report.append(f"{part:>15}: {tune[part]:<6} {trainable:>12,} trainable of {total:,}")
    return report


# ---- data ------------------------------------------------------------------------------------------------
def encode_all(records: list[Record], processor: Processor, progress: bool) -> list[dict]:
    """Tokenize every record up front, so a bad or overlong record stops the run before step 1."""
    from tqdm.auto import tqdm

    out = []
    for r in tqdm(records, desc="tokenizing", disable=not progress, mininterval=1.0):
        try:
            ids = processor.template.tokenize(r.messages, processor.tokenizer,
                                              num_image_tokens=processor.num_image_tokens,
                                              max_length=processor.max_length, sample_id=r.id)
        except ValueError as e:
            raise DataError(f"record '{r.id}': {e}") from None
        n = sum(1 for x in ids["labels"] if x != -100)
        if n == 0:
            raise DataError(f"record '{r.id}': nothing to supervise (the answer would train nothing)")
        out.append({"input_ids": torch.tensor(ids["input_ids"]), "labels": torch.tensor(ids["labels"]),
                    "images": r.images, "n_supervised": n})
    return out


def check_images(records: list[Record], progress: bool) -> None:
    """Check every image file once, up front (`check_image_file`), so a corrupt one stops the run before step 1
    rather than hours in; all the bad ones are named together."""
    from tqdm.auto import tqdm

    bad = []
    paths = sorted({p for r in records for p in r.images})
    for p in tqdm(paths, desc="checking images", disable=not progress, mininterval=1.0):
        try:
            check_image_file(p)
        except (ValueError, FileNotFoundError) as e:
            bad.append(str(e))
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} of {len(paths)} images cannot be used: " + "; ".join(bad[:5]) + more)


def grouped_order(lengths: list[int], has_image: list[bool], group: int, generator: torch.Generator) -> list[int]:
    """LLaVA's modality-length grouping: a random order in which each run of `group` samples is all-image or
    all-text and sorted by length (less padding), with the runs themselves shuffled."""
    def runs(idx: list[int]) -> list[list[int]]:
        perm = [idx[i] for i in torch.randperm(len(idx), generator=generator).tolist()]
        return [sorted(perm[i:i + group], key=lambda j: -lengths[j]) for i in range(0, len(perm), group)]

    mm = runs([i for i, m in enumerate(has_image) if m])
    text = runs([i for i, m in enumerate(has_image) if not m])
    tail = [r for rs in (mm, text) if rs for r in rs[-1:]]  # the two short leftovers go last, as one group
    body = mm[:-1] + text[:-1]
    body = [body[i] for i in torch.randperm(len(body), generator=generator).tolist()]
    return [i for r in body + [sorted(j for r in tail for j in r)] for i in r]


def epoch_order(examples: list[dict], cfg: TrainConfig, epoch: int, group: int) -> list[int]:
    """The sample order of an epoch: a pure function of the seed and the epoch, so resume and DDP agree."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    if not cfg.group_by_length:
        return torch.randperm(len(examples), generator=g).tolist()
    return grouped_order([len(e["input_ids"]) for e in examples], [bool(e["images"]) for e in examples], group, g)


# ---- the loop --------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int) -> float:
    """Cosine schedule with linear warmup, as a factor of the peak (transformers' cosine schedule)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    seconds: float
    metrics: list[dict]
    summary: str


def _dist():
    """(rank, world size), initialising torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank() if world > 1 else 0), world


def train(cfg: TrainConfig) -> TrainResult:
    """Run one training stage as `cfg` says; returns where the result went and the per-step metrics."""
    from tqdm.auto import tqdm

    rank, world = _dist()
    cfg.check(world)
    recipe = cfg.recipe
    tune = dict(recipe.tune)
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
    accum = batch // (cfg.micro_batch_size * world)
    steps_per_epoch = len(examples) // batch  # a partial last batch is dropped: every step sees a full batch
    if steps_per_epoch == 0:
        raise DataError(f"data '{cfg.data}': {len(examples)} samples is fewer than one batch of {batch}")
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup = math.ceil(cfg.warmup_ratio * total)
    lr = cfg.resolved_lr()
    opt = torch.optim.AdamW([p for _, p in trainable], lr=lr, weight_decay=cfg.weight_decay)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net, dynamic=True, backend=COMPILE_BACKEND)  # padded batches vary in length

    partial = Path(f"{cfg.out}.partial")
    start, metrics = 0, []
    settings = resume_settings(cfg, len(examples), world)
    if cfg.resume and (partial / "state.json").is_file():
        start, metrics = _restore(partial, model, opt, trainable, settings)
    if rank == 0:
        print(f"stage {cfg.stage}: {len(examples)} samples, {total} steps of {batch} "
              f"({accum} x {cfg.micro_batch_size} x {world} processes), lr {lr:g}, template {cfg.resolved_template()}")
        print("\n".join(report))
        if start:
            print(f"resuming from step {start} ({partial})")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    bar = tqdm(total=total, initial=start, desc=f"stage {cfg.stage}", disable=not (cfg.progress and rank == 0))
    t0 = time.perf_counter()
    order_cache: dict[int, list[int]] = {}
    for step in range(start, total):
        epoch, within = divmod(step, steps_per_epoch)
        if epoch not in order_cache:
            order_cache = {epoch: epoch_order(examples, cfg, epoch, cfg.micro_batch_size * world)}
        ids = order_cache[epoch][within * batch:(within + 1) * batch]
        n_tokens = sum(examples[i]["n_supervised"] for i in ids)  # the whole global batch's supervised tokens
        m = cfg.micro_batch_size  # micro-step k: this process takes its slice of the k-th run of m x world
        micro = [ids[(k * world + rank) * m:(k * world + rank + 1) * m] for k in range(accum)]
        for g in opt.param_groups:
            g["lr"] = lr * lr_at(step, total, warmup)
        step_loss = torch.zeros((), device=device)
        t_step = time.perf_counter()
        for k, mb in enumerate(micro):
            inputs = _collate([examples[i] for i in mb], processor, cache, device)
            sync = k == len(micro) - 1 or world == 1
            ctx = net.no_sync() if (world > 1 and not sync) else _null()
            with ctx, autocast:
                out = net(**inputs, return_logits=False)
                loss_sum = out.loss * out.num_tokens
            (loss_sum * world / n_tokens).backward()  # DDP averages over processes; this undoes it
            step_loss += loss_sum.detach()
        if world > 1:
            torch.distributed.all_reduce(step_loss)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t_step
        row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
               "loss": float(step_loss) / n_tokens, "lr": opt.param_groups[0]["lr"],
               "grad_norm": float(grad_norm), "samples_per_s": len(ids) / dt, "tokens": n_tokens}
        metrics.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total and rank == 0:
            _checkpoint(partial, model, opt, trainable, step + 1, metrics, settings)
    bar.close()
    seconds = time.perf_counter() - t0
    out = Path(cfg.out)
    if rank == 0:
        _save_result(out, cfg, model, processor, metrics)
        if partial.exists():
            import shutil

            shutil.rmtree(partial, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    final = metrics[-1]["loss"] if metrics else float("nan")
    hits = f", feature cache {cache.hits} hits / {cache.misses} misses" if cache else ""
    summary = (f"stage {cfg.stage} done: {len(metrics)} steps in {seconds:.1f} s, final loss {final:.4f}"
               f"{hits} -> {out}")
    if rank == 0:
        print(summary)
    return TrainResult(out, len(metrics), final, seconds, metrics, summary)


class _null:
    """A do-nothing context manager (no autocast on CPU, no no_sync outside DDP)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _collate(examples: list[dict], processor: Processor, cache: FeatureCache | None, device) -> dict:
    """Encoded examples -> model inputs on `device`; images as cached features when a cache is in use."""
    batch = processor.collate([{"input_ids": e["input_ids"], "labels": e["labels"], "images": None}
                               for e in examples])
    paths = [p for e in examples for p in e["images"]]
    inputs = {k: batch[k].to(device) for k in ("input_ids", "labels", "attention_mask")}
    if paths:
        if cache is not None:
            inputs["image_features"] = cache.get(paths).to(device)
        else:
            inputs["images"] = processor.image_processor(paths, names=[str(p) for p in paths]).to(device)
    return inputs


# ---- checkpoints: atomic, safetensors + JSON, exact resume ----------------------------------------------------
def resume_settings(cfg: TrainConfig, n_samples: int, world: int) -> dict:
    """What a run's losses depend on besides its weights: a checkpoint resumes only a run with the same."""
    keep = ("stage", "init", "vision", "lm", "projector", "feature_layer", "template", "lora", "freeze_lm",
            "lora_r", "lora_alpha", "lora_dropout", "micro_batch_size", "epochs", "max_steps", "warmup_ratio",
            "weight_decay", "max_grad_norm", "group_by_length", "seed")
    return {**{k: getattr(cfg, k) for k in keep}, "lr": cfg.resolved_lr(), "batch_size": cfg.resolved_batch_size(),
            "samples": n_samples, "processes": world}


def _checkpoint(path: Path, model, opt, trainable, step: int, metrics: list[dict], settings: dict) -> None:
    tensors = {f"param/{n}": p.detach().cpu() for n, p in trainable}
    for n, p in trainable:
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt/{n}/{k}"] = torch.as_tensor(v).detach().cpu()
    tensors["rng/torch"] = torch.get_rng_state()  # LoRA dropout draws from it
    with atomic_dir(path) as tmp:
        save_tensors(tensors, tmp / "state.safetensors")
        write_json(tmp / "state.json", {"step": step, "metrics": metrics, "settings": settings})


def _restore(path: Path, model, opt, trainable, settings: dict) -> tuple[int, list[dict]]:
    state = read_json(path / "state.json", what="checkpoint state")
    saved = state.get("settings")  # absent in checkpoints of older versions
    if saved is not None:
        differ = [f"{k} ({saved.get(k)!r} there, {v!r} now)" for k, v in settings.items() if saved.get(k) != v]
        if differ:
            raise ValueError(f"checkpoint '{path}': left by a run with other settings: {'; '.join(differ)}. "
                             "Run with the same settings to resume it, or delete it to start afresh.")
    tensors = load_tensors(path / "state.safetensors")
    with torch.no_grad():
        for n, p in trainable:
            if f"param/{n}" not in tensors:
                raise ValueError(f"checkpoint '{path}': has no weight '{n}' (a different model or recipe?)")
            p.copy_(tensors[f"param/{n}"])
            st = {k.split("/")[-1]: v for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
            if st:
                opt.state[p] = {k: (v if k != "step" else v.clone()) for k, v in st.items()}
    torch.set_rng_state(tensors["rng/torch"])
    return state["step"], state["metrics"]


def _save_result(out: Path, cfg: TrainConfig, model: LlavaModel, processor: Processor, metrics: list[dict]):
    """Stage 1: the projector alone (+ backbone names). Stage 2: the full model, or the LoRA adapter."""
    run = {"train_config": dataclasses.asdict(cfg), "metrics": metrics}
    with atomic_dir(out, marker="config.json") as tmp:
        if cfg.stage == 1:
            write_json(tmp / "config.json", {
                "format": STAGE1_FORMAT, "vision": cfg.vision, "lm": cfg.lm, "projector": model.projector.kind,
                "feature_layer": model.vision_tower.feature_layer, "feature_select": model.vision_tower.select})
            save_tensors(model.projector.state_dict(), tmp / "projector.safetensors")
        elif cfg.lora:
            write_json(tmp / "config.json", {
                "format": LORA_FORMAT, "init": str(Path(cfg.init).resolve()) if cfg.init else None,
                "vision": cfg.vision, "lm": cfg.lm, "projector": model.projector.kind,
                "feature_layer": model.vision_tower.feature_layer})
            save_tensors(model.projector.state_dict(), tmp / "projector.safetensors")
            model.language_model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        else:
            model.write_files(tmp, processor)
        write_json(tmp / "run.json", run)


LORA_FORMAT = "minillava-lora"


def merge_lora(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """A stage-2 LoRA output -> a full model folder with the adapter merged into the LM weights."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    meta = read_json(adapter_dir / "config.json", what="LoRA output config")
    if meta.get("format") != LORA_FORMAT:
        raise ValueError(f"'{adapter_dir}': not a LoRA training output")
    cfg = TrainConfig(stage=2, data="-", **{k: meta[k] for k in ("init", "vision", "lm", "projector", "feature_layer")})
    model, processor = initial_model(cfg)
    load_state(model.projector, load_tensors(adapter_dir / "projector.safetensors"), f"projector in '{adapter_dir}'")
    model.language_model = PeftModel.from_pretrained(model.language_model, str(adapter_dir / "adapter"))
    model.language_model = model.language_model.merge_and_unload()
    model.save_pretrained(out_dir, processor=processor)
    return Path(out_dir)
