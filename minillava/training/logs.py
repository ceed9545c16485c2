"""Logs a person can watch while a run goes: a JSON line per step, TensorBoard if asked, and MFU's FLOP count.

Process 0 writes `metrics.jsonl` into the log folder: `TrainConfig.log_dir`, or by default `<out>.logs` beside the
output (not inside `<out>.partial`, which every checkpoint replaces whole). Watch it with `tail -f`. The default
folder is a live view: a finished run removes it (its `run.json` holds the same rows) unless TensorBoard wrote there
too; a killed run leaves it, and the run that resumes rewrites it from the checkpoint. A `log_dir` you name is
kept. Each row:

    step, epoch, loss, lr, grad_norm   the optimizer step (from 1), its loss (mean over supervised tokens), the
                                       learning rate it used and the gradient norm before clipping
    samples_per_s, tokens_per_s        throughput of the whole step; tokens = input tokens, image tokens included,
                                       padding not
    tokens                             supervised tokens of the global batch
    mfu, peak_memory_gb                on CUDA only: model FLOP utilisation (`step_flops`), and process 0's peak
                                       allocated memory during the step in GiB (2^30 bytes)

With `report_to="tensorboard"` the same numbers go to TensorBoard event files in `<log dir>/tensorboard` (view
them with `tensorboard --logdir <log dir>`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model import LlavaModel
from ..utils import atomic_file

METRICS_NAME = "metrics.jsonl"
REPORT_TO = ("tensorboard",)
# Dense bf16 peak TFLOP/s by device name (first match wins: "H100 PCIe" before "H100"); others need peak_tflops.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def log_dir(out: str | Path, configured: str | None) -> Path:
    """Where a run's logs go: `configured` (TrainConfig.log_dir), else `<out>.logs` beside the output."""
    return Path(configured) if configured else Path(f"{Path(out)}.logs")


def check_report_to(report_to: str | None) -> None:
    """Refuse an unknown `report_to`, or "tensorboard" without its package, before the run starts."""
    if report_to is None:
        return
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to '{report_to}': expected {' or '.join(REPORT_TO)} (or none)")
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        raise ImportError("report_to 'tensorboard': the tensorboard package is not installed; "
                          "pip install tensorboard") from None


class MetricsLog:
    """Process 0's step metrics: a line of JSON per step in `<directory>/metrics.jsonl`, and TensorBoard scalars
    with report_to="tensorboard". `past`: the rows of the steps already done (a resumed run's); the file is
    rewritten with them, so it holds one row per step even when a killed run logged steps past its checkpoint."""

    def __init__(self, directory: Path, report_to: str | None, past: list[dict]):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / METRICS_NAME
        with atomic_file(self.path) as f:
            f.writelines(json.dumps(row) + "\n" for row in past)
        self.file = open(self.path, "a", buffering=1)  # line-buffered: `tail -f` sees each step as it ends
        self.tensorboard = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a killed run wrote after its checkpoint
            self.tensorboard = SummaryWriter(str(directory / "tensorboard"), purge_step=len(past) + 1)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"train/{key}", value, global_step=row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def remove_live_log(directory: Path) -> None:
    """Delete the `metrics.jsonl` of a finished run in the default log folder, and the folder if that empties it."""
    (directory / METRICS_NAME).unlink(missing_ok=True)
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


# ---- MFU ---------------------------------------------------------------------------------------------------------
def model_sizes(model: LlavaModel, tower_runs: bool) -> dict[str, int]:
    """Parameter counts (all, and trainable) of each part that `step_flops` charges for, from the whole model
    (call it before sharding). `tower_runs`: the vision tower encodes every step (no feature cache)."""
    lm = model.language_model
    embed, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    body = [p for p in lm.get_decoder().parameters() if p is not embed]  # layers + final norm (non-embedding)

    def count(params) -> tuple[int, int]:
        params = list(params)
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    (n_lm, t_lm), (n_proj, t_proj) = count(body), count(model.projector.parameters())
    return {"lm": n_lm, "lm_trained": t_lm, "head": head.numel(), "head_trained": head.numel() * head.requires_grad,
            "projector": n_proj, "projector_trained": t_proj,
            "vision": sum(p.numel() for p in model.vision_tower.parameters()) if tower_runs else 0}


def step_flops(sizes: dict[str, int], tokens: int, supervised: int, image_tokens: int) -> float:
    """FLOPs of one optimizer step, counted as for transformers (Kaplan et al.: 2N per token forward, 2N backward
    to the inputs, 2N more for the weight gradients of trained weights; attention's T^2 term left out):

        (4 N_lm + 2 N_lm_trained) T  +  (4 N_head + 2 N_head_trained) S
        + (2 N_proj + 2 N_proj_trained) I  +  2 N_vision I

    T: input tokens, S: supervised tokens (the LM head runs on those alone), I: image tokens; N_lm counts the
    decoder without its embeddings; N_vision is 0 when the feature cache spares the tower (frozen: forward only).
    A full stage-2 step is thus about 6 N_lm T, a stage-1 step (LM frozen, backward through it) about 4 N_lm T."""
    s = sizes
    return ((4 * s["lm"] + 2 * s["lm_trained"]) * tokens + (4 * s["head"] + 2 * s["head_trained"]) * supervised
            + (2 * s["projector"] + 2 * s["projector_trained"] + 2 * s["vision"]) * image_tokens)


def peak_tflops(device: torch.device, precision: str, configured: float | None) -> float | None:
    """The peak TFLOP/s of one process's accelerator that MFU is measured against: `configured`
    (TrainConfig.peak_tflops), else the dense bf16 peak of a known GPU for bf16 runs, else None (no MFU)."""
    if configured is not None or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((t for key, t in PEAK_BF16_TFLOPS if key in name), None) if precision == "bf16" else None


def cuda_metrics(device: torch.device, flops: float, seconds: float, world: int, peak: float | None) -> dict:
    """mfu (the step's FLOPs per second over all processes' peak; None when the peak is unknown) and
    peak_memory_gb (this process, since `reset_peak_memory_stats` at the step's start)."""
    mfu = flops / seconds / (peak * 1e12 * world) if peak else None
    return {"mfu": mfu, "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
