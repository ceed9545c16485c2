"""The memory plan (`minillava plan`): parameter counts from configs, the activation formula against what autograd
keeps, sharding, checkpointing, the recipes, and the plan's total against a measured peak."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import world  # noqa: F401  (the tiny backbones, images and LLaVA-format files)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from minillava.model import LlavaModel
from minillava.training.plan import (
    RECIPE_DEFAULTS,
    SCALE_RECIPES,
    SHAPES,
    GiB,
    activation_bytes,
    backbone,
    largest_micro_batch,
    main,
    plan,
    recipe_plan,
    table,
)
from minillava.utils import peft_quietly
from minillava.vision import VisionTower

# Small shapes, built for real: a CLIP tower (4x4 patches + CLS) and a Llama with grouped-query attention.
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
LM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=500, max_position_embeddings=256)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The small shapes as folders holding a config.json, the way `plan` takes any local model."""
    root = tmp_path_factory.mktemp("shapes")
    AutoConfig.for_model("clip_vision_model", **VISION).save_pretrained(root / "vision")
    AutoConfig.for_model("llama", **LM).save_pretrained(root / "lm")
    return str(root / "vision"), str(root / "lm")


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def small_llava(seed: int = 0) -> LlavaModel:
    torch.manual_seed(seed)
    vision = AutoModel.from_config(AutoConfig.for_model("clip_vision_model", **VISION))
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LM))
    return LlavaModel(VisionTower(vision), "mlp2x_gelu", lm, image_token_id=5)


# ---- parameter counts -------------------------------------------------------------------------------------------
def test_counts_equal_the_real_modules(folders):
    """Built on the meta device from a config, counted: the same numbers as the real modules (the zoo's included)."""
    import minillava as ml

    model = small_llava()
    p = plan(*folders, seq_len=64, micro_batch=2, lora=False)
    assert p.counts["vision"] == count(model.vision_tower) and p.counts["lm"] == count(model.language_model)
    assert p.counts["projector"] == count(model.projector) and p.counts["trainable"] == count(model) - p.counts[
        "vision"]
    assert p.image_tokens == model.num_image_tokens == 16
    for name, kind in (("tiny-clip", "vision"), ("tiny-lm", "lm")):
        real = ml.checkpoints.load_vision(name)[0] if kind == "vision" else ml.checkpoints.load_lm(name)[0]
        real = ml.vision.vision_model_of(real) if kind == "vision" else real
        assert backbone(name, kind).params == count(real), name
    tiny = plan("tiny-llava", "tiny-llava", seq_len=160)  # a whole minillava model folder holds both configs
    assert tiny.counts["vision"] + tiny.counts["projector"] + tiny.counts["lm"] == count(ml.load("tiny-llava")[0])


def test_lora_count_equals_peft(folders):
    """LoRA on every linear layer of the LM (LLaVA's recipe, peft's "all-linear"): r * (d_in + d_out) each."""
    from peft import LoraConfig, get_peft_model

    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LM))
    with peft_quietly():
        peft_lm = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    p = plan(*folders, seq_len=64, lora=True, lora_r=8)
    assert p.counts["lora"] == sum(t.numel() for t in peft_lm.parameters() if t.requires_grad)
    assert p.counts["trainable"] == p.counts["lora"] + p.counts["projector"]


@pytest.mark.parametrize("name, known", [
    ("clip-vit-l-336", 303_507_456),  # LLaVA-1.5's tower, ~304 M
    ("vicuna-7b", 6_738_415_616),  # Llama-2-7B
    ("llama-2-13b", 13_015_864_320),
    ("qwen2.5-0.5b", 494_032_768),  # tied embeddings, counted once
    ("smollm2-135m", 134_515_008),
])
def test_named_shapes_have_their_public_sizes(name, known):
    kind = "vision" if SHAPES[name]["config"]["model_type"].endswith("vision_model") else "lm"
    assert abs(backbone(name, kind).params - known) <= 0.01 * known


