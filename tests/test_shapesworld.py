"""ShapesWorld: determinism, valid LLaVA files, scene invariants, answers that follow from scenes, pixels."""

import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from minillava.data import shapesworld as sw
from minillava.data.records import load_records
from minillava.data.shapesworld import (
    COLORS,
    HELD_OUT,
    MORE_PHRASINGS,
    PHRASINGS,
    POSITIONS,
    SHAPES,
    SHORT_ANSWER,
    SIZES,
    Background,
    Obj,
    Scene,
    absent_objects,
    bbox,
    build,
    caption,
    change_scene,
    combo_frequencies,
    describe,
    generate_records,
    main,
    objects_present,
    render,
    render_background,
    sample_scene,
    scenes,
    short_form,
    text_chats,
)

MULTI = "Image 1: <image>\nImage 2: <image>\n"
RELATIONS = {"left": (1, -1), "right": (1, 1), "above": (0, -1), "below": (0, 1)}  # grid axis, sign
INTRO = re.compile(r"^(?:In a picture there is|A picture shows|Picture:|In an image there is) .*?\. "
                   r"(?=[A-Z])")  # the scene told in words, before a text chat's first question
SMALL = dict(n_train=30, n_val=8, n_test=8, n_comp=8, n_text=20, n_text_val=5)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("sw") / "data"
    return out, build(out, seed=3, **SMALL)


@pytest.fixture(scope="module")
def splits():
    return {s: generate_records(s, 500 if s != "multiturn" else 100, seed=1) for s in sw.SPLITS}


def qa_turns(records):
    """(question without the short-answer suffix, answer as if unsuffixed, qtype, scene or [scenes]) for every
    answer turn; a suffixed question's answer must be the short form."""
    for r in records:
        users = [m["content"] for m in r.messages if m["role"] == "user"]
        answers = [m["content"] for m in r.messages if m["role"] == "assistant"]
        assert len(answers) == len(r.meta["qtypes"]), r.id
        scene = r.meta.get("scene")
        scene = [Scene.from_dict(s) for s in scene] if isinstance(scene, list) else (
            Scene.from_dict(scene) if scene else None)
        for q, a, t in zip(users, answers, r.meta["qtypes"]):
            if q.endswith(SHORT_ANSWER):
                assert not a.endswith(".") or a.startswith(("There is", "They ")), (q, a)
            q = q.removesuffix(SHORT_ANSWER).removeprefix(MULTI).removeprefix("<image>\n")
            yield INTRO.sub("", q), a, t, scene


WHERE = {p: {"center": "in the center", "left": "on the left", "right": "on the right"}.get(p, f"at the {p}")
         for p in POSITIONS}
SLOTS = {"{}": r"(the [a-z ]+?|[a-z ]+?)", "{w}": r"(left of|right of|above|below)",
         "{to}": r"(to the left of|to the right of|above|below)", "{a}": r"(the [a-z ]+?|[a-z]+ shapes|[a-z]+s)",
         "{b}": r"(the [a-z ]+?|[a-z]+ shapes|[a-z]+s)", "{mf}": r"(more|fewer)",
         "{more}": r"(bigger|larger|smaller|higher|lower|further left|further right)"}


def parse(question: str, qtype: str) -> tuple[str, dict]:
    """Which phrasing of `qtype` a question uses, and what fills its slots (independent of the generator's
    code: only its phrasing tables are read). Returns (set "train" | "held_out" | "more", {slot: text})."""
    forms = [(which, f) for which, fs in zip(("train", "held_out", "more"),
                                             (*PHRASINGS[qtype], MORE_PHRASINGS.get(qtype, ()))) for f in fs]
    for which, form in sorted(forms, key=lambda x: -len(x[1])):  # the most literal first: "Is {a} placed {w} {b}?"
        pattern, names = re.escape(form), []
        for slot, rx in SLOTS.items():
            esc = re.escape(slot)
            while esc in pattern:
                pattern = pattern.replace(esc, f"(?P<s{len(names)}>{rx[1:-1]})", 1)
                names.append(slot)
        m = re.fullmatch(pattern, question) or re.fullmatch(pattern, question[0].lower() + question[1:])
        if m:
            return which, {n: m.group(f"s{i}") for i, n in enumerate(names)}
    raise AssertionError(f"no {qtype} phrasing matches {question!r}")


