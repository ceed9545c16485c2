"""The frozen-feature cache: vision features computed once per image and reused across steps and epochs.

LLaVA's vision tower is frozen in both training stages, so for a given image its features never change --
yet the reference implementations decode, preprocess and encode every image again at every step. Here each
image's features are computed once and kept in memory, or on disk (one safetensors file per image, read back
through a memory map when needed: nothing is held in the process, and later runs find them again).

A cache entry is keyed by everything that determines the features: a fingerprint of the tower's weights, the
feature layer and selection, the preprocessing settings, and the image file (path, size, modification time).
Change any of them and the key changes, so stale features are never reused.

The features of a whole data set can be large (LCS-558K at 576 x 1024 fp32: 1.3 TB), so `choose_cache` picks
where they go before any is computed ("auto"), and refuses a place they cannot fit, with the estimate.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..utils import load_tensors, save_tensors
from ..vision import ImageProcessor, VisionTower


def tower_fingerprint(tower: VisionTower, image_processor: ImageProcessor) -> str:
    """A hash of the tower's weights, its feature layer/selection and the preprocessing settings."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(tower.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([tower.feature_layer, tower.select, image_processor.to_dict()], sort_keys=True).encode())
    return h.hexdigest()


def image_key(path: Path) -> str:
    """Identify an image file by its resolved path, size and modification time."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def feature_file(directory: Path, key: str) -> Path:
    """Where the disk cache in `directory` keeps the features of image `key` (256 sub-folders, as git's objects,
    so that no folder holds hundreds of thousands of files)."""
    h = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    return directory / h[:2] / f"{h}.safetensors"


@dataclass(frozen=True)
class CachedImages:
    """Which images a `FeatureCache` holds, at one moment: a small picklable snapshot that DataLoader workers
    test paths against (`path in snapshot`), to skip decoding images whose features need no computing."""

    keys: frozenset
    directory: Path | None

    def __contains__(self, path) -> bool:
        key = image_key(Path(path))
        return key in self.keys or (self.directory is not None and feature_file(self.directory, key).is_file())


class FeatureCache:
    """Maps image files to their frozen vision features (P, C_v), computing misses in one batch.

    Args:
        tower: the frozen `VisionTower`. image_processor: the preprocessing that feeds it.
        directory: None: features are kept in memory. A folder: they are kept there only (one safetensors file
            each, under a sub-folder named by the tower's fingerprint) and found again by later runs.
    """

    def __init__(self, tower: VisionTower, image_processor: ImageProcessor, directory: str | Path | None = None):
        if not tower.frozen:
            raise ValueError("feature cache: the vision tower is trainable, so its features change; "
                             "caching them would train on stale features")
        self.tower, self.image_processor = tower, image_processor
        self.prefix = tower_fingerprint(tower, image_processor)
        self.directory = Path(directory) / self.prefix if directory is not None else None
        self.memory: dict[str, torch.Tensor] = {}  # (memory mode only)
        self.hits = self.misses = 0

    def get(self, paths: list[Path], pixels: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Image paths -> features (N, P, C_v), in order. The tower runs only on images not seen before, on
        their `pixels` (3, S, S) where given (one entry per path, None where not decoded), else on the files."""
        keys = [image_key(Path(p)) for p in paths]
        found = {k: f for k in dict.fromkeys(keys) if (f := self._lookup(k)) is not None}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        if missing:
            device = next(self.tower.parameters()).device
            with torch.no_grad():
                feats = self.tower(self._pixels(missing, keys, paths, pixels).to(device)).cpu()
            for k, f in zip(missing, feats):
                found[k] = f.clone()
                self._store(k, found[k])
        return torch.stack([found[k] for k in keys])

    def _pixels(self, missing: list[str], keys: list[str], paths: list[Path], pixels) -> torch.Tensor:
        """Pixels (M, 3, S, S) of the `missing` images: those given, the others decoded from their files here."""
        given = {k: x for k, x in zip(keys, pixels or []) if x is not None}
        files = {k: p for k, p in zip(keys, paths) if k in missing and k not in given}
        decoded = self.image_processor(list(files.values()), names=[str(p) for p in files.values()])
        given.update(zip(files, decoded))
        return torch.stack([given[k] for k in missing])

    def _lookup(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            return self.memory.get(key)
        file = feature_file(self.directory, key)
        return load_tensors(file)["features"] if file.is_file() else None

    def _store(self, key: str, features: torch.Tensor) -> None:
        if self.directory is None:
            self.memory[key] = features
            return
        file = feature_file(self.directory, key)
        file.parent.mkdir(parents=True, exist_ok=True)
        save_tensors({"features": features}, file)  # atomic: processes sharing the folder never see half a file

    def snapshot(self) -> CachedImages:
        """The images held now, for DataLoader workers (see `CachedImages`)."""
        return CachedImages(frozenset(self.memory), self.directory)


# ---- where the features go -----------------------------------------------------------------------------------------
class CacheChoice(NamedTuple):
    kind: str  # "memory", "disk" or "off"
    estimate: int  # bytes the features of all the images take
    reason: str  # one line saying why, for the run's log
    directory: Path | None  # where "disk" keeps them (None otherwise)


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def feature_bytes(n_images: int, tokens_per_image: int, width: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the features of `n_images` take: images x tokens per image x feature width x bytes per number."""
    return n_images * tokens_per_image * width * dtype.itemsize


def human_bytes(n: float) -> str:
    """Bytes in decimal units, two significant digits under 10: 1316818550784 -> "1.3 TB", 24e9 -> "24 GB"."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 999.5 or unit == "TB":  # (999.6 GB would print as "1000 GB")
            return f"{n:.1f} {unit}" if n < 10 and unit != "B" else f"{n:.0f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def available_ram() -> int:
    """Memory available to a new allocation, in bytes: Linux's MemAvailable, else free pages (os.sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if "SC_AVPHYS_PAGES" in os.sysconf_names else os.sysconf("SC_PHYS_PAGES")
    return pages * os.sysconf("SC_PAGE_SIZE")


def free_disk(directory: Path) -> int:
    """Free bytes on the file system that holds `directory` (or would: its nearest existing parent)."""
    p = Path(directory).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def default_cache_dir(out: str | Path) -> Path:
    """Where a run keeps features on disk when no cache_dir is named: `<out>.features`, beside the output (not
    in `<out>.partial`, which each resumable checkpoint replaces whole)."""
    return Path(f"{Path(out)}.features")


def choose_cache(kind: str, n_images: int, tokens_per_image: int, width: int, dtype: torch.dtype = torch.float32,
                 epochs: float = 1.0, directory: str | Path | None = None, copies: int = 1,
                 ram_bytes: int | None = None, disk_bytes: int | None = None) -> CacheChoice:
    """Where the features of `n_images` images (tokens_per_image x width numbers of `dtype` each) go.

    kind "auto": "off" when each image is met once (epochs <= 1: a feature computed would never be reused),
    "memory" when the estimate fits in half the memory available, "disk" (in `directory`) when it fits in half
    the free disk there, else "off". An explicit "memory" or "disk" the estimate does not fit is refused
    (ValueError with the estimate); "off" is always granted. `epochs`: passes over the data the run makes
    (steps x batch / samples where max_steps decides). `copies`: processes on this machine that each keep a
    memory cache of their own (DDP ranks; a disk cache is shared). `ram_bytes` / `disk_bytes`: what is
    available (None: measured; tests pass them in).
    """
    need = feature_bytes(n_images, tokens_per_image, width, dtype)
    what = f"{n_images:,} images ({tokens_per_image} x {width} {DTYPE_NAMES.get(dtype, str(dtype))} each)"
    if kind not in ("auto", "memory", "disk", "off"):
        raise ValueError(f"feature cache '{kind}': expected auto, memory, disk or off")
    if kind == "off":
        return CacheChoice("off", need, "feature cache off: every image is encoded at every step", None)
    if kind == "auto" and epochs <= 1:
        return CacheChoice("off", need, f"feature cache off: one pass over the data ({epochs:g} epochs) computes "
                                        "each image's features once and never reuses them", None)
    what_in_memory = what + (f" in each of {copies} processes" if copies > 1 else "")
    ram = available_ram() if ram_bytes is None else ram_bytes
    if kind == "memory" or (kind == "auto" and need * copies <= ram / 2):
        if need * copies > ram:
            raise ValueError(f"feature cache 'memory': needs about {human_bytes(need)} for {what_in_memory}, this "
                             f"machine has {human_bytes(ram)} available; choose 'disk' or 'auto'")
        return CacheChoice("memory", need, f"feature cache in memory: {human_bytes(need)} for {what_in_memory} "
                                           f"({human_bytes(ram)} available)", None)
    if directory is None and kind == "disk":
        raise ValueError("feature cache 'disk': needs a folder (cache_dir)")
    free = 0 if directory is None else free_disk(directory) if disk_bytes is None else disk_bytes
    if kind == "disk" or need <= free / 2:
        if need > free:
            raise ValueError(f"feature cache 'disk': needs about {human_bytes(need)} for {what}, '{directory}' "
                             f"has {human_bytes(free)} free; choose another cache_dir, 'auto' or 'off'")
        why = "" if kind == "disk" else f"more than half the {human_bytes(ram)} of memory available; "
        return CacheChoice("disk", need, f"feature cache on disk in '{directory}': {human_bytes(need)} for "
                                         f"{what_in_memory} ({why}{human_bytes(free)} free there)", Path(directory))
    return CacheChoice("off", need, f"feature cache off: {human_bytes(need)} for {what_in_memory} fits in neither "
                                    f"half the {human_bytes(ram)} of memory available nor half the "
                                    f"{human_bytes(free)} free in '{directory}'", None)
