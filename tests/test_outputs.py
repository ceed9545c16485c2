"""Where results go: no save replaces a folder minillava did not write, one run at a time writes an output,
resume checks the data and init it continues on, and a finished run cleans up what killed runs left."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import caption_records, make_model, make_processor, save_world

import minillava as ml
from minillava import checkpoints, outputs
from minillava.tools.build_zoo import write_card
from minillava.training import TrainConfig, train
from minillava.training import loop as mt

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def write_captions(path: Path, colours: list[str]) -> str:
    """8 caption records in LLaVA's format, the answers naming `colours` in turn."""
    path.write_text(json.dumps(caption_records(8, colours)))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """Backbones saved as transformers folders, 8 images and a caption file (test_train's world, smaller)."""
    d = tmp_path_factory.mktemp("world")
    paths = save_world(d, tokenizer, 8)
    return {**paths, "captions": write_captions(d / "captions.json", ["red", "green", "blue", "yellow"])}


def settings(world, out, **kw) -> dict:
    return {"stage": 1, "out": str(out), "data": world["captions"], "images": world["images"],
            "vision": world["vision"], "lm": world["lm"], "batch_size": 4, "micro_batch_size": 4, "max_steps": 2,
            "progress": False, **kw}


def stage1(world, out, **kw):
    return train(TrainConfig(**settings(world, out, **kw)))


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def user_folder(path: Path) -> Path:
    """A folder of the user's own: a config.json among other files (a project, say)."""
    (path / "src").mkdir(parents=True)
    (path / "config.json").write_text('{"mine": true}')
    (path / "notes.txt").write_text("precious")
    (path / "src" / "code.py").write_text("print('mine')")
    return path


def dead_pid() -> int:
    """The PID of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def interrupt_after_checkpoint(monkeypatch, run):
    """Run `run()` with a training loop that dies right after its first resumable checkpoint."""
    original = mt.save_state

    def checkpoint_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(mt, "save_state", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(mt, "save_state", original)


# ---- 1. a save replaces only a folder minillava wrote ------------------------------------------------------------
def test_training_never_replaces_a_folder_minillava_did_not_write(world, tmp_path):
    mine = user_folder(tmp_path / "mine")
    with pytest.raises(FileExistsError, match=r"out '.*mine': .*\.minillava.*delete it or move it away"):
        stage1(world, mine)
    assert tree(mine) == ["config.json", "notes.txt", "src", "src/code.py"]


@pytest.mark.parametrize("save", ["save", "export_hf", "merge_lora"])
def test_every_save_refuses_a_folder_minillava_did_not_write(save, tokenizer, tmp_path):
    model = make_model(tokenizer)
    processor = make_processor(tokenizer, model)
    mine = user_folder(tmp_path / "mine")
    lora = tmp_path / "lora"  # merge_lora refuses before it loads anything
    lora.mkdir()
    (lora / "config.json").write_text(json.dumps({"format": checkpoints.LORA_FORMAT}))
    calls = {"save": lambda: ml.save(model, processor, mine), "export_hf": lambda: ml.export_hf(model, processor, mine),
             "merge_lora": lambda: checkpoints.merge_lora(lora, mine)}
    with pytest.raises(FileExistsError, match=r"'.*mine': .*\.minillava"):
        calls[save]()
    assert tree(mine) == ["config.json", "notes.txt", "src", "src/code.py"]


def test_a_folder_minillava_wrote_is_replaced_until_it_holds_other_files(tokenizer, tmp_path):
    model = make_model(tokenizer)
    processor = make_processor(tokenizer, model)
    out = tmp_path / "ckpt"
    ml.save(model, processor, out)
    written = json.loads((out / ".minillava").read_text())["files"]
    assert "config.json" in written and "model.safetensors" in written and ".minillava" not in written
    ml.export_hf(model, processor, out)  # one minillava save replaces another
    write_card(out, "a card", "written beside the model after its save", {}, {})  # as tools/build_zoo.py does
    ml.save(model, processor, out)
    assert not (out / "README.md").exists() and (out / "model.safetensors").is_file()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"'.*ckpt': holds files minillava did not write \(notes.txt\)"):
        ml.save(model, processor, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_an_output_of_an_older_version_is_refused_with_what_to_do(tokenizer, tmp_path):
    """A folder written before the marker existed (the shipped zoo, say) is not replaced: the error says so."""
    model = make_model(tokenizer)
    old = tmp_path / "tiny-llava"
    ml.save(model, None, old)
    (old / ".minillava").unlink(missing_ok=True)  # as a version without markers wrote it
    with pytest.raises(FileExistsError, match=r"'.*tiny-llava': has no \.minillava.*older version.*delete it or "
                                              "move it away"):
        with outputs.atomic_dir(old, marker="config.json"):
            pass
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "model.safetensors"]


# ---- 2. one run at a time into an output -------------------------------------------------------------------------
HOLDER = """
import json, sys, time
from pathlib import Path
from minillava.training import TrainConfig, loop
cfg, started, go = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
step = loop.train_step
def waiting_step(*args, **kwargs):
    started.touch()
    while not go.exists():
        time.sleep(0.05)
    return step(*args, **kwargs)