def resolve_phrase(ref: str, scene: Scene) -> list[Obj]:
    """The objects a referring phrase names ('the large circle at the top')."""
    ref = ref.removeprefix("the ")
    pos = next((p for p in sorted(POSITIONS, key=len, reverse=True) if ref.endswith(" " + WHERE[p])), None)
    words = ref.removesuffix(" " + WHERE[pos]).split() if pos else ref.split()
    return [o for o in scene.objects
            if all(w == "object" or w in (o.size, o.color, o.shape) for w in words)
            and (pos is None or o.position == pos)]


def expected_count(question: str, scene: Scene) -> int:
    words = re.findall(r"[a-z]+", question.lower())
    return sum(all(w not in words for w in (set(COLORS) | set(SIZES)) - {o.color, o.size})
               and all(s + "s" not in words for s in set(SHAPES) - {o.shape}) for o in scene.objects)


def parse_box(s: str) -> list[float]:
    assert re.fullmatch(r"\[\d\.\d\d, \d\.\d\d, \d\.\d\d, \d\.\d\d\]", s), s
    return [float(v) for v in s[1:-1].split(", ")]


def attribute(attr: str, o: Obj, scene: Scene) -> str:
    return {"color": o.color.capitalize() + ".", "position": o.position.capitalize() + ".",
            "shape": ("An " if o.shape[0] in "aeiou" else "A ") + o.shape + ".",
            "size": o.size.capitalize() + ".", "grounding": bbox(o, scene.size)}[attr]


def same(a: str, want: str) -> bool:
    """The answer, or its short form (after the short-answer suffix)."""
    return a == want or a == short_form(want)


KEYS = {"bigger": (lambda o: SIZES[o.size], 1), "larger": (lambda o: SIZES[o.size], 1),
        "smaller": (lambda o: SIZES[o.size], -1), "higher": (lambda o: o.cell[0], -1),
        "lower": (lambda o: o.cell[0], 1), "further left": (lambda o: o.cell[1], -1),
        "further right": (lambda o: o.cell[1], 1)}


def line(position: str, more: str) -> str:
    """The row or column a step-by-step comparison with `Ctx.rows` says of an object at `position` ('top left')."""
    if more in ("higher", "lower"):
        return f"in the {'top' if 'top' in position else 'bottom' if 'bottom' in position else 'middle'} row"
    return f"in the {'left' if 'left' in position else 'right' if 'right' in position else 'middle'} column"


