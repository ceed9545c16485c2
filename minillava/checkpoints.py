"""Checkpoints: every on-disk format minillava reads or writes, behind one loader, `load(name_or_path)`.

- `"format": "minillava"` in config.json: the whole model (model.safetensors) and the processor's files;
  written by `save` and by stage 2;
- `"format": "minillava-stage1"`: the projector alone and the names of its backbones; written by stage 1;
- `"format": "minillava-lora"`: the projector, peft's LoRA adapter and what the run started from; stage 2 with
  LoRA;
- `"model_type": "llava"`: transformers' `LlavaForConditionalGeneration` folder; written by `hf.export_hf`.

Backbones (a CLIP vision tower, a causal LM) load by zoo name, folder or hub id with `load_vision` and `load_lm`;
`assemble` puts them together with a fresh projector, as stage 1 starts. Weights are safetensors only, and every
load is strict: a missing, unexpected or misshapen weight is an error that names it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import zoo
from .model import LlavaModel
from .outputs import atomic_dir, check_replaceable
from .processor import Processor
from .utils import (
    check_weights,
    load_tensors,
    peft_quietly,
    pick_device,
    pick_dtype,
    quiet_loading,
    read_json,
    require_keys,
    save_tensors,
    write_json,
)
from .vision import CLIP_MEAN, CLIP_STD, ImageProcessor, VisionTower, vision_model_of

FORMAT, STAGE1_FORMAT, LORA_FORMAT = "minillava", "minillava-stage1", "minillava-lora"
CONFIG_NAME, WEIGHTS_NAME, PROJECTOR_NAME, ADAPTER_DIR = (
    "config.json", "model.safetensors", "projector.safetensors", "adapter")
MODEL_KEYS = ("projector", "feature_layer", "feature_select", "image_token_id", "vision_config", "text_config")


# ---- the one loader ---------------------------------------------------------------------------------------------
def load(name_or_path: str | Path, device=None, dtype=None,
         template: str | None = None) -> tuple[LlavaModel, Processor]:
    """Any LLaVA -> (LlavaModel, Processor), ready for inference (eval mode).

    Takes a zoo name (`tiny-llava`, `tiny-llava-stage1`), a minillava model folder, a stage-1 output, a LoRA
    output (merged in memory) or a transformers Llava folder (llava-1.5-hf layout; also a hub id, with network).
    `template` overrides the processor's chat template; by default each folder's own (a stage-1 folder: `plain`;
    a transformers folder: the one its saved chat template renders, else `vicuna_v1`: `hf.saved_template`).
    """
    name = str(name_or_path)
    if name in zoo.BACKBONES + zoo.WHEEL_LMS:
        raise ValueError(f"'{name}' is a backbone, not a LLaVA: load it with load_vision / load_clip / load_lm")
    folder = zoo.resolve(name_or_path)
    if not Path(folder).exists():  # a hub id: only transformers Llava checkpoints live there
        from .hf import load_hf

        return load_hf(folder, device=device, dtype=dtype, template=template)
    folder = Path(folder)
    config = read_json(folder / CONFIG_NAME, what="model config", keys=())
    kind = config.get("format") or config.get("model_type")
    if kind == "llava":
        from .hf import load_hf

        return load_hf(folder, device=device, dtype=dtype, template=template)
    if kind == STAGE1_FORMAT:
        model, processor = load_stage1(folder, template=template or "plain", aspect="square")
    elif kind == LORA_FORMAT:
        model, processor = _load_lora(folder, config)
    elif kind == FORMAT:
        model, processor = _load_full(folder, config), Processor.from_pretrained(folder)
        if processor.num_image_tokens != model.num_image_tokens:
            raise ValueError(f"model folder '{folder}': its processor puts {processor.num_image_tokens} tokens per "
                             f"image in the prompt, its vision tower gives {model.num_image_tokens}")
    else:
        raise ValueError(f"model folder '{folder}': config.json names no model minillava knows (format "
                         f"'{config.get('format')}', model_type '{config.get('model_type')}'); expected a minillava, "
                         "stage-1, LoRA or transformers Llava folder")
    if template:
        processor = processor.with_template(template)
    device = pick_device(device)
    return model.to(device=device, dtype=pick_dtype(device, dtype)).eval(), processor


# ---- minillava's own format ------------------------------------------------------------------------------------
def save(model: LlavaModel, processor: Processor | None, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors (+ the processor's files) atomically into `out_dir`: a new or empty
    folder, or one a minillava save wrote (`outputs.check_replaceable`)."""
    with atomic_dir(out_dir, marker=CONFIG_NAME) as tmp:
        write_model_files(model, processor, tmp)
    return Path(out_dir)


