"""ShapesWorld's questions: one question about a scene and its answer, computed from the scene.

Each question type has many phrasings, split in two: those training uses, and held-out ones that only the
"paraphrase" test split asks (`PHRASINGS`), so an evaluation can tell understanding a question from recognising
its wording; the natural-use rounds train on more phrasings still (`MORE_PHRASINGS`). Besides LLaVA's kinds of
questions (attributes, counts, existence, relations, grounding), the natural ones people ask:

- **false premises**: a question about something that is not there ("What color is the star?" with no star)
  is answered with its absence ("There is no star in the image."), as LRV-Instruction's negative instructions
  teach; the answer never invents an attribute;
- **comparisons between named objects**: "Which is bigger, the circle or the square?", "Is the red circle
  higher than the blue square?", "Are there more circles or squares?";
- **world facts** asked beside an image ("How many sides does a triangle have?"), answered from knowledge.

A generator takes (scene, rng, ctx) and returns (question, answer) or None when it cannot ask unambiguously;
(question, answer, qtype) when the question it asked is of another type (a comparison with a false premise).
"""

from __future__ import annotations

from dataclasses import dataclass

from .scenes import (
    COLORS,
    DETAIL_INSTRUCTIONS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    _a,
    _cap,
    _pick,
    _where,
    absent_objects,
    bbox,
)