def check_answer(q: str, a: str, t: str, scene: Scene):
    """Recompute the answer to one question from the scene, independently of the generator."""
    if t in ("color", "shape", "position", "size", "grounding"):
        _, slots = parse(q, t)
        (o,) = resolve_phrase(slots["{}"], scene)  # referent must be unique
        assert same(a, attribute(t, o, scene)), (q, a)
    elif t == "false_premise":
        for k in ("color", "shape", "position", "size", "grounding", "compare_which", "compare_yn", "and_ref"):
            try:
                _, slots = parse(q, k)
            except AssertionError:
                continue
            refs = [v for n, v in slots.items() if n in ("{}", "{a}", "{b}")]
            absent = [r for r in refs if not resolve_phrase(r, scene)]
            assert len(absent) == 1 and a == f"There is no {absent[0].removeprefix('the ')} in the image.", (q, a)
            return
        raise AssertionError(f"false premise in no known phrasing: {q!r}")
    elif t == "count":
        assert same(a, f"{expected_count(q, scene)}."), (q, a)
    elif t == "exist":
        thing = parse(q, "exist")[1]["{}"].split()[1:]  # "a red circle" -> ["red", "circle"]
        present = any(all(w in (o.color, o.shape) for w in thing) for o in scene.objects)
        assert same(a, "Yes." if present else "No."), (q, a)
    elif t == "relation":
        rel = next(k for k in RELATIONS if f" {k} " in q or q.endswith(f" {k}?"))
        axis, sign = RELATIONS[rel]
        try:
            _, slots = parse(q, "relation_yn")
            (o,), (anchor,) = resolve_phrase(slots["{a}"], scene), resolve_phrase(slots["{b}"], scene)
            assert same(a, "Yes." if sign * (o.cell[axis] - anchor.cell[axis]) > 0 else "No."), (q, a)
        except AssertionError as e:
            if "phrasing" not in str(e):
                raise
            _, slots = parse(q, "relation")
            (anchor,) = resolve_phrase(slots["{}"], scene)
            (hit,) = [o for o in scene.objects if sign * (o.cell[axis] - anchor.cell[axis]) > 0]
            assert a.lower().rstrip(".").split()[-2:] == [hit.color, hit.shape], (q, a)
    elif t == "compare_named":
        for k in ("compare_which", "compare_yn", "compare_more"):
            try:
                _, slots = parse(q, k)
            except AssertionError:
                continue
            if k == "compare_more":
                na, nb = (expected_count(f"how many {slots[s]}", scene) for s in ("{a}", "{b}"))
                win = slots["{a}"] if na > nb else slots["{b}"] if nb > na else None
                ok = same(a, f"{win.capitalize()}.") if win else a == "They are the same number."
            else:
                (x,), (y,) = resolve_phrase(slots["{a}"], scene), resolve_phrase(slots["{b}"], scene)
                key, sign = KEYS[slots["{more}"]]
                d = sign * (key(x) - key(y))
                if ", so " in a:  # step by step (`Ctx.reasoned`): each object's size or place, then the conclusion
                    size = slots["{more}"] in ("bigger", "larger", "smaller")
                    said = [(o.size if size else line(o.position, slots["{more}"])
                             if re.search(r" (row|column)(,| and| is) ", a) else WHERE[o.position]) for o in (x, y)]
                    steps, conclusion = a.split(", so ")
                    refs, values = (slots["{a}"], slots["{b}"]), [f"the {v} one" if size else v for v in said]
                    led = steps == f"{values[0].capitalize()} is {refs[0]} and {values[1]} is {refs[1]}"  # value_led
                    assert led or steps == f"{refs[0].capitalize()} is {said[0]} and {refs[1]} is {said[1]}", (q, a)
                    end = f" is {slots['{more}']}."
                    w = 0 if d > 0 else 1
                    if led and k == "compare_which" and d != 0 and conclusion.endswith(f", which{end}"):
                        assert conclusion == f"{values[w]} is {refs[w]}, which{end}", (q, a)  # the winner's step again
                        conclusion = f"{refs[w]}{end}"
                    if k == "compare_which" and d != 0 and conclusion.endswith(f",{end}"):  # `Ctx.value_first`
                        value = f"the {said[w]} one" if size else f"the one {said[w]}"
                        assert conclusion.startswith(f"{value}, "), (q, a)  # the winner's value, then the object
                        conclusion = conclusion.removeprefix(f"{value}, ").replace(f",{end}", end)
                    a = (conclusion.removeprefix("the answer is ").capitalize() if k == "compare_yn"
                         else conclusion.capitalize() if d == 0 else
                         conclusion.removesuffix(end).capitalize() + "." if conclusion.endswith(end) else conclusion)
                ok = (same(a, "Yes." if d > 0 else "No.") if k == "compare_yn" else
                      a.startswith("They are") if d == 0 else
                      same(a, (slots["{a}"] if d > 0 else slots["{b}"]).capitalize() + "."))
            assert ok, (q, a)
            return
        raise AssertionError(f"comparison in no known phrasing: {q!r}")


