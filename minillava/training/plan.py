"""The memory plan: how many bytes one device needs to train LLaVA, part by part, before anything is run.

`plan(vision, lm, ...)` builds the backbones on the `meta` device from their transformers configs (no weights,
no memory), counts their parameters, and adds up, per device:

- parameters: trainable weights in fp32 (the master copy in bf16 mixed precision); frozen weights in the
  compute dtype under DDP (LLaVA holds its frozen tower in bf16; `distributed.store_frozen`), in fp32 under FSDP2
  (whose mixed-precision policy casts what it gathers; the tower, which it does not manage, stays fp32 too);
  bf16 compute copies of the trainable weights (autocast caches one per weight for the step) or, under FSDP2,
  the gathered (unsharded) root and two decoder layers.
- gradients: fp32, one per trainable weight (plus DDP's bucket copy when world > 1, plus one unsharded layer
  under FSDP2).
- optimizer: AdamW's two fp32 moments per trainable weight.
- activations: what autograd keeps for the backward pass, from the per-layer formula below, or the optimizer
  step's temporaries (one fp32 tensor the size of the trainable weights) when those are larger: the two never
  live at the same time.
- overhead: a fixed allowance (default 1 GiB) for the CUDA context, cuBLAS/NCCL workspaces and allocator slack.

FSDP2 ("fsdp") shards the projector and the LM (parameters, gradients, optimizer state) over `world` devices;
the frozen vision tower is replicated. DDP ("ddp") replicates everything. Gradients are counted as held through
the forward pass, as they are during gradient accumulation: with accumulation 1 and `zero_grad(set_to_none=True)`
the true peak can be lower by up to the gradient row.

Activations, in bytes (B = micro_batch, T = seq_len, tok = B*T), for a Llama-style decoder layer run with SDPA
(a flash or memory-efficient kernel: no T x T score matrix is kept). Per token and layer:

    a = 4 (fp32) or 2 (bf16: the whole forward in bf16, as under FSDP2's MixedPrecisionPolicy); h = hidden,
    i = MLP width, q = heads*head_dim, k = kv_heads*head_dim (= q in a padded batch: transformers repeats K and V
    for a masked SDPA), n = heads
    LM trained (full):   8h + a*(4h + 2q + 2k + 4i) + 4n
        each RMSNorm keeps its input upcast to fp32 (4h), its normalised input and its output (a*h each);
        SDPA keeps q, k, v, its output and an fp32 log-sum-exp per head; the MLP gate, silu(gate), up, product
    LM frozen (stage 1): 8h + a*(2q + 2k + 3i) + 4n
        frozen weights need no saved inputs, but the gradient still flows back through the LM to the projector
    LoRA: frozen + per adapted linear 5*d_in + 4r (peft runs adapters in fp32: the dropout output, its 1-byte
        mask (4 bytes on a CPU), A's output)
    padded batch: + a*T (SDPA's additive B x T x T mask, made anew in every layer)

    layers = L * tok * layer        (checkpointing: L * tok * a*h, the layer inputs)
    around = tok * (2a*head_dim + 4h + a*h)       RoPE cos/sin; the final norm (no a*h when the LM is frozen)
           + image tokens * a*(C_v + 2H)          the projector's input, GELU input and output (mlp2x_gelu)
           + supervised * a*h (+ 4*V*h)           the head fused with the loss (`loss.linear_cross_entropy`)
                                                  keeps the gradient for its input, and for its weight (fp32)
                                                  when the head trains; never a (positions, V) matrix of scores
    peak = layers + around + max(supervised * a*h (+ 4*V*h)   those gradients, scaled, as backward starts,
                                 a*tok*(2h + 2i) (+ tok*layer, recomputed, with checkpointing))

The frozen vision tower runs under no_grad: nothing of it persists. Its pass alone holds every hidden state
(output_hidden_states) and one layer's intermediates, which counts only when larger than the LM's peak. Every text
token counts as supervised and every sample as padded to seq_len: the worst case. Terms under 1% (token ids,
masks, the norms' 1/rms) are left out. Under plain autocast (fp32 weights) the residual stream stays fp32 and
the activations are somewhat larger than this bf16 figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30

# ---- the named shapes and the recipes: data ---------------------------------------------------------------
# Configs as the hub ships them (only the fields that change shapes); parameter counts come from building them.
SHAPES = {
    "clip-vit-l-336": {"source": "openai/clip-vit-large-patch14-336", "config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
        "projection_dim": 768}},
    "clip-vit-b-16": {"source": "openai/clip-vit-base-patch16", "config": {
        "model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "hidden_act": "quick_gelu",
        "projection_dim": 512}},
    "siglip-base-224": {"source": "google/siglip-base-patch16-224", "config": {
        "model_type": "siglip_vision_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh"}},
    "vicuna-7b": {"source": "lmsys/vicuna-7b-v1.5 (the Llama-2-7B shape)", "config": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}},
    "llama-2-13b": {"source": "meta-llama/Llama-2-13b-hf (and vicuna-13b-v1.5)", "config": {
        "model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}},
    "qwen2.5-0.5b": {"source": "Qwen/Qwen2.5-0.5B", "config": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "tie_word_embeddings": True}},
    "smollm2-135m": {"source": "HuggingFaceTB/SmolLM2-135M", "config": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": True}},
}

# LLaVA-1.5's scripts/v1_5/{pretrain,finetune,finetune_lora}.sh: bf16, gradient checkpointing, max length 2048,
# 8 x A100-80GB; ZeRO-3 is the FSDP2 of this plan, ZeRO-2 (stage 1) replicates the weights like DDP.
# micro_batch "auto": the largest that fits gpu_gb and divides batch / world; accumulation makes up the rest.
SCALE_RECIPES = {
    "llava-1.5-7b-stage1": dict(about="LLaVA-1.5-7B stage 1 (pretrain.sh: ZeRO-2, 32 per GPU)",
                                vision="clip-vit-l-336", lm="vicuna-7b", stage=1, seq_len=2048, strategy="ddp",
                                world=8, micro_batch=32, batch=256, gpu_gb=80),
    "llava-1.5-7b": dict(about="LLaVA-1.5-7B stage 2 (finetune.sh: ZeRO-3, 16 per GPU)",
                         vision="clip-vit-l-336", lm="vicuna-7b", stage=2, seq_len=2048, strategy="fsdp", world=8,
                         micro_batch=16, batch=128, gpu_gb=80),
    "llava-1.5-7b-lora": dict(about="LLaVA-1.5-7B stage 2, LoRA r=128 (finetune_lora.sh: ZeRO-3, 16 per GPU; "
                                    "here DDP, as `train` runs LoRA, the frozen LM replicated in bf16)",
                              vision="clip-vit-l-336", lm="vicuna-7b", stage=2, lora=True, seq_len=2048,
                              strategy="ddp", world=8, micro_batch=16, batch=128, gpu_gb=80),
    "llava-1.5-13b": dict(about="LLaVA-1.5-13B stage 2 (finetune.sh: ZeRO-3, 16 per GPU)",
                          vision="clip-vit-l-336", lm="llama-2-13b", stage=2, seq_len=2048, strategy="fsdp", world=8,
                          micro_batch=16, batch=128, gpu_gb=80),
    "smollm2-llava-24gb": dict(about="one 24 GB GPU: CLIP-B/16 + SmolLM2-135M, stage 2 full, LLaVA's batch 128",
                               vision="clip-vit-b-16", lm="smollm2-135m", stage=2, seq_len=2048, strategy="ddp",
                               world=1, micro_batch="auto", batch=128, gpu_gb=24),
    "qwen-llava-0.5b-24gb": dict(about="one 24 GB GPU: SigLIP-B/16 + Qwen2.5-0.5B, stage 2 full, LLaVA's batch 128",
                                 vision="siglip-base-224", lm="qwen2.5-0.5b", stage=2, seq_len=2048, strategy="ddp",
                                 world=1, micro_batch="auto", batch=128, gpu_gb=24),
}
RECIPE_DEFAULTS = dict(projector="mlp2x_gelu", lora=False, precision="bf16", checkpointing=True)


# ---- backbones: from a name, a zoo component or a folder, built on the meta device ---------------------------
@dataclass(frozen=True)
class Backbone:
    """What the plan needs of a vision tower or an LM: its parameter count and the widths of its layers."""

    name: str
    kind: str  # "vision" or "lm"
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int = 0  # LM only, from here on
    head_dim: int = 0
    vocab: int = 0
    layer_params: int = 0  # one decoder layer
    linears: tuple = ()  # (d_in, d_out) of every linear layer of one decoder layer (LoRA adapts them all)
    image_size: int = 0  # vision only, from here on
    patch_size: int = 0
    has_cls: bool = False

    @property
    def image_tokens(self) -> int:
        """Tokens an image takes in the prompt: (image_size / patch_size)^2; LLaVA drops CLIP's CLS token."""
        return (self.image_size // self.patch_size) ** 2


def _config_of(name: str, kind: str):
    """A transformers config from a shape name, a zoo component, or a folder with a config.json."""
    from transformers import AutoConfig

    from .. import zoo

    if name in SHAPES:
        cfg = dict(SHAPES[name]["config"])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    folder = zoo.path(name) if name in zoo.COMPONENTS else Path(name)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{kind} '{name}': not a named shape ({', '.join(SHAPES)}), a zoo component "
                         f"({', '.join(zoo.COMPONENTS)}) or a folder with a config.json")
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("format") == "minillava-stage1":  # a stage-1 output names its backbones
        return _config_of(raw["vision" if kind == "vision" else "lm"], kind)
    if raw.get("format") == "minillava":  # a whole minillava model holds both configs
        cfg = dict(raw["vision_config" if kind == "vision" else "text_config"])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    cfg = AutoConfig.from_pretrained(folder)
    if kind == "vision" and hasattr(cfg, "vision_config"):  # a dual encoder (CLIPModel, SiglipModel): its tower
        cfg = cfg.vision_config
    return cfg


