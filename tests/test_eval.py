"""VQA metrics on hand-made predictions whose right scores are known."""

import json

import pytest
import torch

import minillava as ml
from minillava import evaluation as ev
from minillava.data.records import Record


@pytest.mark.parametrize("pred,ref,exact,contains", [
    ("Red.", "Red.", True, True),
    ("red", "Red.", True, True),
    ("The circle is red.", "Red.", False, True),
    ("Three.", "3.", True, True),
    ("3", "Three.", True, True),
    ("A star.", "Star", True, True),
    ("Top left.", "Top left.", True, True),
    ("Top right.", "Top left.", False, False),
    ("[0.05, 0.05, 0.30, 0.30]", "[0.05, 0.05, 0.30, 0.30]", True, True),
    ("[0.05, 0.05, 0.30, 0.31]", "[0.05, 0.05, 0.30, 0.30]", False, False),
    ("Yes, there is a blue star.", "Yes.", False, True),
    ("Yesterday.", "Yes.", False, False),  # contains works on whole words
    ("", "Red.", False, False),
])
def test_matching(pred, ref, exact, contains):
    assert ev.exact_match(pred, ref) == exact
    assert ev.contains(pred, ref) == contains


def test_questions_follow_turns_with_gold_history():
    r = Record("r1", [], [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "Red."},
                          {"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Top."}],
               {"qtypes": ["color", "position"]})
    qs = ev.questions([r], suffix=ev.SHORT_ANSWER)
    assert [q["qtype"] for q in qs] == ["color", "position"]
    assert qs[1]["messages"][1]["content"] == "Red."  # the reference answer, not the model's
    assert qs[1]["messages"][-1]["content"] == "Where?" + ev.SHORT_ANSWER
    assert r.messages[2]["content"] == "Where?"  # the record itself is untouched


def test_score_per_type():
    qs = [{"qtype": "color", "reference": "Red."}, {"qtype": "color", "reference": "Blue."},
          {"qtype": "count", "reference": "2."}, {"qtype": "count", "reference": "3."}]
    s = ev.score(qs, ["Red.", "It is blue.", "2", "4."])
    assert s["by_type"]["color"] == {"n": 2, "exact": 0.5, "contains": 1.0}
    assert s["by_type"]["count"] == {"n": 2, "exact": 0.5, "contains": 0.5}
    assert s["overall"] == {"n": 4, "exact": 0.5, "contains": 0.75}
    assert "overall" in ev.format_table(s)
    with pytest.raises(ValueError, match="3 answers for 4 questions"):
        ev.score(qs, ["a", "b", "c"])


