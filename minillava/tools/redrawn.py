"""ShapesWorld's test questions on pictures drawn by other code: does the model see shapes, or its renderer?

ShapesWorld's `render` draws every training image the same way: a pale gradient with faint noise, shapes at the
centre of their cell, supersampled edges, colours within 8 levels of their named value, 64 pixels. `redraw`
paints the same scene independently: flat or two-tone backgrounds that may be darker or more saturated, shades
up to 25 levels off, shapes off-centre in their cell with sizes that vary, any rotation, aliased edges, some with
an outline, at another image size (the processor resizes it). The answers still follow from the scene, except
bounding boxes (the geometry moved), whose turns are kept as history only.

    python -m minillava.tools.redrawn [--model tiny-llava] [--n 300] [--out data/results/redrawn.json]
"""

from __future__ import annotations

import argparse
import colorsys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data import shapesworld as sw
from ..data.records import Record
from ..utils import write_json

SIZES = (48, 96, 128)  # image sides in pixels, none of them ShapesWorld's 64


def _background(rng, size: int) -> Image.Image:
    """A flat colour, or two flat halves, of any hue; lighter or darker than ShapesWorld's pale ones."""
    def colour():
        r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.72, 1.0))
        return tuple(int(255 * v) for v in (r, g, b))
    img = Image.new("RGB", (size, size), colour())
    if rng.random() < 0.4:
        half = [(0, 0, size, size // 2), (0, 0, size // 2, size)][int(rng.integers(2))]
        ImageDraw.Draw(img).rectangle(half, fill=colour())
    return img


def _points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    radii = {"square": [r * 0.85] * 4, "triangle": [r] * 3, "star": [r, 0.42 * r] * 5}[shape]
    a = np.deg2rad(angle + np.arange(len(radii)) * 360 / len(radii))
    return [(cx + rad * np.sin(t), cy - rad * np.cos(t)) for rad, t in zip(radii, a)]


def shade(color: str, rng: np.random.Generator, spread: int = 25) -> tuple[int, int, int]:
    """The named colour with each channel moved by up to `spread` levels."""
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in sw.COLORS[color])


def redraw(scene: sw.Scene, rng: np.random.Generator, size: int) -> Image.Image:
    """The scene painted without ShapesWorld's renderer: same objects, cells, sizes and colour names."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for o in scene.objects:
        fill = shade(o.color, rng)
        r = size * (rng.uniform(0.075, 0.105) if o.size == "small" else rng.uniform(0.14, 0.165))
        cx = (o.cell[1] + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        cy = (o.cell[0] + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        outline = (40, 40, 40) if rng.random() < 0.3 else None
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
        else:
            draw.polygon(_points(o.shape, cx, cy, r, float(rng.uniform(0, 360))), fill=fill, outline=outline)
    return img


def redrawn_records(records: list[Record], folder: Path, seed: int = 0, *, draw=None) -> list[Record]:
    """Single-image records with their image redrawn into `folder` by `draw(scene, rng)` (default: `redraw`, at
    one of `SIZES`); grounding turns become "context" (their boxes no longer hold)."""
    draw = draw or (lambda scene, rng: redraw(scene, rng, int(rng.choice(SIZES))))
    rng, out = np.random.default_rng(seed), []
    for r in records:
        if len(r.images) != 1 or not isinstance(r.meta.get("scene"), dict):
            continue
        path = folder / f"{r.id}.png"
        draw(sw.Scene.from_dict(r.meta["scene"]), rng).save(path)
        qtypes = ["context" if t == "grounding" else t for t in r.meta.get("qtypes", [])]
        if any(t != "context" for t in qtypes):
            out.append(Record(r.id, [path], r.messages, {**r.meta, "qtypes": qtypes}))
    return out


def evaluate(model, processor, records: list[Record], seed: int = 0, *, draw=None, progress: bool = True) -> dict:
    """VQA exact match per question type on the redrawn pictures (see `redrawn_records`)."""
    with tempfile.TemporaryDirectory() as tmp:
        recs = redrawn_records(records, Path(tmp), seed, draw=draw)
        return sw.evaluate(model, processor, recs, "vqa", progress=progress)


def main(argv: list[str] | None = None) -> dict:
    import torch

    from ..checkpoints import load
    from ..data.records import load_records

    p = argparse.ArgumentParser(prog="python -m minillava.tools.redrawn", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--data", default=None, help="ShapesWorld test records (default: a fresh test split)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args(argv)
    model, processor = load(a.model, dtype=torch.float32)
    records = (load_records(a.data) if a.data else sw.generate_records("test", a.n).instruct)[: a.n]
    result = evaluate(model, processor, records)
    print(result["table"])
    if a.out:
        write_json(a.out, {k: result[k] for k in ("overall", "by_type")})
    return result


if __name__ == "__main__":
    main()
