"""ShapesWorld's instruction data: caption records for stage 1, conversations for stage 2, text-only chats.

LLaVA's kinds of instruction data, asked about ShapesWorld scenes: "conversation" (short questions), "detail"
(a detailed description), "reasoning" (counting, comparing, relations) and two-image questions; and the turns
natural use brings: "followup" chats that refer back ("Where is it?", "And the square?", "What about the other
one?") and "long" chats of 5-6 turns in which an image may arrive at a later turn, after questions asked of no
image ("I don't see an image."). False premises are asked throughout (see `questions`). Some short-answer
questions carry LLaVA-1.5's suffix and get the one-word answer. Every answer is computed from the scene; every
answer turn is tagged with its question type in the record's "qtypes". The natural-use training mix
(`NATURAL_WEIGHTS`) adds three kinds that no evaluation split asks as such: "comparison" (named objects
compared, one after another), "long_pair" (a long chat whose second image comes at any turn, the two-image
questions asked late) and "no_image" (image questions in any training phrasing, asked with no image).

Splits (`SPLITS`): train, val, test and compositional as before; "paraphrase" (test scenes asked with the
held-out phrasings alone), "multiturn" (one question asked first, as the fifth turn, and as the fifth turn with
an image attached at a later turn: three records per scene) and "cooccur" (test scenes with the world's
co-occurrence bias, for POPE's popular and adversarial settings).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..records import Record
from .questions import (
    NO_IMAGE,
    NO_IMAGE_HELD_OUT,
    NO_IMAGE_QUESTIONS,
    Ctx,
    absent_ref,
    attribute_answer,
    fact,
    no_such,
    phrasing,
    q_color,
    q_compare,
    q_compare_named,
    q_count_attr,
    q_count_total,
    q_exist,
    q_fact,
    q_false_premise,
    q_grounding,
    q_position,
    q_relation,
    q_shape,
    q_size,
    ref,
    short_form,
    target,
)
from .scenes import (
    BRIEF_INSTRUCTIONS,
    COOCCUR_P,
    HELD_OUT,
    IMAGE,
    KIND_WEIGHTS,
    KINDS,
    SHORT_ANSWER,
    SPLITS,
    Scene,
    _join,
    _pick,
    caption,
    change_scene,
    describe,
    render,
    sample_scene,
)

# (qtype, generator) pairs; a generator returns (question, answer) or None when it cannot ask unambiguously
_CONVERSATION = (("color", q_color), ("shape", q_shape), ("count", q_count_total), ("exist", q_exist),
                 ("position", q_position), ("grounding", q_grounding), ("size", q_size),
                 ("relation", q_relation), ("false_premise", q_false_premise))
_REASONING = (("count", q_count_attr), ("compare", q_compare), ("relation", q_relation),
              ("exist", q_exist), ("compare_named", q_compare_named), ("false_premise", q_false_premise))
_TEXT = _CONVERSATION[:8] + _REASONING[:2]
_LONG = _CONVERSATION + _REASONING[:2] + (("compare_named", q_compare_named), ("fact", q_fact))
_SHORT = ("color", "shape", "count", "exist", "position", "size", "relation", "compare", "compare_named",
          "followup", "multi_more", "multi_count", "fact")  # the types that take the short-answer suffix
_ATTRS = ("color", "shape", "position", "size")


def _gens(ctx: Ctx, gens):
    return gens if ctx.negatives else tuple(g for g in gens if g[0] != "false_premise")


def _qas(scene, rng, ctx, gens, k: int) -> list[tuple[str, str, str]]:
    """Up to k (question, answer, qtype) from distinct generators, in random order, skipping any that can't
    ask (e.g. no unique referent)."""
    gens, out = _gens(ctx, gens), []
    for i in rng.permutation(len(gens)):
        qtype, gen = gens[i]
        qa = gen(scene, rng, ctx)
        if qa is not None:
            out.append((*qa, qtype)[:3])
        if len(out) == k:
            break
    return out


def _chat(qas, rng, prefixes: dict[int, str] | None = None, suffix_p: float = 0.2) -> list[dict]:
    """QA triples -> alternating messages; `prefixes[i]` opens question i (the images it brings); some
    short-answer questions carry LLaVA-1.5's suffix "Answer the question using a single word or phrase." and
    get the one-word answer ("Red", "Circle", "3"), as its VQA data does."""
    msgs, prefixes = [], prefixes or {}
    for i, (q, a, qtype) in enumerate(qas):
        if qtype in _SHORT and rng.random() < suffix_p:
            q, a = q + SHORT_ANSWER, short_form(a)
        msgs += [{"role": "user", "content": prefixes.get(i, "") + q}, {"role": "assistant", "content": a}]
    return msgs


def _followups(scene: Scene, rng, ctx: Ctx) -> list[tuple[str, str, str]]:
    """A question about one object, then 1-3 follow-ups that refer back to it: another attribute of "it",
    the same attribute of another object ("And the square?"; one that is not there gets its absence), or of
    "the other one" in a two-object scene (the natural-use rounds, `ctx.more`, ask it three times as often:
    their models answered it worst, often repeating the previous answer)."""
    attr = _pick(rng, _ATTRS)
    o = target(scene, rng, ctx)
    r = ref(o, scene, rng, hide={"position": "pos"}.get(attr, attr))
    if r is None:
        return []
    out = [(phrasing(rng, ctx, attr).format(r), attribute_answer(attr, o, scene), attr)]
    moves = ("it", "and", "and") + (("other",) * (6 if ctx.more else 2) if len(scene.objects) == 2 else ())
    for _ in range(int(rng.integers(1, 4))):
        move = _pick(rng, moves)
        if move == "it":
            attr = _pick(rng, [a for a in _ATTRS if a != attr])
            out.append((phrasing(rng, ctx, f"it_{attr}"), attribute_answer(attr, o, scene), "followup"))
        elif move == "other":
            o = next(p for p in scene.objects if p is not o)
            out.append((phrasing(rng, ctx, "and_other"), attribute_answer(attr, o, scene), "followup"))
        else:
            hide = {"position": "pos"}.get(attr, attr)
            if ctx.negatives and rng.random() < 0.2:
                fake = absent_ref(scene, rng, ctx, hide=hide)
                if fake is not None:
                    out.append((phrasing(rng, ctx, "and_ref").format(fake), no_such(fake), "false_premise"))
                    continue
            others = [p for p in scene.objects if p is not o]
            nxt = _pick(rng, others) if others else None
            r2 = nxt and ref(nxt, scene, rng, hide=hide)
            if not r2:
                break
            o = nxt
            out.append((phrasing(rng, ctx, "and_ref").format(r2), attribute_answer(attr, o, scene), "followup"))
    return out


def _detail(rng, ctx, scene):
    return phrasing(rng, ctx, "detail"), describe(scene), "detail"


def _long(scene: Scene, rng, ctx: Ctx) -> tuple[list, dict[int, str]]:
    """5-6 turns mixing short questions, follow-ups, a description and facts. The image comes with the first
    question, or (a third of the time) at turn 2 or 3, after questions that need no image or are told
    there is none."""
    n = int(rng.integers(5, 7))
    late = int(rng.integers(1, 3)) if rng.random() < 1 / 3 else 0
    early = []
    for _ in range(late):
        if rng.random() < 0.5:
            early.append((_pick(rng, NO_IMAGE_QUESTIONS), NO_IMAGE, "no_image"))
        else:
            early.append((*fact(rng), "fact"))
    body = []
    while len(body) < n - late:
        step = rng.random()
        if step < 0.15 and not any(t == "detail" for *_, t in body):
            body.append(_detail(rng, ctx, scene))
        elif step < 0.4:
            body += _followups(scene, rng, ctx)
        else:
            body += _qas(scene, rng, ctx, _LONG, 1)
    return early + body[: n - late], {late: f"{IMAGE}\n"}


def _comparison(scene: Scene, rng, ctx: Ctx) -> list[tuple[str, str, str]]:
    """1-3 comparisons between named objects (size, position, counts of two kinds), one after another."""
    qas = (q_compare_named(scene, rng, ctx) for _ in range(int(rng.integers(1, 4))))
    return [(*qa, "compare_named")[:3] for qa in qas if qa is not None]


def _long_pair(scene: Scene, rng, ctx: Ctx) -> tuple[Scene, list, dict[int, str]]:
    """5-6 turns about two images: 0-4 questions about the first image, then the second image with the turn
    that brings it, then the two-image questions (which has more shapes, what changed, the count in one of them)
    among world facts, the last turn always one of them: as the multiturn split asks late, with the images given
    at the start or at a later turn."""
    second, pair = _multi(scene, rng, ctx)
    at = int(rng.integers(0, 5))  # questions about the first image alone, before the second comes
    first = _turns(scene, rng, ctx, at)
    between = [_count_in(scene, second, _pick(rng, ("first", "second")), rng, ctx) if rng.random() < 0.7
               else (*fact(rng), "fact") for _ in range(int(rng.integers(5, 7)) - at - len(pair))]
    prefixes = {0: TWO_IMAGES} if at == 0 else {0: f"{IMAGE}\n", at: f"{IMAGE}\n"}
    return second, first + between + pair, prefixes


def _no_image(scene: Scene, rng, ctx: Ctx) -> tuple[list, dict[int, str]]:
    """1-2 questions about an image asked with none given, in any training phrasing, answered by saying so
    (none of `NO_IMAGE_HELD_OUT`, kept for measuring); half the time the image then comes with one more question."""
    asked = [(q, NO_IMAGE, "no_image") for q, *_ in _qas(scene, rng, ctx, _CONVERSATION[:8], int(rng.integers(1, 3)))
             if q not in NO_IMAGE_HELD_OUT]
    if not asked or rng.random() < 0.5:
        return asked or [(_pick(rng, NO_IMAGE_QUESTIONS), NO_IMAGE, "no_image")], {}
    return asked + _qas(scene, rng, ctx, _CONVERSATION, 1), {len(asked): f"{IMAGE}\n"}


def _multi(scene: Scene, rng, ctx: Ctx) -> tuple[Scene, list[tuple[str, str, str]]]:
    """A second scene and questions about the pair: the one change made, or which has more shapes."""
    changed = change_scene(scene, rng, ctx.exclude) if rng.random() < 0.6 else None
    qas = []
    if changed is not None:
        second, answer = changed
        qas.append((phrasing(rng, ctx, "multi_diff"), answer, "multi_diff"))
    else:
        second = sample_scene(rng, exclude=ctx.exclude, image_size=scene.size)
    if changed is None or rng.random() < 0.5:
        qas.append(_more(scene, second, rng, ctx))
    if changed is None and rng.random() < 0.5:
        which = _pick(rng, ("first", "second"))
        qas.append(_count_in(scene, second, which, rng, ctx))
    return second, qas


def _more(first: Scene, second: Scene, rng, ctx: Ctx) -> tuple[str, str, str]:
    n1, n2 = len(first.objects), len(second.objects)
    answer = "The first image." if n1 > n2 else "The second image." if n2 > n1 else "They have the same number."
    return phrasing(rng, ctx, "multi_more"), answer, "multi_more"


def _count_in(first: Scene, second: Scene, which: str, rng, ctx: Ctx) -> tuple[str, str, str]:
    return (phrasing(rng, ctx, "multi_count").format(which),
            f"{len((first if which == 'first' else second).objects)}.", "multi_count")


TWO_IMAGES = f"Image 1: {IMAGE}\nImage 2: {IMAGE}\n"


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


_BUCKETS = {"train": range(2, 10), "val": (0,), "test": (1,), "compositional": range(10), "paraphrase": (1,),
            "multiturn": (1,), "cooccur": (1,)}


def generate_records(split: str, n: int, seed: int = 0, image_size: int = 64, kinds=KINDS,
                     image_dir: str | Path = "images", negatives: bool = True,
                     cooccur: float | None = None, weights: dict | None = None, short_p: float = 0.2,
                     more_phrasings: bool = False, reasoned: bool = False, rows: bool = False,
                     value_first: bool = False, value_led: bool = False) -> SplitData:
    """n images of a split -> one caption record and one instruction record each, plus their scenes.

    The instruction record's kind is drawn from `kinds` with `weights` (default KIND_WEIGHTS, which gives the
    natural-use training kinds none; NATURAL_WEIGHTS is their mix); a "multi_image" or "long_pair" record adds a
    second image named '<first>_b.png' (given with the first, or with a later question), a "no_image" record
    has an image only if it comes at a later turn. `short_p`: the share of short-answer questions that carry
    LLaVA-1.5's suffix; `more_phrasings`: ask `MORE_PHRASINGS` too (a training split only); `reasoned`: answer
    named comparisons step by step (`Ctx.reasoned`; with the suffix, still in a word), with `rows` a place said by
    its row or column (`Ctx.rows`), with `value_first` the winner's value said before it is named
    (`Ctx.value_first`) and with `value_led` each value before its object (`Ctx.value_led`). The "multiturn" split
    makes three instruction records per image instead (`_multiturn`). Records name images as
    `image_dir / name`. negatives: ask false-premise questions (False for the ablation without them);
    cooccur: the co-occurrence bias of the scenes (default: `COOCCUR_P` in the "cooccur" split, else none).
    Deterministic in the arguments; the splits use independent random streams.
    """
    index, exclude, require = _split_setup(split)
    weights = KIND_WEIGHTS if weights is None else weights
    bad = [k for k in [*kinds, *weights] if k not in KIND_WEIGHTS]
    if bad or not kinds:
        raise ValueError(f"kinds: {bad or 'none given'}; choose from {', '.join(KINDS)}")
    p = np.array([weights.get(k, 0.0) for k in kinds], dtype=float)
    if (p < 0).any() or not p.sum():
        raise ValueError(f"kinds {list(kinds)}: their weights {p.tolist()} must be >= 0 and not all 0")
    if more_phrasings and split != "train":
        raise ValueError(f"more_phrasings: only for the train split, not '{split}' (its phrasings are measured)")
    Ctx(reasoned=reasoned, rows=rows, value_first=value_first, value_led=value_led)  # a step form needs reasoned
    if not 0 <= short_p <= 1:
        raise ValueError(f"short_p {short_p}: the share of short questions with the suffix, expected 0 to 1")
    bias = (COOCCUR_P if split == "cooccur" else 0.0) if cooccur is None else cooccur
    rng = np.random.default_rng([seed, index])
    data, image_dir = SplitData([], [], {}), Path(image_dir)
    for i in range(n):
        scene = sample_scene(rng, exclude=exclude, require=require, image_size=image_size, cooccur=bias)
        while _bucket(scene) not in _BUCKETS[split]:
            scene = sample_scene(rng, exclude=exclude, require=require, image_size=image_size, cooccur=bias)
        name, sd = f"{split}_{i:06d}.png", scene.to_dict()
        data.scenes[name] = scene
        ctx = Ctx(exclude, tuple(o for o in scene.objects if (o.color, o.shape) in require),
                  paraphrase=split == "paraphrase", negatives=negatives, more=more_phrasings, reasoned=reasoned,
                  rows=rows, value_first=value_first, value_led=value_led)
        instr = _pick(rng, BRIEF_INSTRUCTIONS)
        user = f"{IMAGE}\n{instr}" if rng.random() < 0.5 else f"{instr}\n{IMAGE}"
        data.captions.append(Record(f"cap-{split}-{i:06d}", [image_dir / name],
                                    [{"role": "user", "content": user},
                                     {"role": "assistant", "content": caption(scene, rng)}],
                                    {"kind": "caption", "qtypes": ["caption"], "scene": sd}))
        if split == "multiturn":
            data.instruct += _multiturn(scene, rng, ctx, f"{split}-{i:06d}", image_dir / name, data.scenes)
            continue
        kind, images, scenes = str(rng.choice(list(kinds), p=p / p.sum())), [image_dir / name], sd
        prefixes = {0: f"{IMAGE}\n"}
        if kind == "conversation":
            qas = _qas(scene, rng, ctx, _CONVERSATION, int(rng.integers(2, 5)))
        elif kind == "reasoning":
            qas = _qas(scene, rng, ctx, _REASONING, int(rng.integers(1, 4)))
        elif kind == "detail":
            qas = [_detail(rng, ctx, scene)]
        elif kind == "followup":
            qas = _followups(scene, rng, ctx) or _qas(scene, rng, ctx, _CONVERSATION, 2)
        elif kind == "long":
            qas, prefixes = _long(scene, rng, ctx)
        elif kind == "comparison":
            qas = _comparison(scene, rng, ctx) or _qas(scene, rng, ctx, _REASONING, 2)
        elif kind == "no_image":
            qas, prefixes = _no_image(scene, rng, ctx)
            images = images if prefixes else []
        else:
            if kind == "long_pair":
                second, qas, prefixes = _long_pair(scene, rng, ctx)
            else:
                second, qas = _multi(scene, rng, ctx)
                prefixes = {0: TWO_IMAGES}
                first = _qas(scene, rng, ctx, _CONVERSATION, 1) if rng.random() < 0.4 else []
                if first:  # the second image comes later, after a question about the first
                    qas, prefixes = first + qas, {0: f"{IMAGE}\n", 1: f"{IMAGE}\n"}
            name2 = f"{split}_{i:06d}_b.png"
            data.scenes[name2] = second
            images, scenes = images + [image_dir / name2], [sd, second.to_dict()]
        data.instruct.append(Record(f"{split}-{i:06d}", images, _chat(qas, rng, prefixes, short_p),
                                    {"kind": kind, "qtypes": [q[2] for q in qas], "scene": scenes}))
    return data


def _multiturn(scene: Scene, rng, ctx: Ctx, rid: str, image, scenes: dict) -> list[Record]:
    """One question asked three ways: first ("-first"), as the fifth turn after four others with the images
    given at the start ("-fifth"), and as the fifth turn with an image attached at a later turn ("-late"). The
    question is a short one (a false premise among them), a detailed description, or about two images; the
    earlier turns are tagged "context" (their answers are given, not scored)."""
    sd, what = scene.to_dict(), _pick(rng, ("short", "short", "short", "detail", "pair"))
    if what == "pair":
        second = change_scene(scene, rng, ctx.exclude)
        second = second[0] if second is not None and rng.random() < 0.5 else sample_scene(
            rng, exclude=ctx.exclude, image_size=scene.size)
        image2 = Path(str(image).removesuffix(".png") + "_b.png")
        scenes[image2.name] = second
        goal = _more(scene, second, rng, ctx)
        counts = [_count_in(scene, second, w, rng, ctx)[:2] for w in ("first", "second")]
        both = [counts[0], fact(rng), counts[1], fact(rng)]
        first_only = _context(scene, rng, ctx)
        ways = {"first": ([goal], {0: TWO_IMAGES}), "fifth": ([*(_c(x) for x in both), goal], {0: TWO_IMAGES}),
                "late": ([*first_only, goal], {0: f"{IMAGE}\n", 4: f"{IMAGE}\n"})}
        images, meta_scene = [image, image2], [sd, second.to_dict()]
    else:
        goal = _detail(rng, ctx, scene) if what == "detail" else _qas(scene, rng, ctx, _CONVERSATION + _REASONING, 1)[0]
        facts = [(*fact(rng), "context") for _ in range(2)]
        ways = {"first": ([goal], {0: f"{IMAGE}\n"}),
                "fifth": ([*_context(scene, rng, ctx), goal], {0: f"{IMAGE}\n"}),
                "late": ([*facts, *_context(scene, rng, ctx)[:2], goal], {2: f"{IMAGE}\n"})}
        images, meta_scene = [image], sd
    return [Record(f"{rid}-{way}", list(images), _chat(qas, rng, prefixes, suffix_p=0.0),
                   {"kind": "multiturn", "variant": way, "qtypes": [q[2] for q in qas], "scene": meta_scene})
            for way, (qas, prefixes) in ways.items()]


def _c(qa) -> tuple[str, str, str]:
    return (qa[0], qa[1], "context")


def _turns(scene: Scene, rng, ctx: Ctx, k: int) -> list[tuple[str, str, str]]:
    """k turns about the scene (short questions, follow-ups), with their question types."""
    turns = []
    while len(turns) < k:
        turns += _followups(scene, rng, ctx) if rng.random() < 0.3 else _qas(scene, rng, ctx, _LONG, 1)
    return turns[:k]


def _context(scene: Scene, rng, ctx: Ctx) -> list[tuple[str, str, str]]:
    """Four earlier turns about the scene (`_turns`), tagged "context"."""
    return [_c(t) for t in _turns(scene, rng, ctx, 4)]


_SCENE_INTROS = ("In a picture there is {}.", "A picture shows {}.", "Picture: {}.",
                 "In an image there is {}.")


def tell(scene: Scene, rng) -> str:
    """The scene told in words, as the text-only chats tell it: 'In a picture there is a large red circle at the
    top left and a small blue square at the bottom.'"""
    return _pick(rng, _SCENE_INTROS).format(_join([o.phrase() for o in scene.objects]))


