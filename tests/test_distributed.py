"""Training beyond one process: FSDP2 (2 processes, and a mesh of one), sharded checkpoints that resume exactly,
activation checkpointing, bf16 with fp32 master weights, and the step-metrics log (JSONL, TensorBoard).

The torchrun tests run on the CPU with gloo (`slow`); everything else runs FSDP2 in this process, on a mesh of one.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import world  # noqa: F401  (the tiny backbones, images and LLaVA-format files)

import minillava as ml
from minillava.training import TrainConfig, collate, logs, setup, train, train_step
from minillava.training import distributed as md
from minillava.training import loop as mt

FIELDS = {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "tokens"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module's tests in one thread: the tiny model gains nothing from a second, and on a busy 2-core
    machine OpenMP's threads wait on each other (measured: a test 2.4 s with one thread, 35 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stage2(world, out, **kw):  # noqa: F811
    """Stage 2 (projector and the whole LM train) on the 16 instruction records: batch 8, 4 steps (2 epochs)."""
    return train(config(world, out, **kw))


def config(world, out, **kw):  # noqa: F811
    kw = {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "lr": 1e-3, "progress": False,
          "data": world["instruct"], "images": world["images"], "vision": world["vision"], "lm": world["lm"], **kw}
    return TrainConfig(stage=2, out=str(out), **kw)


def losses(result) -> list[float]:
    return [m["loss"] for m in result.metrics]


def weights(folder) -> dict[str, torch.Tensor]:
    return ml.load(folder, device="cpu")[0].state_dict()


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ---- FSDP2 in this process (a mesh of one) ---------------------------------------------------------------------
def test_fsdp_in_one_process_matches_plain_and_saves_the_ordinary_format(world, tmp_path):  # noqa: F811
    plain = stage2(world, tmp_path / "plain")
    fsdp = stage2(world, tmp_path / "fsdp", strategy="fsdp")
    assert losses(fsdp) == pytest.approx(losses(plain), rel=1e-6)
    assert sorted(p.name for p in fsdp.out.iterdir()) == sorted(p.name for p in plain.out.iterdir())
    assert_same_weights(weights(fsdp.out), weights(plain.out), rtol=1e-6, atol=1e-7)
    assert not torch.distributed.is_initialized()  # the group of one made for the run is gone


def save_then_interrupt(original):
    def checkpoint_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    return checkpoint_then_die


def test_fsdp_checkpoint_resumes_exactly_in_one_process(world, tmp_path, monkeypatch):  # noqa: F811
    full = stage2(world, tmp_path / "full", strategy="fsdp", save_every=1)  # each checkpoint replaces the last
    assert not (tmp_path / "full.partial").exists()
    monkeypatch.setattr(mt, "save_sharded_state", save_then_interrupt(mt.save_sharded_state))
    with pytest.raises(KeyboardInterrupt):
        stage2(world, tmp_path / "cut", strategy="fsdp", save_every=2)
    monkeypatch.undo()
    partial = tmp_path / "cut.partial"
    assert {".metadata", "__0_0.distcp", "rng-0.safetensors", "state.json"} <= {p.name for p in partial.iterdir()}
    with pytest.raises(ValueError, match=r"strategy \('fsdp' there, 'ddp' now\); precision \('fp32' there, "
                                         r"'bf16' now\)"):
        stage2(world, tmp_path / "cut", save_every=2, precision="bf16")
    log = tmp_path / "cut.logs" / "metrics.jsonl"  # the killed run's log: left for a person to read
    with open(log, "a") as f:  # as if the killed run had logged a step past its checkpoint
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    resumed = stage2(world, tmp_path / "cut", strategy="fsdp", save_every=2,
                     log_dir=str(tmp_path / "cut.logs"))  # (named: kept after the run, to be read here)
    assert losses(resumed) == losses(full)  # exactly
    assert_same_weights(weights(resumed.out), weights(full.out), rtol=0, atol=0)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert not partial.exists()


# ---- FSDP2 with two processes (torchrun, gloo) -------------------------------------------------------------------
def torchrun(world, out, *args, port: int, script: str = "-m minillava.cli"):  # noqa: F811
    """`torchrun --nproc-per-node 2` of `minillava train` stage 2 (fsdp, as `config`); its stdout. `script`: what
    torchrun runs with the arguments of `minillava train`."""
    flags = ["--stage", "2", "--data", world["instruct"], "--images", world["images"], "--vision", world["vision"],
             "--lm", world["lm"], "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "4", "--lr", "1e-3",
             "--no-progress", "--strategy", "fsdp", "--save-every", "2", "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), *script.split(), "train", *flags], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def fsdp2(world, tmp_path_factory):  # noqa: F811
    """An uninterrupted 2-process FSDP run (with activation checkpointing, and a sharded checkpoint at step 2)."""
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    torchrun(world, out, "--gradient-checkpointing", "--log-dir", str(out.parent / "logs"), port=29541)
    return out


@pytest.mark.slow
def test_fsdp_two_processes_match_one(world, fsdp2, tmp_path):  # noqa: F811
    """2 processes, sharded, with activation checkpointing == 1 process, plain: losses within rtol 1e-5 (the
    reductions add in another order), weights within 1e-5; the result loads as any model folder."""
    plain = stage2(world, tmp_path / "plain")  # micro-batches of 4 = 2 x 2 processes: the same batches
    two = [m["loss"] for m in json.loads((fsdp2 / "run.json").read_text())["metrics"]]
    assert len(two) == 4 and two == pytest.approx(losses(plain), rel=1e-5)
    assert_same_weights(weights(fsdp2), weights(plain.out), rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in (fsdp2.parent / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["loss"] for r in rows] == two


def text_beside_images(world, out) -> tuple[str, int]:  # noqa: F811
    """The instruction records with their text-only chats doubled (8 of 20), and a seed whose random order gives
    one process a micro-batch of text only while the other's has an image (checked, not hoped for)."""
    from minillava.training.data import rank_slices, sample_order

    records = json.loads(open(world["instruct"]).read())
    records += [{**r, "id": r["id"] + "b"} for r in records if "image" not in r]
    out.write_text(json.dumps(records))
    has_image = ["image" in r for r in records]

    def disagree(seed: int) -> bool:
        for epoch in (0, 1):  # batch 8 of 20 records: 2 steps an epoch, 4 steps in all
            order = sample_order([1] * len(records), has_image, seed, epoch, 8, False)
            for step in range(2):
                mine, theirs = (rank_slices(order, step, 8, 2, rank, 2) for rank in (0, 1))
                if any(any(has_image[i] for i in a) != any(has_image[i] for i in b) for a, b in zip(mine, theirs)):
                    return True
        return False

    return str(out), next(seed for seed in range(100) if disagree(seed))