# qtype -> (phrasings training uses, held-out phrasings of the "paraphrase" split). "{}" is the object named.
PHRASINGS = {
    "color": (("What color is {}?", "What is the color of {}?", "Which color does {} have?", "What colour is {}?",
               "Tell me the color of {}.", "What's the color of {}?", "Can you tell me what color {} is?",
               "Name the color of {}."),
              ("Could you tell me the colour of {}?", "Which colour is {}?", "I wonder what color {} is.",
               "Say what color {} is.")),
    "shape": (("What shape is {}?", "What kind of shape is {}?", "Which shape is {}?", "What is the shape of {}?",
               "Tell me the shape of {}.", "What type of shape is {}?", "Can you tell me what shape {} is?",
               "Name the shape of {}."),
              ("Which kind of shape is {}?", "Could you say what shape {} is?", "What sort of shape is {}?",
               "Identify the shape of {}.")),
    "position": (("Where is {}?", "Where is {} located?", "In which part of the image is {}?",
                  "Where can I find {}?", "Where's {}?", "Tell me where {} is.", "What is the position of {}?",
                  "Where in the image is {}?"),
                 ("Whereabouts is {}?", "Which part of the picture is {} in?", "Could you tell me where {} is?",
                  "Where does {} sit?")),
    "size": (("Is {} large or small?", "What size is {}?", "Is {} big or small?", "How big is {}?",
              "What is the size of {}?", "Is {} small or large?", "Tell me the size of {}."),
             ("How large is {}?", "Is {} a big one or a small one?", "Could you tell me how big {} is?",
              "What's the size of {}?")),
    "grounding": (("Give the bounding box of {}.", "What is the bounding box of {}?",
                   "Please provide the bounding box coordinate of the region this sentence describes: {}.",
                   "Where exactly is {}? Give its bounding box."),
                  ("Output the bounding box of {}.", "Locate {} with a bounding box.")),
    "count": (("How many shapes are there?", "How many objects are in the image?", "How many shapes can you see?",
               "Count the shapes in the image.", "What is the number of shapes?",
               "How many things are in the picture?", "How many shapes does the image contain?"),
              ("Could you count the objects?", "How many shapes are shown?", "What's the total number of objects?",
               "Count the objects in the picture.")),
    "count_attr": (("How many {} are there?", "How many {} are in the image?", "How many {} can you see?",
                    "Count the {}.", "What is the number of {}?", "How many {} does the image have?"),
                   ("How many {} are shown?", "Could you count the {}?", "How many {} do you see?",
                    "Tell me how many {} there are.")),
    "exist": (("Is there {}?", "Is there {} in the image?", "Do you see {}?", "Does the image contain {}?",
               "Can you see {}?", "Is there {} anywhere?", "Does the picture have {}?"),
              ("Does the image show {}?", "Is {} visible?", "Can you find {} in the picture?",
               "Do I see {} here?")),
    # "{w}": "left of", "above"...; "{to}": "to the left of", "above"...
    "relation": (("Which shape is {w} {}?", "What is {to} {}?", "Which object is {to} {}?",
                  "What shape is {to} {}?", "Tell me what is {to} {}."),
                 ("What can be found {to} {}?", "Which thing is {to} {}?", "Name the object {to} {}.")),
    "relation_yn": (("Is {a} {w} {b}?", "Is {a} positioned {w} {b}?", "Is {a} placed {w} {b}?"),
                    ("Would you say {a} is {w} {b}?",)),
    "compare_count": (("Are there {mf} {a} than {b}?", "Does the image have {mf} {a} than {b}?",
                       "Are there {mf} {a} than {b} in the image?"),
                      ("Do you see {mf} {a} than {b}?",)),
    "compare_same": (("Are all the shapes the same {}?", "Do all the objects have the same {}?",
                      "Is every shape the same {}?"),
                     ("Do the shapes all share one {}?",)),
    # "{a}", "{b}": two named objects; "{more}": bigger/smaller/higher/lower/further left/further right
    "compare_which": (("Which is {more}, {a} or {b}?", "Which one is {more}, {a} or {b}?",
                       "Which is {more}: {a} or {b}?"),
                      ("Of {a} and {b}, which is {more}?", "Which of {a} and {b} is {more}?")),
    "compare_yn": (("Is {a} {more} than {b}?", "Is {a} {more} than {b} in the image?"),
                   ("Would you say {a} is {more} than {b}?",)),
    "compare_more": (("Are there more {a} or {b}?", "Are there more {a} or more {b}?",
                      "Which are there more of, {a} or {b}?"),
                     ("Do you see more {a} or more {b}?",)),
    # follow-ups: "it" is the object the previous question named; "{}" another object
    "it_color": (("What color is it?", "And its color?", "Which color is it?", "What colour is it?"),
                 ("And what color is it?",)),
    "it_shape": (("What shape is it?", "And its shape?", "Which shape is it?"), ("And what shape is it?",)),
    "it_position": (("Where is it?", "And where is it?", "Where is it located?", "Where is that?"),
                    ("Whereabouts is it?",)),
    "it_size": (("Is it large or small?", "How big is it?", "And its size?", "Is it big or small?"),
                ("What about its size?",)),
    "and_ref": (("And {}?", "What about {}?", "How about {}?", "And what about {}?"), ("And how about {}?",)),
    "and_other": (("What about the other one?", "And the other one?", "And the other?"),
                  ("How about the other one?",)),
    "detail": (DETAIL_INSTRUCTIONS + ("Describe the image in detail.", "Tell me everything you see in the image."),
               ("Can you describe this picture thoroughly?", "What does the image show? Please be detailed.")),
    "multi_diff": (("What is different between the two images?", "What changed between the two images?",
                    "What is the difference between the two images?", "What changed from the first image to the "
                    "second?"), ("How do the two images differ?", "Spot the difference between the two images.")),
    "multi_more": (("Which image has more shapes?", "Which of the two images has more shapes?",
                    "Which image contains more objects?", "Which image shows more objects?"),
                   ("Does the first or the second image have more shapes?",)),
    "multi_count": (("How many shapes are in the {} image?", "Count the shapes in the {} image."),
                    ("How many objects does the {} image have?",)),
}
# qtype -> more training phrasings, asked only where a split is built with `more_phrasings` (the natural-use
# rounds), so the splits built without it are as before. Each is at least 3 words from every held-out phrasing
# of its type (checked by a test): they widen what training says, not what the paraphrase split asks.
MORE_PHRASINGS = {
    "color": ("What color does {} have?", "Please tell me the color of {}.", "Do you know the color of {}?",
              "What color is {} in the image?", "What is the colour of {}?", "Look at {}. What color is it?"),
    "shape": ("What shape does {} have?", "Please tell me the shape of {}.", "Do you know the shape of {}?",
              "Tell me what shape {} is.", "Look at {}. What shape is it?"),
    "position": ("Where is {} in the image?", "Where in the picture is {}?", "I am looking for {}. Where is it?",
                 "Do you know where {} is?", "In what part of the image is {}?", "Look at {}. Where is it?"),
    "size": ("Please tell me the size of {}.", "Do you know the size of {}?", "What size does {} have?",
             "Look at {}. Is it large or small?", "Would you call {} large or small?",
             "Is {} a large shape or a small shape?", "Tell me how large {} is."),
    "grounding": ("Give me the box around {}.", "Where is {}? Answer with a bounding box.",
                  "Find {} and give its bounding box."),
    "count": ("How many objects can you see?", "How many shapes are in the picture?", "Please count the shapes.",
              "Tell me the number of shapes.", "How many objects does the picture contain?"),
    "count_attr": ("How many {} appear in the image?", "How many {} are in the picture?", "Tell me the number of {}.",
                   "How many {} does the picture have?", "Count the {} in the image."),
    "exist": ("Is there {} in the picture?", "Is {} in the picture?", "Do you see {} in the image?",
              "Is {} anywhere in the image?", "Is {} present in the image?", "Can you spot {} anywhere in the image?",
              "Could you find {}?"),
    "relation": ("Which shape do you see {to} {}?", "What lies {to} {}?",
                 "Tell me which shape is {to} {}."),
    "relation_yn": ("Is {a} located {w} {b}?", "Is it true that {a} is {w} {b}?", "Is {a} found {w} {b}?",
                    "Do you think that {a} is {w} {b}?", "Would it be true that {a} is {w} {b}?"),
    "compare_count": ("Does the picture have {mf} {a} than {b}?", "Is it true that there are {mf} {a} than {b}?",
                      "Are there {mf} {a} than {b} here?"),
    "compare_same": ("Do all the shapes have the same {}?", "Is every object the same {}?",
                     "Do the objects all have the same {}?"),
    "compare_which": ("Which is {more} here, {a} or {b}?", "Which object is {more}, {a} or {b}?",
                      "Tell me which is {more}: {a} or {b}.", "Looking at {a} and {b}, which one is {more}?"),
    "compare_yn": ("Is {a} {more} than {b} here?", "Is it true that {a} is {more} than {b}?",
                   "Tell me if {a} is {more} than {b}.", "Compared with {b}, is {a} {more}?",
                   "Do you think that {a} is {more} than {b}?", "Would it be true that {a} is {more} than {b}?"),
    "compare_more": ("Which are more common, {a} or {b}?", "Which do you see more of, {a} or {b}?",
                     "More {a} or more {b}?"),
    "it_color": ("What is its color?", "What color is that one?", "Its color, please?"),
    "it_shape": ("What is its shape?", "What shape is that one?", "Its shape, please?"),
    "it_position": ("Where is that one?", "And where is it located?", "Where can I find it?"),
    "it_size": ("Is that one large or small?", "And how big is it?", "What size is it?"),
    "and_ref": ("What about {} then?", "And {} then?", "Same question for {}."),
    "and_other": ("Same question for the other one.", "And the remaining one?"),
    "detail": ("Describe this picture in detail.", "Give a detailed description of the image.",
               "Could you describe the image in detail?", "Can you give a detailed description of the image?",
               "What is in this image? Describe it in detail."),
    "multi_diff": ("What differs between the two images?", "What is not the same in the two images?",
                   "In what way do the two images differ?"),
    "multi_more": ("Which of the images has more shapes?", "Which picture has more objects?"),
    "multi_count": ("Tell me how many shapes the {} image has.", "What is the number of shapes in the {} image?"),
}
FALSE_PREMISE_TYPES = ("color", "shape", "position", "size", "grounding")  # attribute questions, asked of nothing


