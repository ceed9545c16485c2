"""ShapesWorld's instruction data: caption records for stage 1, conversations for stage 2, text-only chats.

LLaVA's kinds of instruction data, asked about ShapesWorld scenes: "conversation" (short questions), "detail"
(a detailed description), "reasoning" (counting, comparing, relations) and two-image questions. Every answer is
computed from the scene; every answer turn is tagged with its question type in the record's "qtypes".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..records import Record
from .scenes import (
    BRIEF_INSTRUCTIONS,
    COLORS,
    DETAIL_INSTRUCTIONS,
    HELD_OUT,
    IMAGE,
    KIND_WEIGHTS,
    KINDS,
    POSITIONS,
    SHAPES,
    SHORT_ANSWER,
    SIZES,
    SPLITS,
    Obj,
    Scene,
    _a,
    _cap,
    _join,
    _pick,
    _where,
    absent_objects,
    bbox,
    caption,
    change_scene,
    describe,
    render,
    sample_scene,
)


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
