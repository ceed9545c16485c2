"""Training data: records encoded into token ids and labels, ordered and batched.

Two ways in. `encode_all` + `check_images` read a whole file up front, so a bad record stops the run before
step 1 (small files). `LazyData` starts at once on a file of any size: each record is parsed, tokenized and its
images decoded when a step needs it, in DataLoader workers; a bad one stops the run when it is met, naming it,
or is skipped and listed at the end (`skip_bad`).

The order of an epoch is a pure function of the seed and the epoch (`sample_order`), so a resumed run and every
process of a distributed one see the same batches. `group_by_length` is LLaVA's modality-length grouping; the
lazy path groups by a length estimate (`estimate_length`: words + image tokens), as LLaVA's
LengthGroupedSampler does, because tokenizing the whole file first would be the wait it exists to avoid.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..data.records import DataError, Record, duplicate_ids, parse_record, read_raw
from ..processor import Processor
from ..vision import check_image_file
from .cache import FeatureCache
from .config import TrainConfig


# ---- up front: every record encoded, every image checked before step 1 -----------------------------------------
def encode_record(record: Record, processor: Processor) -> dict:
    """One record -> {"input_ids": (T,), "labels": (T,), "images": [Path], "n_supervised": int}, or a DataError
    naming the record: tokenization refused (too long, bad text), or nothing to supervise."""
    try:
        ids = processor.template.tokenize(record.messages, processor.tokenizer,
                                          num_image_tokens=processor.num_image_tokens,
                                          max_length=processor.max_length, sample_id=record.id)
    except ValueError as e:
        raise DataError(f"record '{record.id}': {e}") from None
    n = sum(1 for x in ids["labels"] if x != -100)
    if n == 0:
        raise DataError(f"record '{record.id}': nothing to supervise (the answer would train nothing)")
    return {"input_ids": torch.tensor(ids["input_ids"]), "labels": torch.tensor(ids["labels"]),
            "images": record.images, "n_supervised": n}


def encode_all(records: list[Record], processor: Processor, progress: bool) -> list[dict]:
    """Tokenize every record up front (`encode_record`), so a bad or overlong record stops the run before step 1."""
    from tqdm.auto import tqdm

    return [encode_record(r, processor)
            for r in tqdm(records, desc="tokenizing", disable=not progress, mininterval=1.0)]


def check_images(records: list[Record], progress: bool) -> None:
    """Check every image file once, up front (`check_image_file`), so a corrupt one stops the run before step 1
    rather than hours in; all the bad ones are named together."""
    from tqdm.auto import tqdm

    bad = []
    paths = sorted({p for r in records for p in r.images})
    for p in tqdm(paths, desc="checking images", disable=not progress, mininterval=1.0):
        try:
            check_image_file(p)
        except (ValueError, FileNotFoundError) as e:
            bad.append(str(e))
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} of {len(paths)} images cannot be used: " + "; ".join(bad[:5]) + more)


# ---- the order of an epoch -----------------------------------------------------------------------------------------
def grouped_order(lengths: list[int], has_image: list[bool], group: int, generator: torch.Generator) -> list[int]:
    """LLaVA's modality-length grouping: a random order in which each run of `group` samples is all-image or
    all-text and sorted by length (less padding), with the runs themselves shuffled."""
    def runs(idx: list[int]) -> list[list[int]]:
        perm = [idx[i] for i in torch.randperm(len(idx), generator=generator).tolist()]
        return [sorted(perm[i:i + group], key=lambda j: -lengths[j]) for i in range(0, len(perm), group)]

    mm = runs([i for i, m in enumerate(has_image) if m])
    text = runs([i for i, m in enumerate(has_image) if not m])
    tail = [r for rs in (mm, text) if rs for r in rs[-1:]]  # the two short leftovers go last, as one group
    body = mm[:-1] + text[:-1]
    body = [body[i] for i in torch.randperm(len(body), generator=generator).tolist()]
    return [i for r in body + [sorted(j for r in tail for j in r)] for i in r]


def sample_order(lengths: list[int], has_image: list[bool], seed: int, epoch: int, group: int,
                 group_by_length: bool) -> list[int]:
    """The sample order of an epoch, a pure function of (seed, epoch) and the samples' lengths and modalities:
    a permutation of range(len(lengths)), grouped by length (`grouped_order`) or plainly shuffled."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    if not group_by_length:
        return torch.randperm(len(lengths), generator=g).tolist()
    return grouped_order(lengths, has_image, group, g)


