"""LLaVA's data format, read and checked.

A data file is a JSON list of records, as LCS-558K, LLaVA-Instruct-150K and llava_v1_5_mix665k are:

    {"id": "000123", "image": "000123.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"},
                       {"from": "gpt", "value": "Red."}]}

"image" is absent for text-only records. minillava also reads a list of paths there (one per `<image>`
placeholder, in order), which is how multi-image conversations are written. Every record is checked when the
file is read, and a problem is reported with the file, the record's id and what is wrong -- never skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..templates import IMAGE_PLACEHOLDER, from_llava, to_llava
from ..utils import atomic_file, existing_file


@dataclass
class Record:
    """One conversation: its id, image paths (resolved against the image folder) and messages."""

    id: str
    images: list[Path] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # anything else the record carried (e.g. ShapesWorld's scene)


class DataError(ValueError):
    """A data file or record that cannot be used, with the file and record named."""


def parse_record(raw, image_dir: Path | None, where: str, check_files: bool = True) -> Record:
    """One raw JSON record -> `Record`, or a `DataError` naming `where` (file and record) and the problem:
    malformed fields, turns out of order (`check_turns`), text that is not valid Unicode (a lone surrogate,
    which no tokenizer reads), placeholders that do not match the images, missing image files."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    rid = raw.get("id")
    where = f"{where} (id '{rid}')" if rid is not None else where
    if rid is None:
        raise DataError(f"{where}: missing 'id'")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise DataError(f"{where}: 'id' must be a non-empty string or an integer, got {rid!r}")
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    try:
        messages = from_llava(convs)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{where}: {e}") from None
    check_turns(messages, where)
    image = raw.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    n_slots = sum(str(m["content"]).count(IMAGE_PLACEHOLDER) for m in messages)
    if n_slots != len(paths):
        raise DataError(f"{where}: {n_slots} '{IMAGE_PLACEHOLDER}' placeholders but {len(paths)} images")
    resolved = [Path(image_dir) / p if image_dir is not None else Path(p) for p in paths]
    if check_files:
        for p in resolved:
            if not p.is_file():
                raise DataError(f"{where}: image '{p}' not found")
    meta = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations")}
    return Record(id=str(rid), images=resolved, messages=messages, meta=meta)


def check_turns(messages: list[dict], where: str) -> None:
    """Turns alternate user, assistant, user, ... after an optional system message, as LLaVA's preprocessing
    asserts, and every answer says something (an empty one would train the end-of-turn token alone) and holds
    no "<image>" (images go in the questions)."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if m["role"] != expected:
            raise DataError(f"{where}: turn {i} is from '{m['role']}', expected '{expected}' (turns alternate "
                            "human, gpt, human, ...)")
        if expected == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: turn {i} is an empty answer")
        if expected == "assistant" and IMAGE_PLACEHOLDER in m["content"]:
            raise DataError(f"{where}: turn {i} is an answer holding '{IMAGE_PLACEHOLDER}'; images go in the "
                            "human turns")
    if not any(m["role"] == "assistant" for m in turns):
        raise DataError(f"{where}: no answer (training needs one to learn from; evaluation needs the "
                        "reference answer)")


def read_raw(path: str | Path, image_dir: str | Path | None = None, check_files: bool = True) -> tuple[list, Path]:
    """A LLaVA-format file's records as raw JSON objects, unchecked, and the image folder (default: the file's
    folder). Refuses, naming the file, what is wrong with the file as a whole: missing, not JSON, not a list,
    empty, no image folder (ids used twice: `duplicate_ids`). A large file is read without parsing its records."""
    path = existing_file(path, "data file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))  # (a byte-order mark is tolerated)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        lines = isinstance(e, json.JSONDecodeError) and e.msg == "Extra data" and e.lineno > 1
        hint = ("; it looks like JSON Lines, one record per line: LLaVA's format is one JSON list of records"
                if lines else "")
        raise DataError(f"data file '{path}': not valid JSON in UTF-8 ({e}){hint}") from None
    if not isinstance(raw, list):
        raise DataError(f"data file '{path}': expected a JSON list of records, got {type(raw).__name__}")
    if not raw:
        raise DataError(f"data file '{path}': has no records")
    image_dir = Path(image_dir) if image_dir is not None else path.parent
    if check_files and not image_dir.is_dir():
        raise FileNotFoundError(f"image folder '{image_dir}': not found")
    return raw, image_dir


def duplicate_ids(raw: list) -> list[str]:
    """One line per id that more than one record carries: "id 'x' appears 3 times (records 4, 9, 12)"."""
    ids = [str(r["id"]) if isinstance(r, dict) and isinstance(r.get("id"), (str, int))
           and not isinstance(r["id"], bool) else None for r in raw]
    twice = {rid for rid, n in Counter(ids).items() if n > 1 and rid is not None}
    where: dict[str, list[int]] = {}
    for i, rid in enumerate(ids):
        if rid in twice:
            where.setdefault(rid, []).append(i)
    return [f"id '{rid}' appears {len(at)} times (records {', '.join(map(str, at))})" for rid, at in where.items()]


def load_records(path: str | Path, image_dir: str | Path | None = None, check_files: bool = True) -> list[Record]:
    """Read a LLaVA-format JSON file (a list of records) and check every record.

    image_dir: the folder image paths are relative to (default: the JSON file's folder).
    """
    raw, image_dir = read_raw(path, image_dir, check_files)
    records = [parse_record(r, image_dir, f"data file '{path}', record {i}", check_files) for i, r in enumerate(raw)]
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise DataError(f"data file '{path}': id '{r.id}' appears more than once")
        seen.add(r.id)
    return records


def record_to_json(record: Record, image_dir: str | Path | None = None) -> dict:
    """A `Record` back to LLaVA's JSON form (image paths relative to `image_dir` where possible)."""
    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(image_dir)) if image_dir is not None else str(p)
        except ValueError:
            return str(p)

    out: dict = {"id": record.id}
    if record.images:
        out["image"] = rel(record.images[0]) if len(record.images) == 1 else [rel(p) for p in record.images]
    out["conversations"] = to_llava(record.messages)
    out.update(record.meta)
    return out


def save_records(records: list[Record], path: str | Path, image_dir: str | Path | None = None) -> None:
    """Write records as a LLaVA-format JSON file, atomically."""
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent
    with atomic_file(path) as f:
        json.dump([record_to_json(r, image_dir) for r in records], f, indent=1)
