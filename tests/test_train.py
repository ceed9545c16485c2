"""Both training stages on tiny backbones: recipes, the feature cache, resume, DDP, LoRA and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import caption_records, random_image, save_world
from safetensors.torch import load_file

import minillava as ml
import minillava.cli
from minillava.data.records import DataError
from minillava.training import TrainConfig, train
from minillava.training import loop as mt


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """Backbones saved as transformers folders, images, and caption / instruction files in LLaVA's format."""
    d = tmp_path_factory.mktemp("world")
    paths = save_world(d, tokenizer, 16)
    colours = ["red", "green", "blue", "yellow"]
    captions = caption_records(16, colours)
    instruct = []
    for i in range(16):
        if i % 4 == 3:  # text-only
            instruct.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": "How many sides does a triangle have?"}, {"from": "gpt", "value": "3."}]})
        elif i % 4 == 2:  # two images
            instruct.append({"id": f"m{i}", "image": [f"{i}.png", f"{i - 1}.png"], "conversations": [
                {"from": "human", "value": "Image 1: <image>\nImage 2: <image>\nWhich has more shapes?"},
                {"from": "gpt", "value": "The first image."}]})
        else:
            instruct.append({"id": f"q{i}", "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the circle?"},
                {"from": "gpt", "value": f"{colours[i % 4].capitalize()}."},
                {"from": "human", "value": "Is it large?"}, {"from": "gpt", "value": "Yes."}]})
    return {"dir": d, **paths, "captions": write_json(d / "captions.json", captions),
            "instruct": write_json(d / "instruct.json", instruct)}


def stage1(world, out, **kw):
    kw = {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "progress": False, "data": world["captions"],
          "images": world["images"], "vision": world["vision"], "lm": world["lm"], **kw}
    return train(TrainConfig(stage=1, out=str(out), **kw))


@pytest.fixture(scope="module")
def s1(world, tmp_path_factory):
    return stage1(world, tmp_path_factory.mktemp("runs") / "s1", lr=1e-2)


