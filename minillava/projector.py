"""The projector ("connector"): the one part of LLaVA learned from scratch.

It maps each vision feature (width C_v, e.g. 1024 for CLIP ViT-L) to a vector of the language model's
embedding width H (4096 for Vicuna-7B), so an image becomes a run of "soft words". Built from a name as in
LLaVA's `llava/model/multimodal_projector/builder.py`:

- `linear`: Linear(C_v, H) -- LLaVA-1.
- `mlp{N}x_gelu`: Linear(C_v, H), then N-1 times (exact GELU, Linear(H, H)) -- LLaVA-1.5 uses `mlp2x_gelu`.
- `identity`: no parameters; needs C_v == H.

The layers live in an `nn.Sequential`, so the weight names (`0.weight`, `2.weight`) are LLaVA's `mm_projector.*`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

PROJECTORS = ("linear", "mlp{N}x_gelu", "identity")


def build_projector(name: str, vision_dim: int, text_dim: int) -> nn.Sequential:
    """A projector from its name: features (..., vision_dim) -> embeddings (..., text_dim)."""
    if name == "linear":
        layers = [nn.Linear(vision_dim, text_dim)]
    elif name == "identity":
        if vision_dim != text_dim:
            raise ValueError(f"projector 'identity' needs equal widths, got vision {vision_dim} and text {text_dim}")
        layers = [nn.Identity()]
    elif m := re.fullmatch(r"mlp(\d+)x_gelu", name):
        depth = int(m.group(1))
        if depth < 1:
            raise ValueError(f"projector '{name}': depth must be at least 1")
        layers = [nn.Linear(vision_dim, text_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(text_dim, text_dim)]
    else:
        raise ValueError(f"unknown projector '{name}'; known: {', '.join(PROJECTORS)}")
    projector = nn.Sequential(*layers)
    projector.kind = name
    return projector


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Fewer, wider image tokens, as SmolVLM and nanoVLM compress them before their projector (Idefics3's
    `pixel_shuffle`): patch features (N, P, C) on a g x g grid -> (N, P / factor^2, C * factor^2), each new token
    holding a factor x factor block of neighbouring patches. g must be a multiple of `factor`; no parameters."""
    n, p, c = features.shape
    g = int(round(p ** 0.5))
    if g * g != p or g % factor:
        raise ValueError(f"pixel_shuffle: {p} patches are not a square grid whose side is a multiple of {factor}")
    x = features.reshape(n, g, g // factor, c * factor)  # rows, column blocks: each holds `factor` neighbours
    x = x.permute(0, 2, 1, 3).reshape(n, g // factor, g // factor, c * factor * factor)  # and `factor` rows
    return x.permute(0, 2, 1, 3).reshape(n, p // factor ** 2, c * factor ** 2)
