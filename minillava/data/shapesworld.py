"""ShapesWorld: a seeded synthetic world of coloured shapes, and every dataset the book trains on.

LLaVA learns from images paired with text: captions in stage 1 (LCS-558K) and instruction conversations in
stage 2 (LLaVA-Instruct-150K, llava_v1_5_mix665k). Real images need GPUs; ShapesWorld is small enough for a
2-core CPU and still asks LLaVA's kinds of questions. An image is a 3x3 grid holding 1 to 4 shapes (circle,
square, triangle, star) in six colours and two sizes, on a pale textured background. Everything an answer
depends on lives in a `Scene`, so every answer is computed, exact and short ("Red.", "3.", "Top left.").

* The world: `sample_scene`, `render`, `bbox`, `caption`, `describe`, `change_scene`.
* In memory: `generate_records(split, n, seed)` -> caption and instruction records (LLaVA's "conversation",
  "detail" and "reasoning" kinds, plus two-image questions) and the scene of every image they name;
  `text_chats(n, seed)` -> text-only chats (scenes told in words) for pretraining the language model.
* On disk: `build(out_dir)` or `python -m minillava.data.shapesworld OUT_DIR` writes LLaVA JSON + PNGs.
* For POPE-style probes: `objects_present`, `absent_objects`, `combo_frequencies`.

Every answer turn is tagged in the record's extra fields: "qtypes" (one per answer), "kind" and "scene".
The "compositional" split draws the `HELD_OUT` colour/shape pairs (a purple star, an orange triangle), which
the other splits never draw nor mention.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import io
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..utils import atomic_dir, read_json, write_json
from .records import Record, save_records

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 225),
          "yellow": (235, 205, 30), "purple": (145, 60, 195), "orange": (245, 135, 25)}
SIZES = {"small": 0.095, "large": 0.155}  # radius / image size: 6.1 and 9.9 px at 64 px (a cell: 21.3 px)
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
HELD_OUT = (("purple", "star"), ("orange", "triangle"))  # drawn only in the "compositional" split
SPLITS = ("train", "val", "test", "compositional")
KINDS = ("conversation", "detail", "reasoning", "multi_image")
KIND_WEIGHTS = {"conversation": 0.45, "detail": 0.1, "reasoning": 0.25, "multi_image": 0.2}
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's suffix for VQA data
IMAGE = "<image>"
GENERATOR = "minillava.data.shapesworld"  # written in manifest.json, checked before replacing a folder
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled with LANCZOS: anti-aliased edges
BRIEF_INSTRUCTIONS = (  # LLaVA's stage-1 (LCS-558K) instructions
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.", "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.")
DETAIL_INSTRUCTIONS = (  # LLaVA's detailed-description instructions
    "Describe the following image in detail.", "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.", "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Walk through the important details of the image.")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _where(position: str) -> str:
    """'top left' -> 'at the top left'; 'center' -> 'in the center'; 'left' -> 'on the left'."""
    special = {"center": "in the center", "left": "on the left", "right": "on the right"}
    return special.get(position, f"at the {position}")


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


# ----------------------------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class Obj:
    """One shape: what it is (shape, color, size), where it is (grid cell (row, col)) and how it is drawn."""

    shape: str
    color: str
    size: str
    cell: tuple[int, int]
    rgb: tuple[int, int, int] | None = None  # the drawn colour: COLORS[color] plus a little seeded jitter
    angle: float = 0.0  # rotation jitter in degrees (0 for circles)

    @property
    def position(self) -> str:
        return POSITIONS[3 * self.cell[0] + self.cell[1]]

    def phrase(self) -> str:
        """'a large red circle at the top left'."""
        return f"{_a(self.size)} {self.color} {self.shape} {_where(self.position)}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Obj:
        return cls(**{**d, "cell": tuple(d["cell"]), "rgb": tuple(d["rgb"]) if d.get("rgb") else None})


@dataclass(frozen=True)
class Background:
    """A pale linear gradient from color0 to color1 along `angle` degrees, plus grey noise of std `noise`."""

    color0: tuple[int, int, int]
    color1: tuple[int, int, int]
    angle: int
    noise_seed: int
    noise: float = 3.0


@dataclass(frozen=True)
class Scene:
    """Everything an image shows: its objects (in reading order), background and size in pixels."""

    objects: tuple[Obj, ...]
    background: Background
    size: int = 64

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 4:
            raise ValueError(f"scene: needs 1 to 4 objects, got {len(self.objects)}")
        if len({o.cell for o in self.objects}) != len(self.objects):
            raise ValueError(f"scene: two objects share a cell ({[o.cell for o in self.objects]})")
        for o in self.objects:
            if o.shape not in SHAPES or o.color not in COLORS or o.size not in SIZES or not (
                    0 <= o.cell[0] < 3 and 0 <= o.cell[1] < 3):
                raise ValueError(f"scene: unknown shape, color, size or cell in {o}")

    def to_dict(self) -> dict:
        return {"size": self.size, "background": asdict(self.background),
                "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        bg = d["background"]
        bg = Background(**{**bg, "color0": tuple(bg["color0"]), "color1": tuple(bg["color1"])})
        return cls(tuple(Obj.from_dict(o) for o in d["objects"]), bg, d["size"])


def _new_obj(rng: np.random.Generator, shape: str, color: str, size: str, cell: tuple[int, int]) -> Obj:
    rgb = tuple(int(np.clip(c + rng.integers(-8, 9), 0, 255)) for c in COLORS[color])
    angle = 0.0 if shape == "circle" else round(float(rng.uniform(-15, 15)), 1)
    return Obj(shape, color, size, (int(cell[0]), int(cell[1])), rgb, angle)


def _sample_background(rng: np.random.Generator) -> Background:
    """A pale, weakly saturated colour (every channel >= ~195) and a second one close to it."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.03, 0.13), rng.uniform(0.88, 0.97))
    c0 = tuple(int(round(255 * x)) for x in rgb)
    c1 = tuple(int(np.clip(c + rng.integers(-14, 15), 190, 250)) for c in c0)
    return Background(c0, c1, int(rng.integers(360)), int(rng.integers(2**31)))


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, exclude=HELD_OUT, require=(),
                 image_size: int = 64) -> Scene:
    """A random scene: 1-4 objects (or `n_objects`) in distinct cells, sorted in reading order.

    exclude: (color, shape) pairs never drawn. require: pairs of which one is always drawn (the first object
    gets one of them), as the compositional split needs.
    """
    n = int(rng.integers(1, 5)) if n_objects is None else n_objects
    if not 1 <= n <= 4:
        raise ValueError(f"n_objects: must be 1 to 4, got {n}")
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in exclude]
    cells = rng.choice(9, size=n, replace=False)
    combos = [allowed[int(rng.integers(len(allowed)))] for _ in range(n)]
    if require:
        combos[0] = tuple(require[int(rng.integers(len(require)))])
    objs = [_new_obj(rng, s, c, _pick(rng, tuple(SIZES)), divmod(int(cell), 3))
            for (c, s), cell in zip(combos, cells)]
    return Scene(tuple(sorted(objs, key=lambda o: o.cell)), _sample_background(rng), image_size)