def test_stage1_trains_only_the_projector(world, s1):
    files = sorted(p.name for p in s1.out.iterdir())
    assert files == [".minillava", "config.json", "projector.safetensors", "run.json"]  # .minillava: what it wrote
    assert set(load_file(s1.out / "projector.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    cfg = json.loads((s1.out / "config.json").read_text())
    assert cfg["format"] == "minillava-stage1" and cfg["lm"] == world["lm"]
    assert s1.steps == 4 and all(torch.isfinite(torch.tensor(m["loss"])) for m in s1.metrics)
    assert s1.metrics[0]["lr"] == 0.0  # the cosine schedule starts its 3% warmup at zero, as transformers'


def test_stage1_recipe_report(world, tmp_path, capsys):
    stage1(world, tmp_path / "r", max_steps=1)
    out = capsys.readouterr().out
    assert "vision_tower: frozen" in out and "projector: full" in out and "language_model: frozen" in out
    assert "template plain" in out and "stage 1 done: 1 steps" in out


def test_feature_cache_gives_the_same_losses(world, tmp_path):
    cached = stage1(world, tmp_path / "a", feature_cache="memory", max_steps=6)
    plain = stage1(world, tmp_path / "b", feature_cache="off", max_steps=6)
    assert [round(m["loss"], 5) for m in cached.metrics] == [round(m["loss"], 5) for m in plain.metrics]
    assert "32 hits / 16 misses" in cached.summary  # 3 epochs: each image encoded once, then cached


def test_disk_cache_is_keyed_by_tower_and_layer(world, tmp_path):
    stage1(world, tmp_path / "a", feature_cache="disk", cache_dir=str(tmp_path / "cache"), max_steps=2)
    stage1(world, tmp_path / "b", feature_cache="disk", cache_dir=str(tmp_path / "cache"), max_steps=2,
           feature_layer=-1)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # two towers/layers, two separate key spaces
    again = stage1(world, tmp_path / "c", feature_cache="disk", cache_dir=str(tmp_path / "cache"), max_steps=2)
    assert "16 hits / 0 misses" in again.summary


def test_stage2_full_from_stage1(world, s1, tmp_path):
    res = train(TrainConfig(stage=2, data=world["instruct"], images=world["images"], out=str(tmp_path / "s2"),
                            init=str(s1.out), batch_size=8, micro_batch_size=4, max_steps=3, lr=1e-3,
                            progress=False))
    model, proc = ml.load(res.out, device="cpu")
    assert proc.template.name == "vicuna_v1" and proc.image_processor.aspect == "pad"
    base, _ = ml.load_lm(world["lm"])
    tuned = model.language_model.state_dict()
    assert any(not torch.equal(v, tuned[k]) for k, v in base.state_dict().items())  # the LM trained
    vision = ml.load_vision(world["vision"])[0].state_dict()
    assert all(torch.equal(v, model.vision_tower.model.state_dict()[k]) for k, v in vision.items())  # frozen


def test_accumulation_changes_nothing_but_speed(world, s1, tmp_path):
    """Length groups are one global batch (LLaVA's LengthGroupedSampler): micro-batches of 8, 4 or 2 make the
    same batches, hence the same losses (up to the order in which the sums are added)."""
    runs = [train(TrainConfig(stage=2, data=world["instruct"], images=world["images"], out=str(tmp_path / f"m{m}"),
                              init=str(s1.out), batch_size=8, micro_batch_size=m, max_steps=3, lr=1e-3,
                              progress=False)) for m in (8, 4, 2)]
    losses = [[r["loss"] for r in run.metrics] for run in runs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_stage2_lora_and_merge(world, s1, tmp_path):
    res = train(TrainConfig(stage=2, data=world["instruct"], images=world["images"], out=str(tmp_path / "lora"),
                            init=str(s1.out), lora=True, lora_r=4, lora_alpha=8, batch_size=8, micro_batch_size=4,
                            max_steps=2, progress=False))
    assert (res.out / "adapter" / "adapter_model.safetensors").is_file()
    merged = ml.merge_lora(res.out, tmp_path / "merged")
    model, proc = ml.load(merged, device="cpu")
    b = proc([{"role": "user", "content": "<image>\nWhat color?"}], [random_image()], add_generation_prompt=True)
    assert model.generate(b["input_ids"], b["attention_mask"], b["images"], max_new_tokens=3).shape == (1, 3)


def test_resume_gives_the_same_losses(world, tmp_path, monkeypatch):
    full = stage1(world, tmp_path / "full", max_steps=6, lr=1e-2)
    original = mt.save_state

    def checkpoint_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(mt, "save_state", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        stage1(world, tmp_path / "cut", max_steps=6, lr=1e-2, save_every=3)
    assert (tmp_path / "cut.partial" / "state.json").is_file() and not (tmp_path / "cut").exists()
    monkeypatch.setattr(mt, "save_state", original)
    resumed = stage1(world, tmp_path / "cut", max_steps=6, lr=1e-2, save_every=3)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in full.metrics]
    assert not (tmp_path / "cut.partial").exists()
    assert "done: 6 steps, the last 3 in " in resumed.summary and "(resumed at step 3)" in resumed.summary


@pytest.mark.slow
def test_ddp_two_processes_match_one(world, tmp_path):
    common = ["--stage", "1", "--data", world["captions"], "--images", world["images"], "--vision", world["vision"],
              "--lm", world["lm"], "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3",
              "--lr", "1e-2", "--no-group-by-length", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    "29533", "-m", "minillava.cli", "train", "--out", str(tmp_path / "ddp"), *common],
                   check=True, env=env, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "minillava.cli", "train", "--out", str(tmp_path / "one"), *common],
                   check=True, env=env, capture_output=True, timeout=300)
    losses = [[m["loss"] for m in json.loads((tmp_path / r / "run.json").read_text())["metrics"]]
              for r in ("ddp", "one")]
    assert len(losses[0]) == 3
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5)