loop.train_step = waiting_step
loop.train(TrainConfig(**cfg))
"""


def test_a_second_run_into_an_output_a_live_run_holds_is_refused(world, tmp_path):
    out, started, go = tmp_path / "out", tmp_path / "started", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(settings(world, out)), str(started), str(go)],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not started.exists():
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.1)
        with pytest.raises(BlockingIOError, match=rf"out '.*out': another run is writing it \(PID {first.pid} on "
                                                  rf"{socket.gethostname()}, started .*\)"):
            stage1(world, out)
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (out / "projector.safetensors").is_file() and not Path(f"{out}.lock").exists()
    assert stage1(world, out).steps == 2  # free again once the first run has ended


def test_a_lock_left_by_a_dead_run_is_taken_over(world, tmp_path, capsys):
    out, pid = tmp_path / "out", dead_pid()
    Path(f"{out}.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                               "started": "2024-01-01 00:00:00"}))
    assert stage1(world, out).steps == 2
    err = capsys.readouterr().err
    assert f"taking over the lock of a run that ended without releasing it (PID {pid} on" in err
    assert not Path(f"{out}.lock").exists()


# ---- 3. resume only on the same data and init --------------------------------------------------------------------
def test_a_checkpoint_is_not_resumed_on_other_data_or_another_init(world, tmp_path, monkeypatch):
    data = tmp_path / "data.json"
    write_captions(data, ["red", "green", "blue", "yellow"])
    interrupt_after_checkpoint(monkeypatch, lambda: stage1(world, tmp_path / "run", data=str(data), max_steps=4,
                                                           save_every=2))
    write_captions(data, ["pink", "black", "white", "brown"])  # as many records, other answers
    with pytest.raises(ValueError, match=r"other settings: data_sha256 \('\w+' there, '\w+' now\)"):
        stage1(world, tmp_path / "run", data=str(data), max_steps=4, save_every=2)

    init = stage1(world, tmp_path / "init").out
    two = dict(stage=2, init=str(init), max_steps=4, save_every=2)
    interrupt_after_checkpoint(monkeypatch, lambda: stage1(world, tmp_path / "two", **two))
    stage1(world, tmp_path / "init", seed=1)  # another projector in the same folder
    with pytest.raises(ValueError, match=r"other settings: init_sha256 \('\w+' there, '\w+' now\)"):
        stage1(world, tmp_path / "two", **two)


# ---- 4. a finished run cleans up after killed ones ---------------------------------------------------------------
KILLED = """
import os, signal, sys
from minillava.outputs import atomic_dir
saves = [atomic_dir(target) for target in sys.argv[1:]]  # kept: a context manager collected cleans up
for save in saves:
    (save.__enter__() / "model.safetensors").write_bytes(bytes(1000))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_finished_run_removes_what_killed_runs_left(world, tmp_path, monkeypatch, capsys):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    interrupt_after_checkpoint(monkeypatch, lambda: stage1(world, out, max_steps=4, save_every=2))
    killed = subprocess.run([sys.executable, "-c", KILLED, str(out), str(partial)], env=ENV, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    dead = tmp_path / f".out.partial.old-{dead_pid()}-x1y2"  # a run killed between the renames of a save
    dead.mkdir()
    alive = tmp_path / f".out.tmp-{os.getppid()}-a1b2"  # a save in progress in another process
    unknown = tmp_path / ".out.tmp-k2j_x9a1"  # named by an older version: no PID to check
    for folder in (alive, unknown):
        folder.mkdir()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out")]) == 5
    capsys.readouterr()
    assert stage1(world, out, max_steps=4, save_every=2).steps == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.tmp-k2j_x9a1", alive.name, "out"])
    err = capsys.readouterr().err
    assert f"left '{alive}' (process {os.getppid()} is still running)" in err
    assert f"left '{unknown}' (no process ID in its name" in err