@dataclass(frozen=True)
class Ctx:
    """How a split asks: pairs never to mention, objects to ask about when possible (the held-out ones in the
    compositional split), held-out phrasings or the training ones, and whether false premises are asked."""

    exclude: tuple = HELD_OUT
    focus: tuple = ()
    paraphrase: bool = False
    negatives: bool = True  # false-premise questions (LRV-Instruction's negative instructions)
    more: bool = False  # the natural-use rounds: training also asks `MORE_PHRASINGS`, and "the other one" more often
    reasoned: bool = False  # named comparisons answered step by step (`reasoning`), not in one word
    rows: bool = False  # with `reasoned`: a place said by its row or column ('in the top row'), not by its name
    value_first: bool = False  # with `reasoned`: 'which' names the winning value, then the object ('the large one,
    #                            the square, is bigger')
    value_led: bool = False  # with `reasoned`: each value said before its object ('the large one is the square'), in
    #                          the steps and in value_first's conclusion ('so the large one is the square, which is
    #                          bigger'): naming the winner copies what followed its value, forwards

    def __post_init__(self):
        if (self.rows or self.value_first or self.value_led) and not self.reasoned:
            raise ValueError(f"rows={self.rows}, value_first={self.value_first}, value_led={self.value_led}: these "
                             "change the steps of a step-by-step answer, so they need reasoned=True")