def test_pope_metrics_on_known_answers():
    refs = ["Yes.", "Yes.", "No.", "No."]
    m = ev.pope_metrics(["Yes.", "No.", "Yes, there is.", "No."], refs)
    assert m == {"n": 4, "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    always_yes = ev.pope_metrics(["Yes."] * 4, refs)
    assert always_yes["recall"] == 1.0 and always_yes["precision"] == 0.5 and always_yes["yes_ratio"] == 1.0
    with pytest.raises(ValueError, match="3 answers for 4 POPE questions"):
        ev.pope_metrics(["Yes."] * 3, refs)


@pytest.mark.parametrize("answer, yes", [
    ("Yes.", True), ("No.", False), ("Yes, but not the big one.", False), ("There is a red circle.", True),
    ("There is not a red circle.", False), ("No, there is none.", False), ("", True), ("Yeah", True),
    ("Yes. No star is there.", True)])
def test_pope_reads_answers_as_llavas_eval_pope(answer, yes):
    """LLaVA's eval_pope.py: the first sentence, commas dropped, is "no" if a word is No, no or not; else "yes"."""
    assert ev.pope_yes(answer) is yes


def test_empty_answers_and_bad_answer_files_never_score(eval_files, tmp_path):
    assert not ev.exact_match("", "A.") and not ev.exact_match("The.", "The.")
    with pytest.raises(ValueError, match="no questions to score"):
        ev.score([], [])
    with pytest.raises(ValueError, match="no questions to check"):
        ev.rules_report([], [])
    with pytest.raises(ValueError, match="10 human answers, got 1"):
        ev.vqa_soft_accuracy("red", ["red"])
    assert ev.vqa_normalize("(w-2)-x") == "w 2 x"  # the official script reads "- " on the answer as given
    _, data = eval_files
    qs = ev.questions(data.instruct)[:2]
    for rows, match in (([{"id": q["id"], "turn": q["turn"], "answer": None} for q in qs], "is None, not text"),
                        ([{"id": qs[0]["id"], "turn": qs[0]["turn"], "answer": "x"}] * 2, "two answers for question")):
        (tmp_path / "a.json").write_text(json.dumps(rows))
        with pytest.raises(ValueError, match=match):
            ev.score_answer_file(qs, tmp_path / "a.json")


def test_pope_records_are_balanced_and_true():
    from minillava.data import shapesworld as sw

    data = sw.generate_records("test", 30, seed=3, kinds=("conversation",))
    freq = sw.combo_frequencies(data.scenes.values())
    for strategy in sw.POPE_STRATEGIES:
        probes = sw.pope_records(data.instruct, strategy, freq=freq)
        yes = [p for p in probes if p.messages[1]["content"] == "Yes."]
        assert len(yes) * 2 == len(probes) > 0
        for p in probes:
            scene = sw.Scene.from_dict(p.meta["scene"])
            color, shape = p.messages[0]["content"].split("Is there a ")[1].split()[:2]
            assert ((color, shape) in sw.objects_present(scene)) == (p.messages[1]["content"] == "Yes.")
    with pytest.raises(ValueError, match="POPE strategy 'weird'"):
        sw.pope_records(data.instruct, "weird")


def test_caption_metrics_on_known_captions():
    from minillava.data import shapesworld as sw

    bg = sw.Background((250, 250, 250), (240, 240, 240), 0, 0)
    scene = sw.Scene((sw.Obj("circle", "red", "large", (0, 0)), sw.Obj("star", "blue", "small", (1, 1))), bg)
    perfect = "A large red circle at the top left and a small blue star in the center."
    m = sw.caption_metrics([perfect], [scene])
    assert m["object_precision"] == 1.0 and m["object_recall"] == 1.0
    assert m["size_accuracy"] == 1.0 and m["position_accuracy"] == 1.0
    wrong = "A small red circle at the bottom and a green square."
    m = sw.caption_metrics([wrong], [scene])
    assert m["object_precision"] == 0.5 and m["object_recall"] == 0.5
    assert m["size_accuracy"] == 0.0 and m["position_accuracy"] == 0.0
    m = sw.caption_metrics([sw.describe(scene)], [scene])  # the detailed-description form: counts are no mentions
    assert m["mentions_per_caption"] == 2 and m["object_precision"] == 1.0 and m["position_accuracy"] == 1.0
    moved = sw.describe(sw.Scene((sw.Obj("circle", "red", "large", (2, 2)),), bg))
    m = sw.caption_metrics([moved], [scene])
    assert m["object_precision"] == 1.0 and m["object_recall"] == 0.5 and m["position_accuracy"] == 0.0
    assert sw.caption_mentions("There are 2 red circles and no blue stars. Two squares.") == []  # no one object
    late = "A red circle. A large red circle at the top left."  # the placed mention gets the object it names
    assert sw.caption_metrics([late], [scene])["position_accuracy"] == 1.0
    twice = "A large red circle at the top left. A red circle in the center."  # one red circle, said twice
    m = sw.caption_metrics([twice], [scene])
    assert m["object_precision"] == 0.5 and m["object_recall"] == 0.5 and m["position_accuracy"] == 1.0


# ---- the command line ------------------------------------------------------------------------------------------
@pytest.fixture
def eval_files(tmp_path, model, processor):
    from conftest import random_image

    from minillava.data import shapesworld as sw
    from minillava.data.records import save_records

    data = sw.generate_records("test", 6, seed=1, kinds=("conversation",), image_dir=tmp_path)
    for name in data.scenes:
        random_image(32, 32).save(tmp_path / name)  # the tiny model's 32 px tower; content is irrelevant here
    for r in data.instruct:  # one short question each: the test tokenizer is far less compact than the zoo's
        r.messages[:] = r.messages[:2]
        r.meta["qtypes"] = r.meta["qtypes"][:1]
    save_records(data.instruct, tmp_path / "q.json", image_dir=tmp_path)
    ml.save(model, processor, tmp_path / "model")
    return tmp_path, data


def test_eval_cli_vqa_and_pope(eval_files, capsys):
    from minillava.cli import main
    from minillava.data import shapesworld as sw

    d, data = eval_files
    assert main(["eval", "--model", str(d / "model"), "--data", str(d / "q.json"), "--out", str(d / "r.json")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((d / "r.json").read_text())
    # every question of the file answered once, and scored on those answers
    qs = ev.questions(data.instruct)
    assert [(p["id"], p["turn"], p["reference"]) for p in saved["predictions"]] == [
        (q["id"], q["turn"], q["reference"]) for q in qs]
    right = sum(ev.exact_match(p["answer"], p["reference"]) for p in saved["predictions"])
    assert saved["overall"]["n"] == len(qs) == 6 and saved["overall"]["exact"] == right / 6
    assert out.startswith(saved["table"] + "\n") and "overall" in saved["table"]
    assert main(["eval", "--model", str(d / "model"), "--data", str(d / "q.json"), "--kind", "pope",
                 "--out", str(d / "pope.json")]) == 0
    pope = json.loads((d / "pope.json").read_text())["pope"]
    # per image, up to 3 objects that are there and as many that are not
    n = sum(2 * min(3, len(set(sw.objects_present(s)))) for s in data.scenes.values())
    assert {k: v["n"] for k, v in pope.items()} == dict.fromkeys(sw.POPE_STRATEGIES, n)
    assert "adversarial" in capsys.readouterr().out


def test_eval_cli_scores_an_answer_file(eval_files, capsys):
    from minillava.cli import main

    d, data = eval_files
    qs = ev.questions(data.instruct)
    (d / "a.json").write_text(json.dumps([{"id": q["id"], "turn": q["turn"], "answer": q["reference"]} for q in qs]))
    assert main(["eval", "--data", str(d / "q.json"), "--answers", str(d / "a.json")]) == 0
    assert "100.0%" in capsys.readouterr().out.splitlines()[-1]
    (d / "bad.json").write_text(json.dumps([{"id": "nope", "turn": 0, "answer": "Red."}]))
    assert main(["eval", "--data", str(d / "q.json"), "--answers", str(d / "bad.json")]) == 2
    assert "does not match the questions" in capsys.readouterr().err


def test_eval_cli_bad_input(eval_files, capsys):
    from minillava.cli import main

    d, _ = eval_files
    (d / "noref.json").write_text(json.dumps([{"id": "x", "image": "test_000000.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}]}]))
    assert main(["eval", "--model", str(d / "model"), "--data", str(d / "noref.json")]) == 2
    assert "no answer" in capsys.readouterr().err
    (d / "empty_model").mkdir()
    assert main(["eval", "--model", str(d / "empty_model"), "--data", str(d / "q.json")]) == 2
    assert "model config" in capsys.readouterr().err
    (d / "notmodel").mkdir()
    (d / "notmodel" / "config.json").write_text('{"model_type": "bert"}')
    assert main(["eval", "--model", str(d / "notmodel"), "--data", str(d / "q.json")]) == 2
    assert "names no model minillava knows" in capsys.readouterr().err
    for args, message in ((["--limit", "0"], "--limit 0: expected a number of records"),
                          (["--limit", "-1"], "--limit -1"),  # (not a slice dropping the last record)
                          (["--out", str(d)], "a folder is there"),  # refused before the evaluation runs
                          (["--out", str(d / "q.json" / "r.json")], "is a file, not a folder")):
        assert main(["eval", "--model", str(d / "nope"), "--data", str(d / "q.json"), *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", "--data", str(d / "q.json"), "--answers", str(d / "q.json"), "--kind", "pope"]) == 2
    assert "--answers scores VQA answers" in capsys.readouterr().err
    assert main(["eval", "--model", str(d / "model"), "--data", str(d / "q.json"), "--kind", "multiturn"]) == 2
    assert "is not of ShapesWorld's multiturn split" in capsys.readouterr().err


# ---- VQAv2's soft accuracy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, normalised", [
    ("Two dogs!", "2 dogs"), ("It's a cat.", "it's cat"), ("dont know", "don't know"), ("1,000", "1000"),
    ("3.5", "3.5"), ("Yes.", "yes"), ("black-and-white", "black and white"), ("none", "0"), ("  The\tend\n", "end"),
])
def test_vqa_normalisation(text, normalised):
    assert ev.vqa_normalize(text) == normalised


@pytest.mark.parametrize("humans, soft", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_counts_humans_leaving_one_out(humans, soft):
    answers = ["2"] * humans + ["3"] * (10 - humans)
    assert ev.vqa_soft_accuracy("Two.", answers) == pytest.approx(soft)  # normalised before matching


def test_vqa_soft_accuracy_in_scores_and_eval_files(eval_files, capsys):
    from minillava.cli import main

    d, data = eval_files
    records = json.loads((d / "q.json").read_text())
    for r in records:  # VQAv2 style: ten human answers beside the single reference
        r["answers"] = [r["conversations"][1]["value"]] * 2 + ["something else"] * 8
    (d / "v.json").write_text(json.dumps(records))
    qs = ev.questions(data.instruct)
    (d / "a.json").write_text(json.dumps([{"id": q["id"], "turn": q["turn"], "answer": q["reference"]} for q in qs]))
    assert main(["eval", "--data", str(d / "v.json"), "--answers", str(d / "a.json"), "--out", str(d / "r.json")]) == 0
    result = json.loads((d / "r.json").read_text())
    assert result["overall"]["exact"] == 1.0 and result["overall"]["vqa_soft"] == pytest.approx(0.6)
    assert "VQA acc" in capsys.readouterr().out
    records[0]["answers"] = "red"  # not a list: named, refused
    (d / "bad.json").write_text(json.dumps(records))
    assert main(["eval", "--data", str(d / "bad.json"), "--answers", str(d / "a.json")]) == 2
    assert f"record '{records[0]['id']}': 'answers' must be a list of 10 strings" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_compiled_decoding_gives_the_same_answers(eval_files):
    """`minillava eval --compile` decodes with the static cache and the compiled step: the same predictions."""
    from minillava.cli import main

    d, _ = eval_files
    for flag, name in (([], "eager.json"), (["--compile"], "compiled.json")):
        assert main(["eval", "--model", str(d / "model"), "--data", str(d / "q.json"), "--out", str(d / name),
                     *flag]) == 0
    eager, compiled = (json.loads((d / n).read_text()) for n in ("eager.json", "compiled.json"))
    assert compiled["predictions"] == eager["predictions"] and len(eager["predictions"]) == 6


# ---- MMBench: multiple choice and CircularEval ------------------------------------------------------------------
def test_mc_prompt_is_llava_15s_mmbench_layout():
    assert ev.mc_prompt("What color is it?", ["red", "blue"]) == (
        "What color is it?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly.")
    with pytest.raises(ValueError, match="2 to 8 options"):
        ev.mc_prompt("Q?", ["only one"])


@pytest.mark.parametrize("answer, picked", [("B", 1), ("B.", 1), ("(C) green", 2), ("A) red", 0), ("C: green", 2),
                                            (" d", None), ("D", None), ("It is blue.", 1), ("Blue or red?", None),
                                            ("Pink.", None), ("Another one.", None),
                                            ("A blue one.", 1)])  # the article, not option A
def test_match_option_reads_a_letter_or_one_options_text(answer, picked):
    assert ev.match_option(answer, ["red", "blue", "green"]) == picked


def test_circular_eval_catches_a_letter_biased_guesser():
    """A model that always answers "A" is right once in four passes: 25% plain accuracy over questions whose
    right option is first, 0% under CircularEval. One that reads the options by content is right in every pass."""
    options = ["red", "blue", "green", "yellow"]
    always_a = ev.circular_eval(lambda prompt: "A", "What color is the circle?", options, answer=0)
    assert always_a == {"picked": [0, 1, 2, 3], "single": True, "circular": False}
    prompts = []

    def reader(prompt):  # answers with the letter of "red", wherever the rotation put it
        prompts.append(prompt)
        line = next(l for l in prompt.splitlines() if l.endswith(". red"))
        return line[0]

    sure = ev.circular_eval(reader, "What color is the circle?", options, answer=0)
    assert sure == {"picked": [0, 0, 0, 0], "single": True, "circular": True}
    assert [p.splitlines()[1] for p in prompts] == ["A. red", "A. blue", "A. green", "A. yellow"]  # each first once
    with pytest.raises(ValueError, match="answer index 4"):
        ev.circular_eval(reader, "Q?", options, answer=4)


def test_paired_bootstrap_intervals_and_pairing():
    gen = torch.Generator().manual_seed(0)
    n = 1200
    base = (torch.rand(n, generator=gen) < 0.8).float()
    one = ev.paired_bootstrap(base)
    assert one["n"] == n and one["exact"] == pytest.approx(base.mean().item()) and "diff" not in one
    lo, hi = one["ci"]
    se = (0.8 * 0.2 / n) ** 0.5
    assert lo < one["exact"] < hi and 3 * se < hi - lo < 5 * se  # about +-1.96 SE
    assert ev.paired_bootstrap(base, level=0.5)["ci"][1] - ev.paired_bootstrap(base, level=0.5)["ci"][0] < hi - lo
    # one answer in a hundred changes: the paired interval of the difference is far narrower than the unpaired
    # 2 * 1.96 * sqrt(2) SE the two accuracies' own intervals imply
    flipped = torch.where(torch.rand(n, generator=gen) < 0.01, 1 - base, base)
    pair = ev.paired_bootstrap(flipped, base)
    assert pair["diff"] == pytest.approx((flipped - base).mean().item())
    assert pair["diff_ci"][0] <= pair["diff"] <= pair["diff_ci"][1]
    assert pair["diff_ci"][1] - pair["diff_ci"][0] < 0.3 * (hi - lo) * 2 ** 0.5
    worse = base * (torch.rand(n, generator=gen) > 0.1)  # wrong on a tenth more: wholly below zero
    assert ev.paired_bootstrap(worse, base)["diff_ci"][1] < 0
    assert ev.paired_bootstrap(base, base)["diff_ci"] == [0.0, 0.0]
    assert ev.paired_bootstrap(base, seed=1)["ci"] != one["ci"] and ev.paired_bootstrap(base) == one  # seeded
    with pytest.raises(ValueError, match="1199 scores for 1200"):
        ev.paired_bootstrap(base, base[1:])
    with pytest.raises(ValueError, match="one score per question"):
        ev.paired_bootstrap([])