# ------------------------------------------------------------------------------------------------ files
def test_build_is_byte_deterministic_and_seeded(built, tmp_path):
    out, manifest = built
    again = tmp_path / "again"
    assert build(again, seed=3, **SMALL) == manifest
    assert tree_hashes(out) == tree_hashes(again)
    other = tmp_path / "other"
    build(other, seed=4, **SMALL)
    a, b = tree_hashes(out), tree_hashes(other)
    assert a["images/train_000000.png"] != b["images/train_000000.png"]
    assert all(a[f] != b[f] for f in manifest["files"])


def test_every_file_loads_and_matches_manifest(built):
    out, manifest = built
    assert set(manifest["files"]) == {"captions_train.json", "captions_test.json", "text_train.json",
                                      "text_val.json", "instruct_train.json", "instruct_val.json",
                                      "instruct_test.json", "instruct_compositional.json",
                                      "instruct_paraphrase.json", "instruct_multiturn.json", "instruct_cooccur.json"}
    images = set()  # the multiturn split's three records of a scene share its images
    for fname, info in manifest["files"].items():
        assert hashlib.sha256((out / fname).read_bytes()).hexdigest() == info["sha256"]
        records = load_records(out / fname)  # checks placeholders against images and that images exist
        assert len(records) == info["records"]
        for r in records:
            if fname.startswith("text"):
                assert not r.images and "<image>" not in str(r.messages)
            if r.meta["kind"] == "multi_image":
                assert len(r.images) == 2 and len(r.meta["scene"]) == 2
                first = r.messages[0]["content"]  # both images first, or the second with a later question
                assert first.startswith(MULTI) or (first.count("<image>") == 1 and sum(
                    m["content"].count("<image>") for m in r.messages) == 2)
            images |= set(r.images) if fname.startswith("instruct") else set()
    assert len(images) == manifest["images"] == len(list((out / "images").glob("*.png")))


def test_build_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a ShapesWorld build"):
        build(tmp_path, **SMALL)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli(tmp_path):
    out = tmp_path / "cli"
    manifest = main([str(out), "--n-train", "5", "--n-val", "2", "--n-test", "2", "--n-comp", "0", "--n-text",
                     "3", "--n-text-val", "2", "--seed", "7", "--kinds", "conversation"])
    assert manifest["seed"] == 7 and "instruct_compositional.json" not in manifest["files"]
    assert {r.meta["kind"] for r in load_records(out / "instruct_train.json")} == {"conversation"}
    with pytest.raises(SystemExit):  # a step form without step-by-step answers: refused, nothing written
        main([str(tmp_path / "rows"), "--n-train", "1", "--rows", "--value-first"])
    assert not (tmp_path / "rows").exists()
    small = ["--n-train", "200", "--n-val", "0", "--n-test", "0", "--n-comp", "0", "--n-text", "0", "--n-text-val",
             "0", "--n-para", "0", "--n-multiturn", "0", "--n-cooccur", "0", "--reasoned", "--rows", "--value-first"]
    form = ("reasoned", "rows", "value_first", "value_led")
    for led, said_so in ((False, r" (row|column), so the one in the \w+ (row|column), "),
                         (True, r"^In the \w+ (row|column) is .*, so in the \w+ (row|column) is .*, which is ")):
        manifest = main([str(tmp_path / "steps"), *small, *["--value-led"][:led]])
        assert {k: manifest["arguments"][k] for k in form} == {**dict.fromkeys(form, True), "value_led": led}
        records = load_records(tmp_path / "steps" / "instruct_train.json")
        said = [m["content"] for r in records for m in r.messages[1::2]]
        assert any(re.search(said_so, a) for a in said), said


