"""Lazy training data (records encoded and images decoded in DataLoader workers, as steps need them), the
feature cache's choice of place, and `minillava data check`."""

import json
import re

import pytest
import torch
from conftest import random_image

from minillava.data.check import CheckReport, check_file, check_processor, main
from minillava.data.records import DataError, load_records
from minillava.training import TrainConfig
from minillava.training.cache import FeatureCache, choose_cache, feature_file
from minillava.training.data import (
    LazyData,
    collate,
    encode_all,
    epoch_order,
    estimate_length,
    rank_slices,
    sample_order,
    step_counts,
)

COLOURS = ["red", "green", "blue", "yellow"]


def qa(*turns):
    return [{"from": f, "value": v} for f, v in turns]


def good_records(n=16):
    """Captions, two-image questions and text-only chats of varied lengths, as tests/test_train.py's world."""
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append({"id": f"t{i}", "conversations": qa(("human", "How many sides does a triangle have?"),
                                                           ("gpt", "3." + " Yes." * (i % 3)))})
        elif i % 4 == 2:
            out.append({"id": f"m{i}", "image": [f"{i}.png", f"{i - 1}.png"], "conversations": qa(
                ("human", "Image 1: <image>\nImage 2: <image>\nWhich has more shapes?"),
                ("gpt", "The first image."))})
        else:
            out.append({"id": f"q{i}", "image": f"{i}.png", "conversations": qa(
                ("human", "<image>\nWhat color is the circle?"), ("gpt", f"{COLOURS[i % 4].capitalize()}."),
                *([("human", "Is it large?"), ("gpt", "Yes.")] if i % 2 else []))})
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("lazy")
    for i in range(16):
        random_image(32, 28, seed=i).save(d / f"{i}.png")
    (d / "torn.png").write_bytes((d / "0.png").read_bytes()[:-40])  # truncated: the header still reads
    return d


def write(folder, records, name="data.json"):
    (folder / name).write_text(json.dumps(records))
    return folder / name