@functools.cache
def backbone(name: str, kind: str) -> Backbone:
    """Build `name` (see `_config_of`) on the meta device and read off its sizes. kind: "vision" or "lm"."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = _config_of(str(name), kind)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = (AutoModel if kind == "vision" else AutoModelForCausalLM).from_config(cfg)
    params = sum(p.numel() for p in model.parameters())  # (tied embeddings count once)
    heads = cfg.num_attention_heads
    common = dict(name=str(name), kind=kind, params=params, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                  intermediate=cfg.intermediate_size, heads=heads)
    if kind == "vision":
        inner = getattr(model, "vision_model", model)
        return Backbone(**common, image_size=cfg.image_size, patch_size=cfg.patch_size,
                        has_cls=hasattr(inner.embeddings, "class_embedding"))
    layer = model.get_decoder().layers[0]
    linears = tuple((m.in_features, m.out_features) for m in layer.modules() if isinstance(m, torch.nn.Linear))
    return Backbone(**common, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                    head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab=cfg.vocab_size,
                    layer_params=sum(p.numel() for p in layer.parameters()), linears=linears)


def projector_params(name: str, vision_dim: int, text_dim: int) -> int:
    """Parameters of the projector `name` (built on the meta device by `build_projector`)."""
    import torch

    from ..projector import build_projector

    with torch.device("meta"):
        return sum(p.numel() for p in build_projector(name, vision_dim, text_dim).parameters())


# ---- the plan ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Bytes per device of one training step, by part; `total` is their sum (the step's planned peak)."""

    name: str
    vision: str
    lm: str
    projector: str
    seq_len: int
    micro_batch: int
    world: int
    strategy: str
    checkpointing: bool
    precision: str
    stage: int
    lora: bool
    image_tokens: int
    counts: dict  # parameters: vision, projector, lm, lora, trainable
    params: int
    grads: int
    optimizer: int
    activations: int  # the larger of the backward pass's saved tensors and the optimizer step's temporaries
    overhead: int
    detail: dict = field(default_factory=dict)  # the parts of each row, bytes
    batch: int | None = None  # the global batch, when the plan belongs to a recipe
    gpu_gb: float | None = None

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.overhead

    def fits(self, gpu_gb: float | None = None) -> bool:
        """Whether `total` fits a device of `gpu_gb` GiB (what nvidia-smi shows as "80 GB" is 80 GiB)."""
        gpu_gb = self.gpu_gb if gpu_gb is None else gpu_gb
        if gpu_gb is None:
            raise ValueError("fits: no GPU size given (gpu_gb)")
        return self.total <= gpu_gb * GiB

    @property
    def accumulation(self) -> int | None:
        """Micro-steps per optimizer step that reach `batch` (None without a global batch)."""
        return None if self.batch is None else self.batch // (self.micro_batch * self.world)

    @property
    def tune(self) -> str:
        """What trains, in the vocabulary of the recipes: the LM's mode (frozen, full or lora)."""
        return "frozen" if self.stage == 1 else ("lora" if self.lora else "full")