def test_llava_7b_totals_the_published_size():
    """CLIP-L/336 + mlp2x_gelu + Vicuna-7B = 7.06 B (llava-1.5-7b-hf: 7,063,427,072 with its 64 extra token rows)."""
    c = plan("clip-vit-l-336", "vicuna-7b").counts
    assert c["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert c["vision"] + c["projector"] + c["lm"] + 64 * 4096 * 2 == 7_063_427_072


# ---- the parts ----------------------------------------------------------------------------------------------------
def test_fsdp_divides_the_sharded_parts_by_the_world_size():
    one = plan("clip-vit-l-336", "vicuna-7b", seq_len=2048, micro_batch=4, strategy="fsdp", world=1)
    eight = plan("clip-vit-l-336", "vicuna-7b", seq_len=2048, micro_batch=4, strategy="fsdp", world=8)
    assert eight.optimizer == one.optimizer // 8 and eight.optimizer == 8 * one.counts["trainable"] // 8
    assert eight.detail["fp32 gradients"] == one.detail["fp32 gradients"] // 8
    assert eight.detail["trainable weights (fp32)"] == one.detail["trainable weights (fp32)"] // 8
    key = "vision tower (frozen, replicated)"
    assert eight.detail[key] == one.detail[key] == 4 * one.counts["vision"]  # replicated, fp32 (FSDP leaves it)
    assert eight.activations == one.activations  # each device still runs its own micro-batch
    ddp = plan("clip-vit-l-336", "vicuna-7b", seq_len=2048, micro_batch=4, strategy="ddp", world=8)
    assert ddp.optimizer == one.optimizer and ddp.detail["DDP buckets"] == ddp.detail["fp32 gradients"]
    assert ddp.detail[key] == 2 * one.counts["vision"]  # bf16: `store_frozen`
    frozen_lm = plan("clip-vit-l-336", "vicuna-7b", seq_len=2048, stage=1, strategy="fsdp", world=8)
    assert frozen_lm.detail["frozen LM"] == 4 * frozen_lm.counts["lm"] // 8  # sharded, fp32


def test_the_plan_holds_frozen_weights_as_training_does(world, tmp_path):  # noqa: F811
    """The dtypes `plan` counts are those `train` holds: bf16 frozen weights under ddp, fp32 under fsdp."""
    from minillava.training import TrainConfig, setup
    from minillava.training import distributed as md

    for strategy, dtype in (("ddp", torch.bfloat16), ("fsdp", torch.float32)):
        try:
            run = setup(TrainConfig(stage=1, out=str(tmp_path / strategy), data=world["captions"],
                                    images=world["images"], vision=world["vision"], lm=world["lm"], batch_size=8,
                                    micro_batch_size=8, max_steps=1, precision="bf16", strategy=strategy,
                                    progress=False))
            assert {p.dtype for p in run.model.parameters() if not p.requires_grad} == {dtype}
        finally:
            md.finish()


def test_plan_command_refuses_what_it_would_ignore(capsys):
    from minillava.training.plan import main

    for argv, message in ((["--recipe", "llava-1.5-7b", "--world", "4"], "leave out --world"),
                          (["--stage", "1", "--lora"], "--lora with --stage 1"),
                          (["--gpu-gb", "-1"], "--gpu-gb -1.0: must be positive"),
                          (["--lora-r", "0"], "--lora-r 0: must be positive")):
        assert main(argv) == 2 and message in capsys.readouterr().err


def test_precision_and_stage_decide_the_bytes_per_parameter(folders):
    """fp32: 4 + 4 + 8 bytes per trainable weight. bf16 mixed: fp32 master weight, gradient and moments, a bf16
    compute copy, and the frozen weights in bf16. Stage 1 trains the projector alone."""
    for precision, frozen, copy in (("fp32", 4, 0), ("bf16", 2, 2)):
        p = plan(*folders, seq_len=64, precision=precision)
        c = p.counts
        assert p.params == frozen * c["vision"] + (4 + copy) * c["trainable"]
        assert (p.grads, p.optimizer) == (4 * c["trainable"], 8 * c["trainable"])
        s1 = plan(*folders, seq_len=64, precision=precision, stage=1)
        assert s1.counts["trainable"] == c["projector"]
        assert s1.params == frozen * (c["vision"] + c["lm"]) + (4 + copy) * c["projector"]


def test_checkpointing_keeps_only_the_layer_inputs():
    common = dict(vision="clip-vit-l-336", lm="vicuna-7b", seq_len=2048, micro_batch=16, strategy="fsdp", world=8)
    on, off = plan(checkpointing=True, **common), plan(checkpointing=False, **common)
    assert on.activations < off.activations / 3
    v, t = backbone("clip-vit-l-336", "vision"), backbone("vicuna-7b", "lm")
    kept = activation_bytes(v, t, 576, 2048, 16, 2, "full", checkpointing=True)
    one_layer = activation_bytes(v, t, 576, 2048, 16, 2, "full", checkpointing=False)["layers"] // 32
    assert kept["layers"] == 32 * 16 * 2048 * 2 * 4096  # the inputs of the 32 layers, bf16
    assert kept["backward transients"] > one_layer  # one layer recomputed at a time, and its gradients


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("tune", ["full", "frozen", "lora"])
def test_activation_formula_equals_what_autograd_saves(folders, tune, precision):
    """The tensors autograd keeps for the backward pass of a real forward (unique storages, weights excluded),
    against the formula: equal but for the terms it leaves out (ids, masks, 1/rms) and the padding and first token
    it counts as supervised: within 1%. bf16 here is a model cast to bf16, as FSDP2's MixedPrecisionPolicy runs it."""
    from peft import LoraConfig, get_peft_model

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = small_llava().to(dtype).train()
    if tune != "full":
        model.language_model.requires_grad_(False)
    if tune == "lora":
        with peft_quietly():
            model.language_model = get_peft_model(model.language_model, LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
    B, T, P = 2, 96, model.num_image_tokens
    ids = torch.randint(10, LM["vocab_size"], (B, T))
    ids[:, 1:1 + P] = 5
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, -6:] = 0  # a padded batch
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :1 + P] = -100
    storages = {}

    def keep(t):
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(ids, mask, images=torch.randn(B, 3, 32, 32), labels=labels, return_logits=False)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = sum(n for ptr, n in storages.items() if ptr not in weights)
    a = dtype.itemsize
    acts = activation_bytes(backbone(folders[0], "vision"), backbone(folders[1], "lm"), P, T, B, a, tune,
                            checkpointing=False, padded=True, lora_r=8, mask_bytes=4)  # (a CPU: fp32 masks)
    planned = acts["layers"] + acts["around the layers"]
    assert abs(saved - planned) <= 0.01 * planned, (saved, planned)