# ------------------------------------------------------------------------------------------------ scenes
def test_scene_invariants_and_held_out_pairs(splits):
    for split, data in splits.items():
        assert all(1 <= len(s.objects) <= 4 and len({o.cell for o in s.objects}) == len(s.objects)
                   for s in data.scenes.values())
        combos = [set(objects_present(s)) & set(HELD_OUT) for s in data.scenes.values()]
        if split == "compositional":
            first = [s for name, s in data.scenes.items() if not name.endswith("_b.png")]
            assert all(set(objects_present(s)) & set(HELD_OUT) for s in first)
        else:
            assert not any(combos)
            text = str([r.messages for r in data.instruct + data.captions])
            assert "purple star" not in text and "orange triangle" not in text
    text = str([r.messages for r in text_chats(300, seed=1)])
    assert "purple star" not in text and "orange triangle" not in text
    counts = Counter(len(s.objects) for s in splits["train"].scenes.values())
    assert set(counts) == {1, 2, 3, 4}


def test_evaluation_scenes_are_not_training_scenes(splits):
    def content(scene):
        return frozenset((o.size, o.color, o.shape, o.cell) for o in scene.objects)

    train = {content(s) for n, s in splits["train"].scenes.items() if not n.endswith("_b.png")}
    for split in ("val", "test"):
        firsts = [content(s) for n, s in splits[split].scenes.items() if not n.endswith("_b.png")]
        assert not train & set(firsts)
        assert Counter(len(c) for c in firsts).keys() == {1, 2, 3, 4}


def test_scene_round_trips_through_json(splits):
    for s in list(splits["val"].scenes.values())[:20]:
        again = Scene.from_dict(s.to_dict())
        assert again == s and render(again).tobytes() == render(s).tobytes()


def test_bbox_is_the_cell_and_size():
    assert bbox(Obj("circle", "red", "large", (0, 0))) == "[0.01, 0.01, 0.32, 0.32]"
    for r in range(3):
        for c in range(3):
            for size, rad in SIZES.items():
                o = Obj("star", "red", size, (r, c))
                x1, y1, x2, y2 = parse_box(bbox(o))
                assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
                assert abs((x1 + x2) / 2 - (c + 0.5) / 3) < 0.01 and abs((y1 + y2) / 2 - (r + 0.5) / 3) < 0.01
                assert abs((x2 - x1) - 2 * rad) < 0.011


# ------------------------------------------------------------------------------------------------ answers
def test_answers_follow_from_the_scene(splits):
    seen = Counter()
    records = [r for d in splits.values() for r in d.instruct] + text_chats(300, seed=2)
    for q, a, t, scene in qa_turns(records):
        seen[t] += 1
        if t.startswith("multi") or t in ("detail", "fact", "followup", "context", "no_image") or scene is None:
            continue
        check_answer(q, a, t, scene[0] if isinstance(scene, list) else scene)  # asked before the second image
    assert {"color", "shape", "count", "exist", "position", "relation", "grounding", "size", "compare",
            "detail", "multi_diff", "multi_more", "multi_count", "fact", "false_premise", "compare_named",
            "followup", "no_image", "context"} <= set(seen)


def test_existence_is_balanced_and_colour_questions_unique(splits):
    exist = [a.rstrip(".") for d in splits.values() for q, a, t, _ in qa_turns(d.instruct) if t == "exist"]
    assert len(exist) >= 300
    assert abs(exist.count("Yes") / len(exist) - 0.5) <= 0.1
    assert set(exist) == {"Yes", "No"}
    colour = [(q, s) for d in splits.values() for q, a, t, s in qa_turns(d.instruct) if t == "color"]
    assert colour and all(len(resolve_phrase(parse(q, "color")[1]["{}"], s[0] if isinstance(s, list) else s)) == 1
                          for q, s in colour)


