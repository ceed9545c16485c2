"""The frozen-feature cache: vision features computed once per image and reused across steps and epochs.

LLaVA's vision tower is frozen in both training stages, so for a given image its features never change --
yet the reference implementations decode, preprocess and encode every image again at every step. Here each
image's features are computed once and kept in memory (or on disk, to share between runs).

A cache entry is keyed by everything that determines the features: a fingerprint of the tower's weights, the
feature layer and selection, the preprocessing settings, and the image file (path, size, modification time).
Change any of them and the key changes, so stale features are never reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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


class FeatureCache:
    """Maps image files to their frozen vision features (P, C_v), computing misses in one batch.

    Args:
        tower: the frozen `VisionTower`. image_processor: the preprocessing that feeds it.
        directory: if given, features are also stored there as safetensors and found again by later runs.
    """

    def __init__(self, tower: VisionTower, image_processor: ImageProcessor, directory: str | Path | None = None):
        if not tower.frozen:
            raise ValueError("feature cache: the vision tower is trainable, so its features change; "
                             "caching them would train on stale features")
        self.tower, self.image_processor = tower, image_processor
        self.prefix = tower_fingerprint(tower, image_processor)
        self.directory = Path(directory) / self.prefix if directory is not None else None
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def _file(self, key: str) -> Path:
        return self.directory / (hashlib.blake2b(key.encode(), digest_size=16).hexdigest() + ".safetensors")

    def get(self, paths: list[Path]) -> torch.Tensor:
        """Image paths -> features (N, P, C_v), in order; the tower runs only on images not seen before."""
        keys = [image_key(Path(p)) for p in paths]
        missing = []
        for k in keys:
            if k in self.memory:
                continue
            if self.directory is not None and self._file(k).is_file():
                self.memory[k] = load_tensors(self._file(k))["features"]
            elif k not in missing:
                missing.append(k)
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        if missing:
            by_key = dict(zip(keys, paths))
            device = next(self.tower.parameters()).device
            with torch.no_grad():
                pixels = self.image_processor([by_key[k] for k in missing]).to(device)
                feats = self.tower(pixels).cpu()
            for k, f in zip(missing, feats):
                self.memory[k] = f.clone()
                if self.directory is not None:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    save_tensors({"features": self.memory[k]}, self._file(k))
        return torch.stack([self.memory[k] for k in keys])