def epoch_order(examples: list[dict], cfg: TrainConfig, epoch: int, group: int) -> list[int]:
    """`sample_order` of encoded examples, grouped by their token counts: resume and DDP agree."""
    return sample_order([len(e["input_ids"]) for e in examples], [bool(e["images"]) for e in examples],
                        cfg.seed, epoch, group, cfg.group_by_length)


def rank_slices(order: list[int], within: int, batch: int, micro: int, rank: int = 0,
                world: int = 1) -> list[list[int]]:
    """The micro-batches process `rank` of `world` takes in step `within` of an epoch: its global batch
    order[within * batch:(within + 1) * batch] cut into runs of micro x world, the rank-th slice of each run
    (as `loop.train_step` slices it). Returns batch // (micro * world) lists of `micro` sample indices."""
    ids = order[within * batch:(within + 1) * batch]
    return [ids[(k * world + rank) * micro:(k * world + rank + 1) * micro] for k in range(batch // (micro * world))]


def collate(examples: list[dict], processor: Processor, cache: FeatureCache | None, device,
            packing: bool = False) -> dict:
    """Encoded examples -> model inputs on `device`: padded (B, T), or with `packing` one padding-free row
    (`Processor.pack`); images as cached features when a cache is in use."""
    batch = _batch([{"input_ids": e["input_ids"], "labels": e["labels"], "images": None} for e in examples],
                   processor, packing)
    paths = [p for e in examples for p in e["images"]]
    inputs = {k: v.to(device) for k, v in batch.items() if k != "images" and v is not None}
    if paths:
        if cache is not None:
            inputs["image_features"] = cache.get(paths).to(device)
        else:
            inputs["images"] = processor.image_processor(paths, names=[str(p) for p in paths]).to(device)
    return inputs


# ---- lazy: a file of any size, each record encoded and its images decoded when a step needs it -------------------
def record_size(raw) -> tuple[int, int]:
    """(words, images) of a raw record, without parsing it: the whitespace-separated words of its turns and
    the images it names. A malformed record counts what can be counted (its error is met when it is loaded)."""
    if not isinstance(raw, dict):
        return 0, 0
    convs = raw.get("conversations")
    turns = convs if isinstance(convs, list) else []
    words = sum(len(t["value"].split()) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))
    return words, len(_image_names(raw.get("image")))


def estimate_length(raw, num_image_tokens: int) -> tuple[int, bool]:
    """A record's length in tokens without tokenizing it, LLaVA's cheap estimate: its words plus
    `num_image_tokens` per image (`record_size`); and whether it has images."""
    words, images = record_size(raw)
    return words + images * num_image_tokens, images > 0


class LazySamples(torch.utils.data.Dataset):
    """The records of a LLaVA file, each parsed, tokenized and its images decoded only when asked for (in a
    DataLoader worker).

    Item i -> {"index": i, "id", "input_ids": (T,), "labels": (T,), "n_supervised", "images": [Path],
    "pixels": (K, 3, S, S) or None, "decoded": [bool] per image (False: the feature cache holds it, not
    decoded)}; or, for a record or image that cannot be used, {"index": i, "id", "error": what is wrong, naming
    the record}. Errors travel as values, so that the main process decides (stop or skip) and reports them
    without a worker's traceback around them.

    The records are kept as one buffer of JSON texts and their offsets, not as Python objects: forked workers
    would copy a list of dicts page by page as reference counts change, and spawned ones would unpickle it.
    """

    def __init__(self, raw: list, where: str, image_dir: Path, processor: Processor | None = None):
        texts = [json.dumps(r).encode() for r in raw]
        self.offsets = np.cumsum([0] + [len(t) for t in texts])
        self.blob = np.frombuffer(b"".join(texts), dtype=np.uint8)
        self.where, self.image_dir, self.processor = where, image_dir, processor
        self.cached = None  # the images whose features the main process holds (`FeatureCache.snapshot`)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, i: int):
        return json.loads(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def __getitem__(self, i: int) -> dict:
        raw = self.raw(i)
        rid = raw.get("id") if isinstance(raw, dict) else None
        rid = str(rid) if rid is not None else f"record {i}"
        try:
            record = parse_record(raw, self.image_dir, f"{self.where}, record {i}")
            sample = encode_record(record, self.processor)
            pixels, decoded = self.pixels(record)
        except (ValueError, OSError) as e:  # DataError and the image errors are ValueErrors
            return {"index": i, "id": rid, "error": str(e)}
        return {**sample, "index": i, "id": record.id, "pixels": pixels, "decoded": decoded}

    def pixels(self, record: Record) -> tuple[torch.Tensor | None, list[bool]]:
        """The record's images the feature cache lacks, decoded and preprocessed: ((K, 3, S, S) or None, a flag
        per image saying whether it is among the K). DataError naming the record and the image."""
        decoded = [self.cached is None or p not in self.cached for p in record.images]
        todo = [p for p, d in zip(record.images, decoded) if d]
        try:
            pixels = self.processor.image_processor(todo, names=[str(p) for p in todo]) if todo else None
        except (ValueError, OSError) as e:
            raise DataError(f"record '{record.id}': {e}") from None
        return pixels, decoded


def _batch(samples: list[dict], processor: Processor, packing: bool) -> dict:
    return processor.pack(samples) if packing else processor.collate(samples)


def collate_step(samples: list[dict], micro: int, processor: Processor, packing: bool = False) -> list[dict]:
    """One step's samples for this process (runs of `micro`, in order) -> its micro-batches, padded (or packed)
    as `collate` does it (in the worker). Each is {"input_ids", "labels", "attention_mask": (b, T), or None
    when every sample was bad (attention_mask also when packed, which adds "position_ids" (1, T));
    "images": [Path]; "pixels": (K, 3, S, S) or None; "decoded": [bool] per image; "bad": [(index, id, error)];
    and counts over its good samples: "n_samples", "n_tokens" (image tokens included, padding not),
    "n_supervised"}."""
    return [_collate_micro(samples[k:k + micro], processor, packing) for k in range(0, len(samples), micro)]


def _collate_micro(samples: list[dict], processor: Processor, packing: bool) -> dict:
    good = [s for s in samples if "error" not in s]
    out = {"bad": [(s["index"], s["id"], s["error"]) for s in samples if "error" in s],
           "images": [p for s in good for p in s["images"]], "decoded": [d for s in good for d in s["decoded"]],
           "n_samples": len(good), "n_tokens": sum(len(s["input_ids"]) for s in good),
           "n_supervised": sum(s["n_supervised"] for s in good), "input_ids": None, "labels": None,
           "attention_mask": None}
    if good:
        batch = _batch([{"input_ids": s["input_ids"], "labels": s["labels"], "images": None} for s in good],
                       processor, packing)
        out.update({k: v for k, v in batch.items() if k != "images"})
    pixels = [s["pixels"] for s in good if s["pixels"] is not None]
    out["pixels"] = torch.cat(pixels) if pixels else None
    return out


class LazyData:
    """A LLaVA-format file for training without encoding it first (`open`, then `encode_with` a processor): the
    records' length estimates give the epoch order (`order`), DataLoader workers load this process's
    micro-batches ahead (`steps`), and the main process makes model inputs of them (`inputs`), where a bad
    sample stops the run or, with `skip_bad`, is left out and listed (`skipped_report`)."""

    def __init__(self, dataset: LazySamples, sizes: list[tuple[int, int]], n_images: int, skip_bad: bool = False):
        self.dataset, self.n_images, self.skip_bad = dataset, n_images, skip_bad
        self.words, self.images = (np.array(column, dtype=np.int64).reshape(-1) for column in zip(*sizes))
        self.skipped: dict[int, str] = {}  # sample index -> what is wrong with it
        self.skips = 0  # times a bad sample was left out of a micro-batch (a sample is met once per epoch)
        self.last_good: dict | None = None  # the last micro-batch `inputs` made inputs of (for `stand_in`)

    @classmethod
    def open(cls, path: str | Path, image_dir: str | Path | None = None, skip_bad: bool = False) -> LazyData:
        """Read the file (`read_raw`; an id used twice is refused) and count every record's words and images
        (`record_size`); nothing is parsed, tokenized or decoded yet, and no model is needed."""
        raw, image_dir = read_raw(path, image_dir)
        twice = duplicate_ids(raw)
        if twice:
            more = f" (and {len(twice) - 1} more)" if len(twice) > 1 else ""
            raise DataError(f"data file '{path}': {twice[0]}{more}")
        images = {str(p) for r in raw if isinstance(r, dict) for p in _image_names(r.get("image"))}
        sizes = [record_size(r) for r in raw]
        return cls(LazySamples(raw, f"data file '{path}'", image_dir), sizes, len(images), skip_bad)

    def encode_with(self, processor: Processor) -> LazyData:
        """Encode samples with `processor` (its template, image tokens and max_length as training has them)."""
        self.dataset.processor = processor
        return self

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def lengths(self) -> list[int]:
        """Every record's estimated length (`estimate_length`) with the processor's image tokens."""
        return (self.words + self.images * self._processor().num_image_tokens).tolist()

    @property
    def has_image(self) -> list[bool]:
        return (self.images > 0).tolist()

    def order(self, seed: int, epoch: int, group: int, group_by_length: bool) -> list[int]:
        """`sample_order` by the estimated lengths."""
        return sample_order(self.lengths, self.has_image, seed, epoch, group, group_by_length)

    def _processor(self) -> Processor:
        if self.dataset.processor is None:
            raise ValueError("lazy data: no processor to encode with; call encode_with(processor) first")
        return self.dataset.processor

    def steps(self, order: list[int], first: int, last: int, batch: int, micro: int, rank: int = 0,
              world: int = 1, num_workers: int = 0, cache: FeatureCache | None = None,
              packing: bool = False) -> Iterator[list[dict]]:
        """This process's micro-batches (`collate_step`) of the steps first..last-1 of an epoch in `order`:
        one list of batch // (micro x world) per step, loaded ahead by `num_workers` processes (0: here; at
        most one per CPU). Images whose features `cache` holds now are not decoded: pass `inputs` the same.
        `packing`: each micro-batch one padding-free row (`Processor.pack`)."""
        self.dataset.cached = cache.snapshot() if cache is not None else None
        plan = [[i for mb in rank_slices(order, s, batch, micro, rank, world) for i in mb] for s in range(first, last)]
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=plan, num_workers=min(num_workers, _cpus()),
            collate_fn=functools.partial(collate_step, micro=micro, processor=self._processor(), packing=packing))
        return iter(loader)

    def inputs(self, micro: dict, cache: FeatureCache | None, device) -> dict | None:
        """One micro-batch from `steps` -> model inputs on `device`, as `collate` gives them. Its bad samples
        first: a DataError naming the first, or (skip_bad) noted and left out. None when none is left."""
        if not self.skip_bad:
            self.raise_first_bad([micro])
        for index, _, error in micro["bad"]:
            self.skipped.setdefault(index, error)
            self.skips += 1
        if micro["input_ids"] is None:
            return None
        self.last_good = micro
        inputs = {k: micro[k].to(device) for k in ("input_ids", "labels", "attention_mask", "position_ids")
                  if micro.get(k) is not None}
        if micro["images"] and cache is not None:
            rows = iter(micro["pixels"] if micro["pixels"] is not None else [])
            pixels = [next(rows) if d else None for d in micro["decoded"]]
            inputs["image_features"] = cache.get(micro["images"], pixels).to(device)
        elif micro["images"]:
            inputs["images"] = micro["pixels"].to(device)
        return inputs

    def raise_first_bad(self, loaded: list[dict]) -> None:
        """The DataError of the first bad sample in this process's micro-batches `loaded`, if any."""
        for micro in loaded:
            for _, _, error in micro["bad"]:
                raise DataError(error)

    def stand_in(self, cache: FeatureCache | None, device) -> dict:
        """Inputs to run, with the loss weighted 0, where a process's micro-batch had only bad samples but every
        process must still take part in the step's collectives (DDP's gradient all-reduce, FSDP's gathers): the
        last good micro-batch this process met. DataError when there is none yet."""
        if self.last_good is None:
            raise DataError(f"{self.dataset.where}: a micro-batch of bad samples only, before any good one on this "
                            "process; run `minillava data check` on the file, or use a larger micro batch")
        return self.inputs({**self.last_good, "bad": []}, cache, device)

    def skipped_report(self) -> list[str]:
        """Lines to print at the end of a run that skipped bad samples: how many, then each one's problem."""
        if not self.skipped:
            return []
        head = (f"skipped {len(self.skipped)} bad sample(s) of {self.dataset.where} ({self.skips} time(s) in all; "
                "they trained nothing):")
        return [head] + [f"  {error}" for _, error in sorted(self.skipped.items())]


def step_counts(loaded: list[dict]) -> torch.Tensor:
    """(samples, supervised tokens, tokens, images) in one step's micro-batches from `LazyData.steps`, good
    samples only: int64 (4,), to all-reduce into the global batch's counts when each process loaded its part."""
    return torch.tensor([sum(mb[k] for mb in loaded) for k in ("n_samples", "n_supervised", "n_tokens")]
                        + [sum(len(mb["images"]) for mb in loaded)])


def _cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _image_names(image) -> list:
    return [image] if isinstance(image, str) else image if isinstance(image, list) else []