def write_model_files(model: LlavaModel, processor: Processor | None, folder: Path) -> None:
    """The files of a full model, into an existing (temporary) folder; `save` makes it atomic."""
    write_json(folder / CONFIG_NAME, {"format": FORMAT, **model.config})
    save_tensors(model.state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    if processor is not None:
        processor.save_pretrained(folder)


def _load_full(folder: Path, config: dict) -> LlavaModel:
    require_keys(config, MODEL_KEYS, f"model config '{folder / CONFIG_NAME}'")
    model = LlavaModel.from_config(config)
    load_state(model, load_tensors(folder / WEIGHTS_NAME), f"model folder '{folder}'")
    return model


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `module` strictly, with an error listing missing, unexpected or misshapen weights."""
    own = module.state_dict()
    tied = _tied_keys(module)
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    check_weights(what, missing, unexpected, wrong)
    module.load_state_dict(state, strict=False)


def _tied_keys(module: nn.Module) -> set[str]:
    """Weights that share storage with an earlier one (e.g. a tied LM head) need not be in a checkpoint."""
    seen, tied = {}, set()
    for k, v in module.state_dict(keep_vars=True).items():
        ptr = v.data_ptr()
        if ptr in seen:
            tied.add(k)
        seen.setdefault(ptr, k)
    return tied


# ---- backbones, and assembling LLaVA from them ------------------------------------------------------------------
def load_vision(name_or_path: str | Path, dtype=None) -> tuple[nn.Module, ImageProcessor]:
    """A vision backbone -> (transformers vision model, ImageProcessor) with LLaVA's pad-to-square default.
    Accepts CLIP/SigLIP vision models or dual encoders (their vision half is taken)."""
    from transformers import AutoConfig, AutoModel

    where = zoo.resolve(name_or_path)
    config = AutoConfig.from_pretrained(where)
    with quiet_loading():
        model = AutoModel.from_pretrained(where, **({"dtype": dtype} if dtype else {}))
    vision = vision_model_of(model)
    siglip = "siglip" in getattr(config, "model_type", "")
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if siglip else (CLIP_MEAN, CLIP_STD)
    return vision, ImageProcessor(image_size=vision.config.image_size, mean=mean, std=std)


def load_clip(name_or_path: str | Path = "tiny-clip"):
    """A dual encoder (vision + text towers) -> (CLIPModel, tokenizer, ImageProcessor), for zero-shot use."""
    from transformers import AutoModel, AutoTokenizer

    where = zoo.resolve(name_or_path)
    with quiet_loading():
        clip = AutoModel.from_pretrained(where).eval()
    return clip, AutoTokenizer.from_pretrained(where), ImageProcessor(image_size=clip.config.vision_config.image_size)


def load_lm(name_or_path: str | Path, dtype=None):
    """A causal language model -> (model, tokenizer), the tokenizer given an `<image>` special token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = zoo.resolve(name_or_path)
    with quiet_loading():
        lm = AutoModelForCausalLM.from_pretrained(where, **({"dtype": dtype} if dtype else {}))
    tokenizer = AutoTokenizer.from_pretrained(where)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    old = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > old:  # the new row is never read as input (image tokens are replaced) but, with a tied
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # head, scores "<image>": make it the
        with torch.no_grad():  # mean embedding, the same on every load (no random draw)
            for emb in (lm.get_input_embeddings(), lm.get_output_embeddings()):  # (the same tensor when tied)
                if emb is not None:
                    emb.weight[old:] = emb.weight[:old].mean(0)
    return lm, tokenizer


def assemble(vision: str, lm: str, projector: str = "mlp2x_gelu", feature_layer: int = -2, aspect: str = "pad",
             template: str = "vicuna_v1") -> tuple[LlavaModel, Processor]:
    """Fresh LLaVA from backbones: pretrained vision tower + pretrained LM + a new, randomly initialised projector."""
    vision_model, image_processor = load_vision(vision)
    image_processor.aspect = aspect
    language_model, tokenizer = load_lm(lm)
    tower = VisionTower(vision_model, feature_layer=feature_layer)
    model = LlavaModel(tower, projector, language_model, tokenizer.convert_tokens_to_ids("<image>"))
    processor = Processor(tokenizer, image_processor, model.num_image_tokens, template, model.max_length)
    return model, processor


# ---- stage 1: the projector alone -------------------------------------------------------------------------------
def save_stage1(model: LlavaModel, vision: str, lm: str, folder: Path) -> None:
    """The files of a stage-1 output (the projector and the names of its backbones), into `folder`."""
    write_json(folder / CONFIG_NAME, {
        "format": STAGE1_FORMAT, "vision": vision, "lm": lm, "projector": model.projector.kind,
        "feature_layer": model.vision_tower.feature_layer, "feature_select": model.vision_tower.select})
    save_tensors(model.projector.state_dict(), folder / PROJECTOR_NAME)


def load_stage1(path: str | Path, template: str = "vicuna_v1", aspect: str = "pad") -> tuple[LlavaModel, Processor]:
    """A stage-1 output -> the assembled model (training mode; `load` gives it ready for inference)."""
    path = Path(path)
    cfg = read_json(path / CONFIG_NAME, what="stage-1 config")
    if cfg.get("format") != STAGE1_FORMAT:
        raise ValueError(f"'{path}': not a stage-1 output (its config.json has no format '{STAGE1_FORMAT}')")
    model, processor = assemble(cfg["vision"], cfg["lm"], cfg["projector"], cfg["feature_layer"], aspect, template)
    load_state(model.projector, load_tensors(path / PROJECTOR_NAME), f"stage-1 projector in '{path}'")
    return model, processor


# ---- stage 2 with LoRA: adapters, and merging them ---------------------------------------------------------------
def save_lora(model: LlavaModel, processor: Processor, init: str | None, vision: str, lm: str, folder: Path) -> None:
    """The files of a LoRA stage-2 output: projector, peft adapter, processor, and what the run started from."""
    if init is not None and init not in zoo.LLAVAS:  # a zoo name stays a name
        init = Path(init).resolve()  # a sibling of the output is kept relative: the two may move together
        init = f"../{init.name}" if init.parent == Path(folder).resolve().parent else str(init)
    write_json(folder / CONFIG_NAME, {
        "format": LORA_FORMAT, "init": init, "vision": vision, "lm": lm,
        "projector": model.projector.kind, "feature_layer": model.vision_tower.feature_layer})
    save_tensors(model.projector.state_dict(), folder / PROJECTOR_NAME)
    # (the embeddings grew by one row for "<image>", a row that is never read; `load_lm` adds it again, so the
    # adapter need not carry a copy of the whole embedding matrix)
    model.language_model.save_pretrained(str(folder / ADAPTER_DIR), safe_serialization=True,
                                         save_embedding_layers=False)
    processor.save_pretrained(folder)


def _load_lora(folder: Path, meta: dict) -> tuple[LlavaModel, Processor]:
    """A LoRA output -> its base model with the adapter merged in and its own projector."""
    from peft import PeftModel

    if meta.get("init"):
        init = Path(zoo.resolve(meta["init"])) if meta["init"] in zoo.LLAVAS else folder / meta["init"]
        model, processor = (load_stage1(init) if _format(init) == STAGE1_FORMAT
                            else (_load_full(init, read_json(init / CONFIG_NAME)), Processor.from_pretrained(init)))
    else:
        model, processor = assemble(meta["vision"], meta["lm"], meta["projector"], meta["feature_layer"])
    load_state(model.projector, load_tensors(folder / PROJECTOR_NAME), f"projector in '{folder}'")
    with peft_quietly():
        model.language_model = PeftModel.from_pretrained(model.language_model, str(folder / ADAPTER_DIR))
    model.language_model = model.language_model.merge_and_unload()
    if (folder / "minillava_processor.json").is_file():  # (older LoRA outputs saved no processor)
        processor = Processor.from_pretrained(folder)
    return model, processor


def _format(folder: str | Path) -> str | None:
    return read_json(Path(folder) / CONFIG_NAME, what="model config").get("format")


def merge_lora(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """A stage-2 LoRA output -> a full model folder with the adapter merged into the LM weights."""
    check_replaceable(out_dir, CONFIG_NAME)  # before the minutes of loading, not after
    adapter_dir = Path(adapter_dir)
    meta = read_json(adapter_dir / CONFIG_NAME, what="LoRA output config")
    if meta.get("format") != LORA_FORMAT:
        raise ValueError(f"'{adapter_dir}': not a LoRA training output")
    model, processor = _load_lora(adapter_dir, meta)
    return save(model, processor, out_dir)
