"""`minillava data check FILE`: a whole LLaVA-format file checked ahead of training, in parallel.

Every record is parsed as training parses it (`records.parse_record`) and, given a tokenizer and template
(`--model`, or `--lm` + `--vision` + `--template`), tokenized as training tokenizes it
(`training.data.encode_record`), which refuses samples longer than `--max-length`. Every image the records name
is then opened and decoded once. Every problem is reported, naming the record (its position and id) or the
image (and the records that use it); the exit code is 1 when there is any. The work goes in chunks to a pool
of processes, with a progress bar.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .records import DataError, duplicate_ids, parse_record, read_raw

CHUNK = 256  # records or images per task handed to a worker process


@dataclass
class CheckReport:
    """What `check_file` found: counts, every problem (one line each) and, with a tokenizer, the longest sample."""

    path: str
    records: int = 0
    images: int = 0  # distinct image files the records name
    bad_records: list[str] = field(default_factory=list)  # "record 12 (id 'x'): what is wrong"
    bad_images: list[str] = field(default_factory=list)  # "image 'a.png': what is wrong (used by 'x', 'y')"
    longest: int | None = None  # tokens in the longest sample (None: not tokenized)

    @property
    def ok(self) -> bool:
        return not (self.bad_records or self.bad_images)

    def summary(self) -> str:
        verdict = "ok" if self.ok else f"{len(self.bad_records)} bad record(s), {len(self.bad_images)} bad image(s)"
        longest = f"; the longest sample has {self.longest} tokens" if self.longest is not None else ""
        return f"data file '{self.path}': {self.records:,} records, {self.images:,} images: {verdict}{longest}"


def check_file(path: str | Path, images: str | Path | None = None, workers: int | None = None, processor=None,
               decode: bool = True, progress: bool = False) -> CheckReport:
    """Check every record and image of a LLaVA-format file; returns a `CheckReport` listing every problem.

    images: the folder image paths are relative to (default: the file's folder). workers: processes (None: one
    per CPU; 0: check in this process). processor: a `Processor` to tokenize with (its template, image tokens
    and max_length), or None to check records without tokenizing. decode: decode every image fully (False:
    read headers only; faster, but a truncated JPEG passes). Raises, naming the file, only when the file as a
    whole cannot be read (missing, not JSON, not a list, empty, no image folder).
    """

    raw, image_dir = read_raw(path, images)
    report = CheckReport(str(path), records=len(raw), bad_records=duplicate_ids(raw))
    state = (image_dir, processor, decode)
    if workers != 0:
        workers = min(workers or os.cpu_count() or 1, -(-len(raw) // CHUNK))  # no more processes than chunks
    pool = None if workers == 0 else ProcessPoolExecutor(workers, initializer=_init, initargs=state)
    if pool is None:
        _init(*state)
    try:
        tasks = [(i, raw[i:i + CHUNK]) for i in range(0, len(raw), CHUNK)]
        records = _run(pool, _check_records, tasks, len(raw), "records", progress)
        report.bad_records += [error for _, error, _, _ in records if error]
        lengths = [n for *_, n in records if n is not None]
        report.longest = max(lengths) if lengths else None
        users: dict[str, list[str]] = {}
        for i, _, paths, _ in records:
            for p in paths:
                users.setdefault(p, []).append(str(raw[i]["id"]))
        names = sorted(users)
        report.images = len(names)
        tasks = [(names[i:i + CHUNK],) for i in range(0, len(names), CHUNK)]
        found = _run(pool, _check_images, tasks, len(names), "images", progress)
        report.bad_images = _image_problems(found, users, image_dir)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return report


def _run(pool, fn, tasks: list[tuple], total: int, what: str, progress: bool) -> list[tuple]:
    """fn(*task) for every task, in the pool (None: here), with a progress bar; their results, flattened, sorted."""
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=total, desc=f"checking {what}", unit=what[:-1], disable=not progress, mininterval=0.5) as bar:
        done = (fn(*t) for t in tasks) if pool is None else (
            f.result() for f in as_completed([pool.submit(fn, *t) for t in tasks]))
        for results in done:
            out += results
            bar.update(len(results))
    return sorted(out, key=lambda r: r[0])


def _image_problems(found: list[tuple[str, str | None]], users: dict[str, list[str]], image_dir: Path) -> list[str]:
    """A line per bad image, naming the records that use it; one line when none of them exists (a wrong
    image folder, not hundreds of thousands of missing files)."""
    missing = [p for p, error in found if error and error.endswith(": not found")]
    if len(found) > 1 and len(missing) == len(found):
        return [f"none of the {len(found):,} images is in the image folder '{image_dir}' (the first: '{missing[0]}'); "
                "is it the right folder (--images)?"]
    return [f"{error} (used by {_quoted(users[p])})" for p, error in found if error]


def _quoted(ids: list[str], most: int = 3) -> str:
    shown = ", ".join(f"'{i}'" for i in ids[:most])
    return f"record{'s' if len(ids) > 1 else ''} {shown}" + (f" and {len(ids) - most} more" if len(ids) > most else "")


# ---- what each worker process does --------------------------------------------------------------------------------
_STATE: dict = {}  # set in each worker by `_init`: the image folder, the processor (or None), whether to decode


def _init(image_dir: Path, processor, decode: bool) -> None:
    _STATE.update(image_dir=image_dir, processor=processor, decode=decode)


def _check_records(start: int, chunk: list) -> list[tuple]:
    """Records start, start+1, ... -> (index, problem or None, image paths, tokens or None) each. Images are
    checked apart (`_check_images`), once each however many records use them."""
    from ..training.data import encode_record

    out = []
    for i, raw in enumerate(chunk, start):
        try:
            record = parse_record(raw, _STATE["image_dir"], f"record {i}", check_files=False)
        except DataError as e:
            out.append((i, str(e), [], None))
            continue
        error = n_tokens = None
        if _STATE["processor"] is not None:
            try:
                n_tokens = len(encode_record(record, _STATE["processor"])["input_ids"])
            except DataError as e:
                error = f"record {i} (id '{record.id}'): {str(e).removeprefix(f'record {record.id!r}: ')}"
        out.append((i, error, [str(p) for p in record.images], n_tokens))
    return out


def _check_images(paths: list[str]) -> list[tuple[str, str | None]]:
    """Image files -> (path, problem or None) each: decoded as training decodes them (and, with a processor,
    checked against its preprocessing), or only their headers checked (`decode` False)."""
    from ..vision import check_image_file, load_image

    out = []
    processor = _STATE["processor"]
    for p in paths:
        try:
            if _STATE["decode"]:
                image = load_image(p)
                if processor is not None:
                    processor.image_processor.check(image, p)
            else:
                check_image_file(p)
            out.append((p, None))
        except (ValueError, OSError) as e:
            out.append((p, str(e)))
    return out


# ---- a tokenizer and template to check with, without loading any weights -----------------------------------------
def check_processor(model: str | None = None, lm: str | None = None, vision: str | None = None,
                    template: str | None = None, max_length: int | None = None):
    """The `Processor` training would encode with, built from configs and tokenizers only (no weights), or None
    when neither `model` nor `lm` is given. model: a zoo name or minillava model folder (its own processor), or a
    stage-1 output (its backbones, template "plain"). lm + vision: a language model's tokenizer, and a vision
    backbone whose patch count sets the tokens per image; template is then required. max_length: overrides the
    context length (default: the language model's)."""
    from ..checkpoints import STAGE1_FORMAT
    from ..processor import PROCESSOR_NAME, Processor
    from ..utils import read_json
    from ..zoo import resolve

    if model and (lm or vision):
        raise ValueError("--model and --lm/--vision: give a model, or a language model and a vision backbone")
    if model:
        folder = Path(resolve(model))
        if (folder / PROCESSOR_NAME).is_file():
            processor = Processor.from_pretrained(folder)
        elif read_json(folder / "config.json", what="model config").get("format") == STAGE1_FORMAT:
            cfg = read_json(folder / "config.json", what="stage-1 config")
            processor = _backbone_processor(cfg["lm"], cfg["vision"], template or "plain")
        else:
            raise ValueError(f"model '{model}': no {PROCESSOR_NAME} and not a stage-1 output; give --lm, --vision "
                             "and --template instead")
        processor = processor.with_template(template) if template else processor
    elif lm or vision:
        if not (lm and vision and template):
            raise ValueError("--lm, --vision and --template go together: the tokenizer, the image tokens (from the "
                             "vision backbone's patch count) and the layout")
        processor = _backbone_processor(lm, vision, template)
    else:
        return None
    if max_length is not None:
        processor.max_length = max_length
    return processor


def _backbone_processor(lm: str, vision: str, template: str):
    """Processor of a language model's tokenizer (+ `<image>`, as `load_lm` adds it) and a vision backbone's
    image size and patch count (CLS dropped, LLaVA's default), from their configs."""
    from transformers import AutoConfig, AutoTokenizer

    from ..processor import Processor
    from ..vision import ImageProcessor
    from ..zoo import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(lm))
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vcfg = AutoConfig.from_pretrained(resolve(vision))
    vcfg = getattr(vcfg, "vision_config", vcfg)
    context = getattr(AutoConfig.from_pretrained(resolve(lm)), "max_position_embeddings", None)
    tokens = (vcfg.image_size // vcfg.patch_size) ** 2
    return Processor(tokenizer, ImageProcessor(image_size=vcfg.image_size), tokens, template, context)


# ---- the command line -----------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillava data check",
                                description="Check every record and image of a LLaVA-format JSON file before "
                                            "training on it; every problem is listed, the exit code is 1 if any.")
    p.add_argument("file", help="the LLaVA-format JSON file (a list of records)")
    p.add_argument("--images", default=None, help="the folder image paths are relative to (default: the file's "
                                                  "folder)")
    p.add_argument("--workers", type=int, default=None, help="processes to check with (default: one per CPU; 0: "
                                                             "this process only)")
    p.add_argument("--model", default=None, help="also tokenize every record as training would, with this model's "
                                                 "tokenizer, template and context (a zoo name, model folder or "
                                                 "stage-1 output; no weights are loaded)")
    p.add_argument("--lm", default=None, help="or: tokenize with this language model's tokenizer (with --vision "
                                              "and --template)")
    p.add_argument("--vision", default=None, help="the vision backbone whose patch count sets the tokens per image "
                                                  "(with --lm)")
    p.add_argument("--template", default=None, help="the chat template to render with (required with --lm; "
                                                    "replaces the model's with --model)")
    p.add_argument("--max-length", type=int, default=None, help="longest sample in tokens, image tokens included "
                                                                "(default: the language model's context)")
    p.add_argument("--no-decode", dest="decode", action="store_false", help="check image headers only (faster; a "
                                                                            "truncated JPEG passes)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """`minillava data check`: 0 when the file is fine, 1 when anything in it is bad (each problem printed on
    stdout, then a summary), 2 when the file or the options cannot be used at all (said on stderr)."""
    args = parser().parse_args(argv)
    try:
        processor = check_processor(args.model, args.lm, args.vision, args.template, args.max_length)
        report = check_file(args.file, args.images, args.workers, processor, args.decode, args.progress)
    except (ValueError, OSError) as e:
        print(f"minillava data check: error: {e}", file=sys.stderr)
        return 2
    for line in report.bad_records + report.bad_images:
        print(line)
    print(report.summary())
    return 0 if report.ok else 1
