"""ShapesWorld's test questions on pictures drawn by other code: does the model see shapes, or its renderer?

ShapesWorld's `render` draws every training image the same way: a pale gradient with faint noise, shapes at the
centre of their cell, supersampled edges, colours within 8 levels of their named value, 64 pixels. `redraw`
paints the same scene independently: flat or two-tone backgrounds that may be darker or more saturated, shades
up to 25 levels off, shapes off-centre in their cell with sizes that vary, any rotation, aliased edges, some with
an outline, at another image size (the processor resizes it). The answers still follow from the scene, except
bounding boxes (the geometry moved), whose turns are kept as history only.

    python -m minillava.tools.redrawn [--model tiny-llava] [--n 300] [--out data/results/redrawn.json]

Which of those differences costs what: `redraw` can paint any of its `FACTORS` ShapesWorld's way instead, and
`--factors` measures each alone and every one but each, on the same random draws (about 26 min on 2 CPU cores):

    python -m minillava.tools.redrawn --factors --n 1000 --out data/results/redrawn_factors.json
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import sys
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


# What redraw does differently from ShapesWorld's renderer, one factor at a time (ShapesWorld's way in brackets).
FACTORS = {
    "background": "flat or two-tone, of any hue, often darker (a pale gradient with faint noise)",
    "shades": "up to 25 levels off the named colour (8)",
    "rotation": "shapes turned to any angle (at most 15 degrees)",
    "proportions": "a smaller square, a triangle centred higher, a thinner star (ShapesWorld's)",
    "placement": "off-centre in the cell, radii that vary (centred, two fixed radii)",
    "edges": "aliased, 30% outlined in dark grey (anti-aliased, no outline)",
    "image size": "48, 96 or 128 px, resized by the processor (64 px)",
}


def redraw(scene: sw.Scene, rng: np.random.Generator, size: int | None = None, *, same=()) -> Image.Image:
    """The scene painted without ShapesWorld's renderer: same objects, cells, sizes and colour names, at `size`
    pixels (None: one of `SIZES`, drawn from `rng`). `same`: `FACTORS` painted ShapesWorld's way instead. Every
    random draw is made whatever `same` holds, so variants of a scene differ in those factors alone; with all
    of them the picture is ShapesWorld's own (`sw.render`)."""
    if unknown := set(same) - set(FACTORS):
        raise ValueError(f"same: unknown factors {sorted(unknown)}; known: {list(FACTORS)}")
    size = int(rng.choice(SIZES)) if size is None else size
    size = scene.size if "image size" in same else size
    background = _background(rng, size)
    if "background" in same:
        background = sw.render_background(scene.background, size)
    cell, shapes = size / 3, []
    for o in scene.objects:
        fill = shade(o.color, rng)
        r = size * (rng.uniform(0.075, 0.105) if o.size == "small" else rng.uniform(0.14, 0.165))
        cx = (o.cell[1] + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        cy = (o.cell[0] + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        outline = (40, 40, 40, 255) if rng.random() < 0.3 and "edges" not in same else None
        angle = 0.0 if o.shape == "circle" else float(rng.uniform(0, 360))  # from the top, clockwise
        if "rotation" in same:  # ShapesWorld's, where its square's angle 0 is `_points`'s 45
            angle = o.angle + (45.0 if o.shape == "square" else 0.0)
        fill = (*(o.rgb or sw.COLORS[o.color]), 255) if "shades" in same else (*fill, 255)
        cx, cy, r = sw.geometry(o, size) if "placement" in same else (cx, cy, r)
        shapes.append((o, cx, cy, r, angle, fill, outline))

    def draw_shapes(draw: ImageDraw.ImageDraw, k: int) -> None:
        for o, cx, cy, r, angle, fill, outline in shapes:
            cx, cy, r = cx * k, cy * k, r * k
            if o.shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
            else:
                points = (sw.polygon(dataclasses.replace(o, angle=angle - (45.0 if o.shape == "square" else 0.0)),
                                     cx, cy, r) if "proportions" in same else _points(o.shape, cx, cy, r, angle))
                draw.polygon(points, fill=fill, outline=outline)
    return sw.paint(background, draw_shapes, sw.SUPERSAMPLE if "edges" in same else 1)


def redrawn_records(records: list[Record], folder: Path, seed: int = 0, *, draw=None) -> list[Record]:
    """Single-image records with their image redrawn into `folder` by `draw(scene, rng)` (default: `redraw`, at
    one of `SIZES`); grounding turns become "context" (their boxes no longer hold)."""
    draw = draw or redraw
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


def conditions() -> dict[str, tuple[str, ...]]:
    """The factor conditions, {name: the factors painted ShapesWorld's way}: none redrawn ("ShapesWorld's", the
    renderer's own picture), one factor alone ("only background", ...), every factor but one ("all but
    background", ...) and all ("redrawn", the check itself)."""
    every = tuple(FACTORS)
    return {"ShapesWorld's": every, **{f"only {f}": tuple(g for g in every if g != f) for f in every},
            **{f"all but {f}": (f,) for f in every}, "redrawn": ()}


def factors(model, processor, records: list[Record], seed: int = 0, progress: bool = True) -> dict:
    """Which difference costs what: VQA exact match (`evaluate`) in every one of `conditions()`, the random draws
    the same in each, so two conditions differ only in the factors they paint differently."""
    out = {}
    for name, same in conditions().items():
        r = evaluate(model, processor, records, seed, draw=lambda scene, rng, same=same: redraw(scene, rng, same=same),
                     progress=progress)
        out[name] = {"same": list(same), **{k: r[k] for k in ("overall", "by_type")}}
        print(f"{name:24s} {r['overall']['exact']:.1%}", flush=True)
    return out


def factor_pictures(path: str | Path, n: int = 3, seed: int = 0) -> None:
    """A PNG for the book: `n` scenes (rows), each painted ShapesWorld's way, with one factor redrawn, and with
    all (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_file

    names = ["ShapesWorld's", *(f"only {f}" for f in FACTORS), "redrawn"]
    scenes = [sw.sample_scene(np.random.default_rng([seed, i])) for i in range(n)]
    fig, axes = plt.subplots(n, len(names), figsize=(1.25 * len(names), 1.35 * n + 0.3), squeeze=False)
    for i, (row, scene) in enumerate(zip(axes, scenes)):
        for ax, name in zip(row, names):
            ax.imshow(redraw(scene, np.random.default_rng([seed, i, 1]), same=conditions()[name]))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name.removeprefix("only "), fontsize=9)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    import time

    import torch

    from ..checkpoints import load
    from ..data.records import load_records
    from ..zoo import weights_digest

    p = argparse.ArgumentParser(prog="python -m minillava.tools.redrawn", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--data", default=None, help="ShapesWorld test records (default: a fresh test split)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--factors", action="store_true",
                   help="measure every factor condition (`conditions`), not only the redrawn pictures; --out also "
                        "gets a PNG of them beside it")
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args(argv)
    model, processor = load(a.model, dtype=torch.float32)
    records = (load_records(a.data) if a.data else sw.generate_records("test", a.n).instruct)[: a.n]
    if a.factors:
        start = time.perf_counter()
        result = {"model": a.model, "model_sha256": weights_digest(a.model), "n_records": len(records),
                  "factors": FACTORS, "conditions": factors(model, processor, records)}
        result["seconds"] = round(time.perf_counter() - start)
        result["command"] = "python -m minillava.tools.redrawn " + " ".join(sys.argv[1:] if argv is None else argv)
        if a.out:
            write_json(a.out, result)
            factor_pictures(Path(a.out).with_suffix(".png"))
        return result
    result = evaluate(model, processor, records)
    print(result["table"])
    if a.out:
        write_json(a.out, {k: result[k] for k in ("overall", "by_type")})
    return result


if __name__ == "__main__":
    main()