def test_plain_question_forms_appear(splits):
    questions = {q for d in splits.values() for q, *_ in qa_turns(d.instruct)}
    text = "\n".join(questions)
    for pattern in (r"^What color is the circle\?$", r"^How many shapes are there\?$",
                    r"^Is there a \w+ \w+\?$",
                    r"^Where is the \w+ \w+\?$", r"^Which shape is left of the [\w ]+\?$",
                    r"^Give the bounding box of the \w+ \w+\.$", r"^Is the \w+ large or small\?$",
                    r"^What is different between the two images\?$", r"^Which image has more shapes\?$"):
        assert re.search(pattern, text, re.M), pattern


def test_multi_image_difference_names_the_single_change(splits):
    n = 0
    turns = [x for d in splits.values() for x in qa_turns(d.instruct) if x[2] == "multi_diff"]
    for _, a, _, (s1, s2) in turns:
        before, after = set(s1.objects), set(s2.objects)
        gone, new = before - after, after - before
        assert len(gone) <= 1 and len(new) <= 1 and (gone or new) and s1.background == s2.background
        for o in gone:  # "the red circle" must name one object of the first image
            assert sum((x.color, x.shape) == (o.color, o.shape) for x in s1.objects) == 1
        if gone and new:
            (o,), (p,) = gone, new
            assert sum([o.cell != p.cell, o.color != p.color, o.shape != p.shape]) == 1 and o.size == p.size
            article = "an" if p.shape[0] in "aeiou" else "a"
            want = (f"The {o.color} {o.shape} is {p.color} in the second image." if o.color != p.color
                    else f"The {o.color} {o.shape} is {article} {p.shape} in the second image."
                    if o.shape != p.shape else f"The {o.color} {o.shape} moved to the {p.position}.")
            assert a == want, (a, want)
        elif gone:
            (o,) = gone
            assert a == f"The {o.color} {o.shape} was removed."
        else:
            (p,) = new
            assert a.startswith(("A ", "An ")) and a.endswith(f"{p.size} {p.color} {p.shape} was added "
                                                              f"{WHERE[p.position]}.")
        n += 1
    assert n >= 20


def test_change_scene_respects_held_out_pairs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        changed = change_scene(sample_scene(rng), rng)
        assert changed is not None  # a one-object scene can always get an object added
        assert not set(objects_present(changed[0])) & set(HELD_OUT)


def test_captions_and_descriptions_name_every_object():
    rng = np.random.default_rng(5)
    for _ in range(50):
        s = sample_scene(rng)
        cap, det = caption(s, rng), describe(s)
        for o in s.objects:
            assert f"{o.size} {o.color} {o.shape} {WHERE[o.position]}" in cap
            assert f"{o.size} {o.color} {o.shape} is {WHERE[o.position]}." in det.lower()
        assert f"{len(s.objects)} shape" in det


def test_pope_helpers():
    rng = np.random.default_rng(0)
    scene = Scene((Obj("star", "red", "large", (0, 0)), Obj("circle", "blue", "small", (1, 1))),
                  Background((240, 240, 240), (230, 230, 230), 0, 0))
    assert objects_present(scene) == [("red", "star"), ("blue", "circle")]
    for strategy in ("random", "adversarial"):
        picks = absent_objects(scene, rng, 5, strategy, exclude=HELD_OUT)
        assert len(picks) == 5 and not set(picks) & (set(objects_present(scene)) | set(HELD_OUT))
    adversarial = absent_objects(scene, rng, 8, "adversarial")
    assert all(s in ("star", "circle") for _, s in adversarial)  # same shape, other colour comes first
    freq = combo_frequencies([sample_scene(rng) for _ in range(200)])
    popular = absent_objects(scene, rng, 3, "popular", freq)
    assert [freq[p] for p in popular] == sorted((freq[p] for p in popular), reverse=True)
    with pytest.raises(ValueError, match="needs freq"):
        absent_objects(scene, rng, 1, "popular")