def _geometry(o: Obj, image_size: int) -> tuple[float, float, float]:
    """(cx, cy, r) in pixels: the centre of the object's cell and its nominal radius."""
    cell = image_size / 3
    return (o.cell[1] + 0.5) * cell, (o.cell[0] + 0.5) * cell, SIZES[o.size] * image_size


def _polygon(o: Obj, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Corner points of a square, triangle or star that fits inside the box (cx +- r, cy +- r)."""
    if o.shape == "square":  # half side 0.8 r: still inside the box when rotated by up to 17 degrees
        radii, start, cy0 = [0.8 * 2**0.5 * r] * 4, 45.0, cy
    elif o.shape == "triangle":  # circumradius r, centre lowered by r/4 so the triangle sits mid-box
        radii, start, cy0 = [r] * 3, -90.0, cy + 0.25 * r
    else:  # a five-pointed star, inner radius 0.45 r
        radii, start, cy0 = [r, 0.45 * r] * 5, -90.0, cy
    step = 360 / len(radii)
    angles = np.deg2rad(start + o.angle + step * np.arange(len(radii)))
    return [(cx + rad * np.cos(a), cy0 + rad * np.sin(a)) for rad, a in zip(radii, angles)]


def render_background(bg: Background, size: int = 64) -> Image.Image:
    """The background alone: an RGB image of size x size pixels, a pure function of `bg`."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    a = np.deg2rad(bg.angle)
    t = x * np.cos(a) + y * np.sin(a)
    t = ((t - t.min()) / max(t.max() - t.min(), 1e-9))[..., None]  # (S, S, 1), 0 -> color0, 1 -> color1
    noise = np.random.default_rng(bg.noise_seed).normal(0.0, bg.noise, (size, size, 1))
    pixels = np.asarray(bg.color0) * (1 - t) + np.asarray(bg.color1) * t + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def render(scene: Scene) -> Image.Image:
    """Scene -> an RGB image of `scene.size` pixels. A pure function of the scene (noise is seeded in it)."""
    S, k = scene.size, SUPERSAMPLE
    base = render_background(scene.background, S).convert("RGBA")
    layer = Image.new("RGBA", (S * k, S * k), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for o in scene.objects:
        cx, cy, r = (v * k for v in _geometry(o, S))
        fill = (*(o.rgb or COLORS[o.color]), 255)
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o, cx, cy, r), fill=fill)
    # LANCZOS after a 2x box reduction (reducing_gap): half the time, same look. Pillow premultiplies alpha.
    layer = layer.resize((S, S), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return Image.alpha_composite(base, layer).convert("RGB")


def bbox(obj: Obj, image_size: int = 64) -> str:
    """LLaVA-1.5's grounding answer: the object's box as normalised '[x1, y1, x2, y2]', two decimals."""
    cx, cy, r = _geometry(obj, image_size)
    box = [min(max(v / image_size, 0.0), 1.0) for v in (cx - r, cy - r, cx + r, cy + r)]
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A brief caption naming every object (size, colour, shape, position) in reading order."""
    body = _join([o.phrase() for o in scene.objects])
    form = _pick(rng, ("{B}.", "There is {b}.", "The image shows {b}.", "A picture of {b}."))
    return form.format(B=_cap(body), b=body)


_PHRASE = re.compile(r"\b(small|large) (\w+) (circle|square|triangle|star) "
                     r"((?:at the|on the|in the) [a-z]+(?: left| right)?)")


def hard_negative(text: str, rng: np.random.Generator, exclude=HELD_OUT) -> str | None:
    """A caption that is false for the image by ONE change to the objects it names (NegCLIP's hard negatives):
    another shape, colour, size or position for one object, or two objects' colours swapped. Without such
    negatives a small CLIP learns colours (which in-batch captions tell apart) and barely learns shapes.
    Never names an `exclude` pair; None when `text` names no object."""
    found = list(_PHRASE.finditer(text))
    if not found:
        return None
    objs = [list(m.groups()) for m in found]  # [size, color, shape, where]
    wheres = [_where(p) for p in POSITIONS]
    colors = [o[1] for o in objs]
    kinds = ["shape", "shape", "color", "size", "position"] + (["swap"] if len(set(colors)) > 1 else [])
    for _ in range(8):
        kind, new = _pick(rng, kinds), [list(o) for o in objs]
        if kind == "swap":
            i, j = rng.choice([(i, j) for i in range(len(objs)) for j in range(len(objs)) if colors[i] < colors[j]])
            new[i][1], new[j][1] = colors[j], colors[i]
        else:
            o = new[int(rng.integers(len(new)))]
            slot, values = {"size": (0, tuple(SIZES)), "color": (1, tuple(COLORS)), "shape": (2, SHAPES),
                            "position": (3, tuple(wheres))}[kind]
            o[slot] = _pick(rng, [v for v in values if v != o[slot]])
        if all((o[1], o[2]) not in exclude for o in new):
            parts, last = [], 0
            for m, o in zip(found, new):
                parts += [text[last:m.start()], " ".join(o)]
                last = m.end()
            return "".join(parts) + text[last:]
    return None


def describe(scene: Scene) -> str:
    """A detailed description: the count by shape, each object in reading order, then the colours."""
    objs, n = scene.objects, len(scene.objects)
    counts = Counter(o.shape for o in objs)
    parts = [f"{counts[s]} {s}{'s' if counts[s] > 1 else ''}" for s in SHAPES if counts[s]]
    colors = [c for c in COLORS if any(o.color == c for o in objs)]
    return " ".join([f"There {'is' if n == 1 else 'are'} {n} shape{'s' if n > 1 else ''} in the image: "
                     f"{_join(parts)}."]
                    + [f"{_cap(_a(o.size))} {o.color} {o.shape} is {_where(o.position)}." for o in objs]
                    + [f"{'The only color is' if len(colors) == 1 else 'The colors are'} {_join(colors)}.",
                       "The background is light."])


def change_scene(scene: Scene, rng: np.random.Generator, exclude=HELD_OUT) -> tuple[Scene, str] | None:
    """The scene with ONE change (a colour, a shape, a position, an added or a removed object) and the
    canonical answer to "What is different?" ("The red circle is blue in the second image."); None if no
    change can be named unambiguously. A changed object is one whose colour+shape is unique in the scene."""
    objs = list(scene.objects)
    combos = Counter((o.color, o.shape) for o in objs)
    unique = [o for o in objs if combos[(o.color, o.shape)] == 1]
    free = [(r, c) for r in range(3) for c in range(3) if all(o.cell != (r, c) for o in objs)]
    kinds = (["color", "shape", "position"] + (["removed"] if len(objs) >= 2 else [])) * bool(unique)
    kinds += ["added"] if len(objs) < 4 else []
    if not kinds:
        return None
    kind = _pick(rng, kinds)
    if kind == "added":
        c, s = _pick(rng, [(c, s) for c in COLORS for s in SHAPES if (c, s) not in exclude])
        new = _new_obj(rng, s, c, _pick(rng, tuple(SIZES)), _pick(rng, free))
        objs.append(new)
        answer = f"{_cap(_a(f'{new.size} {c} {s}'))} was added {_where(new.position)}."
    else:
        o = _pick(rng, unique)
        name, i = f"The {o.color} {o.shape}", objs.index(o)
        if kind == "color":
            c = _pick(rng, [c for c in COLORS if c != o.color and (c, o.shape) not in exclude])
            rgb = tuple(int(np.clip(v + d - w, 0, 255)) for v, d, w in zip(COLORS[c], o.rgb, COLORS[o.color]))
            objs[i], answer = replace(o, color=c, rgb=rgb), f"{name} is {c} in the second image."
        elif kind == "shape":
            s = _pick(rng, [s for s in SHAPES if s != o.shape and (o.color, s) not in exclude])
            angle = 0.0 if s == "circle" else o.angle or round(float(rng.uniform(-15, 15)), 1)
            objs[i], answer = replace(o, shape=s, angle=angle), f"{name} is {_a(s)} in the second image."
        elif kind == "position":
            objs[i] = replace(o, cell=_pick(rng, free))
            answer = f"{name} moved to the {objs[i].position}."
        else:
            del objs[i]
            answer = f"{name} was removed."
    return replace(scene, objects=tuple(sorted(objs, key=lambda o: o.cell))), answer


# ----------------------------------------------------------------------------------------- POPE helpers
def objects_present(scene: Scene) -> list[tuple[str, str]]:
    """The (color, shape) pairs in the scene, in COLORS x SHAPES order."""
    have = {(o.color, o.shape) for o in scene.objects}
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) in have]


def combo_frequencies(scenes) -> Counter:
    """How often each (color, shape) pair is drawn in `scenes`: the "popular" ranking of POPE."""
    return Counter((o.color, o.shape) for sc in scenes for o in sc.objects)


def absent_objects(scene: Scene, rng: np.random.Generator, k: int = 1, strategy: str = "random",
                   freq: Counter | None = None, exclude=()) -> list[tuple[str, str]]:
    """Up to k (color, shape) pairs absent from the scene, chosen as POPE does.

    random: any absent pair. popular: the most frequent pairs in `freq` (see combo_frequencies).
    adversarial: pairs sharing a shape with a present object (a blue star beside a red star), then a colour.
    Ties are broken at random; `exclude` pairs are never returned.
    """
    present = set(objects_present(scene))
    pool = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and (c, s) not in exclude]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    if strategy == "popular":
        if freq is None:
            raise ValueError("absent_objects: strategy 'popular' needs freq (see combo_frequencies)")
        pool.sort(key=lambda cs: -freq[cs])
    elif strategy == "adversarial":
        pool.sort(key=lambda cs: -sum(2 * (cs[1] == s) + (cs[0] == c) for c, s in present))
    elif strategy != "random":
        raise ValueError(f"absent_objects: unknown strategy '{strategy}' (random, popular or adversarial)")
    return pool[:k]


# ---------------------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class _Ctx:
    exclude: tuple = HELD_OUT  # pairs never to mention (absent-object questions, changes)
    focus: tuple = ()  # objects to ask about when possible (the held-out ones in the compositional split)


_REF_FORMS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"), ("color",),
              ("size", "color"), ("pos",), ("shape", "pos"))


def _key(o: Obj, attr: str):
    return o.cell if attr == "pos" else getattr(o, attr)


def _ref(o: Obj, scene: Scene, rng, hide: str | None = None) -> str | None:
    """A phrase naming `o` uniquely, without attribute `hide` ('the circle', 'the object in the center')."""
    forms = [f for f in _REF_FORMS if hide not in f
             and sum(all(_key(p, a) == _key(o, a) for a in f) for p in scene.objects) == 1]
    if not forms:
        return None
    f = _pick(rng, forms)
    words = [getattr(o, a) for a in ("size", "color") if a in f] + [o.shape if "shape" in f else "object"]
    return "the " + " ".join(words) + (" " + _where(o.position) if "pos" in f else "")


def _target(scene: Scene, rng, ctx: _Ctx) -> Obj:
    return _pick(rng, [o for o in scene.objects if o in ctx.focus] or list(scene.objects))


def _attribute_question(attr, forms, answer):
    """A generator asking for `attr` of one object, named without it; `answer(obj)` is the answer."""
    def ask(scene, rng, ctx):
        o = _target(scene, rng, ctx)
        ref = _ref(o, scene, rng, hide=attr)
        return None if ref is None else (_pick(rng, forms).format(ref), answer(o, scene))
    return ask


_q_color = _attribute_question("color", ("What color is {}?", "What is the color of {}?",
                                         "Which color does {} have?"), lambda o, sc: _cap(o.color) + ".")
_q_shape = _attribute_question("shape", ("What shape is {}?", "What kind of shape is {}?",
                                         "Which shape is {}?"), lambda o, sc: _cap(_a(o.shape)) + ".")
_q_position = _attribute_question("pos", ("Where is {}?", "Where is {} located?",
                                          "In which part of the image is {}?"),
                                  lambda o, sc: _cap(o.position) + ".")
_q_size = _attribute_question("size", ("Is {} large or small?", "What size is {}?", "Is {} big or small?"),
                              lambda o, sc: _cap(o.size) + ".")
_q_grounding = _attribute_question(None, ("Give the bounding box of {}.", "What is the bounding box of {}?",
                                          "Please provide the bounding box coordinate of the region this "
                                          "sentence describes: {}."), lambda o, sc: bbox(o, sc.size))


def _q_count_total(scene, rng, ctx):
    q = _pick(rng, ("How many shapes are there?", "How many objects are in the image?",
                    "How many shapes can you see?", "Count the shapes in the image."))
    return q, f"{len(scene.objects)}."


def _q_count_attr(scene, rng, ctx):
    """Count by colour, shape or size; the value is usually one that is present, sometimes any."""
    attr = _pick(rng, ("color", "color", "shape", "shape", "size"))
    values = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}[attr]
    v = getattr(_target(scene, rng, ctx), attr) if rng.random() < 0.7 else _pick(rng, values)
    noun = f"{v}s" if attr == "shape" else f"{v} {_pick(rng, ('shapes', 'objects'))}"
    q = _pick(rng, ("How many {} are there?", "How many {} are in the image?", "How many {} can you see?"))
    return q.format(noun), f"{sum(getattr(o, attr) == v for o in scene.objects)}."


def _q_exist(scene, rng, ctx):
    """Yes or No with equal odds; absent objects are random or adversarial (same shape, other colour)."""
    present = bool(rng.random() < 0.5)
    forms = ("Is there {}?", "Is there {} in the image?", "Do you see {}?", "Does the image contain {}?")
    have = {o.shape for o in scene.objects}
    shapes = sorted(have) if present else [s for s in SHAPES if s not in have]
    if rng.random() < 0.3 and shapes:
        thing = _pick(rng, shapes)
    elif present:
        o = _target(scene, rng, ctx)
        thing = f"{o.color} {o.shape}"
    else:
        strategy = _pick(rng, ("random", "adversarial"))
        thing = " ".join(absent_objects(scene, rng, 1, strategy, exclude=ctx.exclude)[0])
    return _pick(rng, forms).format(_a(thing)), "Yes." if present else "No."


_RELATIONS = {"left": ("left of", 1, -1), "right": ("right of", 1, 1), "above": ("above", 0, -1),
              "below": ("below", 0, 1)}  # word, grid axis (0 row, 1 col), sign


def _related(a: Obj, b: Obj, rel: str) -> bool:
    """Is a `rel` of b? Left/right compare grid columns, above/below grid rows (strictly)."""
    _, axis, sign = _RELATIONS[rel]
    return sign * (a.cell[axis] - b.cell[axis]) > 0


def _q_relation(scene, rng, ctx):
    """'Which shape is left of the square?' (asked only when one object is) or 'Is A left of B?'."""
    anchor = _target(scene, rng, ctx)
    others = [o for o in scene.objects if o is not anchor]
    if not others:
        return None
    if rng.random() < 0.3:
        other, rel = _pick(rng, others), _pick(rng, tuple(_RELATIONS))
        ra, rb = _ref(other, scene, rng, hide="pos"), _ref(anchor, scene, rng, hide="pos")
        if ra and rb:
            return f"Is {ra} {_RELATIONS[rel][0]} {rb}?", "Yes." if _related(other, anchor, rel) else "No."
    ref = _ref(anchor, scene, rng, hide="pos")
    for i in rng.permutation(4):
        rel = tuple(_RELATIONS)[i]
        hits = [o for o in others if _related(o, anchor, rel)]
        if ref and len(hits) == 1:
            word = _RELATIONS[rel][0]
            to = f"to the {rel} of" if rel in ("left", "right") else word
            q = _pick(rng, (f"Which shape is {word} {{}}?", f"What is {to} {{}}?",
                            f"Which object is {to} {{}}?"))
            return q.format(ref), _cap(_a(f"{hits[0].color} {hits[0].shape}")) + "."
    return None


def _q_compare(scene, rng, ctx):
    """'Are there more circles than squares?' or 'Are all the shapes the same color?' -> Yes. / No."""
    objs = scene.objects
    if len(objs) >= 2 and rng.random() < 0.35:
        attr = _pick(rng, ("color", "shape", "size"))
        q = _pick(rng, (f"Are all the shapes the same {attr}?", f"Do all the objects have the same {attr}?"))
        return q, "Yes." if len({getattr(o, attr) for o in objs}) == 1 else "No."
    attr = _pick(rng, ("color", "shape"))
    a = getattr(_target(scene, rng, ctx), attr)
    b = _pick(rng, [v for v in (SHAPES if attr == "shape" else tuple(COLORS)) if v != a])
    if rng.random() < 0.5:
        a, b = b, a
    more = bool(rng.random() < 0.5)
    na, nb = (sum(getattr(o, attr) == v for o in objs) for v in (a, b))
    noun = (lambda v: f"{v}s") if attr == "shape" else (lambda v: f"{v} shapes")
    return (f"Are there {'more' if more else 'fewer'} {noun(a)} than {noun(b)}?",
            "Yes." if (na > nb if more else na < nb) else "No.")


# (qtype, generator) pairs; a generator returns (question, answer) or None when it cannot ask unambiguously
_CONVERSATION = (("color", _q_color), ("shape", _q_shape), ("count", _q_count_total), ("exist", _q_exist),
                 ("position", _q_position), ("grounding", _q_grounding), ("size", _q_size),
                 ("relation", _q_relation))
_REASONING = (("count", _q_count_attr), ("compare", _q_compare), ("relation", _q_relation),
              ("exist", _q_exist))
_TEXT = _CONVERSATION + _REASONING[:2]


def _qas(scene, rng, ctx, gens, k: int) -> list[tuple[str, str, str]]:
    """Up to k (question, answer, qtype) from distinct generators, in random order, skipping any that can't
    ask (e.g. no unique referent)."""
    out = []
    for i in rng.permutation(len(gens)):
        qtype, gen = gens[i]
        qa = gen(scene, rng, ctx)
        if qa is not None:
            out.append((*qa, qtype))
        if len(out) == k:
            break
    return out


def _chat(prefix: str, qas, rng, suffix_p: float = 0.15) -> list[dict]:
    """QA triples -> alternating messages; `prefix` opens the first question; some short-answer questions
    carry LLaVA-1.5's "Answer the question using a single word or phrase." suffix."""
    msgs = []
    for i, (q, a, qtype) in enumerate(qas):
        if qtype not in ("grounding", "multi_diff", "detail", "caption") and rng.random() < suffix_p:
            q += SHORT_ANSWER
        msgs += [{"role": "user", "content": prefix + q if i == 0 else q},
                 {"role": "assistant", "content": a}]
    return msgs


def _multi(scene: Scene, rng, ctx: _Ctx) -> tuple[Scene, list[tuple[str, str, str]]]:
    """A second scene and questions about the pair: the one change made, or which has more shapes."""
    changed = change_scene(scene, rng, ctx.exclude) if rng.random() < 0.6 else None
    qas = []
    if changed is not None:
        second, answer = changed
        qas.append((_pick(rng, ("What is different between the two images?", "What changed between the two "
                                "images?", "What is the difference between the two images?")), answer,
                    "multi_diff"))
    else:
        second = sample_scene(rng, exclude=ctx.exclude, image_size=scene.size)
    if changed is None or rng.random() < 0.5:
        n1, n2 = len(scene.objects), len(second.objects)
        answer = ("The first image." if n1 > n2 else "The second image." if n2 > n1
                  else "They have the same number.")
        qas.append((_pick(rng, ("Which image has more shapes?", "Which of the two images has more shapes?",
                                "Which image contains more objects?")), answer, "multi_more"))
    if changed is None and rng.random() < 0.5:
        which = _pick(rng, ("first", "second"))
        qas.append((f"How many shapes are in the {which} image?",
                    f"{len((scene if which == 'first' else second).objects)}.", "multi_count"))
    return second, qas


# ------------------------------------------------------------------------------------------- datasets
@dataclass
class SplitData:
    """One split in memory: caption and instruction records, and the scene of every image they name."""

    captions: list[Record]
    instruct: list[Record]
    scenes: dict[str, Scene]  # image file name -> scene; `render(scene)` gives the image

    def image(self, name: str) -> Image.Image:
        return render(self.scenes[name])


def _split_setup(split: str) -> tuple[int, tuple, tuple]:
    if split not in SPLITS:
        raise ValueError(f"split: unknown '{split}', expected one of {', '.join(SPLITS)}")
    held = split == "compositional"
    return SPLITS.index(split), () if held else HELD_OUT, HELD_OUT if held else ()


def _bucket(scene: Scene) -> int:
    """0-9 from a hash of what the scene shows (no jitter, no background). Val draws only bucket 0, test only
    bucket 1 and train the rest, so no evaluation image is a training scene redrawn with new jitter."""
    key = ";".join(f"{o.size} {o.color} {o.shape} {o.cell}" for o in scene.objects)
    return hashlib.sha256(key.encode()).digest()[0] % 10


_BUCKETS = {"train": range(2, 10), "val": (0,), "test": (1,), "compositional": range(10)}


def generate_records(split: str, n: int, seed: int = 0, image_size: int = 64, kinds=KINDS,
                     image_dir: str | Path = "images") -> SplitData:
    """n images of a split -> one caption record and one instruction record each, plus their scenes.

    The instruction record's kind is drawn from `kinds` (weights KIND_WEIGHTS); a "multi_image" record adds a
    second image named '<first>_b.png'. Records name images as `image_dir / name`. Deterministic in
    (split, n, seed, image_size, kinds); the splits use independent random streams.
    """
    index, exclude, require = _split_setup(split)
    bad = [k for k in kinds if k not in KIND_WEIGHTS]
    if bad or not kinds:
        raise ValueError(f"kinds: {bad or 'none given'}; choose from {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, index])
    p = np.array([KIND_WEIGHTS[k] for k in kinds])
    data, image_dir = SplitData([], [], {}), Path(image_dir)
    for i in range(n):
        scene = sample_scene(rng, exclude=exclude, require=require, image_size=image_size)
        while _bucket(scene) not in _BUCKETS[split]:
            scene = sample_scene(rng, exclude=exclude, require=require, image_size=image_size)
        name, sd = f"{split}_{i:06d}.png", scene.to_dict()
        data.scenes[name] = scene
        ctx = _Ctx(exclude, tuple(o for o in scene.objects if (o.color, o.shape) in require))
        instr = _pick(rng, BRIEF_INSTRUCTIONS)
        user = f"{IMAGE}\n{instr}" if rng.random() < 0.5 else f"{instr}\n{IMAGE}"
        data.captions.append(Record(f"cap-{split}-{i:06d}", [image_dir / name],
                                    [{"role": "user", "content": user},
                                     {"role": "assistant", "content": caption(scene, rng)}],
                                    {"kind": "caption", "qtypes": ["caption"], "scene": sd}))
        kind, images, scenes = str(rng.choice(list(kinds), p=p / p.sum())), [image_dir / name], sd
        prefix = f"{IMAGE}\n"
        if kind == "conversation":
            qas = _qas(scene, rng, ctx, _CONVERSATION, int(rng.integers(2, 5)))
        elif kind == "reasoning":
            qas = _qas(scene, rng, ctx, _REASONING, int(rng.integers(1, 4)))
        elif kind == "detail":
            qas = [(_pick(rng, DETAIL_INSTRUCTIONS), describe(scene), "detail")]
        else:
            second, qas = _multi(scene, rng, ctx)
            name2 = f"{split}_{i:06d}_b.png"
            data.scenes[name2] = second
            images, scenes = images + [image_dir / name2], [sd, second.to_dict()]
            prefix = f"Image 1: {IMAGE}\nImage 2: {IMAGE}\n"
        data.instruct.append(Record(f"{split}-{i:06d}", images, _chat(prefix, qas, rng),
                                    {"kind": kind, "qtypes": [q[2] for q in qas], "scene": scenes}))
    return data


_SCENE_INTROS = ("In a picture there is {}.", "A picture shows {}.", "Picture: {}.",
                 "In an image there is {}.")


_FACTS = ((("How many sides does a triangle have?", "3."), ("How many sides does a square have?", "4."),
           ("How many corners does a triangle have?", "3."), ("How many corners does a square have?", "4."),
           ("How many points does a star have?", "5."), ("Does a circle have corners?", "No.")),
          (("Which shape has three sides?", "A triangle."), ("Which shape has four sides?", "A square."),
           ("Which shape has five points?", "A star."), ("Which shape is round?", "A circle.")))


def _fact(rng) -> tuple[str, str, str]:
    """A fact of the world that needs no scene: sides and points, word categories, grid neighbours."""
    kind = int(rng.integers(4))
    if kind < 2:
        return (*_pick(rng, _FACTS[kind]), "fact")
    if kind == 2:
        word = _pick(rng, SHAPES + tuple(COLORS) + tuple(SIZES))
        cat = "shape" if word in SHAPES else "color" if word in COLORS else "size"
        q = _pick(rng, ("Is {} a color or a shape?", "Is {} a shape or a color?") if cat != "size"
                  else ("Is {} a size or a color?", "Is {} a color or a size?")).format(word)
        return q, f"{_cap(_a(cat))}.", "fact"
    cells = [(r, c) for r in range(3) for c in range(3)]
    a, rel = _pick(rng, cells), _pick(rng, tuple(_RELATIONS))
    _, axis, sign = _RELATIONS[rel]
    b = list(a)
    b[axis] += sign
    if not 0 <= b[axis] < 3:
        b[axis] -= 2 * sign
        rel = {"left": "right", "right": "left", "above": "below", "below": "above"}[rel]
    return (f"Which position is {_RELATIONS[rel][0]} the {POSITIONS[3 * a[0] + a[1]]}?",
            f"{_cap(POSITIONS[3 * b[0] + b[1]])}.", "fact")


def text_chats(n: int, seed: int = 0, split: str = "train", image_size: int = 64) -> list[Record]:
    """n text-only chats (no images) for pretraining the language model on the world's words and facts.

    70% describe a scene in words ("In a picture there is a large red circle at the top left and ...") and
    ask 1-3 of the image questions about it; 30% ask 1-2 world facts ("How many sides does a triangle
    have?" -> "3."). Held-out pairs never appear. Records carry "kind" ("text" | "fact"), "qtypes", "scene".
    """
    rng = np.random.default_rng([seed, 100 + _split_setup(split)[0]])
    out, ctx = [], _Ctx()
    for i in range(n):
        if rng.random() < 0.7:
            scene = sample_scene(rng, exclude=HELD_OUT, image_size=image_size)
            intro = _pick(rng, _SCENE_INTROS).format(_join([o.phrase() for o in scene.objects]))
            qas = _qas(scene, rng, ctx, _TEXT, int(rng.integers(1, 4)))
            meta = {"kind": "text", "qtypes": [t for _, _, t in qas], "scene": scene.to_dict()}
            msgs = _chat(intro + " ", qas, rng)
        else:
            qas = [_fact(rng) for _ in range(int(rng.integers(1, 3)))]
            meta, msgs = {"kind": "fact", "qtypes": ["fact"] * len(qas)}, _chat("", qas, rng, 0.0)
        out.append(Record(f"text-{split}-{i:06d}", [], msgs, meta))
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png(scene: Scene) -> bytes:
    buf = io.BytesIO()
    render(scene).save(buf, format="PNG", compress_level=1)  # no metadata: byte-deterministic
    return buf.getvalue()


def _render_all(scenes: list[Scene]) -> list[bytes]:
    """PNG bytes of every scene, in order; on all the cores this process may use when there are many
    (rendering is pure). Workers start from a fresh interpreter (forkserver), not a fork of one holding torch."""
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                  len(scenes) // 2000)
    if workers < 2:
        return [_png(s) for s in scenes]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
        return list(pool.map(_png, scenes, chunksize=500))


def _code_sha256() -> str:
    """A fingerprint of this module's source: data built by other code is not reused."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _arguments(arguments: dict) -> dict:
    """`build`'s arguments as its manifest records them (JSON values; the output folder left out)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items() if k != "out_dir"}


def built_with(out_dir: str | Path, **arguments) -> dict | None:
    """The manifest of the build in out_dir if this version of the module made it with these `build` arguments
    (those not named may be anything), else None."""
    previous = Path(out_dir) / "manifest.json"
    if not previous.is_file():
        return None
    old = read_json(previous, "manifest")
    same = old.get("code_sha256") == _code_sha256() and all(old.get("arguments", {}).get(k) == v
                                                             for k, v in _arguments(arguments).items())
    return old if same else None


def ensure_built(out_dir: str | Path, **kwargs) -> dict:
    """`build(out_dir, **kwargs)`, unless out_dir already holds exactly that build (the same arguments, made by
    the same version of this module); returns the manifest."""
    import inspect

    bound = inspect.signature(build).bind(out_dir, **kwargs)
    bound.apply_defaults()
    return built_with(out_dir, **_arguments(bound.arguments)) or build(out_dir, **kwargs)


def build(out_dir: str | Path, n_train: int = 8000, n_val: int = 500, n_test: int = 1000, n_comp: int = 500,
          n_text: int = 20000, n_text_val: int = 1000, seed: int = 0, image_size: int = 64,
          kinds=KINDS) -> dict:
    """Write every dataset under out_dir, atomically, and return the manifest.

    out_dir/images/*.png, captions_{train,test}.json, instruct_{train,val,test,compositional}.json,
    text_{train,val}.json (LLaVA JSON, images relative to out_dir) and manifest.json (counts, seed, sizes,
    sha256 of each JSON). Byte-identical for the same arguments. An existing out_dir is replaced only if it is
    empty or a previous build (it has a manifest.json); files with no records are not written.
    """
    arguments = _arguments(locals())  # first: exactly the parameters
    out_dir = Path(out_dir)
    previous = out_dir / "manifest.json"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (
            previous.is_file() and read_json(previous, "manifest").get("generator") == GENERATOR):
        raise FileExistsError(f"output folder '{out_dir}': not empty and not a ShapesWorld build; refusing "
                              "to replace it")
    counts = {"train": n_train, "val": n_val, "test": n_test, "compositional": n_comp}
    data = {s: generate_records(s, n, seed, image_size, kinds, out_dir / "images") for s, n in counts.items()}
    files = {"captions_train.json": data["train"].captions, "captions_test.json": data["test"].captions,
             **{f"instruct_{s}.json": data[s].instruct for s in SPLITS},
             "text_train.json": text_chats(n_text, seed, "train", image_size),
             "text_val.json": text_chats(n_text_val, seed, "val", image_size)}
    manifest = {"generator": GENERATOR, "code_sha256": _code_sha256(), "arguments": arguments, "seed": seed,
                "image_size": image_size,
                "kinds": list(kinds), "held_out": [list(p) for p in HELD_OUT], "splits": counts,
                "images": sum(len(d.scenes) for d in data.values()), "files": {}}
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        images_sha = hashlib.sha256()
        named = [(name, scene) for d in data.values() for name, scene in d.scenes.items()]
        for name, png in zip((n for n, _ in named), _render_all([s for _, s in named])):
            (tmp / "images" / name).write_bytes(png)
            images_sha.update(name.encode() + png)
        manifest["images_sha256"] = images_sha.hexdigest()  # over (name, bytes) of every image, in order
        for fname, records in files.items():
            if records:
                save_records(records, tmp / fname, image_dir=out_dir)
                manifest["files"][fname] = {"records": len(records), "sha256": _sha256(tmp / fname)}
        write_json(tmp / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    """Command line: python -m minillava.data.shapesworld OUT_DIR [--n-train N ...] [--seed S]."""
    p = argparse.ArgumentParser(prog="python -m minillava.data.shapesworld",
                                description="Build the ShapesWorld datasets (LLaVA JSON + PNG images).")
    p.add_argument("out_dir")
    for name, default in (("n-train", 8000), ("n-val", 500), ("n-test", 1000), ("n-comp", 500),
                          ("n-text", 20000), ("n-text-val", 1000), ("seed", 0), ("image-size", 64)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = build(a.out_dir, a.n_train, a.n_val, a.n_test, a.n_comp, a.n_text, a.n_text_val, a.seed,
                         a.image_size, tuple(a.kinds))
    except (FileExistsError, NotADirectoryError, ValueError) as e:
        p.error(str(e))
    for fname, info in manifest["files"].items():
        print(f"{fname:32s} {info['records']:7d} records")
    print(f"{manifest['images']} images in {a.out_dir}/images, {time.perf_counter() - t0:.1f} s")
    return manifest


if __name__ == "__main__":
    main()
