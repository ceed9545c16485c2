"""LLaVA's JSON records: every malformed record is refused with the file, the record and the problem named."""

import json

import pytest
from conftest import random_image

from minillava.data.records import DataError, load_records


def write(tmp_path, records, name="data.json"):
    random_image(8, 8).save(tmp_path / "a.png")
    (tmp_path / name).write_text(json.dumps(records))
    return tmp_path / name


def qa(*turns):
    return [{"from": f, "value": v} for f, v in turns]


GOOD = qa(("human", "<image>\nWhat color?"), ("gpt", "Red."))


@pytest.mark.parametrize("record, match", [
    ({"id": ["a"], "image": "a.png", "conversations": GOOD}, r"'id' must be a non-empty string or an integer"),
    ({"id": "", "image": "a.png", "conversations": GOOD}, r"'id' must be a non-empty string"),
    ({"id": "r1", "image": "a.png", "conversations": qa(("gpt", "Red."), ("human", "<image>\nWhat color?"))},
     r"id 'r1'\): turn 0 is from 'assistant', expected 'user'"),
    ({"id": "r2", "image": "a.png", "conversations": GOOD + qa(("gpt", "Blue."))},
     r"id 'r2'\): turn 2 is from 'assistant', expected 'user'"),
    ({"id": "r3", "image": "a.png", "conversations": qa(("human", "<image>\nHi"), ("gpt", " "), ("human", "And?"),
                                                        ("gpt", "Red."))}, r"id 'r3'\): turn 1 is an empty answer"),
    ({"id": "r4", "image": "a.png", "conversations": qa(("human", "<image>\nHi"))}, r"id 'r4'\): no answer"),
    ({"id": "r5", "conversations": GOOD}, r"id 'r5'\): 1 '<image>' placeholders but 0 images"),
    ({"id": "r6", "image": "b.png", "conversations": GOOD}, r"id 'r6'\): image '.*b.png' not found"),
])
def test_malformed_records_are_refused(tmp_path, record, match):
    path = write(tmp_path, [record])
    with pytest.raises(DataError, match=match) as e:
        load_records(path)
    assert "data.json', record 0" in str(e.value)


def test_a_system_turn_may_open_the_conversation(tmp_path):
    [r] = load_records(write(tmp_path, [{"id": 7, "image": "a.png",
                                         "conversations": qa(("system", "Be brief."), *[(t["from"], t["value"])
                                                                                        for t in GOOD])}]))
    assert r.id == "7" and [m["role"] for m in r.messages] == ["system", "user", "assistant"]
