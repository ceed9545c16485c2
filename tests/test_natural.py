"""Natural use: held-out phrasings, false premises, follow-ups, short answers, multi-turn and co-occurrence splits,
questions with no image, pictures drawn by other code, and the ablation without negative instructions."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from test_shapesworld import attribute, check_answer, parse, qa_turns, resolve_phrase, same

from minillava import load, zoo
from minillava.data import shapesworld as sw
from minillava.data.records import Record
from minillava.data.shapesworld import (
    COOCCUR,
    MORE_PHRASINGS,
    PHRASINGS,
    SHORT_ANSWER,
    Scene,
    generate_records,
    text_chats,
)
from minillava.data.shapesworld.questions import conclusion
from minillava.evaluation import questions
from minillava.tools import build_zoo
from minillava.tools.negatives import drop_negatives
from minillava.tools.reasoned import aligned
from minillava.tools.reasoned import main as reasoned_ablation
from minillava.tools.redrawn import redraw, redrawn_records
from minillava.tools.told_comparisons import FORMS, GROUPS, conclusions, lm_digest, told_chats
from minillava.tools.told_comparisons import main as told_comparisons

ATTRS = ("color", "shape", "position", "size")


@pytest.fixture(scope="module")
def train():
    return generate_records("train", 600, seed=5)


def turns(record):
    users = [m["content"] for m in record.messages if m["role"] == "user"]
    answers = [m["content"] for m in record.messages if m["role"] == "assistant"]
    return list(zip(users, answers, record.meta["qtypes"]))


def bare(q: str) -> str:
    return q.removesuffix(SHORT_ANSWER).split("<image>\n")[-1]


def test_paraphrase_split_asks_only_held_out_phrasings(train):
    para = generate_records("paraphrase", 300, seed=5)
    seen = Counter()
    for data, want in ((train, "train"), (para, "held_out")):
        for r in data.instruct:
            for q, _, t in turns(r):
                if t in ("color", "shape", "position", "size", "count"):
                    kind = "count_attr" if t == "count" and not _parses(bare(q), "count") else t
                    assert parse(bare(q), kind)[0] == want, (q, t)
                    seen[want] += 1
    assert seen["train"] > 300 and seen["held_out"] > 150
    for qtype, (used, held) in PHRASINGS.items():  # the two halves never share a phrasing
        assert not set(used) & set(held), qtype


def test_followups_refer_back_to_the_right_object(train):
    """Replay every follow-up chat with its own bookkeeping: 'it' is the last object named, 'And the X?' names a
    new one and keeps the attribute, 'the other one' is the other of two."""
    checked = 0
    for r in train.instruct:
        if r.meta["kind"] != "followup" or "followup" not in r.meta["qtypes"]:
            continue
        scene = Scene.from_dict(r.meta["scene"])
        obj = attr = None
        for q, a, t in turns(r):
            q = bare(q)
            if t in ATTRS:
                attr = t
                (obj,) = resolve_phrase(parse(q, t)[1]["{}"], scene)
            elif t == "followup":
                it = next((k for k in ATTRS if _parses(q, f"it_{k}")), None)
                if it:
                    attr = it
                elif _parses(q, "and_other"):
                    (obj,) = [o for o in scene.objects if o is not obj]
                else:
                    (obj,) = resolve_phrase(parse(q, "and_ref")[1]["{}"], scene)
                want = attribute(attr, obj, scene)
                assert a in (want, sw.short_form(want)), (r.id, q, a, want)
                checked += 1
            elif t == "false_premise":
                assert not resolve_phrase(parse(q, "and_ref")[1]["{}"], scene) and a.startswith("There is no ")
    assert checked > 100


def test_natural_rounds_ask_the_other_one_more_often():
    """'The other one' is asked in two-object scenes: 2 of 5 follow-up moves there by default, 6 of 9 in the
    natural-use rounds (`more_phrasings`), which their models answered worst."""
    def share(data):
        moves = [_parses(bare(q), "and_other") for r in data.instruct if r.meta["kind"] == "followup"
                 and len(Scene.from_dict(r.meta["scene"]).objects) == 2
                 for q, _, t in turns(r) if t == "followup"]
        return sum(moves) / len(moves), len(moves)
    chats = {"followup": 1.0}
    (plain, n), (more, m) = (share(generate_records("train", 600, seed=5, weights=chats, more_phrasings=extra))
                             for extra in (False, True))
    assert n > 200 and m > 200 and 0.3 < plain < 0.5 and 0.57 < more < 0.77, (plain, n, more, m)


def _parses(q, qtype):
    try:
        parse(q, qtype)
        return True
    except AssertionError:
        return False


def test_false_premises_are_asked_everywhere_and_never_of_held_out_pairs(train):
    fp = [(q, a) for r in train.instruct for q, a, t in turns(r) if t == "false_premise"]
    assert len(fp) > 150
    for _, a in fp:
        assert re.fullmatch(r"There is no [a-z ]+ in the image\.", a), a
        words = a.removeprefix("There is no ").removesuffix(" in the image.").split()
        for color, shape in sw.HELD_OUT:  # never a held-out pair, nor its colour alone ("the orange object")
            assert not (color in words and (shape in words or "object" in words)), a
    kinds = Counter(r.meta["kind"] for r in train.instruct if "false_premise" in r.meta["qtypes"])
    assert {"conversation", "reasoning", "followup"} <= set(kinds)


def test_short_answer_suffix_gets_the_one_word_answer(train):
    suffixed = [(q, a, t) for r in train.instruct for q, a, t in turns(r) if q.endswith(SHORT_ANSWER)]
    assert {"color", "shape", "count", "exist", "position", "size", "followup"} <= {t for *_, t in suffixed}
    for q, a, _ in suffixed:  # a tie ("They are the same size.") stays a sentence
        assert a.startswith("They ") or not a.endswith(".") and not a.startswith(("A ", "An ")), (q, a)
    test = generate_records("test", 50, seed=5).instruct
    short = sw.short_answer_records(test)
    qs = questions(short)
    assert qs and all(q["qtype"] in sw.SHORT_TYPES and q["messages"][-1]["content"].endswith(SHORT_ANSWER)
                      and (q["reference"].startswith("They ") or not q["reference"].endswith(".")) for q in qs)


def test_no_image_questions_are_answered_by_saying_so():
    chats = [r for r in text_chats(400, seed=5) if r.meta["kind"] == "no_image"]
    assert len(chats) > 20
    for r in chats:
        assert not r.images and r.messages[1]["content"] == sw.NO_IMAGE
    long = [r for r in generate_records("train", 400, seed=6).instruct if "no_image" in r.meta["qtypes"]]
    for r in long:  # asked before the image arrives
        i = r.meta["qtypes"].index("no_image")
        assert "<image>" not in "".join(m["content"] for m in r.messages[: 2 * i + 1])


def test_natural_mix_asks_comparisons_late_pairs_and_questions_of_no_image():
    data = generate_records("train", 500, seed=8, weights=sw.NATURAL_WEIGHTS, short_p=0.35)
    by = {k: [r for r in data.instruct if r.meta["kind"] == k] for k in ("comparison", "long_pair", "no_image")}
    assert all(len(v) > 10 for v in by.values()), {k: len(v) for k, v in by.items()}
    # named objects compared one after another (an absent one gets its absence); when none can be asked
    # unambiguously (one object; ties of references), other reasoning questions instead
    compared = [set(r.meta["qtypes"]) <= {"compare_named", "false_premise"} for r in by["comparison"]]
    assert sum(compared) > 0.8 * len(compared) and all(len(r.images) == 1 for r in by["comparison"])
    late = 0
    for r in by["long_pair"]:  # a long chat, the second image at any turn, the two-image questions after it
        assert len(r.images) == 2 and r.images[1].name == r.images[0].name.replace(".png", "_b.png")
        assert 5 <= len(r.meta["qtypes"]) <= 7 and r.meta["qtypes"][-1].startswith("multi_")
        users = [m["content"] for m in r.messages if m["role"] == "user"]
        second = next(i for i, u in enumerate(users) if u.count("<image>") == 2 or i and "<image>" in u)
        assert sum(u.count("<image>") for u in users) == 2 and users[0].count("<image>") >= 1
        assert all(not t.startswith("multi_") for t in r.meta["qtypes"][:second])
        late += second > 0
        scenes = [Scene.from_dict(d) for d in r.meta["scene"]]
        for u, a, t in turns(r):  # the counts are the scenes' own
            if t == "multi_count":
                which = 0 if "first" in u else 1
                assert a == f"{len(scenes[which].objects)}." or a == str(len(scenes[which].objects)), (u, a)
    assert 0 < late < len(by["long_pair"])
    for r in by["no_image"]:  # said there is none, in training phrasings, never the held-out probes
        said = [i for i, t in enumerate(r.meta["qtypes"]) if t == "no_image"]
        assert said == list(range(len(said))) and said
        for q, a, _ in turns(r)[: len(said)]:
            assert a == sw.NO_IMAGE and "<image>" not in q and bare(q) not in sw.NO_IMAGE_HELD_OUT
        assert len(r.images) == sum(m["content"].count("<image>") for m in r.messages) <= 1
    suffixed = sum(q.endswith(SHORT_ANSWER) for r in data.instruct for q, _, t in turns(r) if t in ("color", "shape"))
    asked = sum(t in ("color", "shape") for r in data.instruct for t in r.meta["qtypes"])
    assert 0.27 < suffixed / asked < 0.43  # short_p of them carry the suffix


def words(phrasing: str) -> list[str]:
    return re.sub(r"[^\w{} ]", " ", phrasing.lower()).split()


def word_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance counted in words."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_more_phrasings_widen_training_and_stay_away_from_the_held_out_ones():
    assert word_distance(words("Of {a} and {b}, which is {more}?"), words("Between {a} and {b}, which is {more}?")) == 1
    slots = re.compile(r"{\w*}")
    for qtype, more in MORE_PHRASINGS.items():
        used, held = PHRASINGS[qtype]
        assert not set(more) & (set(used) | set(held)), qtype
        for m in more:  # the same slots as the type's training phrasings; >= 3 words from each held-out one
            assert sorted(slots.findall(m)) in [sorted(slots.findall(u)) for u in used], (qtype, m)
            close = [h for h in held if word_distance(words(m), words(h)) < 3]
            assert not close, (qtype, m, close)
    data = generate_records("train", 400, seed=9, more_phrasings=True)
    seen = Counter()
    for r in data.instruct:  # the wider phrasings are asked, and still answered from the scene
        scenes = r.meta["scene"] if isinstance(r.meta["scene"], list) else [r.meta["scene"]]
        scene = Scene.from_dict(scenes[0])
        for q, a, t in turns(r):
            if t in ATTRS and "<image>" in q:
                which, slot = parse(bare(q), t)
                seen[which] += 1
                (o,) = resolve_phrase(slot["{}"], scene)
                assert same(a, attribute(t, o, scene)), (q, a)
    assert 0.3 < seen["more"] / (seen["more"] + seen["train"]) < 0.55 and not seen["held_out"], seen  # ~6 in 14
    plain = generate_records("train", 40, seed=9)  # without it, only the training phrasings
    assert all(parse(bare(q), t)[0] == "train" for r in plain.instruct for q, _, t in turns(r) if t in ATTRS)
    with pytest.raises(ValueError, match="only for the train split, not 'test'"):
        generate_records("test", 2, more_phrasings=True)


def test_natural_kinds_leave_the_default_mix_and_the_evaluation_splits_unchanged():
    old_kinds = sw.KINDS[:6]
    for split in ("train", "test", "paraphrase"):
        a, b = generate_records(split, 40, seed=2), generate_records(split, 40, seed=2, kinds=old_kinds)
        assert [(r.messages, r.meta["kind"]) for r in a.instruct] == [(r.messages, r.meta["kind"]) for r in b.instruct]
    assert not {r.meta["kind"] for r in a.instruct} & {"comparison", "long_pair", "no_image"}
    with pytest.raises(ValueError, match="must be >= 0 and not all 0"):
        generate_records("train", 2, kinds=("no_image",))  # no weight in the default mix
    with pytest.raises(ValueError, match="kinds"):
        generate_records("train", 2, weights={"chitchat": 1.0})
    with pytest.raises(ValueError, match="short_p 1.5"):
        generate_records("train", 2, short_p=1.5)


def test_multiturn_split_asks_one_question_three_ways():
    data = generate_records("multiturn", 40, seed=5)
    recs = {r.id: r for r in data.instruct}
    assert len(recs) == 120
    late_images = 0
    for i in range(40):
        first, fifth, late = (recs[f"multiturn-{i:06d}-{v}"] for v in ("first", "fifth", "late"))
        goal = [bare(first.messages[-2]["content"]), first.messages[-1]["content"]]
        for r in (fifth, late):
            assert [bare(r.messages[-2]["content"]), r.messages[-1]["content"]] == goal
            assert r.meta["qtypes"][:-1] == ["context"] * 4 and len(r.messages) == 10
        assert first.images == fifth.images == late.images
        n = len(first.images)
        assert sum(m["content"].count("<image>") for m in late.messages) == n
        late_images += "<image>" not in late.messages[0]["content"] or n == 2 and late.messages[0][
            "content"].count("<image>") == 1
        qs = questions([late])  # context turns are history only; the images shown so far go with the question
        assert len(qs) == 1 and len(qs[0]["images"]) == n
    assert late_images == 40


def test_multiturn_gap_compares_whole_scenes_only():
    """`--limit` can cut a scene's three records apart: the gap is over the scenes asked all three ways."""
    from minillava.data.shapesworld.probes import multiturn

    def p(scene, variant, right):
        return {"id": f"multiturn-{scene:06d}-{variant}", "qtype": "color", "reference": "Red.",
                "answer": "Red." if right else "Blue."}

    preds = [p(0, "first", 1), p(0, "fifth", 0), p(0, "late", 1), p(1, "first", 1), p(1, "fifth", 1)]
    out = multiturn({"predictions": preds})
    assert out["scenes"] == 1 and out["incomplete_scenes"] == 1
    assert out["gap_points"] == {"fifth": 100.0, "late": 0.0}


