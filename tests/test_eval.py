"""VQA metrics on hand-made predictions whose right scores are known."""

import pytest

from minillava import eval as ev
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
