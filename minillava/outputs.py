"""Outputs that never lose a user's file: guarded atomic saves, one run per output, leftovers cleaned.

A save writes into a temporary sibling folder and renames it into place (`atomic_dir`), so an interrupted save
never leaves a half-written checkpoint. A guarded save marks the folder it wrote (`MARKER` lists its files) and
replaces no other folder; `output_lock` keeps a second run out of an output in use; `remove_leftovers` deletes
what killed saves left behind.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from .utils import current_umask, write_json

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
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the result should look like any new folder
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