@pytest.mark.parametrize("answer, rejects", [
    ("There is no red star in the image.", True), ("No, there is no red star.", True), ("No.", True),
    ("I don't see a red star.", True), ("There isn't a star.", True), ("The star is not in the image.", True),
    ("The star is red.", False), ("There is a red star.", False), ("Red.", False), ("Yes, there is no doubt.", False)])
def test_a_rejected_premise_is_recognised_in_any_wording(answer, rejects):
    from minillava.data.shapesworld.probes import rejects_premise

    assert rejects_premise(answer) is rejects


def test_questions_pass_only_the_images_shown_so_far():
    r = Record("x", ["a.png", "b.png"], [{"role": "user", "content": "<image>\nWhat color is the circle?"},
                                         {"role": "assistant", "content": "Red."},
                                         {"role": "user", "content": "<image>\nWhich image has more shapes?"},
                                         {"role": "assistant", "content": "The first image."}],
               {"qtypes": ["color", "multi_more"]})
    assert [len(q["images"]) for q in questions([r])] == [1, 2]


def test_cooccurrence_bias_and_pope_adversarial():
    rng = np.random.default_rng(0)
    biased = [sw.sample_scene(rng, cooccur=sw.COOCCUR_P) for _ in range(600)]
    plain = [sw.sample_scene(rng) for _ in range(600)]
    a, b = COOCCUR[0]
    together = lambda scenes: sw.cooccurrence_counts(scenes)[(a, b)]  # noqa: E731
    assert together(biased) > 5 * max(together(plain), 1)
    scene = Scene((sw.Obj(a[1], a[0], "large", (0, 0)),), biased[0].background)
    pick = sw.absent_objects(scene, rng, 1, "adversarial", pairs=sw.cooccurrence_counts(biased))
    assert pick == [b]  # POPE's adversarial: the object seen most often beside the present one
    data = generate_records("cooccur", 200, seed=5)
    assert sum(len(set(sw.objects_present(s)) & {a, b}) == 2 for s in data.scenes.values()) > 10