def phrasing(rng, ctx: Ctx, qtype: str) -> str:
    """One phrasing of `qtype`: a training one (with `ctx.more`, from the wider pool too), or a held-out one in
    the paraphrase split."""
    if ctx.paraphrase:
        return _pick(rng, PHRASINGS[qtype][1])
    return _pick(rng, PHRASINGS[qtype][0] + (MORE_PHRASINGS.get(qtype, ()) if ctx.more else ()))


# ---------------------------------------------------------------------------------------------- referring
_REF_FORMS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"), ("color",),
              ("size", "color"), ("pos",), ("shape", "pos"))


def _key(o: Obj, attr: str):
    return o.cell if attr == "pos" else getattr(o, attr)


def ref_words(o: Obj, form) -> str:
    """'the large red circle', 'the object in the center' (`form`: the attributes named)."""
    words = [getattr(o, a) for a in ("size", "color") if a in form] + [o.shape if "shape" in form else "object"]
    return "the " + " ".join(words) + (" " + _where(o.position) if "pos" in form else "")


def ref(o: Obj, scene: Scene, rng, hide: str | None = None) -> str | None:
    """A phrase naming `o` uniquely, without attribute `hide` ('the circle', 'the object in the center')."""
    forms = [f for f in _REF_FORMS if hide not in f
             and sum(all(_key(p, a) == _key(o, a) for a in f) for p in scene.objects) == 1]
    return ref_words(o, _pick(rng, forms)) if forms else None


def target(scene: Scene, rng, ctx: Ctx) -> Obj:
    return _pick(rng, [o for o in scene.objects if o in ctx.focus] or list(scene.objects))


def attribute_answer(attr: str, o: Obj, scene: Scene) -> str:
    """The answer to an attribute question about `o`: 'Red.', 'A circle.', 'Top left.', 'Large.', a box."""
    if attr == "grounding":
        return bbox(o, scene.size)
    return _cap({"color": o.color, "shape": _a(o.shape), "position": o.position, "size": o.size}[attr]) + "."


_HIDE = {"color": "color", "shape": "shape", "position": "pos", "size": "size", "grounding": None}


def _attribute(qtype: str):
    def ask(scene, rng, ctx):
        o = target(scene, rng, ctx)
        r = ref(o, scene, rng, hide=_HIDE[qtype])
        return None if r is None else (phrasing(rng, ctx, qtype).format(r), attribute_answer(qtype, o, scene))
    return ask


q_color, q_shape, q_position, q_size, q_grounding = (_attribute(t) for t in FALSE_PREMISE_TYPES)


