"""Resumable training state: trainable weights, optimizer state and the RNG, saved atomically every few steps.

A checkpoint remembers the settings its run's losses depend on (`resume_settings`), the contents of its data
file and init checkpoint among them; a run with other settings refuses to resume it, naming each that differs.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from ..outputs import MARKER, atomic_dir
from ..utils import load_tensors, read_json, save_tensors, write_json
from .config import TrainConfig


def resume_settings(cfg: TrainConfig, n_samples: int, world: int, precision: str = "fp32") -> dict:
    """What a run's losses depend on besides its weights: a checkpoint resumes only a run with the same.
    `precision`: the run's resolved precision (`TrainConfig.resolved_precision`). The strategy also fixes the
    checkpoint's format; gradient checkpointing is not kept, as it changes no number (it may be switched on to
    resume a run that ran out of memory)."""
    keep = ("stage", "init", "vision", "lm", "projector", "feature_layer", "template", "lora", "freeze_lm",
            "lora_r", "lora_alpha", "lora_dropout", "micro_batch_size", "epochs", "max_steps", "warmup_ratio",
            "weight_decay", "max_grad_norm", "group_by_length", "seed", "strategy", "vision_lr")
    return {**{k: getattr(cfg, k) for k in keep}, "lr": cfg.resolved_lr(), "batch_size": cfg.resolved_batch_size(),
            "precision": precision, "samples": n_samples, "processes": world, "data_sha256": fingerprint(cfg.data),
            "init_sha256": fingerprint(cfg.init) if cfg.stage == 2 and cfg.init else None}


# files of a checkpoint folder that change nothing a run computes: its run log, model card and MARKER
NOT_WEIGHTS = {"README.md", "card.json", "metrics.json", "run.json", MARKER}


def fingerprint(path: str | Path) -> str:
    """The first 16 hex digits of a sha256 over a file's bytes, or over a folder's files (names and bytes, in
    name order; its notes, `NOT_WEIGHTS`, left out)."""
    path, sha = Path(path), hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and p.relative_to(path).as_posix() not in NOT_WEIGHTS)
    for f in files:
        if f != path:  # a folder's file: its name counts too
            sha.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 20):
                sha.update(chunk)
    return sha.hexdigest()[:16]


def save_state(path: Path, opt, trainable, step: int, metrics: list[dict], settings: dict,
               rng: list[torch.Tensor] | None = None) -> None:
    """Write the trainable weights, AdamW's moments and the RNG state of each process (`rng`, in rank order;
    default: this process's) into the folder `path`, atomically."""
    tensors = {f"param/{n}": p.detach().cpu() for n, p in trainable}
    for n, p in trainable:
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt/{n}/{k}"] = torch.as_tensor(v).detach().cpu()
    for rank, state in enumerate(rng or [torch.get_rng_state()]):  # LoRA dropout draws from it
        tensors[f"rng/torch/{rank}"] = state
    with atomic_dir(path, marker="state.json") as tmp:
        save_tensors(tensors, tmp / "state.safetensors")
        write_json(tmp / "state.json", {"step": step, "metrics": metrics, "settings": settings})


def restore_state(path: Path, opt, trainable, settings: dict, rank: int = 0) -> tuple[int, list[dict]]:
    """Load a `save_state` folder into the trainable weights and `opt`, and process `rank`'s RNG state; returns
    (step, metrics so far)."""
    state = checked_state(path, settings)
    tensors = load_tensors(path / "state.safetensors")
    with torch.no_grad():
        for n, p in trainable:
            if f"param/{n}" not in tensors:
                raise ValueError(f"checkpoint '{path}': has no weight '{n}' (a different model or recipe?)")
            p.copy_(tensors[f"param/{n}"])
            st = {k.split("/")[-1]: v for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
            if st:
                opt.state[p] = {k: (v if k != "step" else v.clone()) for k, v in st.items()}
    torch.set_rng_state(tensors.get(f"rng/torch/{rank}", tensors.get("rng/torch")))  # (older: one state for all)
    return state["step"], state["metrics"]


def checked_state(path: Path, settings: dict) -> dict:
    """A checkpoint's state.json, once its settings are found to be `settings`; else a ValueError naming each
    that differs."""
    state = read_json(path / "state.json", what="checkpoint state")
    saved = state.get("settings")  # absent in checkpoints of older versions
    if saved is not None:
        # older versions recorded neither: they ran ddp, with the precision that is the default now
        saved = {"strategy": "ddp", "precision": settings.get("precision"), **saved}
        differ = [f"{k} ({saved.get(k)!r} there, {v!r} now)" for k, v in settings.items() if saved.get(k) != v]
        if differ:
            raise ValueError(f"checkpoint '{path}': left by a run with other settings: {'; '.join(differ)}. "
                             "Run with the same settings to resume it, or delete it to start afresh.")
    return state


# ---- sharded (FSDP) checkpoints: torch.distributed.checkpoint ------------------------------------------------------
def _dcp_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)  # the trainable weights, as `save_state`


def save_sharded_state(path: Path, model, opt, step: int, metrics: list[dict], settings: dict) -> None:
    """FSDP: every process calls it. Each writes its shards of the trainable weights and AdamW's moments (DCP,
    `torch.distributed.checkpoint`), and its RNG state, into process 0's temporary folder; process 0 writes
    state.json and, once all have written, renames the folder onto `path` (atomically, as `save_state`)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .distributed import barrier, broadcast

    rank, world = dist.get_rank(), dist.get_world_size()
    weights, moments = get_state_dict(model, opt, options=_dcp_options())
    with (atomic_dir(path, marker="state.json") if rank == 0 else contextlib.nullcontext()) as tmp:
        tmp = broadcast(tmp, world)  # process 0's temporary folder (a shared file system across machines)
        dcp.save({"model": weights, "optim": moments}, checkpoint_id=tmp)
        save_tensors({"rng/torch": torch.get_rng_state()}, tmp / f"rng-{rank}.safetensors")
        if rank == 0:
            write_json(tmp / "state.json", {"step": step, "metrics": metrics, "settings": settings})
        barrier(world)  # every process has written its files before process 0 renames the folder


def restore_sharded_state(path: Path, model, opt, settings: dict) -> tuple[int, list[dict]]:
    """FSDP: every process calls it. Load a `save_sharded_state` folder into the sharded trainable weights and
    `opt`, and this process's RNG state; returns (step, metrics so far)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = checked_state(path, settings)
    weights, moments = get_state_dict(model, opt, options=_dcp_options())  # the layout to load into
    dcp.load({"model": weights, "optim": moments}, checkpoint_id=path)  # (raises if one is not in the checkpoint)
    # not strict: the frozen weights are left out on purpose (`dcp.load` has found every trainable one)
    set_state_dict(model, opt, model_state_dict=weights, optim_state_dict=moments, options=_dcp_options(False))
    torch.set_rng_state(load_tensors(path / f"rng-{dist.get_rank()}.safetensors")["rng/torch"])
    return state["step"], state["metrics"]