def test_drop_negatives_keeps_every_other_turn_and_the_images(train):
    with_fp = [r for r in train.instruct if "false_premise" in r.meta["qtypes"]]
    out = {r.id: r for r in drop_negatives(with_fp)}
    assert len(out) >= 0.8 * len(with_fp)
    for r in with_fp:
        if r.id not in out:
            assert set(r.meta["qtypes"]) == {"false_premise"}
            continue
        kept = out[r.id]
        assert "false_premise" not in kept.meta["qtypes"]
        assert [t for t in r.meta["qtypes"] if t != "false_premise"] == kept.meta["qtypes"]
        assert sum(m["content"].count("<image>") for m in kept.messages) == len(kept.images)
        assert kept.messages[0]["content"].startswith(("<image>", "Image 1:")) or "<image>" in kept.messages[2][
            "content"] or r.meta["kind"] == "long"


def test_redrawn_pictures_keep_the_scene(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(30):
        scene = sw.sample_scene(rng)
        img = np.asarray(redraw(scene, rng, 96), dtype=int)
        assert img.shape == (96, 96, 3)
        for o in scene.objects:
            if o.shape in ("circle", "square"):  # the cell's centre lies inside the shape
                y, x = int((o.cell[0] + 0.5) * 32), int((o.cell[1] + 0.5) * 32)
                assert np.abs(img[y, x] - np.array(sw.COLORS[o.color])).max() <= 26, (o, img[y, x])
    recs = redrawn_records(generate_records("test", 20, seed=5).instruct, tmp_path)
    assert recs and all("grounding" not in r.meta["qtypes"] and r.images[0].is_file() for r in recs)


def test_told_comparisons_tell_the_whole_scene_and_answer_from_it():
    chats = told_chats(300, seed=3)
    assert told_chats(300, seed=3) == chats and told_chats(300, seed=4) != chats
    groups = Counter()
    for r in chats:
        scene = Scene.from_dict(r.meta["scene"])
        question_at = r.messages[0]["content"].index(". ") + 2  # the scene told, then the question
        told, q = r.messages[0]["content"][:question_at - 1], r.messages[0]["content"][question_at:]
        (group,) = r.meta["qtypes"]
        assert all(o.phrase() in told for o in scene.objects) and (len(scene.objects) >= 2 or group == "count")
        assert r.images == [] and "<image>" not in r.messages[0]["content"]
        check_answer(q, r.messages[1]["content"], "compare_named", scene)  # recomputed from the scene
        assert group == "count" or any(w in q for w in GROUPS[group]), (group, q)
        groups[group] += 1
    assert set(groups) == {"size", "position", "count"} and min(groups.values()) >= 40, groups


def test_told_comparisons_step_by_step_are_the_same_chats_and_score_their_conclusions():
    plain, steps = told_chats(200, seed=3), told_chats(200, seed=3, reasoned=True)
    changed = 0
    for r, s in zip(plain, steps, strict=True):
        assert (r.id, r.messages[0], r.meta) == (s.id, s.messages[0], s.meta)
        (group,) = r.meta["qtypes"]
        a, b = r.messages[1]["content"], s.messages[1]["content"]
        assert (a == b) == (group == "count"), (a, b)  # counts have no step to say
        changed += a != b
        check_answer(s.messages[0]["content"].split(". ", 1)[1], b, "compare_named", Scene.from_dict(s.meta["scene"]))
    assert changed >= 100
    reference = "The circle is small and the square is large, so the square is bigger."
    rows = [{"qtype": "size", "answer": a, "reference": reference} for a in (
        "The circle is large and the square is large, so the square is bigger.",  # a wrong step, a right conclusion
        "The square.", "The circle is small and the square is large, so the circle is bigger.")]
    assert conclusions(rows) == {"size conclusion": 2 / 3, "size steps": 1 / 3, "size conclusion, steps right": 0.0}
    led = ("The small one is the circle and the large one is the square, so the large one is the square, which is "
           "bigger.")
    assert conclusion(led) == "The square." == conclusion(f"{reference[:-len(' is bigger.')]}, which is bigger.")
    assert conclusion("The circle is small and the square is large, so the square, which is bigger.") == "The square."


def test_told_comparisons_by_rows_say_only_the_line_a_position_needs():
    places, rows = told_chats(200, seed=3, reasoned=True), told_chats(200, seed=3, reasoned=True, rows=True)
    said = Counter()
    for r, s in zip(places, rows, strict=True):
        assert (r.id, r.messages[0], r.meta) == (s.id, s.messages[0], s.meta)
        (group,) = r.meta["qtypes"]
        a, b = r.messages[1]["content"], s.messages[1]["content"]
        assert (a == b) == (group != "position"), (a, b)  # sizes and counts are said as before
        assert conclusion(a) == conclusion(b)  # the same conclusion, reached through other steps
        check_answer(s.messages[0]["content"].split(". ", 1)[1], b, "compare_named", Scene.from_dict(s.meta["scene"]))
        said.update(re.findall(r"in the (\w+ (?:row|column))", b))
    assert set(said) == {f"{w} row" for w in ("top", "middle", "bottom")} | {
        f"{w} column" for w in ("left", "middle", "right")}, said
    for form in (dict(rows=True), dict(value_first=True), dict(value_led=True), dict(reasoned=False, rows=True)):
        with pytest.raises(ValueError, match="need reasoned=True"):
            told_chats(1, seed=3, **form)
    with pytest.raises(ValueError, match="unknown answer form"):
        told_chats(1, seed=3, reasoned=True, columns=True)


@pytest.mark.parametrize("rows", [False, True])
def test_told_comparisons_value_first_name_the_winning_value_then_the_object(rows):
    plain, first = (told_chats(200, seed=3, reasoned=True, rows=rows, value_first=v) for v in (False, True))
    changed = 0
    for r, s in zip(plain, first, strict=True):
        assert (r.id, r.messages[0], r.meta) == (s.id, s.messages[0], s.meta)
        a, b = r.messages[1]["content"], s.messages[1]["content"]
        q = s.messages[0]["content"].split(". ", 1)[1]
        named = r.meta["qtypes"] != ["count"] and conclusion(a) not in ("Yes.", "No.") and not (
            conclusion(a).startswith("They "))
        assert (a != b) == named, (a, b)  # only a 'which' with a winner changes: its value comes first
        assert conclusion(a) == conclusion(b)
        check_answer(q, b, "compare_named", Scene.from_dict(s.meta["scene"]))
        changed += a != b
    assert changed >= 40


@pytest.mark.parametrize("rows,first", [(False, True), (True, True), (True, False)])
def test_told_comparisons_value_led_say_each_value_before_its_object(rows, first):
    """`Ctx.value_led`: the steps say each value first ('The large one is the square and ...'); with value_first a
    'which' with a winner repeats the winner's step word for word before the comparison word, without it names the
    winner as the object-first steps do; the same conclusion either way."""
    before, led = (told_chats(200, seed=3, reasoned=True, rows=rows, value_first=first, value_led=v) for v in (0, 1))
    repeated = 0
    for r, s in zip(before, led, strict=True):
        assert (r.id, r.messages[0], r.meta) == (s.id, s.messages[0], s.meta)
        a, b = r.messages[1]["content"], s.messages[1]["content"]
        assert conclusion(a) == conclusion(b) and (a == b) == (r.meta["qtypes"] == ["count"]), (a, b)
        check_answer(s.messages[0]["content"].split(". ", 1)[1], b, "compare_named", Scene.from_dict(s.meta["scene"]))
        if r.meta["qtypes"] == ["count"]:
            continue
        steps, said = b.split(", so ")
        winner = not said.startswith(("the answer is ", "they "))
        assert (", which is " in said) == (winner and first), b  # every winner, in the form asked
        assert not (winner and first) or said.partition(", which is ")[0] in (
            steps[0].lower() + steps[1:]).split(" and "), b  # the winner's step again, word for word
        if not first:
            assert said == a.split(", so ")[1], (a, b)  # the conclusion as the object-first steps say it
        repeated += winner
    assert repeated >= 40, repeated


def test_told_comparisons_tool_measures_a_curve_and_refuses_bad_sizes(tmp_path, capsys):
    out = tmp_path / "told.json"
    assert told_comparisons(["--start", "tiny-llava", "--steps", "2", "--every", "1", "--batch", "2",
                             "--n-eval", "12", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    curve = result["runs"]["tiny-llava"]["curve"]
    assert [row["step"] for row in curve] == [0, 1, 2] and [row["chats seen"] for row in curve] == [0, 2, 4]
    assert all(0 <= row["overall"] <= 1 for row in curve) and sum(result["eval"]["by_group"].values()) == 12
    assert result["runs"]["tiny-llava"]["weights"] == lm_digest(load("tiny-llava")[0].language_model)  # before
    last = result["runs"]["tiny-llava"]["last answers"]  # the last step's, for reading what fails
    assert len(last) == sum(result["eval"]["by_group"].get(g, 0) for g in ("size", "position"))
    assert all(p["group"] in ("size", "position") and p["question"].endswith("?") for p in last)
    assert "told comparisons: 2 steps of 2" in capsys.readouterr().out
    assert told_comparisons(["--start", "tiny-llava", "--steps", "1", "--every", "1", "--batch", "2", "--n-eval", "12",
                             "--reasoned", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["reasoned"] and ", so " in result["eval"]["example"][1]["content"]
    assert {"size conclusion", "position conclusion", "size steps"} <= set(result["runs"]["tiny-llava"]["curve"][0])
    with pytest.raises(SystemExit):
        told_comparisons(["--steps", "0", "--out", str(out)])
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        told_comparisons(["--rows", "--value-first", "--out", str(out)])
    assert "rows=True, value_first=True, value_led=False: these change the steps of a step-by-step answer, so " in (
        capsys.readouterr().err)


@pytest.mark.parametrize("name", ["told_comparisons", "told_comparisons_reasoned", "told_comparisons_rows",
                                  "told_comparisons_value_first", "told_comparisons_value_led"])
def test_the_shipped_told_comparisons_measured_the_shipped_models_on_todays_chats(name):
    """data/results/told_comparisons*.json (chapter 7.6): their held-out chats are the ones the generator draws
    today (one-step or step-by-step answers) and their starts are the shipped weights; a rebuilt zoo needs `make
    told-comparisons` again."""
    saved = json.loads((zoo.data_dir() / "results" / f"{name}.json").read_text())
    form = {k: saved["settings"].get(k, False) for k in FORMS}
    assert [k for k, v in form.items() if v] == {"told_comparisons": [], "told_comparisons_reasoned": ["reasoned"],
                                                 "told_comparisons_rows": ["reasoned", "rows"],
                                                 "told_comparisons_value_first": list(FORMS[:3]),
                                                 "told_comparisons_value_led": list(FORMS)}[name]
    held_out = told_chats(saved["eval"]["n"], seed=1, **form)
    assert saved["eval"]["example"] == held_out[0].messages
    assert saved["eval"]["by_group"] == dict(Counter(r.meta["qtypes"][0] for r in held_out))
    for start, run in saved["runs"].items():
        assert run["weights"] == lm_digest(load(start)[0].language_model), f"{start}: measured from other weights"
        steps = [row["step"] for row in run["curve"]]
        last = saved["settings"]["steps"]
        assert steps == sorted({*range(0, last + 1, saved["settings"]["every"]), last})


@pytest.mark.parametrize("split", ["train", "test", "paraphrase", "multiturn"])
def test_reasoned_comparisons_say_each_object_first_and_change_nothing_else(split):
    kw = dict(weights=sw.NATURAL_WEIGHTS, more_phrasings=True, short_p=0.35) if split == "train" else {}
    plain = generate_records(split, 300, seed=5, **kw).instruct
    steps = generate_records(split, 300, seed=5, reasoned=True, **kw).instruct
    said, short = 0, 0
    for r, s in zip(plain, steps, strict=True):
        assert (r.id, r.images, r.meta) == (s.id, s.images, s.meta)
        for m, n, t in zip(r.messages[1::2], s.messages[1::2], r.meta["qtypes"], strict=True):
            if m != n:  # only a named comparison, answered step by step; its conclusion is the one-step answer
                assert t in ("compare_named", "context") and ", so " in n["content"], (m, n)
                assert sw.short_form(n["content"]) == sw.short_form(m["content"])
                said += 1
        assert r.messages[0::2] == s.messages[0::2]  # the same questions
        for q, m, n, t in zip(s.messages[0::2], r.messages[1::2], s.messages[1::2], s.meta["qtypes"]):
            if q["content"].endswith(SHORT_ANSWER) and t == "compare_named":
                assert m == n and ", so " not in n["content"], (q, n)  # suffixed: the same one-word answer
                short += 1
    assert said >= 10, said
    assert split != "train" or short >= 3, short
    for q, a, t, scene in qa_turns(steps):  # every answer, steps included, recomputed from the scene
        if t == "compare_named" and scene is not None:
            check_answer(q, a, t, scene[0] if isinstance(scene, list) else scene)
    assert aligned(plain, steps) == said
    other = [Record(r.id, r.images, [*r.messages[:-1], {"role": "assistant", "content": "Red, so blue."}], r.meta)
             for r in steps]
    with pytest.raises(ValueError, match=f"record '{plain[0].id}'"):
        aligned(plain, other)
    k, turn = next((k, i) for k, r in enumerate(steps) for i, m in enumerate(r.messages)
                   if ", so " in m["content"] and not m["content"].split(", so ")[1].startswith(("the answer", "they")))
    wrong = [dict(m) for m in steps[k].messages]  # step by step, but concluding with the other object
    steps_part, said = wrong[turn]["content"].split(", so ")
    others = [x for x in re.findall(r"(?:^|and )(.+?) is ", steps_part) if x.lower() != said.split(" is ")[0]]
    wrong[turn]["content"] = f"{steps_part}, so {others[0][0].lower() + others[0][1:]} is {said.split(' is ')[1]}"
    with pytest.raises(ValueError, match=f"record '{steps[k].id}'"):
        aligned(plain, [*steps[:k], Record(steps[k].id, steps[k].images, wrong, steps[k].meta), *steps[k + 1:]])


@pytest.mark.parametrize("split,led", [("train", False), ("test", False), ("train", True)])
def test_the_generator_says_steps_by_row_and_value_first_as_the_told_runs_do(split, led):
    kw = dict(weights=sw.NATURAL_WEIGHTS, more_phrasings=True, short_p=0.35) if split == "train" else {}
    places = generate_records(split, 300, seed=5, reasoned=True, **kw).instruct
    lines = generate_records(split, 300, seed=5, reasoned=True, rows=True, value_first=True, value_led=led,
                             **kw).instruct
    changed = 0
    for r, s in zip(places, lines, strict=True):
        assert (r.id, r.images, r.meta, r.messages[0::2]) == (s.id, s.images, s.meta, s.messages[0::2])
        for m, n, t in zip(r.messages[1::2], s.messages[1::2], r.meta["qtypes"], strict=True):
            if m != n:  # a position's steps (with led, every step), or a 'which' naming the winner's value first
                assert t in ("compare_named", "context") and conclusion(m["content"]) == conclusion(n["content"])
                changed += 1
    assert changed >= 5, changed
    for q, a, t, scene in qa_turns(lines):
        if t == "compare_named" and scene is not None:
            check_answer(q, a, t, scene[0] if isinstance(scene, list) else scene)
    assert any(" row" in a and (", which is " if led else ", the ") in a.split(", so ")[-1]
               for _, a, _, _ in qa_turns(lines))
    for form in (dict(rows=True), dict(value_first=True), dict(value_led=True)):
        with pytest.raises(ValueError, match="need reasoned=True"):
            generate_records(split, 1, seed=5, **form)


def test_a_zoo_scale_builds_its_rounds_in_any_step_form_the_told_runs_measure():
    """`build_zoo.Scale`'s answer form names every step form of the told runs, and the generator takes it as is."""
    from dataclasses import replace

    scale = replace(build_zoo.TOY, reasoned=True, rows=True, value_led=True)
    form = build_zoo.answer_form(scale)
    assert form == {**dict.fromkeys(FORMS, True), "value_first": False}
    said = [a for _, a, t, _ in qa_turns(generate_records("train", 300, seed=5, **form).instruct)
            if t == "compare_named" and ", so " in a]
    assert said and all(re.match(r"(In the \w+ (row|column)|At |On |The (small|large) one) ", a) for a in said), said


def test_the_shipped_reasoned_ablation_started_from_the_shipped_model_on_todays_splits():
    """data/results/reasoned_ablation.json (chapter 7.6): both arms started from the shipped tiny-llava, and the
    step-by-step references it was scored against are the ones the generator writes today."""
    saved = json.loads((zoo.data_dir() / "results" / "reasoned_ablation.json").read_text())
    assert saved["settings"]["before_sha256"] == zoo.weights_digest(saved["settings"]["before"])
    for arm, reasoned in (("control", False), ("reasoned", True)):
        examples = saved["arms"][arm]["test"]["examples"]
        n = max(int(e["id"].rsplit("-", 1)[1]) for e in examples) + 1
        records = {r.id: r for r in generate_records("test", n, reasoned=reasoned).instruct}
        for e in examples:
            assert records[e["id"]].messages[2 * e["turn"] + 1]["content"] == e["reference"], (arm, e)
        assert any(", so " in e["reference"] for e in examples) == reasoned


def test_reasoned_ablation_refuses_bad_settings(capsys):
    for argv, said in ((["--steps", "0"], "--steps"), (["--round", "10"], "--round")):
        with pytest.raises(SystemExit):
            reasoned_ablation(argv)
        assert said in capsys.readouterr().err