# ----------------------------------------------------------------------------------------- false premises
def absent_ref(scene: Scene, rng, ctx: Ctx, hide: str | None = None) -> str | None:
    """A phrase naming an object that is NOT in the scene ('the star', 'the green object', 'the large red
    triangle'), never a held-out pair; half the time close to a present object (one attribute changed), as
    the hardest false premises are. None if none can be found."""
    for _ in range(8):
        form = _pick(rng, [f for f in _REF_FORMS if hide not in f and f != ("pos",) and f != ("shape", "pos")])
        if rng.random() < 0.5:  # adversarial: a present object with one named attribute changed
            o = _pick(rng, scene.objects)
            attr = _pick(rng, [a for a in form if a != "pos"])
            values = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}[attr]
            fake = Obj(**{**o.to_dict(), attr: _pick(rng, [v for v in values if v != getattr(o, attr)]),
                          "cell": o.cell, "rgb": None})
        else:
            fake = Obj(_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _pick(rng, tuple(SIZES)), (0, 0))
        if any(all(_key(p, a) == _key(fake, a) for a in form) for p in scene.objects):
            continue
        if "color" in form and "shape" in form and (fake.color, fake.shape) in ctx.exclude:
            continue
        if "color" in form and "shape" not in form and any(fake.color == c for c, _ in ctx.exclude):
            continue  # "the orange object" could be a held-out orange triangle elsewhere: never mention it
        return ref_words(fake, form)
    return None


def no_such(phrase: str) -> str:
    """'the red star' -> 'There is no red star in the image.'"""
    return f"There is no {phrase.removeprefix('the ')} in the image."


def q_false_premise(scene, rng, ctx):
    """An attribute question about an object that is not there -> 'There is no star in the image.'"""
    qtype = _pick(rng, FALSE_PREMISE_TYPES)
    r = absent_ref(scene, rng, ctx, hide=_HIDE[qtype])
    return None if r is None else (phrasing(rng, ctx, qtype).format(r), no_such(r))


# ------------------------------------------------------------------------------------ counts and existence
def q_count_total(scene, rng, ctx):
    return phrasing(rng, ctx, "count"), f"{len(scene.objects)}."


def q_count_attr(scene, rng, ctx):
    """Count by colour, shape or size; the value is usually one that is present, sometimes any."""
    attr = _pick(rng, ("color", "color", "shape", "shape", "size"))
    values = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}[attr]
    v = getattr(target(scene, rng, ctx), attr) if rng.random() < 0.7 else _pick(rng, values)
    noun = f"{v}s" if attr == "shape" else f"{v} {_pick(rng, ('shapes', 'objects'))}"
    return phrasing(rng, ctx, "count_attr").format(noun), f"{sum(getattr(o, attr) == v for o in scene.objects)}."


def q_exist(scene, rng, ctx):
    """Yes or No with equal odds; absent objects are random or adversarial (same shape, other colour)."""
    present = bool(rng.random() < 0.5)
    have = {o.shape for o in scene.objects}
    shapes = sorted(have) if present else [s for s in SHAPES if s not in have]
    if rng.random() < 0.3 and shapes:
        thing = _pick(rng, shapes)
    elif present:
        o = target(scene, rng, ctx)
        thing = f"{o.color} {o.shape}"
    else:
        strategy = _pick(rng, ("random", "adversarial"))
        thing = " ".join(absent_objects(scene, rng, 1, strategy, exclude=ctx.exclude)[0])
    return phrasing(rng, ctx, "exist").format(_a(thing)), "Yes." if present else "No."


# ----------------------------------------------------------------------------------------------- relations
RELATIONS = {"left": ("left of", 1, -1), "right": ("right of", 1, 1), "above": ("above", 0, -1),
             "below": ("below", 0, 1)}  # word, grid axis (0 row, 1 col), sign


def related(a: Obj, b: Obj, rel: str) -> bool:
    """Is a `rel` of b? Left/right compare grid columns, above/below grid rows (strictly)."""
    _, axis, sign = RELATIONS[rel]
    return sign * (a.cell[axis] - b.cell[axis]) > 0


