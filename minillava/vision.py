"""The vision side of LLaVA: loading images, preprocessing them as LLaVA does, and the frozen vision tower.

Follows LLaVA v1.5 (`llava/mm_utils.py: expand2square`, `llava/model/multimodal_encoder/clip_encoder.py`):
images are padded to a square with the CLIP mean colour, resized (shortest edge, bicubic), centre-cropped,
scaled to [0, 1] and normalised; the tower returns the hidden states of the second-to-last layer with the CLS
token dropped. Any transformers vision model works as the tower (CLIP, SigLIP, ...); SigLIP has no CLS token,
so nothing is dropped there.

16-bit greyscale images (PIL modes "I;16", "I;16B", "I;16L", e.g. 16-bit PNGs) keep their top 8 bits
(value >> 8), so the picture survives the trip to 8 bits. transformers' image processors differ here on
purpose: they convert with PIL's `convert("RGB")`, which saturates, so every value above 255 turns white
and a typical 16-bit image comes out almost all white.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from .utils import existing_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 64_000_000  # refuse larger images: a decompression bomb, or a scan no vision tower needs


def mean_color(mean=CLIP_MEAN) -> tuple[int, ...]:
    """The padding colour LLaVA uses: the normalisation mean in 0..255, truncated -- (122, 116, 104) for CLIP."""
    return tuple(int(m * 255) for m in mean)


def load_image(source, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image (path, bytes or PIL image) as RGB, with errors that name the image and the problem.

    Modes with transparency are composited on white (as transformers does); 16-bit and float greyscale are
    scaled to 8 bits. EXIF rotation is applied. Zero-size images and images above `max_pixels` are refused.
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "<image>")
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, Path)):
            data = existing_file(source, "image").read_bytes()
        elif isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            raise TypeError(f"image '{name}': expected a path, bytes or PIL image, got {type(source).__name__}")
        with _decoding(name):
            image = Image.open(io.BytesIO(data))
            _check_size(image, name, max_pixels)  # before decoding: the header is enough
            image.load()
    _check_size(image, name, max_pixels)
    try:
        return to_rgb(ImageOps.exif_transpose(image))
    except (ValueError, OSError) as e:  # a mode PIL cannot convert
        raise ValueError(f"image '{name}': mode {image.mode!r} cannot be converted to RGB ({e})") from None


def check_image_file(path: str | Path, max_pixels: int = MAX_PIXELS) -> None:
    """Check an image file without decoding its pixels: it exists, its format is recognised, its size is sane
    and its data is complete (PNG and the other formats PIL can verify; a JPEG whose last bytes hold no
    end-of-image marker, as a cut-off download's do not, is decoded to be sure). ValueError names the file."""
    name = str(existing_file(path, "image"))
    with _decoding(name), Image.open(path) as image:
        _check_size(image, name, max_pixels)
        jpeg = image.format == "JPEG"
        image.verify()
    if jpeg and not _ends_jpeg(path):  # (data after the marker, as in phones' motion photos, is allowed)
        with _decoding(name), Image.open(path) as image:
            image.load()


def _ends_jpeg(path: str | Path, tail: int = 4096) -> bool:
    """Whether the last `tail` bytes of a JPEG file (trailing zeros left out) hold its end-of-image marker."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - tail))
        return b"\xff\xd9" in f.read().rstrip(b"\x00")


@contextlib.contextmanager
def _decoding(name: str):
    """PIL's errors (and its decompression-bomb warning) while opening an image -> ValueError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"image '{name}': too large to decode safely (decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"image '{name}': not an image file (no image format recognised)") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"image '{name}': cannot be decoded ({e})") from None


def _check_size(image: Image.Image, name: str, max_pixels: int) -> None:
    w, h = image.size
    if w == 0 or h == 0:
        raise ValueError(f"image '{name}': has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ValueError(f"image '{name}': {w}x{h} is larger than the {max_pixels:,} pixels allowed")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white; 16-bit greyscale shifted to its top 8 bits
    (value >> 8, see the module's docstring); 32-bit integer and float greyscale scaled by their maximum."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), "L")
    elif image.mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float32)
        top = max(float(a.max()), 255.0)
        image = Image.fromarray(np.clip(a / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "La":  # premultiplied alpha, which PIL converts to nothing: divide it out
        la = np.asarray(image).astype(np.float32)
        grey = np.where(la[..., 1] > 0, la[..., 0] * 255.0 / np.maximum(la[..., 1], 1.0), 0.0)
        image = Image.fromarray(np.stack([np.clip(grey, 0, 255), la[..., 1]], -1).astype(np.uint8), "LA")
    if image.mode in ("RGBA", "RGBa", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Paste `image` centred on a square canvas of `background` colour (LLaVA's `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


@dataclass
class ImageProcessor:
    """LLaVA's image preprocessing, configured in one place.

    aspect: "pad" (LLaVA-1.5 stage 2 and inference: pad to square with the mean colour, then resize and crop),
    "square" (stage 1 and llava-hf: resize the shortest edge and centre-crop, cutting the sides off).
    """

    image_size: int = 336  # the crop the tower sees
    resize: int | None = None  # shortest edge before cropping (default: image_size)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    aspect: str = "pad"

    def __post_init__(self):
        if self.aspect not in ("pad", "square"):
            raise ValueError(f"image aspect '{self.aspect}': expected 'pad' or 'square'")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def load(self, source, name: str | None = None) -> Image.Image:
        """`load_image`, then `check`: an image this preprocessing can take, or an error naming it now, when
        it is attached, rather than when its pixels are first needed."""
        name = name or (str(source) if isinstance(source, (str, Path)) else "<image>")
        image = load_image(source, name=name)
        self.check(image, name)
        return image

    def check(self, image: Image.Image, name: str = "<image>") -> None:
        """Refuse an image whose working copy would exceed MAX_PIXELS: padded to a square ("pad"), or resized
        to the shortest edge before the crop ("square"). A long strip (60000x2) is small, but not its square."""
        w, h = image.size
        if self.aspect == "pad" and max(w, h) ** 2 > MAX_PIXELS:
            side = max(w, h)
            raise ValueError(f"image '{name}': {w}x{h} pads to a {side}x{side} square, more than the "
                             f"{MAX_PIXELS:,} pixels allowed; crop or resize it first")
        if self.aspect == "square":
            new_w, new_h = self._resized(w, h)
            if new_w * new_h > MAX_PIXELS:
                raise ValueError(f"image '{name}': {w}x{h} resizes to {new_w}x{new_h}, more than the "
                                 f"{MAX_PIXELS:,} pixels allowed; crop it first")

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        """The size (w, h) becomes when its shortest edge is resized to `resize` (default: image_size)."""
        short = self.resize or self.image_size
        return (short, int(short * h / w)) if w <= h else (int(short * w / h), short)

    def preprocess(self, image: Image.Image, name: str = "<image>") -> torch.Tensor:
        """One RGB PIL image -> normalised pixels (3, image_size, image_size), float32."""
        self.check(image, name)
        if self.aspect == "pad":
            image = expand2square(image, mean_color(self.mean))
        new_w, new_h = self._resized(*image.size)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        s = self.image_size
        left, top = (new_w - s) // 2, (new_h - s) // 2
        image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, images, names: list[str] | None = None) -> torch.Tensor:
        """Images (paths, bytes or PIL) -> pixel values (N, 3, image_size, image_size)."""
        images = list(images)
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        names = names or [None] * len(images)
        loaded = [load_image(im, name=n) for im, n in zip(images, names)]
        return torch.stack([self.preprocess(im, n or (str(src) if isinstance(src, (str, Path)) else "<image>"))
                            for im, n, src in zip(loaded, names, images)])

    def to_dict(self) -> dict:
        return asdict(self)


def vision_model_of(model: nn.Module) -> nn.Module:
    """The image encoder of a transformers model: a dual encoder (CLIPModel, SiglipModel) yields its vision half,
    a standalone `*VisionModel` (what LLaVA and transformers' Llava use); a vision model is returned as is."""
    inner = getattr(model, "vision_model", None)
    if inner is None or not hasattr(model, "text_model"):
        return model
    if hasattr(inner, "config"):  # transformers 5: the vision half is already a CLIPVisionModel
        return inner
    from transformers import AutoModel

    vision = AutoModel.from_config(model.config.vision_config)
    vision.vision_model.load_state_dict(inner.state_dict())
    return vision.to(next(model.parameters()).dtype)


class VisionTower(nn.Module):
    """A transformers vision model that returns LLaVA's image features.

    LLaVA takes the hidden states of `feature_layer` (-2: the second-to-last block, before the final layer norm,
    whose features are less specialised to CLIP's contrastive objective than the last) and drops the CLS token
    ("patch"); "cls_patch" keeps it. The tower is frozen in both training stages, so it runs without autograd.
    """

    def __init__(self, model: nn.Module, feature_layer: int = -2, select: str = "patch", frozen: bool = True):
        super().__init__()
        if select not in ("patch", "cls_patch"):
            raise ValueError(f"feature select '{select}': expected 'patch' or 'cls_patch'")
        self.model = vision_model_of(model)
        self.feature_layer, self.select, self.frozen = feature_layer, select, frozen
        cfg = self.model.config
        n_layers = cfg.num_hidden_layers
        if not -(n_layers + 1) <= feature_layer <= n_layers:
            raise ValueError(f"feature layer {feature_layer}: the tower has {n_layers} layers (+ embeddings)")
        if frozen:
            self.model.requires_grad_(False)
        self.has_cls = hasattr(getattr(self.model, "vision_model", self.model).embeddings, "class_embedding")

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    @property
    def num_tokens(self) -> int:
        """Feature tokens per image: (image_size / patch_size)^2 patches, plus CLS if kept."""
        n = (self.image_size // self.patch_size) ** 2
        return n + int(self.has_cls and self.select == "cls_patch")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen tower stays in eval mode (no dropout), as in LLaVA
            self.model.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, S, S) -> features (N, num_tokens, hidden_size) of the selected layer."""
        dtype = next(self.model.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]
        if self.has_cls and self.select == "patch":
            feats = feats[:, 1:]
        return feats


def noise_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A picture of nothing: uniform RGB noise (size, size), for probing what a model says about no content."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
