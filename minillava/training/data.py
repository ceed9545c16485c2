"""Training data: records encoded into token ids and labels, checked up front, ordered and batched.

The order of an epoch is a pure function of the seed and the epoch, so a resumed run and every process of a
distributed one see the same batches. `group_by_length` is LLaVA's modality-length grouping.
"""

from __future__ import annotations

import torch

from ..data.records import DataError, Record
from ..processor import Processor
from ..vision import check_image_file
from .cache import FeatureCache
from .config import TrainConfig


def encode_all(records: list[Record], processor: Processor, progress: bool) -> list[dict]:
    """Tokenize every record up front, so a bad or overlong record stops the run before step 1."""
    from tqdm.auto import tqdm

    out = []
    for r in tqdm(records, desc="tokenizing", disable=not progress, mininterval=1.0):
        try:
            ids = processor.template.tokenize(r.messages, processor.tokenizer,
                                              num_image_tokens=processor.num_image_tokens,
                                              max_length=processor.max_length, sample_id=r.id)
        except ValueError as e:
            raise DataError(f"record '{r.id}': {e}") from None
        n = sum(1 for x in ids["labels"] if x != -100)
        if n == 0:
            raise DataError(f"record '{r.id}': nothing to supervise (the answer would train nothing)")
        out.append({"input_ids": torch.tensor(ids["input_ids"]), "labels": torch.tensor(ids["labels"]),
                    "images": r.images, "n_supervised": n})
    return out


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


def epoch_order(examples: list[dict], cfg: TrainConfig, epoch: int, group: int) -> list[int]:
    """The sample order of an epoch: a pure function of the seed and the epoch, so resume and DDP agree."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    if not cfg.group_by_length:
        return torch.randperm(len(examples), generator=g).tolist()
    return grouped_order([len(e["input_ids"]) for e in examples], [bool(e["images"]) for e in examples], group, g)


def collate(examples: list[dict], processor: Processor, cache: FeatureCache | None, device) -> dict:
    """Encoded examples -> model inputs on `device`; images as cached features when a cache is in use."""
    batch = processor.collate([{"input_ids": e["input_ids"], "labels": e["labels"], "images": None}
                               for e in examples])
    paths = [p for e in examples for p in e["images"]]
    inputs = {k: batch[k].to(device) for k in ("input_ids", "labels", "attention_mask")}
    if paths:
        if cache is not None:
            inputs["image_features"] = cache.get(paths).to(device)
        else:
            inputs["images"] = processor.image_processor(paths, names=[str(p) for p in paths]).to(device)
    return inputs