@pytest.mark.slow
@pytest.mark.parametrize("strategy, port", [("ddp", 29543), ("fsdp", 29544)])
def test_text_only_micro_batches_beside_image_ones(world, tmp_path, strategy, port):  # noqa: F811
    """One process's micro-batch all text while the other's has images (mix665k has 41K text-only chats): every
    process must still use the projector (`LlavaModel._blank_image_term`), or DDP finds unused parameters and
    FSDP's collectives disagree. The losses match one process's."""
    data, seed = text_beside_images(world, tmp_path / "mixed.json")
    two = tmp_path / "two"
    torchrun(world, two, "--strategy", strategy, "--no-group-by-length", "--data", data, "--seed", str(seed),
             port=port)
    plain = stage2(world, tmp_path / "plain", group_by_length=False, data=data, seed=seed)
    got = [m["loss"] for m in json.loads((two / "run.json").read_text())["metrics"]]
    assert got == pytest.approx(losses(plain), rel=1e-5)


STOP_THEN_RESUME = """
import os, sys
from minillava import cli
from minillava.training import loop

class Stop(Exception):
    pass

original = loop.checkpoint
def save_then_stop(*args, **kwargs):
    original(*args, **kwargs)
    loop.distributed.barrier(2)  # (ddp: process 0 writes it)
    raise Stop  # in every process, once the checkpoint is complete
loop.checkpoint = save_then_stop
try:
    cli.main(sys.argv[1:])
except Stop:
    if os.environ["RANK"] == "0":
        print("stopped with", sorted(os.listdir(sys.argv[sys.argv.index("--out") + 1] + ".partial")), flush=True)
loop.checkpoint = original
sys.exit(cli.main(sys.argv[1:]))  # a new model and optimizer, from the checkpoint on disk
"""


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_exactly(world, fsdp2, tmp_path):  # noqa: F811
    """Stopped after the sharded checkpoint of step 2 (in both processes), then run again (in the same two, to
    launch torchrun once): the same losses and weights as the uninterrupted run, exactly."""
    script = tmp_path / "stop_then_resume.py"
    script.write_text(STOP_THEN_RESUME)
    out = tmp_path / "run"
    stdout = torchrun(world, out, "--gradient-checkpointing", port=29542, script=str(script))
    stopped = next(line for line in stdout.splitlines() if line.startswith("stopped with"))
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.safetensors", "rng-1.safetensors"):
        assert repr(name) in stopped  # the shards of both processes, each process's RNG state
    assert "resuming from step 2" in stdout
    metrics = [json.loads((d / "run.json").read_text())["metrics"] for d in (out, fsdp2)]
    assert [m["loss"] for m in metrics[0]] == [m["loss"] for m in metrics[1]]
    assert_same_weights(weights(out), weights(fsdp2), rtol=0, atol=0)
    assert not (tmp_path / "run.partial").exists()