# ------------------------------------------------------------------------------------------------ pixels
def object_mask(scene: Scene, obj: Obj) -> np.ndarray:
    """Pixels that one object, drawn alone on the scene's background, changes visibly."""
    alone = np.asarray(render(Scene((obj,), scene.background, scene.size)), dtype=int)
    return np.abs(alone - np.asarray(render_background(scene.background, scene.size), dtype=int)).max(-1) > 40


def test_pixels_objects_and_background():
    rng = np.random.default_rng(11)
    for _ in range(25):
        scene = sample_scene(rng, n_objects=4, exclude=())
        img = np.asarray(render(scene), dtype=int)
        assert img.shape == (64, 64, 3)
        masks = []
        for o in scene.objects:
            cx, cy = int((o.cell[1] + 0.5) * 64 / 3), int((o.cell[0] + 0.5) * 64 / 3)
            assert np.abs(img[cy, cx] - np.array(o.rgb)).max() <= 12, (o, img[cy, cx])
            m = object_mask(scene, o)
            x1, y1, x2, y2 = (v * 64 for v in parse_box(bbox(o)))
            ys, xs = np.nonzero(m)
            assert x1 - 1.5 <= xs.min() and xs.max() <= x2 + 0.5, (o, xs.min(), xs.max(), x1, x2)
            assert y1 - 1.5 <= ys.min() and ys.max() <= y2 + 0.5, (o, ys.min(), ys.max(), y1, y2)
            masks.append(m)
        assert (np.sum(masks, axis=0) <= 1).all()  # no two objects touch the same pixel
        bg = img[~np.any(masks, axis=0)]
        for rgb in COLORS.values():
            assert np.abs(bg - np.array(rgb)).max(-1).min() > 60


def test_hard_negatives_change_one_thing_and_never_a_held_out_pair():
    rng = np.random.default_rng(0)
    kinds = Counter()
    for _ in range(300):
        scene = sw.sample_scene(rng)
        text = sw.caption(scene, rng)
        neg = sw.hard_negative(text, rng)
        assert neg is not None and neg != text
        before = [m.groups() for m in scenes._PHRASE.finditer(text)]
        after = [m.groups() for m in scenes._PHRASE.finditer(neg)]
        assert len(before) == len(after) == len(scene.objects)  # the same objects, in the same places
        diff = [(a, b) for a, b in zip(before, after) if a != b]
        slots = {i for a, b in diff for i in range(4) if a[i] != b[i]}
        if len(diff) == 2:  # two objects' colours swapped
            assert slots == {1} and diff[0][0][1] == diff[1][1][1] and diff[1][0][1] == diff[0][1][1]
            kinds["swap"] += 1
        else:
            assert len(diff) == 1 and len(slots) == 1
            kinds[("size", "color", "shape", "position")[slots.pop()]] += 1
        assert all((c, s) not in sw.HELD_OUT for _, c, s, _ in after)
    assert set(kinds) == {"swap", "size", "color", "shape", "position"}
    assert sw.hard_negative("A picture of nothing.", rng) is None


def test_ensure_built_reuses_only_the_same_build(tmp_path):
    args = dict(n_train=6, n_val=0, n_test=2, n_comp=0, n_text=3, n_text_val=0, seed=1)
    first = sw.ensure_built(tmp_path / "d", **args)
    stamp = (tmp_path / "d" / "manifest.json").stat().st_mtime_ns
    assert sw.ensure_built(tmp_path / "d", **args) == first
    assert (tmp_path / "d" / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    other = sw.ensure_built(tmp_path / "d", **{**args, "n_train": 7})
    assert other["splits"]["train"] == 7 and other["arguments"]["n_train"] == 7
    assert sw.ensure_built(tmp_path / "d", **{**args, "n_train": 7, "kinds": ("detail",)})["kinds"] == ["detail"]
    assert sw.built_with(tmp_path / "d", n_train=7, seed=1) and not sw.built_with(tmp_path / "d", n_train=6)
    assert sw.built_with(tmp_path / "nothing", n_train=7) is None