def text_chats(n: int, seed: int = 0, split: str = "train", image_size: int = 64) -> list[Record]:
    """n text-only chats (no images) for pretraining the language model on the world's words and facts.

    65% describe a scene in words ("In a picture there is a large red circle at the top left and ...") and
    ask 1-3 of the image questions about it; 25% ask 1-2 world facts ("How many sides does a triangle
    have?" -> "3."); 10% ask about an image that was never given ("What color is the circle?" -> "I don't see
    an image. ..."). Held-out pairs never appear. Records carry "kind" ("text" | "fact" | "no_image"),
    "qtypes", "scene".
    """
    rng = np.random.default_rng([seed, 100 + _split_setup(split)[0]])
    out, ctx = [], Ctx(negatives=False)
    for i in range(n):
        u = rng.random()
        if u < 0.65:
            scene = sample_scene(rng, exclude=HELD_OUT, image_size=image_size)
            intro = tell(scene, rng)
            qas = _qas(scene, rng, ctx, _TEXT, int(rng.integers(1, 4)))
            meta = {"kind": "text", "qtypes": [t for _, _, t in qas], "scene": scene.to_dict()}
            msgs = _chat(qas, rng, {0: intro + " "}, suffix_p=0.15)
        elif u < 0.9:
            qas = [(*fact(rng), "fact") for _ in range(int(rng.integers(1, 3)))]
            meta, msgs = {"kind": "fact", "qtypes": ["fact"] * len(qas)}, _chat(qas, rng, suffix_p=0.0)
        else:
            qas = [(_pick(rng, NO_IMAGE_QUESTIONS), NO_IMAGE, "no_image")]
            if rng.random() < 0.5:
                qas.append((*fact(rng), "fact"))
            meta, msgs = {"kind": "no_image", "qtypes": [t for *_, t in qas]}, _chat(qas, rng, suffix_p=0.0)
        out.append(Record(f"text-{split}-{i:06d}", [], msgs, meta))
    return out