def activation_bytes(v: Backbone, lm: Backbone, image_tokens: int, seq_len: int, micro_batch: int, a: int,
                     tune: str, checkpointing: bool, padded: bool = True, projector_hidden: int = 1,
                     lora_r: int = 128, lora_dropout: float = 0.05, mask_bytes: int = 1) -> dict:
    """The formula of the module docstring, part by part. a: bytes per element of the compute dtype.
    tune: "full", "frozen" or "lora" (the LM). projector_hidden: GELU layers of the projector (mlp2x_gelu: 1).
    mask_bytes: per element of a dropout mask (1 on a GPU, whose fused kernel keeps a bool mask; `a` on a CPU).
    Returns {part: bytes} with "peak" the activations of the step (the largest moment of the backward pass)."""
    h, i, n, L, V = lm.hidden, lm.intermediate, lm.heads, lm.layers, lm.vocab
    q = lm.heads * lm.head_dim
    k = q if padded else lm.kv_heads * lm.head_dim
    tok = micro_batch * seq_len
    supervised = micro_batch * (seq_len - image_tokens)  # every text token (the worst case)
    if tune == "full":
        per_token = 8 * h + a * (4 * h + 2 * q + 2 * k + 4 * i) + 4 * n
    else:
        per_token = 8 * h + a * (2 * q + 2 * k + 3 * i) + 4 * n
        if tune == "lora":
            # peft keeps adapters in fp32 and casts their input up (without dropout: to the same copy, mostly)
            keep = 4 + mask_bytes if lora_dropout > 0 else 4
            per_token += sum(keep * d_in + 4 * lora_r for d_in, _ in lm.linears)
    if padded:
        per_token += a * seq_len  # the B x T x T additive mask, per layer
    layer = tok * per_token
    layers = L * tok * a * h if checkpointing else L * layer  # checkpointing keeps only the layer inputs
    around = (tok * (a * 2 * lm.head_dim + 4 * h + (a * h if tune == "full" else 0))
              + micro_batch * image_tokens * a * (v.hidden + 2 * h * projector_hidden)
              + supervised * a * h + (4 * V * h if tune == "full" else 0))
    loss_grads = supervised * a * h + (4 * V * h if tune == "full" else 0)
    layer_grads = tok * a * (2 * h + 2 * i) + (layer if checkpointing else 0)  # (+ the layer recomputed)
    peak = around + layers + max(loss_grads, layer_grads)
    # the frozen tower under no_grad: every hidden state (output_hidden_states) + one layer's intermediates
    seq_v = image_tokens + int(v.has_cls)
    vision = micro_batch * (seq_v * a * ((v.layers + 1) * v.hidden + 4 * v.hidden + 2 * v.intermediate)
                            + 3 * v.image_size**2 * 4) + tok * a * h
    return {"layers": layers, "around the layers": around, "backward transients": max(loss_grads, layer_grads),
            "vision tower pass (apart)": vision, "peak": max(peak, vision)}