def eager_steps(path, processor, order, batch, micro, rank, world, cache=None):
    """Today's path: every record encoded up front, then `collate` on the loop's slices."""
    examples = encode_all(load_records(path), processor, progress=False)
    return [[collate([examples[i] for i in mb], processor, cache, "cpu")
             for mb in rank_slices(order, s, batch, micro, rank, world)] for s in range(len(order) // batch)]


def lazy_steps(data, order, batch, micro, rank, world, cache=None, workers=0, first=0):
    return [[data.inputs(mb, cache, "cpu") for mb in step]
            for step in data.steps(order, first, len(order) // batch, batch, micro, rank, world, workers, cache)]


def assert_same(a: list, b: list):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert len(step_a) == len(step_b)
        for x, y in zip(step_a, step_b):
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]), k


# ---- the lazy path gives today's batches ----------------------------------------------------------------------------
@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("rank, world, workers", [(0, 1, 0), (0, 1, 2), (1, 2, 0)])
def test_lazy_batches_equal_eager(folder, processor, group_by_length, rank, world, workers):
    """Same seed, epoch and order -> the same micro-batches (input_ids, labels, attention_mask, pixels), with
    DataLoader workers or without, for each process of a distributed run. The order is computed from the same
    lengths (LLaVA's estimate) for both paths; without grouping it is `epoch_order` itself."""
    path = write(folder, good_records())
    data = LazyData.open(path).encode_with(processor)
    assert data.lengths == [estimate_length(r, processor.num_image_tokens)[0] for r in json.loads(path.read_text())]
    batch, micro = 8, 2
    for epoch in range(2):
        order = data.order(seed=3, epoch=epoch, group=micro * world, group_by_length=group_by_length)
        if not group_by_length:  # a plain shuffle depends on the count alone: today's own order
            cfg = TrainConfig(seed=3, group_by_length=False)
            assert order == epoch_order(encode_all(load_records(path), processor, False), cfg, epoch, micro)
        want = eager_steps(path, processor, order, batch, micro, rank, world)
        got = lazy_steps(data, order, batch, micro, rank, world, workers=workers)
        assert_same(got, want)
        assert any("images" in mb for step in got for mb in step)


def test_rank_slices_cover_the_global_batch():
    """Over processes and micro-steps, a step's slices are its global batch, each sample once."""
    order = list(range(100, 124))
    for world in (1, 2, 4):
        slices = [rank_slices(order, 1, 8, 2, rank, world) for rank in range(world)]
        assert all(len(s) == 8 // (2 * world) and all(len(mb) == 2 for mb in s) for s in slices)
        assert sorted(i for s in slices for mb in s for i in mb) == order[8:16]


def test_the_order_is_a_pure_function_of_seed_and_epoch(folder, processor):
    path = write(folder, good_records())
    a, b = LazyData.open(path).encode_with(processor), LazyData.open(path).encode_with(processor)
    assert a.order(1, 0, 4, True) == b.order(1, 0, 4, True) != a.order(1, 1, 4, True)
    assert sorted(a.order(1, 0, 4, True)) == list(range(16))
    with pytest.raises(ValueError, match=r"no processor to encode with; call encode_with\(processor\) first"):
        LazyData.open(path).order(1, 0, 4, True)
    lengths, has_image = a.lengths, a.has_image
    assert a.order(1, 2, 4, True) == sample_order(lengths, has_image, 1, 2, 4, True)


def test_a_resumed_epoch_starts_mid_way(folder, processor):
    """`steps(order, first, ...)` yields the steps from `first` on, as a resumed run needs them."""
    data = LazyData.open(write(folder, good_records())).encode_with(processor)
    order = data.order(0, 0, 2, True)
    assert_same(lazy_steps(data, order, 4, 2, 0, 1, first=2), lazy_steps(data, order, 4, 2, 0, 1)[2:])


def test_lazy_with_the_feature_cache(folder, processor, model):
    """With a cache the batches carry the same features as today's path; images whose features the cache
    already holds are not decoded again in the workers (the second epoch decodes nothing)."""
    path = write(folder, good_records())
    data = LazyData.open(path).encode_with(processor)
    ours, theirs = (FeatureCache(model.vision_tower, processor.image_processor) for _ in range(2))
    for epoch in range(2):
        order = data.order(0, epoch, 4, True)
        want = eager_steps(path, processor, order, 8, 4, 0, 1, cache=theirs)
        raw = list(data.steps(order, 0, 2, 8, 4, cache=ours))
        decoded = [d for step in raw for mb in step for d in mb["decoded"]]
        assert all(decoded) if epoch == 0 else not any(decoded)
        assert_same([[data.inputs(mb, ours, "cpu") for mb in step] for step in raw], want)
    assert (ours.hits, ours.misses) == (theirs.hits, theirs.misses) and ours.misses == 12  # 12 images in all


# ---- bad samples: the run stops when one is met, or skips and lists them ----------------------------------------
BAD = [
    ({"id": "gone", "image": "nope.png", "conversations": qa(("human", "<image>\nHi"), ("gpt", "Red."))},
     r"record \d+ \(id 'gone'\): image '.*nope.png' not found"),
    ({"id": "torn", "image": "torn.png", "conversations": qa(("human", "<image>\nHi"), ("gpt", "Red."))},
     r"record 'torn': image '.*torn.png': cannot be decoded \(image file is truncated\)"),
    ({"id": "long", "image": "1.png", "conversations": qa(("human", "<image>\nDescribe."),
                                                          ("gpt", "A red shape " * 100))},
     r"record 'long': .*exceed max_length 256"),
    ({"id": "turns", "conversations": qa(("gpt", "Red."), ("human", "Hi"))},
     r"\(id 'turns'\): turn 0 is from 'assistant', expected 'user'"),
    ("not a record", r"record \d+: a record must be a JSON object, got str"),
]


@pytest.mark.parametrize("bad, match", BAD, ids=["missing-image", "torn-image", "too-long", "turns", "not-a-dict"])
def test_a_bad_sample_stops_the_run_when_met(folder, processor, bad, match):
    """The steps before the bad sample's step run; at its step a DataError names it and what is wrong."""
    records = good_records(8)
    records.insert(5, bad)
    data = LazyData.open(write(folder, records, "bad.json")).encode_with(processor)
    order = data.order(0, 0, 3, False)
    where = order.index(5) // 3  # the step (of 3 samples) that meets record 5
    done = 0
    with pytest.raises(DataError, match=match):
        for step in data.steps(order, 0, 3, 3, 3, num_workers=2):
            [data.inputs(mb, None, "cpu") for mb in step]
            done += 1
    assert done == where


def test_skipping_bad_samples_counts_and_lists_them(folder, processor):
    records = good_records(9) + [bad for bad, _ in BAD]  # 14 samples: 7 steps of 2, none left over
    data = LazyData.open(write(folder, records, "bad.json"), skip_bad=True).encode_with(processor)
    seen = 0
    for epoch in range(2):
        order = data.order(0, epoch, 2, True)
        for step in data.steps(order, 0, len(order) // 2, 2, 1, num_workers=2):
            for mb in step:
                inputs = data.inputs(mb, None, "cpu")
                seen += inputs is not None
                assert inputs is None or (inputs["labels"] != -100).any()  # nothing trains with zero loss
    assert seen == 2 * 9  # every good sample, every epoch; every bad one left out
    assert sorted(data.skipped) == list(range(9, 14)) and data.skips == 2 * 5
    report = data.skipped_report()
    assert report[0].startswith("skipped 5 bad sample(s) of data file") and "10 time(s)" in report[0]
    for (_, match), line in zip(BAD, report[1:]):
        assert re.search(match, line), (match, line)


def test_a_micro_batch_of_bad_samples_only_gets_a_stand_in(folder, processor):
    """Under DDP/FSDP every process must run each micro-batch: where all of one's samples were bad, the loop runs
    `stand_in` (the last good micro-batch) with its loss weighted 0. Before any good one there is none."""
    records = [BAD[0][0]] + good_records(3)
    data = LazyData.open(write(folder, records, "stand_in.json"), skip_bad=True).encode_with(processor)
    steps = list(data.steps([0, 1, 2, 3], 0, 2, 2, 1))
    assert data.inputs(steps[0][0], None, "cpu") is None
    with pytest.raises(DataError, match="a micro-batch of bad samples only, before any good one"):
        data.stand_in(None, "cpu")
    good = data.inputs(steps[0][1], None, "cpu")
    assert data.inputs(steps[1][0], None, "cpu") is not None
    assert_same([[data.stand_in(None, "cpu")]], [[data.inputs(steps[1][0], None, "cpu")]])
    assert not torch.equal(good["input_ids"], data.stand_in(None, "cpu")["input_ids"])
    # the step's counts (for the metrics, all-reduced under DDP): its one good sample, q0 with one image
    assert step_counts(steps[0]).tolist() == [1, int((good["labels"] != -100).sum()),
                                              int(good["attention_mask"].sum()), 1]


def test_an_id_used_twice_is_refused_up_front(folder, processor):
    records = good_records(4) + [good_records(4)[1]]
    with pytest.raises(DataError, match=r"id 'q1' appears 2 times \(records 1, 4\)"):
        LazyData.open(write(folder, records, "twice.json"))


def test_estimate_length_is_words_plus_image_tokens():
    r = {"id": "a", "image": ["x.png", "y.png"], "conversations": qa(("human", "<image> <image>\nTwo words"),
                                                                     ("gpt", "Three more words."))}
    assert estimate_length(r, 16) == (4 + 3 + 2 * 16, True)
    assert estimate_length({"id": "t", "conversations": qa(("human", "Hi there"), ("gpt", "Yes."))}, 16) == (3, False)
    assert estimate_length("garbage", 16) == (0, False)


# ---- the feature cache: where it goes -----------------------------------------------------------------------------
GB = 10**9


def test_auto_keeps_small_features_in_memory(tmp_path):
    c = choose_cache("auto", 1000, 576, 1024, torch.float32, epochs=3, directory=tmp_path, ram_bytes=24 * GB)
    assert c.kind == "memory" and c.estimate == 1000 * 576 * 1024 * 4 and c.directory is None
    assert "2.4 GB for 1,000 images (576 x 1024 fp32 each)" in c.reason


def test_auto_puts_large_features_on_disk(tmp_path):
    c = choose_cache("auto", 558_128, 576, 1024, torch.float32, epochs=2, directory=tmp_path, ram_bytes=24 * GB,
                     disk_bytes=4000 * GB)
    assert c.kind == "disk" and c.directory == tmp_path and "1.3 TB" in c.reason
    c = choose_cache("auto", 558_128, 576, 1024, torch.float32, epochs=2, directory=tmp_path, ram_bytes=24 * GB,
                     disk_bytes=2000 * GB)  # 1.3 TB is more than half the free disk: no cache at all
    assert c.kind == "off" and "fits in neither" in c.reason
    small = dict(n_images=10_000, tokens_per_image=576, width=1024, epochs=2, directory=tmp_path, ram_bytes=100 * GB,
                 disk_bytes=4000 * GB)  # 23.6 GB: fits in half of 100 GB once, not 8 times (8 DDP ranks, 8 caches)
    assert choose_cache("auto", **small).kind == "memory" and choose_cache("auto", copies=8, **small).kind == "disk"
    with pytest.raises(ValueError, match=r"needs about 24 GB for 10,000 images \(576 x 1024 fp32 each\) in each "
                                         r"of 8 processes, this machine has 100 GB available"):
        choose_cache("memory", copies=8, **small)


def test_auto_is_off_for_one_epoch(tmp_path):
    c = choose_cache("auto", 10, 576, 1024, torch.float32, epochs=1.0, directory=tmp_path, ram_bytes=24 * GB)
    assert c.kind == "off" and "never reuses" in c.reason


def test_an_explicit_cache_that_cannot_fit_is_refused_with_the_estimate(tmp_path):
    need = 558_128 * 576 * 1024 * 4  # LCS-558K through CLIP ViT-L/14-336, in fp32
    assert round(need / 1e12, 1) == 1.3
    with pytest.raises(ValueError, match=r"^feature cache 'memory': needs about 1\.3 TB for 558,128 images \(576 x "
                                         r"1024 fp32 each\), this machine has 24 GB available"):
        choose_cache("memory", 558_128, 576, 1024, torch.float32, epochs=2, ram_bytes=24 * GB)
    with pytest.raises(ValueError, match=r"feature cache 'disk': needs about 658 GB for 558,128 images \(576 x "
                                         r"1024 bf16 each\), '.*' has 500 GB free"):
        choose_cache("disk", 558_128, 576, 1024, torch.bfloat16, epochs=2, directory=tmp_path, ram_bytes=24 * GB,
                     disk_bytes=500 * GB)
    assert choose_cache("memory", 100, 576, 1024, torch.float32, epochs=1, ram_bytes=24 * GB).kind == "memory"
    with pytest.raises(ValueError, match="feature cache 'ram': expected auto, memory, disk or off"):
        choose_cache("ram", 1, 1, 1)


def test_the_disk_cache_holds_nothing_in_memory(folder, processor, model, tmp_path):
    paths = [folder / f"{i}.png" for i in range(4)]
    in_memory = FeatureCache(model.vision_tower, processor.image_processor).get(paths)
    disk = FeatureCache(model.vision_tower, processor.image_processor, tmp_path)
    assert torch.equal(disk.get(paths), in_memory) and not disk.memory
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 4 and all(f.parent.name == f.stem[:2] for f in files)
    again = FeatureCache(model.vision_tower, processor.image_processor, tmp_path)
    assert torch.equal(again.get(paths), in_memory) and (again.hits, again.misses) == (4, 0)
    assert paths[0] in again.snapshot() and (folder / "5.png") not in again.snapshot()
    assert feature_file(again.directory, "k").suffix == ".safetensors"


# ---- minillava data check -------------------------------------------------------------------------------------------
def bad_file(folder):
    records = good_records(8) + [bad for bad, _ in BAD] + [good_records(8)[0]]
    return write(folder, records, "check.json")


def test_check_file_reports_every_bad_record_and_image(folder, processor, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr("minillava.data.check.ProcessPoolExecutor", None)  # workers=0: all in this process
        report = check_file(bad_file(folder), workers=0, processor=processor)
    assert not report.ok and report.records == 14 and report.images == 8  # 6 good, nope.png and torn.png
    text = "\n".join(report.bad_records + report.bad_images)
    assert "id 'q0' appears 2 times (records 0, 13)" in text
    assert re.search(r"record 10 \(id 'long'\): sample 'long': \d+ tokens exceed max_length 256", text)
    assert "record 11 (id 'turns'): turn 0 is from 'assistant'" in text
    assert "record 12: a record must be a JSON object, got str" in text
    assert re.search(r"image '.*nope.png': not found \(used by record 'gone'\)", text)
    assert re.search(r"image '.*torn.png': cannot be decoded \(image file is truncated\) \(used by record 'torn'\)",
                     text)
    assert len(report.bad_records) == 4 and len(report.bad_images) == 2
    assert report.longest == max(len(e["input_ids"]) for e in encode_all(load_records(write(
        folder, good_records(8), "good.json")), processor, False))
    assert check_file(bad_file(folder), workers=2, processor=processor) == report  # processes: the same report
    shared = check_file(write(folder, good_records(4) + [{**good_records(2)[1], "id": "again", "image": "torn.png"},
                                                         {**good_records(2)[1], "id": "more", "image": "torn.png"}],
                              "shared.json"), workers=0)
    assert shared.bad_images[0].endswith("(used by records 'again', 'more')")
    plain = check_file(bad_file(folder), workers=0)  # no tokenizer: the long record passes, nothing tokenized
    assert plain.longest is None and len(plain.bad_records) == 3
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    wrong = check_file(bad_file(folder), images=elsewhere, workers=0)  # a wrong image folder: one line, not eight
    assert wrong.bad_images == [f"none of the 8 images is in the image folder '{elsewhere}' (the first: "
                                f"'{elsewhere / '0.png'}'); is it the right folder (--images)?"]


def test_check_cli(folder, tmp_path, capsys, processor):
    processor.save_pretrained(tmp_path)
    assert main([str(bad_file(folder)), "--workers", "2", "--model", str(tmp_path), "--no-progress"]) == 1
    report = check_file(bad_file(folder), workers=0, processor=processor)  # the processor the folder holds
    assert capsys.readouterr().out.splitlines() == report.bad_records + report.bad_images + [report.summary()]
    longest = report.longest
    assert report.summary().endswith(f"14 records, 8 images: 4 bad record(s), 2 bad image(s); the longest sample "
                                     f"has {longest} tokens")
    good = write(folder, good_records(8), "good.json")
    assert main([str(good), "--workers", "0", "--model", str(tmp_path), "--max-length", str(longest),
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"8 records, 6 images: ok; the longest sample has {longest} "
                                                    "tokens")
    assert main([str(good), "--model", str(tmp_path), "--max-length", str(longest - 1), "--no-progress"]) == 1
    assert main([str(folder / "none.json"), "--no-progress"]) == 2
    assert "data file" in capsys.readouterr().err
    assert main([str(good), "--lm", "tiny-lm", "--no-progress"]) == 2
    assert "--lm, --vision and --template go together" in capsys.readouterr().err
    from minillava.cli import main as cli

    assert cli(["data", "-h"]) == 0 and "minillava data check FILE" in capsys.readouterr().out
    assert cli(["data"]) == 2 and "minillava data check FILE" in capsys.readouterr().err


def test_check_processor_reads_no_weights():
    """`--lm tiny-lm --vision tiny-clip --template vicuna_v1`: the tokenizer, the image tokens from the patch
    count and the context from the LM's config, as training's processor would have them."""
    from minillava.checkpoints import assemble

    got = check_processor(lm="tiny-lm", vision="tiny-clip", template="vicuna_v1")
    _, want = assemble("tiny-clip", "tiny-lm")
    assert (got.num_image_tokens, got.max_length, got.template.name) == (want.num_image_tokens, want.max_length,
                                                                         "vicuna_v1")
    assert got.tokenizer.get_vocab() == want.tokenizer.get_vocab()
    stage1 = check_processor(model="tiny-llava-stage1", max_length=100)
    assert stage1.template.name == "plain" and stage1.max_length == 100
    assert check_processor() is None and isinstance(CheckReport("x"), CheckReport)