def q_relation(scene, rng, ctx):
    """'Which shape is left of the square?' (asked only when one object is) or 'Is A left of B?'."""
    anchor = target(scene, rng, ctx)
    others = [o for o in scene.objects if o is not anchor]
    if not others:
        return None
    if rng.random() < 0.3:
        other, rel = _pick(rng, others), _pick(rng, tuple(RELATIONS))
        ra, rb = ref(other, scene, rng, hide="pos"), ref(anchor, scene, rng, hide="pos")
        if ra and rb:
            q = phrasing(rng, ctx, "relation_yn").format(a=ra, w=RELATIONS[rel][0], b=rb)
            return _cap(q), "Yes." if related(other, anchor, rel) else "No."
    r = ref(anchor, scene, rng, hide="pos")
    for i in rng.permutation(4):
        rel = tuple(RELATIONS)[i]
        hits = [o for o in others if related(o, anchor, rel)]
        if r and len(hits) == 1:
            word = RELATIONS[rel][0]
            to = f"to the {rel} of" if rel in ("left", "right") else word
            return (phrasing(rng, ctx, "relation").format(r, w=word, to=to),
                    _cap(_a(f"{hits[0].color} {hits[0].shape}")) + ".")
    return None


# --------------------------------------------------------------------------------------------- comparisons
def q_compare(scene, rng, ctx):
    """'Are there more circles than squares?' or 'Are all the shapes the same color?' -> Yes. / No."""
    objs = scene.objects
    if len(objs) >= 2 and rng.random() < 0.35:
        attr = _pick(rng, ("color", "shape", "size"))
        return (phrasing(rng, ctx, "compare_same").format(attr),
                "Yes." if len({getattr(o, attr) for o in objs}) == 1 else "No.")
    attr = _pick(rng, ("color", "shape"))
    a = getattr(target(scene, rng, ctx), attr)
    b = _pick(rng, [v for v in (SHAPES if attr == "shape" else tuple(COLORS)) if v != a])
    if rng.random() < 0.5:
        a, b = b, a
    more = bool(rng.random() < 0.5)
    na, nb = (sum(getattr(o, attr) == v for o in objs) for v in (a, b))
    noun = (lambda v: f"{v}s") if attr == "shape" else (lambda v: f"{v} shapes")
    return (phrasing(rng, ctx, "compare_count").format(mf="more" if more else "fewer", a=noun(a), b=noun(b)),
            "Yes." if (na > nb if more else na < nb) else "No.")


# word -> (key of an object, +1 if a larger key wins, what to say when they tie)
COMPARISONS = {"bigger": (lambda o: SIZES[o.size], 1, "They are the same size."),
               "larger": (lambda o: SIZES[o.size], 1, "They are the same size."),
               "smaller": (lambda o: SIZES[o.size], -1, "They are the same size."),
               "higher": (lambda o: o.cell[0], -1, "They are at the same height."),
               "lower": (lambda o: o.cell[0], 1, "They are at the same height."),
               "further left": (lambda o: o.cell[1], -1, "They are equally far left."),
               "further right": (lambda o: o.cell[1], 1, "They are equally far right.")}