def plan(vision: str, lm: str, projector: str = "mlp2x_gelu", seq_len: int = 2048, micro_batch: int = 1,
         world: int = 1, strategy: str = "ddp", checkpointing: bool = False, precision: str = "bf16", stage: int = 2,
         lora: bool = False, *, lora_r: int = 128, lora_dropout: float = 0.05, padded: bool = True,
         overhead_gb: float = 1.0, batch: int | None = None, gpu_gb: float | None = None, name: str = "") -> Plan:
    """The memory plan of one training step per device.

    vision, lm: a named shape (`SHAPES`), a zoo component (tiny-clip, tiny-lm) or a folder with a config.json.
    strategy: "ddp" (everything replicated) or "fsdp" (FSDP2: projector and LM sharded over `world`, the frozen
    tower replicated). precision: "fp32" or "bf16" (mixed: fp32 master weights, gradients and AdamW moments,
    bf16 compute). stage 1: only the projector trains; stage 2: projector + LM (LoRA adapters with `lora`).
    padded: batches padded to seq_len with an attention mask (SDPA then keeps a T x T mask per layer).
    Returns a `Plan`; sizes are bytes per device.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy '{strategy}': expected ddp or fsdp")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision '{precision}': expected fp32 or bf16")
    if stage not in (1, 2) or (stage == 1 and lora):
        raise ValueError(f"stage {stage}{' with LoRA' if lora else ''}: expected stage 1, or 2 (full or LoRA)")
    if world < 1 or micro_batch < 1:
        raise ValueError(f"world {world} / micro batch {micro_batch}: must be at least 1")
    if batch is not None and batch % (micro_batch * world):
        raise ValueError(f"batch {batch} is not a multiple of micro batch {micro_batch} x {world} devices")
    v, t = backbone(vision, "vision"), backbone(lm, "lm")
    if seq_len <= v.image_tokens:
        raise ValueError(f"seq_len {seq_len}: no room for text after the {v.image_tokens} image tokens of '{vision}'")
    tune = "frozen" if stage == 1 else ("lora" if lora else "full")
    a = 4 if precision == "fp32" else 2
    proj = projector_params(projector, v.hidden, t.hidden)
    lora_params = lora_r * sum(d_in + d_out for d_in, d_out in t.linears) * t.layers if tune == "lora" else 0
    trainable = proj + (t.params if tune == "full" else lora_params)
    frozen_lm = 0 if tune == "full" else t.params
    shard = world if strategy == "fsdp" else 1
    held = 4 if strategy == "fsdp" else a  # frozen weights: bf16 under ddp (`store_frozen`), fp32 under fsdp
    detail = {"vision tower (frozen, replicated)": v.params * held,
              "trainable weights (fp32)": 4 * trainable // shard,
              "frozen LM": frozen_lm * held // shard}
    if strategy == "fsdp":  # unsharded for compute: the root (embeddings, head, projector) and two layers
        root = t.params - t.layers * t.layer_params + proj
        detail["gathered: root + 2 layers"] = a * (root + 2 * t.layer_params)
    elif precision == "bf16":  # autocast keeps a bf16 copy of every trainable weight for the step
        detail["bf16 copies of trainable weights"] = 2 * trainable
    grads = {"fp32 gradients": 4 * trainable // shard}
    if strategy == "ddp" and world > 1:
        grads["DDP buckets"] = 4 * trainable  # gradient_as_bucket_view=False, the default
    if strategy == "fsdp" and tune == "full":
        grads["one unsharded layer"] = a * t.layer_params  # before its reduce-scatter
    gelus = int(m.group(1)) - 1 if (m := re.fullmatch(r"mlp(\d+)x_gelu", projector)) else 0
    acts = activation_bytes(v, t, v.image_tokens, seq_len, micro_batch, a, tune, checkpointing, padded, gelus,
                            lora_r, lora_dropout)
    step_temp = 4 * trainable // shard  # AdamW's foreach sqrt of the second moments, after the activations are gone
    peak = acts.pop("peak")
    acts["optimizer step (apart)"] = step_temp
    rows = {**detail, **grads, **{f"activations: {k}": b for k, b in acts.items()}}
    counts = {"vision": v.params, "projector": proj, "lm": t.params, "lora": lora_params, "trainable": trainable}
    return Plan(name=name, vision=vision, lm=lm, projector=projector, seq_len=seq_len, micro_batch=micro_batch,
                world=world, strategy=strategy, checkpointing=checkpointing, precision=precision, stage=stage,
                lora=lora, image_tokens=v.image_tokens, counts=counts, params=sum(detail.values()),
                grads=sum(grads.values()), optimizer=8 * trainable // shard, activations=max(peak, step_temp),
                overhead=int(overhead_gb * GiB), detail={k: b for k, b in rows.items() if b}, batch=batch,
                gpu_gb=gpu_gb)


def largest_micro_batch(gpu_gb: float, batch: int, world: int = 1, **kwargs) -> Plan:
    """The plan with the largest micro-batch that fits `gpu_gb` and divides batch / world (so accumulation makes
    up the global batch exactly). Raises if not even a micro-batch of 1 fits."""
    if batch % world:
        raise ValueError(f"batch {batch} is not a multiple of the {world} devices")
    per_device = batch // world
    for micro in sorted((m for m in range(1, per_device + 1) if per_device % m == 0), reverse=True):
        p = plan(micro_batch=micro, world=world, batch=batch, gpu_gb=gpu_gb, **kwargs)
        if p.fits(gpu_gb):
            return p
    raise ValueError(f"not even a micro-batch of 1 fits {gpu_gb} GB: {p.total / GiB:.1f} GiB planned")


def recipe_plan(name: str) -> Plan:
    """The plan of a shipped recipe (`SCALE_RECIPES`), its micro-batch computed when the recipe says "auto"."""
    if name not in SCALE_RECIPES:
        raise ValueError(f"unknown recipe '{name}'; known: {', '.join(SCALE_RECIPES)}")
    r = {**RECIPE_DEFAULTS, **SCALE_RECIPES[name]}
    r.pop("about")
    if r["micro_batch"] == "auto":
        r.pop("micro_batch")
        return largest_micro_batch(name=name, **r)
    return plan(name=name, **r)


# ---- printing ---------------------------------------------------------------------------------------------
def _gib(b: int) -> str:
    return f"{b / GiB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _batch(p: Plan) -> str:
    """micro x world x accumulation = batch."""
    if p.batch is None:
        return f"{p.micro_batch} x {p.world}"
    return f"{p.micro_batch} x {p.world} x {p.accumulation} = {p.batch}"


def table(plans: list[Plan], markdown: bool = False) -> str:
    """One row per plan: the setting, the parts in GiB per device, the total and whether it fits its GPU."""
    head = ["plan", "vision + LM", "stage", "batch (micro x dev x acc)", "setup", "params", "grads", "optim",
            "activ", "total GiB", "GPU", "fits"]
    rows = [[p.name or "-", f"{p.vision} + {p.lm}", f"{p.stage} ({p.tune})", _batch(p),
             f"{p.strategy} {p.precision}{' ckpt' if p.checkpointing else ''}", _gib(p.params), _gib(p.grads),
             _gib(p.optimizer), _gib(p.activations), _gib(p.total), "-" if p.gpu_gb is None else f"{p.gpu_gb:g}",
             "-" if p.gpu_gb is None else ("yes" if p.fits() else "NO")] for p in plans]
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head)] + rows)
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [head] + rows)


def breakdown(plans: list[Plan]) -> str:
    """Each part (and what makes it up) in GiB, one column per plan: e.g. stage 1 beside stage 2."""
    first = plans[0]
    c = first.counts
    lines = [f"vision {first.vision} ({_count(c['vision'])}, frozen, {first.image_tokens} image tokens) + "
             f"projector {first.projector} ({_count(c['projector'])}) + LM {first.lm} ({_count(c['lm'])})",
             f"seq {first.seq_len}, {first.strategy} over {first.world} device(s), {first.precision}, "
             f"checkpointing {'on' if first.checkpointing else 'off'}; GiB per device", ""]
    cols = [f"stage {p.stage} ({p.tune}) {p.micro_batch}/dev" for p in plans]
    keys = list(dict.fromkeys(k for p in plans for k in p.detail))
    rows = [["trainable parameters", *[_count(p.counts["trainable"]) for p in plans]]]
    for part in ("params", "grads", "optimizer", "activations", "overhead", "total"):
        rows.append([part, *[_gib(getattr(p, part)) for p in plans]])
        prefix = "activations: " if part == "activations" else ""
        for k in keys:
            belongs = k.startswith(prefix) if prefix else _row_of(k) == part
            if belongs:
                rows.append([f"  {k.removeprefix(prefix)}", *[_gib(p.detail[k]) if k in p.detail else "-"
                                                              for p in plans]])
    if any(p.batch for p in plans):
        rows.append(["batch (micro x dev x acc)", *[_batch(p) for p in plans]])
    if any(p.gpu_gb for p in plans):
        rows.append([f"fits {plans[0].gpu_gb:g} GB", *["yes" if p.fits() else "NO" for p in plans]])
    w0 = max(len(r[0]) for r in rows + [["per device"]])
    ws = [max(len(r[j]) for r in rows + [["", *cols]]) for j in range(1, len(cols) + 1)]
    out = [f"{'per device'.ljust(w0)}  " + "  ".join(cname.rjust(w) for cname, w in zip(cols, ws))]
    out += [f"{r[0].ljust(w0)}  " + "  ".join(x.rjust(w) for x, w in zip(r[1:], ws)) for r in rows]
    note = "(apart): at another moment of the step than the LM's peak; activations are the largest of the three"
    return "\n".join(lines + out + [note])


def _row_of(key: str) -> str:
    """Which row of the breakdown a detail key belongs to."""
    if key.startswith("activations: "):
        return "activations"
    return "grads" if key in ("fp32 gradients", "DDP buckets", "one unsharded layer") else "params"


# ---- the command line: `minillava plan` -------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillava plan", description="Memory per device of a LLaVA training step, "
                                "part by part, and whether it fits a GPU: for a recipe, or for the shapes given.")
    p.add_argument("--recipe", choices=list(SCALE_RECIPES), metavar="NAME",
                   help=f"plan a shipped recipe: {', '.join(SCALE_RECIPES)} (see --recipes)")
    p.add_argument("--recipes", action="store_true", help="print the table of every shipped recipe")
    p.add_argument("--markdown", action="store_true", help="print tables as markdown (for the book)")
    p.add_argument("--shapes", action="store_true", help="list the named shapes --vision and --lm take")
    p.add_argument("--vision", default="clip-vit-l-336",
                   help="vision tower: a named shape, a zoo component or a folder (default: clip-vit-l-336)")
    p.add_argument("--lm", default="vicuna-7b", help="language model: a named shape, a zoo component or a folder "
                   "(default: vicuna-7b)")
    p.add_argument("--projector", default="mlp2x_gelu", help="projector: mlp2x_gelu or linear (default: mlp2x_gelu)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample, image tokens included "
                   "(default: 2048)")
    p.add_argument("--micro-batch", default="1", help="samples per device per forward pass, or 'auto': the largest "
                   "that fits --gpu-gb (default: 1)")
    p.add_argument("--batch", type=int, default=None, help="global batch, for the accumulation steps and 'auto' "
                   "(LLaVA: 256 stage 1, 128 stage 2; default: none, or 128 with 'auto')")
    p.add_argument("--world", type=int, default=1, help="number of devices (default: 1)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="ddp: all replicated; fsdp: FSDP2, projector + LM sharded, tower replicated (default: ddp)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing of the LM's layers (default: off)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                   help="fp32, or bf16 mixed precision with fp32 master weights (default: bf16)")
    p.add_argument("--stage", type=int, choices=[1, 2], default=None,
                   help="1: projector only trains; 2: projector + LM (default: both, side by side)")
    p.add_argument("--lora", action="store_true", help="stage 2 trains LoRA adapters (r=--lora-r) instead of the LM")
    p.add_argument("--lora-r", type=int, default=128, help="LoRA rank (default: 128, LLaVA-1.5's)")
    p.add_argument("--padded", action=argparse.BooleanOptionalAction, default=True,
                   help="batches padded with an attention mask (SDPA keeps a T x T mask per layer; default: on)")
    p.add_argument("--gpu-gb", type=float, default=None, help="device memory in GB (as nvidia-smi shows it) to "
                   "check the plan against")
    p.add_argument("--overhead-gb", type=float, default=1.0,
                   help="fixed allowance: CUDA context, library workspaces, allocator slack (default: 1.0)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`minillava plan`: print a recipe's plan, the recipe table, or the plan of the shapes given per stage."""
    cli = parser()
    args = cli.parse_args(argv)
    try:
        bad = [f"--{k.replace('_', '-')} {v}" for k in ("gpu_gb", "overhead_gb", "lora_r", "world", "seq_len")
               if (v := getattr(args, k)) is not None and (v < 0 or (v == 0 and k != "overhead_gb"))]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be positive")
        if args.stage == 1 and args.lora:
            raise ValueError("--lora with --stage 1: stage 1 trains the projector only (LoRA is a stage-2 option)")
        if args.shapes:
            for name, s in SHAPES.items():
                print(f"{name:<16} {s['config']['model_type']:<20} {s['source']}")
        elif args.recipes:
            print(table([recipe_plan(n) for n in SCALE_RECIPES], markdown=args.markdown))
        elif args.recipe:
            given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                     if k not in ("recipe", "markdown") and v != cli.get_default(k)]
            if given:
                raise ValueError(f"--recipe {args.recipe} fixes every setting; leave out {', '.join(given)} (or plan "
                                 "those shapes without --recipe)")
            p = recipe_plan(args.recipe)
            print(f"{args.recipe}: {SCALE_RECIPES[args.recipe]['about']}")
            print(breakdown([p]))
        else:
            print(breakdown(_plans_of(args)))
    except (ValueError, OSError) as e:  # (a missing folder or zoo component is an OSError)
        print(f"minillava plan: {e}", file=sys.stderr)
        return 2
    return 0


def _plans_of(args: argparse.Namespace) -> list[Plan]:
    """The plans the command line asks for: one per stage (stage 1 and 2 unless --stage says which)."""
    stages = [args.stage] if args.stage else [1, 2]
    common = dict(vision=args.vision, lm=args.lm, projector=args.projector, seq_len=args.seq_len, world=args.world,
                  strategy=args.strategy, checkpointing=args.checkpointing, precision=args.precision,
                  lora_r=args.lora_r, padded=args.padded, overhead_gb=args.overhead_gb)
    plans = []
    for stage in stages:
        kw = dict(common, stage=stage, lora=args.lora and stage == 2)
        if args.micro_batch == "auto":
            if args.gpu_gb is None:
                raise ValueError("--micro-batch auto: needs --gpu-gb, the memory to fill")
            plans.append(largest_micro_batch(args.gpu_gb, args.batch or 128, **kw))
        else:
            if not args.micro_batch.isdigit():
                raise ValueError(f"--micro-batch '{args.micro_batch}': expected a whole number or 'auto'")
            plans.append(plan(micro_batch=int(args.micro_batch), batch=args.batch, gpu_gb=args.gpu_gb, **kw))
    return plans