# ---- bad input: a clear error, nothing overwritten -----------------------------------------------------------
def test_bad_input(world, s1, tmp_path):
    out = tmp_path / "out"  # an earlier run's output, which no failed run may touch
    shutil.copytree(s1.out, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    d = world["dir"]
    long = [{"id": "long1", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red shape " * 100}]}]
    with pytest.raises(DataError, match="record 'long1'.*256"):
        stage1(world, out, data=write_json(d / "long.json", long))
    with pytest.raises(DataError, match="has no records"):
        stage1(world, out, data=write_json(d / "empty.json", []))
    missing = [{"id": "x9", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Red."}]}]
    with pytest.raises(DataError, match="id 'x9'.*nope.png' not found"):
        stage1(world, out, data=write_json(d / "missing.json", missing))
    with pytest.raises(ValueError, match="learning rate -1"):
        stage1(world, out, lr=-1.0)
    with pytest.raises(ValueError, match="batch size 6 is not a multiple of micro batch 4"):
        stage1(world, out, batch_size=6)
    with pytest.raises(ValueError, match="made with lm"):
        train(TrainConfig(stage=2, data=world["instruct"], images=world["images"], out=str(out), init=str(s1.out),
                          lm=world["vision"], progress=False))
    with pytest.raises(FileNotFoundError, match="init checkpoint"):
        train(TrainConfig(stage=2, data=world["instruct"], images=world["images"], out=str(out),
                          init=str(tmp_path / "nope"),
                          progress=False))
    with pytest.raises(ValueError, match="made with projector 'mlp2x_gelu', but projector 'linear'"):
        train(TrainConfig(stage=2, data=world["instruct"], images=world["images"], out=str(out), init=str(s1.out),
                          projector="linear", progress=False))
    for bad, match in ((dict(max_grad_norm=-1.0), "max grad norm -1"), (dict(warmup_ratio=5.0), "warmup ratio 5"),
                       (dict(max_steps=-3), "max steps -3"), (dict(weight_decay=-0.1), "weight decay -0.1"),
                       (dict(max_length=4096), "max length 4096: longer than the language model's context"),
                       (dict(max_length=-5), "max length -5: must be positive"),
                       (dict(max_steps=None, epochs=float("nan")), "epochs nan: must be a positive, finite number"),
                       (dict(max_steps=None, epochs=float("inf")), "epochs inf")):
        with pytest.raises(ValueError, match=match):
            stage1(world, out, **bad)
    with pytest.raises(ValueError, match="init is a stage-2 option"):
        stage1(world, out, init=str(s1.out))
    images = Path(world["images"])
    (images / "torn.png").write_bytes((images / "0.png").read_bytes()[:-40])  # truncated: the header still reads
    torn = [{"id": "t1", "image": "torn.png", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Red."}]}]
    with pytest.raises(DataError, match="1 of 1 images cannot be used: image '.*torn.png'"):
        stage1(world, out, data=write_json(d / "torn.json", torn))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_folder_of_other_files_is_never_replaced(world, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="out '.*mine': holds other files and no config.json"):
        stage1(world, mine)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="out '.*afile': exists and is not a folder"):
        stage1(world, tmp_path / "afile")
    assert (mine / "notes.txt").read_text() == "precious" and sorted(mine.iterdir()) == [mine / "notes.txt"]


def test_a_run_removes_only_its_own_features_beside_the_output(world, tmp_path):
    """The default disk cache `<out>.features` goes when the run ends; what a user kept there stays."""
    users = tmp_path / "run.features"
    users.mkdir()
    (users / "notes.txt").write_text("precious")
    stage1(world, tmp_path / "run", feature_cache="disk", max_steps=2)
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"]
    stage1(world, tmp_path / "other", feature_cache="disk", max_steps=2)
    assert not (tmp_path / "other.features").exists()  # nothing else there: the folder goes too


def test_lazy_data_names_the_first_bad_sample_of_an_all_bad_batch(world, tmp_path):
    """A wrong image folder makes every sample bad: the error is the first one's, not 'all skipped'."""
    with pytest.raises(DataError, match=r"id 'c\d+'\): image '.*\d+.png' not found"):
        stage1(world, tmp_path / "lazy", lazy_data=True, images=str(tmp_path), max_steps=1)


def test_a_checkpoint_of_another_run_is_not_resumed(world, tmp_path, monkeypatch):
    original = mt.save_state

    def checkpoint_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(mt, "save_state", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):  # interrupted after the checkpoint of step 2
        stage1(world, tmp_path / "run", lr=1e-2, save_every=2)
    monkeypatch.setattr(mt, "save_state", original)
    with pytest.raises(ValueError, match=r"left by a run with other settings: lr \(0.01 there, 0.5 now\)"):
        stage1(world, tmp_path / "run", lr=0.5, save_every=2)
    assert not (tmp_path / "run").exists()
    assert len(stage1(world, tmp_path / "run", lr=1e-2, save_every=2).metrics) == 4  # the same settings resume it


def test_cli_reports_errors_cleanly(world, tmp_path, capsys):
    code = minillava.cli.main(["train", "--stage", "1", "--data", str(tmp_path / "none.json"),
                               "--out", str(tmp_path / "o")])
    assert code == 2 and "data file" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_training_gives_the_same_losses(world, tmp_path, monkeypatch):
    """`compile=True` traces the model with torch.compile (dynamic shapes: the batches differ in length); the
    cheap "aot_eager" backend keeps the test fast and still runs the traced forward and backward."""
    monkeypatch.setattr(mt, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    compiled = stage1(world, tmp_path / "a", compile=True, max_steps=3)
    eager = stage1(world, tmp_path / "b", max_steps=3)
    assert [m["loss"] for m in compiled.metrics] == pytest.approx([m["loss"] for m in eager.metrics], rel=1e-4)
    assert load_file(compiled.out / "projector.safetensors").keys() == load_file(
        eager.out / "projector.safetensors").keys()  # saved from the model, not the compiled wrapper


# ---- training the vision tower too (LLaVA-NeXT, OneVision) ---------------------------------------------------------
def test_vision_lr_trains_the_tower_at_its_own_rate(world, s1, tmp_path, capsys):
    common = dict(stage=2, data=world["instruct"], images=world["images"], init=str(s1.out), batch_size=8,
                  micro_batch_size=4, max_steps=3, lr=1e-3, progress=False)
    res = train(TrainConfig(out=str(tmp_path / "tower"), vision_lr=1e-4, **common))
    out = capsys.readouterr().out
    assert "vision_tower: full" in out and "feature cache: off (the vision tower trains" in out
    before = ml.load_vision(world["vision"])[0].state_dict()
    after = ml.load(res.out, device="cpu")[0].vision_tower.model.state_dict()
    moved = {k: float((after[k] - v).abs().max()) for k, v in before.items() if v.is_floating_point()}
    assert max(moved.values()) > 0  # the tower trained, and is saved with the model
    # its own peak rate: a tenth of the LM's moves it less than the LM's rate does, the same data and steps
    fast = train(TrainConfig(out=str(tmp_path / "fast"), vision_lr=1e-3, **common))
    fast_after = ml.load(fast.out, device="cpu")[0].vision_tower.model.state_dict()
    fast_moved = {k: float((fast_after[k] - v).abs().max()) for k, v in before.items() if v.is_floating_point()}
    assert sum(moved.values()) < sum(fast_moved.values())
    assert res.metrics[-1]["lr"] == fast.metrics[-1]["lr"]  # (the row logs the LM's rate)


@pytest.mark.parametrize("settings, match", [
    (dict(stage=1, vision_lr=1e-5), "stage 2 only"),
    (dict(vision_lr=2.0), "between 0 and 1"),
    (dict(vision_lr=1e-5, lora=True), "LoRA output"),
    (dict(vision_lr=1e-5, strategy="fsdp"), "strategy ddp"),
    (dict(vision_lr=1e-5, feature_cache="memory"), "none can be cached"),
])
def test_vision_lr_refuses_what_cannot_work(settings, match):
    cfg = TrainConfig(**{"stage": 2, "data": "x.json", **settings})
    with pytest.raises(ValueError, match=match):
        cfg.check()