def q_compare_named(scene, rng, ctx):
    """Two named objects compared by size or position ('Which is bigger, the circle or the square?' ->
    'The circle.'; 'Is the red circle bigger than the blue square?' -> 'No.'), or two kinds by count ('Are
    there more circles or squares?' -> 'Circles.'). A named object that is not there gets the absence."""
    objs = scene.objects
    if rng.random() < 0.25:  # counts of two kinds
        attr = _pick(rng, ("shape", "color"))
        a, b = (str(v) for v in rng.choice(SHAPES if attr == "shape" else tuple(COLORS), 2, replace=False))
        na, nb = (sum(getattr(o, attr) == v for o in objs) for v in (a, b))
        noun = (lambda v: f"{v}s") if attr == "shape" else (lambda v: f"{v} shapes")
        answer = (f"{_cap(noun(a))}." if na > nb else f"{_cap(noun(b))}." if nb > na
                  else "They are the same number.")
        return phrasing(rng, ctx, "compare_more").format(a=noun(a), b=noun(b)), answer
    if len(objs) < 2:
        return None
    x, y = (objs[int(i)] for i in rng.choice(len(objs), 2, replace=False))
    more = _pick(rng, tuple(COMPARISONS))
    key, sign, tie = COMPARISONS[more]
    hide = "size" if more in ("bigger", "larger", "smaller") else "pos"
    rx, ry = ref(x, scene, rng, hide=hide), ref(y, scene, rng, hide=hide)
    if rx is None or ry is None:
        return None
    if ctx.negatives and rng.random() < 0.1:  # one of the two is not there
        fake = absent_ref(scene, rng, ctx, hide=hide)
        if fake is not None:
            rx, ry = (fake, ry) if rng.random() < 0.5 else (rx, fake)
            q = phrasing(rng, ctx, _pick(rng, ("compare_which", "compare_yn"))).format(a=rx, b=ry, more=more)
            return q, no_such(fake), "false_premise"
    d = sign * (key(x) - key(y))
    said = lambda o: _said(o, hide, more, ctx.rows)  # noqa: E731
    value = lambda o: f"the {said(o)} one" if hide == "size" else said(o)  # noqa: E731  # said as a subject
    step = (lambda o, r: f"{value(o)} is {r}") if ctx.value_led else (lambda o, r: f"{r} is {said(o)}")  # noqa: E731
    steps = f"{_cap(step(x, rx))} and {step(y, ry)}, so " if ctx.reasoned else ""
    if rng.random() < 0.5:
        q = phrasing(rng, ctx, "compare_which").format(a=rx, b=ry, more=more)
        if steps:
            w, rw = (x, rx) if d > 0 else (y, ry)
            if d and ctx.value_first and ctx.value_led:  # the winner's step again, word for word
                return q, steps + f"{step(w, rw)}, which is {more}."
            if ctx.value_first:
                rw = f"the {said(w)} one, {rw}," if hide == "size" else f"the one {said(w)}, {rw},"
            return q, steps + (tie[0].lower() + tie[1:] if d == 0 else f"{rw} is {more}.")
        return q, tie if d == 0 else f"{_cap(rx if d > 0 else ry)}."
    q = _cap(phrasing(rng, ctx, "compare_yn").format(a=rx, b=ry, more=more))
    return q, f"{steps}the answer is {'yes' if d > 0 else 'no'}." if steps else "Yes." if d > 0 else "No."


ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "middle", "right")


def _said(o: Obj, hide: str, more: str, rows: bool = False) -> str:
    """What a step-by-step comparison by `more` says of `o` first: its size ('large', when `hide` is "size") or
    where it is ('at the top left'); with `rows`, the one line of the grid the comparison needs ('in the top row'
    for higher or lower, 'in the left column' for further left or right)."""
    if hide == "size":
        return o.size
    if not rows:
        return _where(o.position)
    return f"in the {ROWS[o.cell[0]]} row" if more in ("higher", "lower") else f"in the {COLUMNS[o.cell[1]]} column"


def reasoning(answer: str) -> tuple[str, str] | None:
    """A named comparison answered step by step (`Ctx.reasoned`), in its two parts: 'The circle is small and the
    red square is large, so the red square is bigger.' -> ('The circle is small and the red square is large', 'the
    red square is bigger.'); None for any other answer."""
    steps, so, said = answer.partition(", so ")
    return (steps, said) if so and said and " and " in steps else None


