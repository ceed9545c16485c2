"""Training beyond one process: the process group, DDP or FSDP2, and the memory savers that go with sharding.

Two strategies (`TrainConfig.strategy`), both launched by `torchrun --nproc-per-node N -m minillava train ...`:

- `ddp`: every process holds the whole model and optimizer; gradients are averaged after the backward pass.
- `fsdp`: PyTorch's FSDP2 (`fully_shard`) on a 1-D device mesh, as torchtitan lays it out: each decoder layer of
  the language model is one unit, the root (embeddings, final norm, LM head, projector) another. Between uses a
  process keeps 1/N of every weight, gradient and AdamW moment; a unit's weights are all-gathered just before it
  runs and freed after. The frozen vision tower is left out of the sharding (replicated): it never trains, so
  there is nothing of it to shard in the optimizer, it is small next to the LM (0.3 B against 7 B in LLaVA-1.5),
  and the feature cache calls it outside the model's forward, where sharded weights would not be gathered.

With one process, `fsdp` runs on a mesh of one (a process group of one, made here), so the same code path can be
tried anywhere.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from ..model import LlavaModel

_OWNED = False  # whether `init` made the process group (a group of one), so `finish` should end it


def init(strategy: str) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins its process group (NCCL on CUDA, else gloo);
    `fsdp` in a single process gets a group of one, since FSDP2 needs a device mesh even of size 1."""
    global _OWNED
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if world > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # NCCL's collectives use the current device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    elif world == 1 and strategy == "fsdp" and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _OWNED = True
    return (dist.get_rank() if world > 1 else 0), world


def finish() -> None:
    """End the process group `init` made for a single-process `fsdp` run (torchrun's groups are left alone)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def barrier(world: int) -> None:
    """Wait for every process (nothing to wait for with one)."""
    if world > 1:
        dist.barrier()


def broadcast(obj, world: int):
    """Process 0's `obj` (any picklable value, e.g. a temporary folder's path), on every process."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: int) -> list:
    """Every process's `obj` (any picklable value), in rank order, on every process."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ---- memory savers -------------------------------------------------------------------------------------------------
def enable_checkpointing(model: LlavaModel) -> None:
    """Activation checkpointing of every decoder layer of the LM: a layer's activations are not kept for the
    backward pass but recomputed there (non-reentrant `torch.utils.checkpoint`). Same gradients, less memory,
    one more forward pass of the LM per step."""
    lm, kwargs = model.language_model, {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # its name since transformers 5.2x; the old one warns there
        lm.activation_checkpointing_enable(kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def autocast(device: torch.device, precision: str):
    """The context a step's forward runs in: bf16 autocast for `precision` "bf16" (weights, gradients and AdamW's
    state stay fp32; matmuls compute in bf16), nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- the model as the steps call it ------------------------------------------------------------------------------
def store_frozen(model: LlavaModel, strategy: str, precision: str) -> None:
    """Under bf16 (without FSDP, whose policy casts what it gathers), hold the weights that do not train -- the
    vision tower, and the LM in stage 1 or under LoRA -- in bf16, as LLaVA's scripts load them: half their
    memory, as `minillava plan` counts it. Weights that train stay fp32 (AdamW's master copy)."""
    if precision == "bf16" and strategy != "fsdp":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)


def wrap(model: LlavaModel, strategy: str, device: torch.device, world: int, precision: str) -> torch.nn.Module:
    """The module a step calls: `model` itself (one process, ddp), DDP around it (ddp, N processes), or `model`
    sharded in place (fsdp: its parameters become DTensor shards, so build the optimizer afterwards)."""
    if strategy == "fsdp":
        shard(model, device, world, precision)
        return model
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def shard(model: LlavaModel, device: torch.device, world: int, precision: str) -> None:
    """FSDP2: `fully_shard` each decoder layer of the LM, then the root (LlavaModel) for what is left, the vision
    tower excepted (kept whole on every process). With "bf16", weights are all-gathered in bf16 and gradients
    reduce-scattered in fp32 (`MixedPrecisionPolicy`); the sharded fp32 weights are what AdamW updates."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
          else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=set(model.vision_tower.parameters()))


def decoder_layers(model: LlavaModel) -> torch.nn.ModuleList:
    """The LM's decoder layers (`model.layers` of a Llama, Qwen2, Mistral ...), the units FSDP shards one by one."""
    layers = getattr(model.language_model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"strategy fsdp: cannot find the decoder layers of the language model "
                         f"({type(model.language_model).__name__} has no get_decoder().layers); use strategy ddp")
    return layers


def full_state_dict(model: LlavaModel) -> dict[str, torch.Tensor]:
    """Every process calls it (the shards are gathered); process 0 gets the whole state dict on the CPU, the
    others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model: LlavaModel, state: dict[str, torch.Tensor]) -> LlavaModel:
    """A plain LlavaModel with the weights of `state` (a `full_state_dict`) and `model`'s shapes, for saving the
    result in the ordinary format. Built on the meta device and given `state`'s tensors, so no second copy."""
    with torch.device("meta"):
        plain = LlavaModel.from_config(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain
