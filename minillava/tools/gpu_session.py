"""Everything that needs a GPU, as one prepared command per part: `python -m minillava.tools.gpu_session --out DIR`.

A GPU is lent to this project now and then, for minutes; this script is what to run when it is. Each part writes
its results under `--out` as it finishes (a part cut short keeps what it wrote), and `--part` picks one:

- `plan`: `minillava plan` against the measured CUDA peak of real training steps (#23): a LLaVA built from
  the named shapes (CLIP ViT-L/14-336 + a Qwen2.5-0.5B-shaped LM; random weights) takes two stage-2 steps as
  `train` takes them (bf16 autocast over fp32 weights, the frozen tower in bf16, AdamW, the fused loss), with
  and without activation checkpointing; `torch.cuda.max_memory_allocated` of the second step against the plan's
  total (its fixed overhead left out). -> `plan_cuda.json`
- `bench`: `minillava bench --device cuda --config base`, every phase, TRL's included. -> `bench_cuda_base.json`
- `smol`: smol-llava's GPU recipe and its evaluation (#22), built into `DIR/zoo`, to be copied into `data/` after a
  look. -> `zoo/`
- `smol-variants`: its variants (full fine-tune, no text chats), measured beside it. -> `zoo/`

`--smoke` runs each part at toy size on whatever device there is, to check the script itself (the tests run
`--part plan --smoke`). One part per call keeps each within a device session's ten-minute limit per command:

    python -m minillava.tools.gpu_session --out $OUT --part plan
    python -m minillava.tools.gpu_session --out $OUT --part bench
    python -m minillava.tools.gpu_session --out $OUT --part smol
    python -m minillava.tools.gpu_session --out $OUT --part smol-variants

A lent machine has no network and takes 64 MiB of files a call: `.ci/device_kit` packs what these parts need
(SmolLM2's GGUF across two calls) and prints the commands that run them there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..utils import pick_device, write_json

PARTS = ("plan", "bench", "smol", "smol-variants")
PLAN_CASES = [dict(vision="clip-vit-l-336", lm="qwen2.5-0.5b", seq_len=1024, micro_batch=8)]
SMOKE_CASES = [dict(vision="tiny-clip", lm="tiny-lm", seq_len=128, micro_batch=2)]


def measure_step_peak(vision: str, lm: str, seq_len: int, micro_batch: int, checkpointing: bool,
                      device: torch.device, precision: str = "bf16") -> int | None:
    """Peak bytes allocated on `device` during the second of two stage-2 training steps of a randomly
    initialised LLaVA of these shapes, run as `train` runs them. None on a CPU (no allocator statistics)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from ..model import LlavaModel
    from ..training import distributed
    from ..training.plan import _config_of
    from ..vision import VisionTower

    torch.manual_seed(0)
    tower = VisionTower(AutoModel.from_config(_config_of(vision, "vision")))
    text = AutoModelForCausalLM.from_config(_config_of(lm, "lm"))
    model = LlavaModel(tower, "mlp2x_gelu", text, image_token_id=5).to(device).train()
    distributed.store_frozen(model, "ddp", precision)
    if checkpointing:
        distributed.enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    P, S = model.num_image_tokens, tower.image_size
    ids = torch.randint(10, text.config.vocab_size, (micro_batch, seq_len), device=device)
    ids[:, 1:1 + P] = 5
    labels = ids.clone()
    labels[:, :1 + P] = -100
    images = torch.randn(micro_batch, 3, S, S, device=device)
    mask = torch.ones_like(ids)

    def step():
        with distributed.autocast(device, precision):
            loss = model(ids, mask, images=images, labels=labels, return_logits=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on
    if device.type != "cuda":
        step()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def part_plan(out: Path, device: torch.device, smoke: bool) -> dict:
    """Planned against measured, for each case with and without checkpointing -> out/plan_cuda.json."""
    from ..training.plan import plan

    rows = []
    for case in SMOKE_CASES if smoke else PLAN_CASES:
        for checkpointing in (True, False):
            planned = plan(stage=2, precision="bf16", checkpointing=checkpointing, padded=False, overhead_gb=0,
                           **case)
            start = time.perf_counter()
            measured = measure_step_peak(**case, checkpointing=checkpointing, device=device)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # (the step's model is gone: the next case starts from nothing)
            row = {**case, "checkpointing": checkpointing, "planned_bytes": planned.total,
                   "planned": {k: getattr(planned, k) for k in ("params", "grads", "optimizer", "activations")},
                   "measured_bytes": measured, "seconds": time.perf_counter() - start}
            if measured:
                row["planned_over_measured"] = planned.total / measured
                row["within_15_percent"] = abs(planned.total - measured) <= 0.15 * measured
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("lm", "checkpointing", "planned_bytes", "measured_bytes")}))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "smoke": smoke, "rows": rows}
    write_json(out / "plan_cuda.json", result)
    return result


def part_bench(out: Path, device: torch.device, smoke: bool) -> None:
    """The benchmark, every phase -> out/bench_cuda_base.json (saved after each phase)."""
    from . import bench

    name = f"bench_{device.type}_{'tiny' if smoke else 'base'}.json"
    args = ["--device", device.type, "--json", "--out", str(out / name)]
    args += ["--config", "tiny", "--repeats", "1", "--warmup", "1", "--images", "16", "--new-tokens", "4",
             "--batch", "8"] if smoke else ["--config", "base"]
    bench.main(args)


def part_smol(out: Path, device: torch.device, smoke: bool) -> None:
    """smol-llava's recipe (both stages) and its evaluation, into out/zoo; the build is written before the
    evaluation starts, so a session cut short during the measurement keeps the weights."""
    from . import build_smol

    where = ["--out", str(out / "zoo"), "--work", str(out / "work"), "--device", device.type]
    build_smol.main(where + ["--scale", "toy" if smoke else "gpu"])
    build_smol.main(where + ["--eval-only"] + (["--n-eval", "8"] if smoke else []))


def part_smol_variants(out: Path, device: torch.device, smoke: bool) -> None:
    """The variants (full fine-tune, no text chats) from the stage 1 in out/zoo, measured beside the stored
    measurement there (in a later session: first copy data/smol-llava-stage1, data/smol-llava and data/results
    into out/zoo, where `--part smol` left them)."""
    from . import build_smol

    where = ["--out", str(out / "zoo"), "--work", str(out / "work"), "--device", device.type]
    build_smol.main(where + ["--scale", "toy" if smoke else "gpu", "--variants"])
    build_smol.main(where + ["--eval-only", "--variants-only"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillava.tools.gpu_session", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the results (created)")
    p.add_argument("--part", choices=PARTS, nargs="+", default=list(PARTS))
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--smoke", action="store_true", help="toy sizes, any device: checks the script itself")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu_session: no CUDA device here; --smoke runs the parts at toy size anywhere")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in args.part:
        start = time.perf_counter()
        {"plan": part_plan, "bench": part_bench, "smol": part_smol,
         "smol-variants": part_smol_variants}[part](out, device, args.smoke)
        print(f"gpu_session: {part} done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