@pytest.mark.slow
def test_ddp_lora_checkpoint_resumes_exactly(world, tmp_path):  # noqa: F811
    """DDP with LoRA dropout: each process draws its own masks, so the checkpoint keeps each process's RNG state;
    stopped after step 2 and resumed, the losses are those of the uninterrupted run, exactly."""
    script = tmp_path / "stop_then_resume.py"
    script.write_text(STOP_THEN_RESUME)
    lora = ["--strategy", "ddp", "--lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.3"]
    whole = torchrun(world, tmp_path / "whole", *lora, port=29545)
    assert "resuming" not in whole
    stdout = torchrun(world, tmp_path / "run", *lora, port=29546, script=str(script))
    assert "resuming from step 2" in stdout
    metrics = [json.loads((tmp_path / d / "run.json").read_text())["metrics"] for d in ("run", "whole")]
    assert [m["loss"] for m in metrics[0]] == [m["loss"] for m in metrics[1]]


# ---- activation checkpointing and bf16 ---------------------------------------------------------------------------
def gradients(world, tmp_path, **kw) -> tuple[dict[str, torch.Tensor], int, int]:  # noqa: F811
    """One forward and backward pass on the first 4 samples: the gradients, how often layer 0's MLP ran, and how
    many numbers the autograd graph kept for the backward pass."""
    run = setup(config(world, tmp_path / "g", **kw))
    mlp, calls, kept = md.decoder_layers(run.model)[0].mlp, [], []
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted
    inputs = collate(run.examples[:4], run.processor, run.cache, run.device)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        loss = run.net(**inputs, return_logits=False).loss
    loss.backward()
    return {n: p.grad for n, p in run.trainable}, len(calls), sum(kept)


def test_gradient_checkpointing_gives_the_same_gradients(world, tmp_path):  # noqa: F811
    plain, plain_calls, plain_kept = gradients(world, tmp_path)
    checkpointed, calls, kept = gradients(world, tmp_path, gradient_checkpointing=True)
    assert (plain_calls, calls) == (1, 2)  # the layer ran again in the backward pass: it was recomputed
    assert kept < plain_kept / 2  # ... as its activations were not kept
    assert_same_weights(checkpointed, plain, rtol=0, atol=0)  # the same arithmetic, so exactly the same


