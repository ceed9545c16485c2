"""Small shared helpers: device and dtype choice, atomic file writes, safetensors I/O, the LR schedule.

Files are written through `atomic_file` (or `outputs.atomic_dir` for folders), so an interrupted save never
leaves a half-written file behind: we write into a temporary sibling and rename it into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the user's choice, else CUDA, else Apple-silicon MPS, else CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """What a result was measured on: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores)"


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 where the device computes in it natively (CUDA with bf16 support, MPS), fp32 on CPU."""
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "mps":
        return torch.bfloat16
    return torch.float32


def current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; it is renamed onto `path` only if the block succeeds."""
    path = check_file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_file_target(path: str | Path, what: str = "output file") -> Path:
    """`path` as a Path, if a file can be written there: not a folder, and no file where a folder must be (call it
    before long work whose result goes there). ValueError naming the path otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} '{path}': a folder is there; name a file")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"{what} '{path}': '{blocking}' is a file, not a folder")
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
    """Open a temporary file beside `path`; it is renamed onto `path` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def existing_file(path: str | Path, what: str = "file") -> Path:
    """`path` as a Path, when a file is there; else FileNotFoundError naming `what` and the path (and saying
    when it is a folder)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{what} '{path}': a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}': not found")
    return path


def read_json(path: str | Path, what: str = "file", keys: tuple[str, ...] | None = None) -> dict:
    """Read a JSON file (UTF-8, whatever the locale) with an error that names the file when it is missing or
    malformed. `keys`: the file must hold a JSON object with (at least) these keys."""
    path = existing_file(path, what)
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} '{path}': not valid JSON ({e})") from None
    if keys is not None:
        require_keys(value, keys, f"{what} '{path}'")
    return value


def require_keys(value, keys: tuple[str, ...], where: str) -> None:
    """ValueError naming `where` unless `value` is a dict holding every one of `keys`."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)}")


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Save tensors as safetensors (never pickle). Shared storage is cloned so tied weights save cleanly."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(_untie(tensors), str(tmp), metadata=metadata)


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU, with an error naming the file if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights '{path}': not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"weights '{path}': cannot be read as safetensors ({e})") from None


def check_weights(what: str, missing=(), unexpected=(), wrong=()) -> None:
    """ValueError naming the weights a checkpoint lacks, has in excess, or has in another shape (the first five of
    each), one wording for every format minillava loads."""
    problems = [(sorted(missing), "missing"), (sorted(unexpected), "unexpected"), (sorted(wrong), "wrong shape")]
    msg = "; ".join(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for keys, label in problems if keys)
    if msg:
        raise ValueError(f"{what}: weights do not match the model ({msg})")


def lr_at(step: int, total: int, warmup: int) -> float:
    """Cosine schedule with linear warmup, as a factor of the peak (transformers' cosine schedule)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@contextlib.contextmanager
def peft_quietly():
    """Wrapping a model with peft: hide the FutureWarning peft 0.21 raises by reading transformers' deprecated
    `is_gradient_checkpointing` (nothing minillava or its user can change)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


@contextlib.contextmanager
def quiet_loading():
    """Load with transformers without its "Loading weights" progress bar in the middle of a run's output."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()
