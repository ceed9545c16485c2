"""ShapesWorld's scenes: a 3x3 grid of coloured shapes on a pale background, drawn and described.

`sample_scene` draws a `Scene` at random, `render` paints it, `caption` and `describe` say what is in it, and
`objects_present`, `absent_objects` and `combo_frequencies` list what is and is not there (for POPE-style probes).
Everything an answer depends on lives in the `Scene`, so every answer is computed and exact.
"""

from __future__ import annotations

import colorsys
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 225),
          "yellow": (235, 205, 30), "purple": (145, 60, 195), "orange": (245, 135, 25)}
SIZES = {"small": 0.095, "large": 0.155}  # radius / image size: 6.1 and 9.9 px at 64 px (a cell: 21.3 px)
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
HELD_OUT = (("purple", "star"), ("orange", "triangle"))  # drawn only in the "compositional" split
SPLITS = ("train", "val", "test", "compositional", "paraphrase", "multiturn", "cooccur")
KINDS = ("conversation", "detail", "reasoning", "multi_image", "followup", "long", "comparison", "long_pair",
         "no_image")
KIND_WEIGHTS = {"conversation": 0.3, "detail": 0.07, "reasoning": 0.18, "multi_image": 0.15, "followup": 0.15,
                "long": 0.15, "comparison": 0.0, "long_pair": 0.0, "no_image": 0.0}  # every split's default mix
NATURAL_WEIGHTS = {"conversation": 0.14, "detail": 0.05, "reasoning": 0.12, "multi_image": 0.08, "followup": 0.25,
                   "long": 0.14, "comparison": 0.12, "long_pair": 0.06, "no_image": 0.04}  # natural-use rounds' mix
COOCCUR = ((("red", "circle"), ("blue", "square")), (("green", "triangle"), ("yellow", "star")),
           (("orange", "circle"), ("purple", "square")))  # pairs that usually appear together (`sample_scene`)
COOCCUR_P = 0.8  # the bias of the "cooccur" split and of training data built with it
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
                 image_size: int = 64, cooccur: float = 0.0) -> Scene:
    """A random scene: 1-4 objects (or `n_objects`) in distinct cells, sorted in reading order.

    exclude: (color, shape) pairs never drawn. require: pairs of which one is always drawn (the first object
    gets one of them), as the compositional split needs. cooccur: the strength of the world's co-occurrence
    bias (`COOCCUR`, as in COCO a fork usually comes with a knife), 0 for none.
    """
    n = int(rng.integers(1, 5)) if n_objects is None else n_objects
    if not 1 <= n <= 4:
        raise ValueError(f"n_objects: must be 1 to 4, got {n}")
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in exclude]
    cells = rng.choice(9, size=n, replace=False)
    combos = [allowed[int(rng.integers(len(allowed)))] for _ in range(n)]
    if cooccur:
        combos = _cooccurring(combos, rng, cooccur, exclude)
    if require:
        combos[0] = tuple(require[int(rng.integers(len(require)))])
    objs = [_new_obj(rng, s, c, _pick(rng, tuple(SIZES)), divmod(int(cell), 3))
            for (c, s), cell in zip(combos, cells)]
    return Scene(tuple(sorted(objs, key=lambda o: o.cell)), _sample_background(rng), image_size)


def _cooccurring(combos: list, rng: np.random.Generator, p: float, exclude) -> list:
    """Objects with the world's co-occurrence bias: with probability p the first object is one of a `COOCCUR`
    pair, and each later object is, with probability p, the partner of an earlier one that lacks it."""
    partner = {a: b for x, y in COOCCUR for a, b in ((x, y), (y, x)) if a not in exclude and b not in exclude}
    if rng.random() < p:
        combos[0] = _pick(rng, sorted(partner))
    for i in range(1, len(combos)):
        missing = [partner[c] for c in combos[:i] if c in partner and partner[c] not in combos[:i]]
        if missing and rng.random() < p:
            combos[i] = missing[0]
    return combos


def geometry(o: Obj, image_size: int) -> tuple[float, float, float]:
    """(cx, cy, r) in pixels: the centre of the object's cell and its nominal radius."""
    cell = image_size / 3
    return (o.cell[1] + 0.5) * cell, (o.cell[0] + 0.5) * cell, SIZES[o.size] * image_size


def polygon(o: Obj, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
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


def paint(base: Image.Image, shapes, k: int = SUPERSAMPLE) -> Image.Image:
    """`base` (a square RGB image) with what `shapes(draw, k)` draws on a transparent layer k times its size,
    reduced to its size: anti-aliased edges (k=1: drawn at its size, aliased)."""
    S = base.size[0]
    layer = Image.new("RGBA", (S * k, S * k), (0, 0, 0, 0))
    shapes(ImageDraw.Draw(layer), k)
    # LANCZOS after a 2x box reduction (reducing_gap): half the time, same look. Pillow premultiplies alpha.
    layer = layer.resize((S, S), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def render(scene: Scene) -> Image.Image:
    """Scene -> an RGB image of `scene.size` pixels. A pure function of the scene (noise is seeded in it)."""
    def shapes(draw: ImageDraw.ImageDraw, k: int) -> None:
        for o in scene.objects:
            cx, cy, r = (v * k for v in geometry(o, scene.size))
            fill = (*(o.rgb or COLORS[o.color]), 255)
            if o.shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon(polygon(o, cx, cy, r), fill=fill)
    return paint(render_background(scene.background, scene.size), shapes)


def bbox(obj: Obj, image_size: int = 64) -> str:
    """LLaVA-1.5's grounding answer: the object's box as normalised '[x1, y1, x2, y2]', two decimals."""
    cx, cy, r = geometry(obj, image_size)
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


def cooccurrence_counts(scenes) -> Counter:
    """How often two (color, shape) pairs appear in the same scene: {(pair_a, pair_b): count}, both orders.
    POPE's adversarial setting asks about the absent objects that co-occur most with the present ones."""
    counts = Counter()
    for sc in scenes:
        have = objects_present(sc)
        counts.update((a, b) for a in have for b in have if a != b)
    return counts


def absent_objects(scene: Scene, rng: np.random.Generator, k: int = 1, strategy: str = "random",
                   freq: Counter | None = None, exclude=(), pairs: Counter | None = None) -> list[tuple[str, str]]:
    """Up to k (color, shape) pairs absent from the scene, chosen as POPE does.

    random: any absent pair. popular: the most frequent pairs in `freq` (see combo_frequencies).
    adversarial: POPE's: the pairs that co-occur most with the present ones in `pairs` (`cooccurrence_counts`),
    then those sharing a shape with a present object (a blue star beside a red star), then a colour; without
    `pairs`, the shape-sharing order alone. Ties are broken at random; `exclude` pairs are never returned.
    """
    present = set(objects_present(scene))
    pool = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and (c, s) not in exclude]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    if strategy == "popular":
        if freq is None:
            raise ValueError("absent_objects: strategy 'popular' needs freq (see combo_frequencies)")
        pool.sort(key=lambda cs: -freq[cs])
    elif strategy == "adversarial":
        pairs = pairs or Counter()
        pool.sort(key=lambda cs: (-sum(pairs[(p, cs)] for p in present),
                                  -sum(2 * (cs[1] == s) + (cs[0] == c) for c, s in present)))
    elif strategy != "random":
        raise ValueError(f"absent_objects: unknown strategy '{strategy}' (random, popular or adversarial)")
    return pool[:k]