def steps(world, tmp_path, n: int = 3, **kw) -> tuple[object, list[float]]:  # noqa: F811
    run = setup(config(world, tmp_path / "s", group_by_length=False, **kw))
    order = list(range(len(run.examples)))
    return run, [train_step(run, step, order)["loss"] for step in range(n)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_bf16_keeps_fp32_master_weights_and_optimizer_state(world, tmp_path, strategy):  # noqa: F811
    """bf16 computes in bf16 (autocast; FSDP also gathers weights in bf16) but the weights AdamW updates and its
    moments stay fp32; without FSDP the frozen weights are held in bf16. The losses move (so bf16 did compute),
    by less than 0.1% from fp32's."""
    try:
        _, fp32 = steps(world, tmp_path, strategy=strategy)
        run, bf16 = steps(world, tmp_path, strategy=strategy, precision="bf16")
    finally:
        md.finish()
    assert {p.dtype for _, p in run.trainable} == {torch.float32}
    frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    assert frozen == ({torch.float32} if strategy == "fsdp" else {torch.bfloat16})  # held in bf16, as planned
    if strategy == "fsdp":  # the weights are shards (DTensor) of fp32 tensors
        assert {p.to_local().dtype for _, p in run.trainable} == {torch.float32}
    moments = [v for state in run.opt.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(run.trainable) and {v.dtype for v in moments} == {torch.float32}
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=1e-3)


# ---- logs --------------------------------------------------------------------------------------------------------
def test_metrics_jsonl_and_tensorboard_events(world, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = stage2(world, tmp_path / "run", max_steps=3, report_to="tensorboard")
    rows = [json.loads(line) for line in (tmp_path / "run.logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(FIELDS <= r.keys() for r in rows)
    assert rows == json.loads((res.out / "run.json").read_text())["metrics"]  # the same rows as run.json
    events = EventAccumulator(str(tmp_path / "run.logs" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows])
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(events.Tags()["scalars"])


def test_log_dir_and_a_missing_tensorboard(world, tmp_path, monkeypatch):  # noqa: F811
    stage2(world, tmp_path / "run", max_steps=1, log_dir=str(tmp_path / "mine"))
    assert len((tmp_path / "mine" / "metrics.jsonl").read_text().splitlines()) == 1  # a log_dir named is kept
    stage2(world, tmp_path / "plain", max_steps=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "plain", "run"]  # the default <out>.logs went
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        stage2(world, tmp_path / "other", report_to="tensorboard")
    assert not (tmp_path / "other.logs").exists()


def test_step_flops_is_about_six_n_per_token(world, tmp_path):  # noqa: F811
    """Stage 2 trains the whole LM: about 6 N FLOPs per token; with the LM frozen (backward through it) 4 N."""
    run = setup(config(world, tmp_path / "f"))
    sizes = run.sizes
    decoder = run.model.language_model.get_decoder()
    n_lm = sum(p.numel() for p in decoder.parameters()) - decoder.embed_tokens.weight.numel()
    assert sizes["lm"] == sizes["lm_trained"] == n_lm and sizes["vision"] == 0  # (the feature cache spares it)
    full = logs.step_flops(sizes, tokens=1000, supervised=0, image_tokens=0)
    frozen = logs.step_flops({**sizes, "lm_trained": 0}, tokens=1000, supervised=0, image_tokens=0)
    assert (full, frozen) == (6 * n_lm * 1000, 4 * n_lm * 1000)
    assert logs.peak_tflops(torch.device("cpu"), "bf16", None) is None  # no MFU without a known peak


def test_cuda_rows_carry_mfu_and_peak_memory(world, tmp_path, monkeypatch):  # noqa: F811
    """The CUDA-only fields, on a CPU: the row of a run that believes it is on CUDA (no GPU calls but one, faked)."""
    run = setup(config(world, tmp_path / "c"))
    run.device, run.peak_tflops = torch.device("cuda"), 100.0
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    ids = list(range(8))
    row = mt.metrics_row(run, 0, mt.batch_counts(run, ids, None), loss=5.0, grad_norm=1.0, seconds=2.0)
    image_tokens = sum(len(run.examples[i]["images"]) for i in ids) * run.model.num_image_tokens
    flops = logs.step_flops(run.sizes, sum(len(run.examples[i]["input_ids"]) for i in ids),
                            sum(run.examples[i]["n_supervised"] for i in ids), image_tokens)
    assert image_tokens > 0 and row["mfu"] == pytest.approx(flops / 2.0 / 100e12)
    assert row["peak_memory_gb"] == 3.0 and FIELDS <= row.keys()


def test_bad_scaling_settings(world, tmp_path):  # noqa: F811
    for bad, match in ((dict(strategy="zero3"), "strategy 'zero3': expected ddp or fsdp"),
                       (dict(precision="fp16"), "precision 'fp16': expected fp32 or bf16"),
                       (dict(strategy="fsdp", lora=True), "strategy fsdp with lora: not supported"),
                       (dict(report_to="wandb"), "report_to 'wandb': expected tensorboard"),
                       (dict(peak_tflops=-1.0), "peak TFLOP/s -1")):
        with pytest.raises(ValueError, match=match):
            stage2(world, tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.logs").exists()
    assert not torch.distributed.is_initialized()