# ---- the number that matters: planned against measured -----------------------------------------------------------
MEASURE = r"""
import ctypes, gc, json, os, sys
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from minillava.model import LlavaModel
from minillava.vision import VisionTower

def rss():  # resident now
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak():  # resident at most, so far: this process's VmHWM (ru_maxrss would also count, after exec, the
    # resident size of the parent that forked it: the pytest process, over a gigabyte after the benchmark tests)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

a = json.loads(sys.argv[1])

def build(vision, lm, checkpointing):
    torch.manual_seed(0)
    tower = VisionTower(AutoModel.from_config(AutoConfig.for_model("clip_vision_model", **vision)))
    model = LlavaModel(tower, "mlp2x_gelu", AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **lm)), 5)
    if checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

def step(model, opt, vision, vocab, B, T):
    P = (vision["image_size"] // vision["patch_size"]) ** 2
    ids = torch.randint(10, vocab, (B, T))
    ids[:, 1:1 + P] = 5
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, -8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :1 + P] = -100
    images = torch.randn(B, 3, vision["image_size"], vision["image_size"])
    model(ids, mask, images=images, labels=labels, return_logits=False).loss.backward()
    opt.step()  # (no zero_grad: the gradients stay, as between micro-steps of an accumulated batch)

# Warm up on a tiny model of the same layers: what libraries set up on first use is not the model's memory.
tv = dict(a["vision"], hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
tl = dict(a["lm"], hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
          num_key_value_heads=2, vocab_size=100)
m, o = build(tv, tl, True)
step(m, o, tv, 100, 2, a["T"])
del m, o
results = []
for checkpointing in (True, False):  # the smaller planned peak first: each run must raise the high-water mark
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, high = rss(), peak()
    model, opt = build(a["vision"], a["lm"], checkpointing)
    step(model, opt, a["vision"], a["lm"]["vocab_size"], 1, a["T"])  # gradients and AdamW state now exist
    step(model, opt, a["vision"], a["lm"]["vocab_size"], a["B"], a["T"])  # the step of the plan
    del model, opt
    results.append({"checkpointing": checkpointing, "measured": peak() - base, "raised": peak() > high})
print(json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and tunes glibc's malloc")
def test_the_plan_meets_the_measured_peak(tmp_path):
    """One fp32 training step (forward, backward, AdamW) of a small LLaVA built from configs with minillava's own
    parts, in a fresh process: its peak resident memory above the baseline, against `plan` for the same shapes,
    within 15%, with and without checkpointing. glibc is told to return every freed block over 128 KiB at once
    (MALLOC_MMAP_THRESHOLD_), so resident memory follows the live tensors, as the plan counts them."""
    shapes = {"vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                             image_size=128, patch_size=16),
              "lm": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=16000, max_position_embeddings=1024),
              "B": 4, "T": 256}
    AutoConfig.for_model("clip_vision_model", **shapes["vision"]).save_pretrained(tmp_path / "vision")
    AutoConfig.for_model("llama", **shapes["lm"]).save_pretrained(tmp_path / "lm")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(shapes)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for row in json.loads(run.stdout.strip().splitlines()[-1]):
        p = plan(str(tmp_path / "vision"), str(tmp_path / "lm"), seq_len=shapes["T"], micro_batch=shapes["B"],
                 precision="fp32", checkpointing=row["checkpointing"], overhead_gb=0)
        assert row["raised"], row
        print(f"checkpointing {row['checkpointing']}: measured {row['measured'] / 2**20:.0f} MiB, "
              f"planned {p.total / 2**20:.0f} MiB")
        assert abs(p.total - row["measured"]) <= 0.15 * row["measured"], (row, p.total)


# ---- recipes and the command line --------------------------------------------------------------------------------
def test_llava_recipe_is_llava_1_5s_finetune():
    p = recipe_plan("llava-1.5-7b")
    assert (p.micro_batch, p.world, p.accumulation, p.batch) == (16, 8, 1, 128)
    assert (p.strategy, p.checkpointing, p.precision, p.stage, p.image_tokens, p.seq_len) == (
        "fsdp", True, "bf16", 2, 576, 2048)
    assert p.fits(80) and not p.fits(24)


@pytest.mark.parametrize("name", [n for n, r in SCALE_RECIPES.items() if r["micro_batch"] == "auto"])
def test_one_gpu_recipes_take_the_largest_micro_batch_that_fits(name):
    p = recipe_plan(name)
    assert p.world == 1 and p.micro_batch * p.accumulation == p.batch == 128 and p.fits()
    settings = {**RECIPE_DEFAULTS, **SCALE_RECIPES[name]}
    for key in ("about", "micro_batch", "batch", "gpu_gb"):
        settings.pop(key)
    bigger = next((m for m in range(p.micro_batch + 1, 129) if 128 % m == 0), None)
    assert bigger is None or not plan(micro_batch=bigger, **settings).fits(p.gpu_gb)  # (None: the whole batch fits)


def test_no_micro_batch_fits_is_an_error():
    with pytest.raises(ValueError, match="not even a micro-batch of 1 fits 1 GB"):
        largest_micro_batch(1, 128, vision="clip-vit-b-16", lm="vicuna-7b")


def test_recipes_table_and_markdown(capsys):
    assert main(["--recipes"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in SCALE_RECIPES) and "16 x 8 x 1 = 128" in text
    assert main(["--recipes", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| plan") and lines[1].startswith("| ---") and len(lines) == 2 + len(SCALE_RECIPES)
    assert table([recipe_plan("llava-1.5-7b")]).count("\n") == 1


def test_plan_command_shows_both_stages(capsys):
    assert main(["--vision", "tiny-clip", "--lm", "tiny-lm", "--seq-len", "160", "--micro-batch", "16",
                 "--precision", "fp32", "--gpu-gb", "24"]) == 0
    text = capsys.readouterr().out
    assert "stage 1 (frozen) 16/dev" in text and "stage 2 (full) 16/dev" in text and "fits 24 GB" in text
    assert main(["--recipe", "smollm2-llava-24gb"]) == 0
    assert "x 1 x" in capsys.readouterr().out  # micro x 1 device x accumulation
    assert main(["--micro-batch", "auto", "--gpu-gb", "80", "--stage", "2", "--lora", "--checkpointing"]) == 0
    assert "stage 2 (lora)" in capsys.readouterr().out


def test_bad_inputs_are_named(capsys):
    assert main(["--lm", "gpt-17"]) == 2
    assert "lm 'gpt-17': not a named shape" in capsys.readouterr().err
    assert main(["--vision", "clip-vit-l-336", "--seq-len", "500"]) == 2
    assert "seq_len 500: no room for text after the 576 image tokens" in capsys.readouterr().err
    assert main(["--micro-batch", "auto"]) == 2
    with pytest.raises(ValueError, match="strategy 'zero3'"):
        plan("clip-vit-b-16", "smollm2-135m", strategy="zero3")


def test_every_option_explains_itself():
    from minillava.training.plan import parser

    undocumented = [a.option_strings[0] for a in parser()._actions if a.option_strings and not a.help]
    assert not undocumented
    assert GiB == 2**30


def test_gpu_session_plan_part_runs_at_toy_size(tmp_path, capsys):
    """The prepared GPU script's plan part, at toy size on this CPU: every case planned both ways and the two
    training steps run (no CUDA here, so nothing is measured); its file says so."""
    from minillava.tools import gpu_session

    assert gpu_session.main(["--out", str(tmp_path), "--part", "plan", "--smoke", "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "plan_cuda.json").read_text())
    assert result["smoke"] is True and result["device"] == "cpu"
    assert [r["checkpointing"] for r in result["rows"]] == [True, False]
    assert all(r["measured_bytes"] is None and r["planned_bytes"] > 0 for r in result["rows"])
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_session.main(["--out", str(tmp_path), "--device", "cpu"])


def test_the_shipped_gpu_measurement_is_what_the_plan_still_says():
    """`data/results/plan_cuda.json` (the plan part on a lent H200, cited in chapter 8 and performance.md): its
    planned bytes are what `plan` gives for its cases today, so a change to the memory model cannot leave the
    cited comparison stale; and the measured peaks it holds are within 15% of them."""
    from minillava import zoo
    from minillava.tools.gpu_session import PLAN_CASES
    from minillava.training.plan import plan

    shipped = json.loads((zoo.data_dir() / "results" / "plan_cuda.json").read_text())
    assert shipped["smoke"] is False and shipped["device"] != "cpu"
    assert [{k: r[k] for k in PLAN_CASES[0]} for r in shipped["rows"]] == PLAN_CASES * 2
    assert [r["checkpointing"] for r in shipped["rows"]] == [True, False]
    for row in shipped["rows"]:
        case = {k: row[k] for k in PLAN_CASES[0]}
        now = plan(stage=2, precision="bf16", checkpointing=row["checkpointing"], padded=False, overhead_gb=0, **case)
        assert now.total == row["planned_bytes"], (
            f"checkpointing={row['checkpointing']}: the plan now gives {now.total} bytes, the stored measurement was "
            f"compared with {row['planned_bytes']}; measure again on a GPU (gpu_session --part plan) and update "
            "chapter 8 and performance.md")
        assert abs(now.total - row["measured_bytes"]) <= 0.15 * row["measured_bytes"]