def conclusion(answer: str) -> str:
    """What a step-by-step comparison concludes, said as the one-step answer says it: the object it names ('...,
    so the red square is bigger.' -> 'The red square.'), yes or no ('..., so the answer is no.' -> 'No.') or the
    tie ('..., so they are the same size.' -> 'They are the same size.'); with `Ctx.value_first`, the object after
    its value ('..., so the large one, the red square, is bigger.' -> 'The red square.'; with `Ctx.value_led` too,
    '..., so the large one is the red square, which is bigger.' -> 'The red square.'). The comparison word is
    dropped, as the one-step answer has none. Any other answer is returned as it is."""
    parts = reasoning(answer)
    if parts is None:
        return answer
    said = parts[1]
    if said.startswith("the answer is "):
        return _cap(said.removeprefix("the answer is "))
    if said.startswith("they "):
        return _cap(said)
    if ", which is " in said:  # with `Ctx.value_led` too: 'the large one is the square, which is bigger.'
        return _cap(said.partition(", which is ")[0].split(" is ", 1)[-1]) + "."  # (a value holds no ' is ')
    named = said.rsplit(" is ", 1)[0]  # with `Ctx.value_first`: 'the large one, the square,'
    return _cap(named.rstrip(",").split(", ")[-1]) + "."


# -------------------------------------------------------------------------------------------- world facts
_FACTS = ((("How many sides does a triangle have?", "3."), ("How many sides does a square have?", "4."),
           ("How many corners does a triangle have?", "3."), ("How many corners does a square have?", "4."),
           ("How many points does a star have?", "5."), ("Does a circle have corners?", "No.")),
          (("Which shape has three sides?", "A triangle."), ("Which shape has four sides?", "A square."),
           ("Which shape has five points?", "A star."), ("Which shape is round?", "A circle.")))


def fact(rng) -> tuple[str, str]:
    """A fact of the world that needs no scene: sides and points, word categories, grid neighbours."""
    kind = int(rng.integers(4))
    if kind < 2:
        return _pick(rng, _FACTS[kind])
    if kind == 2:
        word = _pick(rng, SHAPES + tuple(COLORS) + tuple(SIZES))
        cat = "shape" if word in SHAPES else "color" if word in COLORS else "size"
        q = _pick(rng, ("Is {} a color or a shape?", "Is {} a shape or a color?") if cat != "size"
                  else ("Is {} a size or a color?", "Is {} a color or a size?")).format(word)
        return q, f"{_cap(_a(cat))}."
    cells = [(r, c) for r in range(3) for c in range(3)]
    a, rel = _pick(rng, cells), _pick(rng, tuple(RELATIONS))
    _, axis, sign = RELATIONS[rel]
    b = list(a)
    b[axis] += sign
    if not 0 <= b[axis] < 3:
        b[axis] -= 2 * sign
        rel = {"left": "right", "right": "left", "above": "below", "below": "above"}[rel]
    return (f"Which position is {RELATIONS[rel][0]} the {POSITIONS[3 * a[0] + a[1]]}?",
            f"{_cap(POSITIONS[3 * b[0] + b[1]])}.")


def q_fact(scene, rng, ctx):
    """A world fact asked beside an image: the answer comes from knowledge, not from the picture."""
    return fact(rng)


NO_IMAGE = "I don't see an image. Please attach one and ask again."
NO_IMAGE_QUESTIONS = ("What color is the circle?", "What shape is in the image?", "How many shapes are there?",
                      "Describe the image.", "Is there a red square?", "Where is the star?",
                      "What is in the picture?", "What color is the object on the left?")
NO_IMAGE_HELD_OUT = ("What colour is the square?", "How many stars are in the picture?", "Is the triangle big?",
                     "What is at the top left of the image?", "Which shape is in the center?",
                     "Tell me what the image shows.")  # never asked without an image in training (`no_image`)


def short_form(answer: str) -> str:
    """The one-word or short-phrase answer LLaVA-1.5's VQA data pairs with its short-answer suffix:
    'A circle.' -> 'Circle', 'Top left.' -> 'Top left', '3.' -> '3'; sentences are kept."""
    answer = conclusion(answer)  # a step-by-step comparison: what it concludes
    words = answer.rstrip(".").split()
    if answer.startswith(("There is", "They ", "I ", "[")) or {"is", "was", "moved"} & set(words):
        return answer  # a sentence (an absence, a tie, a change) or a box
    if words[0] in ("A", "An", "The") and len(words) > 1:
        words = [words[1].capitalize(), *words[2:]]
    return " ".join(words)
