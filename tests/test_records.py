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


def test_a_utf8_file_reads_the_same_under_any_locale(tmp_path):
    """Data files are UTF-8 (JSON's encoding), whatever the locale says; a byte-order mark is tolerated."""
    import os
    import subprocess
    import sys

    path = write(tmp_path, [{"id": "café", "image": "a.png", "conversations": qa(("human", "<image>\nCafé?"),
                                                                                 ("gpt", "Oui."))}])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    code = "from minillava.data.records import load_records; import sys; print(load_records(sys.argv[1])[0].id)"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                         encoding="utf-8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "café"


def test_json_lines_and_folders_are_named_for_what_they_are(tmp_path):
    write(tmp_path, [])
    record = {"id": "a", "image": "a.png", "conversations": GOOD}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match="looks like JSON Lines, one record per line: LLaVA's format is one JSON list"):
        load_records(tmp_path / "data.jsonl")
    with pytest.raises(FileNotFoundError, match="data file '.*': a folder, not a file"):
        load_records(tmp_path)
