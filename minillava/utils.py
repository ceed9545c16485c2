"""Small shared helpers: device and dtype choice, atomic file writes, safetensors I/O, the LR schedule.

Everything that touches the disk goes through `atomic_dir` or `atomic_file`, so an interrupted save never
leaves a half-written checkpoint behind: we write into a temporary sibling and rename it into place. A model
save marks the folder it wrote (`MARKER`) and replaces no other; `output_lock` keeps a second run out of an
output in use, and `remove_leftovers` deletes what killed saves left.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


MARKER = ".minillava"  # what a guarded save (`atomic_dir(..., marker=...)`) wrote into the folder: JSON, "files"


def check_replaceable(path: str | Path, marker: str = "config.json", what: str = "output folder") -> None:
    """Refuse to let a save replace `path` unless it is new, empty, or a folder a minillava save wrote: it holds
    `marker` and a MARKER file, and nothing but the files MARKER lists. A folder of the user's other files is never
    deleted."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} '{path}': exists and is not a folder")
    if not path.is_dir() or not any(path.iterdir()):
        return
    refusing = "refusing to replace it"
    if not (path / marker).is_file():
        raise FileExistsError(f"{what} '{path}': holds other files and no {marker}, so it is not a model "
                              f"folder; {refusing} (choose a new or empty folder)")
    written = written_files(path)
    if written is None:
        raise FileExistsError(f"{what} '{path}': has no {MARKER} file listing what minillava wrote there, so "
                              f"another program or an older version of minillava made it; {refusing}. If it is "
                              "an older output you no longer need, delete it or move it away and run again (or "
                              "choose another folder)")
    extra = folder_entries(path) - written
    if extra:
        names = ", ".join(sorted(extra)[:5]) + (" ..." if len(extra) > 5 else "")
        raise FileExistsError(f"{what} '{path}': holds files minillava did not write ({names}); {refusing} "
                              "(move them away, or choose another folder)")


def folder_entries(path: Path) -> set[str]:
    """Every file and folder under `path` as a relative POSIX path, MARKER left out."""
    entries = set()
    for root, dirs, files in os.walk(path):
        rel = Path(root).relative_to(path)
        entries.update((rel / name).as_posix() for name in dirs + files)
    return entries - {MARKER}


def mark_written(folder: Path, names) -> None:
    """Add `names` (files written into `folder` after its guarded save, e.g. a model card) to its MARKER."""
    written = written_files(folder)
    if written is not None:
        write_json(folder / MARKER, {"written_by": "minillava", "files": sorted(written | set(names))})


def written_files(path: Path) -> set[str] | None:
    """The entries `path`'s MARKER lists (None: it has no readable MARKER)."""
    try:
        files = json.loads((path / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(files) if isinstance(files, list) else None


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True, marker: str | None = None):
    """Yield a temporary directory that replaces `path` only when the block finishes without error.

    With `marker` (the file that folder holds, e.g. config.json) the save is guarded: an existing `path` is
    replaced only if `check_replaceable` allows it, and the result gets a MARKER listing what the block wrote.
    The temporary siblings are named `.NAME.tmp-PID-*` and `.NAME.old-PID-*`, so that `remove_leftovers` can
    tell those of a killed process."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"'{path}': exists and is not a directory")
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}': already exists (pass overwrite=True to replace it)")
    if marker:
        check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any new folder
    try:
        yield tmp
        if marker:
            write_json(tmp / MARKER, {"written_by": "minillava", "files": sorted(folder_entries(tmp))})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{tmp.name.rpartition('.tmp-')[2]}")  # the same PID and suffix
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(path: str | Path) -> list[str]:
    """Delete the temporary siblings `atomic_dir` left beside `path` (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`)
    whose process has ended; returns a note on each one left in place, saying why."""
    path = Path(path)
    notes = []
    for kind in ("tmp", "old"):
        for p in sorted(path.parent.glob(f".{glob.escape(path.name)}.{kind}-*")):
            rest = p.name[len(f".{path.name}.{kind}-"):]
            pid = rest.partition("-")[0]
            if not (pid.isdigit() and ("-" in rest or kind == "old")):  # older versions: .NAME.tmp-RANDOM
                notes.append(f"left '{p}' (no process ID in its name, so it may belong to a save still running; "
                             "delete it if none is)")
            elif pid_alive(int(pid)):
                notes.append(f"left '{p}' (process {pid} is still running)")
            else:
                shutil.rmtree(p, ignore_errors=True)
                if p.exists():
                    notes.append(f"left '{p}' (cannot delete it)")
    return notes


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (this process counts: its own saves are not leftovers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def output_lock(out: str | Path, what: str = "out"):
    """Hold `<out>.lock` while the block runs, so that one process at a time writes `out`; a second is refused
    with the holder's PID, host and start time. The lock is the kernel's (flock) and the file only names its
    holder, so a run that dies lets go of it and the next one takes the file over, saying whose it was."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    out = Path(out)
    lock = Path(f"{out}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd) or "its details are not written yet"
            os.close(fd)
            raise BlockingIOError(f"{what} '{out}': another run is writing it ({holder}); wait for it to end or "
                                  f"choose another folder (lock file '{lock}')") from None
        if _is_file(fd, lock):
            break
        os.close(fd)  # the holder deleted the file as it finished, after our open: lock the next one
    previous = _lock_holder(fd)
    if previous:
        print(f"{what} '{out}': taking over the lock of a run that ended without releasing it ({previous})",
              file=sys.stderr)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    try:
        yield
    finally:
        if _is_file(fd, lock):  # deleted before letting go, so a waiting run never locks a file no one deletes
            lock.unlink()
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """Who the lock file open at `fd` names ("" when empty)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096)
    try:
        holder = json.loads(text)
        return f"PID {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return f"a holder it does not name: {text[:80]!r}" if text else ""


def _is_file(fd: int, path: Path) -> bool:
    """Whether `path` is still the file open at `fd`."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; it is renamed onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def read_json(path: str | Path, what: str = "file") -> dict:
    """Read a JSON file with an error that names the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}': not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} '{path}': not valid JSON ({e})") from None


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
