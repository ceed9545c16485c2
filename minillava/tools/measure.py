"""Measuring one side against the other: timings that alternate, peak memory, and a phase's result.

Used by `bench` (minillava against transformers) and `bench_trl` (minillava's trainer against TRL's).
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time

import torch


def spread(values: list[float]) -> dict:
    """{"min", "median", "max"} of a list of numbers."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall seconds of fn(), the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(ml_fn, hf_fn, device, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of `repeats` runs of each side after `warmup` untimed ones, alternating the order (ml, hf),
    (hf, ml), ... so that drifts of a busy machine fall on both sides alike."""
    for _ in range(warmup):
        ml_fn()
        hf_fn()
    ml, hf = [], []
    for r in range(repeats):
        pair = [(ml_fn, ml), (hf_fn, hf)]
        for fn, out in pair if r % 2 == 0 else pair[::-1]:
            out.append(timed(fn, device))
    return ml, hf


def rss_mb(key: str = "VmRSS") -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Release freed heap pages and reset the kernel's peak-RSS mark (Linux); False where that is impossible."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn, device: torch.device) -> dict:
    """Peak memory (MB) during one run of fn(): {"peak_mb", "growth_mb"} (see MEMORY_CPU / MEMORY_CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / 2**20, "growth_mb": (peak - before) / 2**20}
    if not reset_peak_rss():
        fn()
        return {"peak_mb": None, "growth_mb": None}
    before = rss_mb()
    fn()
    peak = rss_mb("VmHWM")
    return {"peak_mb": peak, "growth_mb": peak - before}


def side_result(times: list[float], memory: dict, per_run: dict | None = None) -> dict:
    """One side's figures: seconds per run, throughputs derived from `per_run` counts, and memory."""
    out = {"time_s": spread(times)}
    for name, count in (per_run or {}).items():
        out[f"{name}_per_s"] = spread([count / t for t in times])
    out["memory"] = memory
    return out


def phase_result(ml_times, hf_times, ml_mem, hf_mem, per_run, throughput: bool, what: str, extra=None) -> dict:
    """A phase's result: both sides and the per-repetition ratio (times: ml/hf; throughputs: hf time/ml time)."""
    ratios = [(h / m) if throughput else (m / h) for m, h in zip(ml_times, hf_times)]
    return {"what": what, "ratio": spread(ratios), "ratio_kind": "throughput" if throughput else "time",
            "minillava": side_result(ml_times, ml_mem, per_run), "transformers": side_result(hf_times, hf_mem, per_run),
            **(extra or {})}
