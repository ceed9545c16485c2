"""The two stages of LLaVA-1.5 as data, and every setting of a training run.

A `Recipe` says what each part does in a stage (`frozen`, `full` or `lora`), with the template, learning rate,
global batch and image preprocessing of `scripts/v1_5/pretrain.sh` and `finetune.sh`; `apply_recipe` carries it
out on a model and reports what it froze and what it trains. `TrainConfig` holds everything else; the command
line is generated from its fields and their comments, so Python and `minillava train` take the same options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import zoo
from ..model import LlavaModel
from ..outputs import check_replaceable
from ..utils import peft_quietly

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

    stage: int = 1  # 1: feature alignment (projector only), 2: visual instruction tuning
    data: str = ""  # a LLaVA-format JSON file
    images: str | None = None  # the folder image paths are relative to (default: the JSON file's folder)
    out: str = "runs/stage1"  # the output folder (new, empty, or one minillava wrote)
    vision: str = "tiny-clip"  # stage 1: vision backbone (zoo name, folder or hub id)
    lm: str = "tiny-lm"  # stage 1: language model
    projector: str = "mlp2x_gelu"  # the projector: mlp2x_gelu (LLaVA-1.5) or linear (LLaVA-1)
    feature_layer: int = -2  # the vision layer whose patch features are used (LLaVA: the second to last)
    template: str | None = None  # chat template (None: stage 1 plain; stage 2 the LM's own if known, else vicuna_v1)
    init: str | None = None  # stage 2: a stage-1 output or a full model folder (None: skip stage 1, fresh projector)
    lora: bool = False  # stage 2: train the LM through LoRA adapters instead of fully
    freeze_lm: bool = False  # stage 2: keep the LM frozen too (an ablation: only the projector learns)
    lora_r: int = 128  # LoRA rank
    lora_alpha: int = 256  # LoRA scale: the update is (alpha / r) * B @ A
    lora_dropout: float = 0.05  # dropout on the LoRA branch
    lr: float | None = None  # peak learning rate (None: the recipe's, 2e-4 with LoRA)
    vision_lr: float | None = None  # stage 2: train the vision tower too, at this peak rate (None: frozen)
    batch_size: int | None = None  # global batch, samples per optimizer step over all processes (None: the recipe's)
    micro_batch_size: int = 16  # samples per forward pass; batch_size / (micro * processes) steps accumulate
    epochs: float = 1.0  # passes over the data (fractions allowed)
    max_steps: int | None = None  # stop after this many optimizer steps (None: run the epochs)
    warmup_ratio: float = 0.03  # share of the steps spent warming the learning rate up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm
    group_by_length: bool = True  # LLaVA's modality-length grouping
    packing: bool = False  # each micro-batch as one row without padding, samples kept apart by their positions
    feature_cache: str = "auto"  # vision features in memory, disk, off, or auto: by size and RAM (off for 1 epoch)
    cache_dir: str | None = None  # where a disk feature cache goes (default: <out>.features, removed when the run ends)
    lazy_data: bool = False  # read records and decode images as steps need them, in DataLoader workers (large files)
    num_workers: int = 4  # lazy_data: DataLoader worker processes per training process (0: load in the main one)
    skip_bad_samples: bool = False  # lazy_data: leave out records or images that cannot be used (listed at the end)
    max_length: int | None = None  # longest sample in tokens, image tokens included (None: the LM's context)
    seed: int = 0  # seeds the projector's initialisation and the data order
    save_every: int = 0  # steps between resumable checkpoints (0: none)
    resume: bool = True  # continue from `<out>.partial` if an interrupted run left one (with the same settings)
    device: str | None = None  # cpu, cuda, mps (None: the best available)
    compile: bool = False  # torch.compile the model's forward (pays off on GPUs for long runs; shapes vary)
    strategy: str = "ddp"  # ddp (each process holds the whole model) or fsdp (FSDP2: weights, grads, AdamW sharded)
    precision: str | None = None  # fp32 or bf16 (bf16 compute; fp32 weights, AdamW state); default: bf16 on CUDA
    gradient_checkpointing: bool = False  # recompute the LM's layers in the backward pass: less memory, ~1/3 slower
    log_dir: str | None = None  # keep metrics.jsonl (a JSON line per step) here (default: <out>.logs, while running)
    report_to: str | None = None  # tensorboard: also write TensorBoard events to <log_dir>/tensorboard
    peak_tflops: float | None = None  # one accelerator's peak TFLOP/s, for mfu (default: H100/H200/A100 bf16 peak)
    progress: bool = True  # show progress bars
    extra: dict = field(default_factory=dict)  # free-form notes saved with the run

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.stage]

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (LORA_LR if self.lora else self.recipe.lr)

    def resolved_template(self, lm: str | None = None) -> str:
        """`template`, else in stage 2 the language model's own chat format when minillava knows it (e.g.
        `smollm2` for smollm2-135m-instruct), else the recipe's (plain / vicuna_v1)."""
        own = zoo.own_template(lm or self.lm) if self.stage == 2 else None
        return self.template or own or self.recipe.template

    def resolved_batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else self.recipe.batch_size

    def resolved_precision(self, device) -> str:
        """`precision`, or by default bf16 on CUDA (as LLaVA trains) and fp32 elsewhere."""
        return self.precision or ("bf16" if device.type == "cuda" else "fp32")

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
        if not self.max_steps and not (0 < self.epochs < math.inf):  # (NaN fails both comparisons)
            raise ValueError(f"epochs {self.epochs}: must be a positive, finite number")
        if self.max_length is not None and self.max_length < 0:
            raise ValueError(f"max length {self.max_length}: must be positive (or 0/None: the model's context)")
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
        check_replaceable(f"{Path(self.out)}.partial", "state.json", "resumable checkpoint")
        if self.feature_cache not in ("auto", "memory", "disk", "off"):
            raise ValueError(f"feature cache '{self.feature_cache}': expected auto, memory, disk or off")
        if self.num_workers < 0:
            raise ValueError(f"num workers {self.num_workers}: must be 0 or more")
        if self.skip_bad_samples and not self.lazy_data:
            raise ValueError("skip_bad_samples: a lazy_data option (without lazy_data every record and image is "
                             "checked before step 1, and a bad one stops the run there)")
        if self.stage == 1 and self.lora:
            raise ValueError("stage 1 trains the projector only; LoRA is a stage-2 option")
        if self.lora and self.freeze_lm:
            raise ValueError("lora and freeze_lm: choose one way to treat the language model")
        self._check_vision_lr()
        if not self.data:
            raise ValueError("data: a LLaVA-format JSON file is required")
        self._check_scaling()

    def _check_vision_lr(self) -> None:
        """Training the tower (LLaVA-NeXT and OneVision do, at about a tenth of the LM's rate): stage 2, whole
        outputs, replicated weights, and features computed afresh at every step."""
        if self.vision_lr is None:
            return
        if self.stage != 2:
            raise ValueError(f"vision_lr: stage {self.stage} keeps the vision tower frozen; it trains in stage 2 only")
        if not 0 < self.vision_lr < 1:
            raise ValueError(f"vision_lr {self.vision_lr}: expected a number between 0 and 1 (LLaVA-NeXT: 2e-6)")
        if self.lora:
            raise ValueError("vision_lr with lora: a LoRA output holds the projector and the adapters only, so the "
                             "trained tower would be lost; train the LM fully, or keep the tower frozen")
        if self.strategy == "fsdp":
            raise ValueError("vision_lr with strategy fsdp: FSDP keeps the vision tower whole and unsynchronised on "
                             "every process; use strategy ddp")
        if self.feature_cache in ("memory", "disk"):
            raise ValueError(f"vision_lr with feature_cache {self.feature_cache}: the features change as the tower "
                             "trains, so none can be cached; use feature_cache off (or auto)")

    def _check_scaling(self) -> None:
        """The settings of `distributed.py` and `logs.py`: strategy, precision, report_to."""
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy '{self.strategy}': expected ddp or fsdp")
        if self.precision not in (None, "fp32", "bf16"):
            raise ValueError(f"precision '{self.precision}': expected fp32 or bf16 (fp16 would need loss scaling, "
                             "which minillava does not do)")
        if self.strategy == "fsdp" and self.lora:
            raise ValueError("strategy fsdp with lora: not supported (the adapter is saved through peft, which "
                             "needs whole weights); LoRA trains few weights, so use strategy ddp")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak TFLOP/s {self.peak_tflops}: must be positive")


def apply_recipe(model: LlavaModel, tune: dict, cfg: TrainConfig) -> list[str]:
    """Freeze or unfreeze each part as the recipe says (LoRA wraps the LM with peft); returns a report."""
    if tune["language_model"] == "lora":
        from peft import LoraConfig, get_peft_model

        model.language_model.requires_grad_(False)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules="all-linear", bias="none")
        with peft_quietly():
            model.language_model = get_peft_model(model.language_model, lora)
    for part in PARTS:
        if tune[part] != "lora":
            getattr(model, part).requires_grad_(tune[part] == "full")
    model.vision_tower.frozen = tune["vision_tower"] == "frozen"  # (a frozen tower stays in eval mode)
    report = []
    for part in PARTS:
        params = list(getattr(model, part).parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        report.append(f"{part:>15}: {tune[part]:<6} {trainable:>12,} trainable of {total:,}")
    return report
