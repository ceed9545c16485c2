"""Interop with transformers' `LlavaForConditionalGeneration` (the llava-hf checkpoints).

`export_hf` writes a folder that transformers 5 loads (4.x reads neither its tokenizer config nor its processor
config): the "legacy" key layout below, a `LlavaConfig`, the tokenizer (with `<image>`), a `LlavaProcessor` that
expands `<image>` into as many tokens as the vision tower yields features, and a generation config that stops
where minillava stops (the template's end-of-turn tokens). `load_hf` (what `minillava.load` calls for such a
folder) reads them -- real llava-1.5-hf checkpoints included -- into minillava's `LlavaModel` and `Processor`, reusing
transformers' own loading, as strictly as minillava's own format: a missing, unexpected or misshapen weight,
or an unreadable weights file, is an error that names it (transformers would initialise the missing ones at
random and carry on).

Key map (minillava -> transformers legacy layout), written out so it can be audited:
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .model import LlavaModel
from .outputs import atomic_dir
from .processor import Processor
from .projector import build_projector
from .templates import TEMPLATES
from .utils import check_weights, pick_device, pick_dtype, quiet_loading, read_json, save_tensors, write_json
from .vision import CLIP_MEAN, CLIP_STD, ImageProcessor, VisionTower

KEY_MAP = {
    "vision_tower.model.": "vision_tower.vision_model.",  # as transformers 4.x's CLIPVisionModel names it
    "projector.0.": "multi_modal_projector.linear_1.",
    "projector.2.": "multi_modal_projector.linear_2.",
    "language_model.": "language_model.",  # `model.*` and `lm_head.weight`, as LlamaForCausalLM names them
}
__doc__ += "\n".join(f"    {k}* -> {v}*" for k, v in KEY_MAP.items()) + "\n"


def _rename(key: str) -> str:
    for old, new in KEY_MAP.items():
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"no transformers name for weight '{key}'")


def _hf_select_strategy(tower: VisionTower) -> str:
    """transformers' name for the feature selection: "default" drops the first token, "full" keeps all."""
    return "default" if tower.has_cls and tower.select == "patch" else "full"


def hf_config(model: LlavaModel):
    """The `LlavaConfig` describing `model` (it must use the `mlp2x_gelu` projector, as transformers' Llava)."""
    from transformers import LlavaConfig

    if model.projector.kind != "mlp2x_gelu":
        raise ValueError(f"export_hf: projector '{model.projector.kind}' has no equivalent in transformers' Llava "
                         "(it has mlp2x_gelu only)")
    tower = model.vision_tower
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # as the weights are written
    return LlavaConfig(
        vision_config={**model.config["vision_config"], "dtype": dtype},
        text_config={**model.config["text_config"], "dtype": dtype}, dtype=dtype,
        architectures=["LlavaForConditionalGeneration"],
        image_token_id=model.image_token_id, image_seq_length=model.num_image_tokens,
        vision_feature_layer=tower.feature_layer, vision_feature_select_strategy=_hf_select_strategy(tower),
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(model.language_model.config, "tie_word_embeddings", False)))


def export_hf(model: LlavaModel, processor: Processor, out_dir: str | Path) -> Path:
    """Write `model` and `processor` as a transformers Llava folder (legacy layout, safetensors), atomically."""
    from transformers import CLIPImageProcessorPil, GenerationConfig, LlavaImageProcessorPil, LlavaProcessor

    if hasattr(model.language_model, "peft_config"):  # its keys would be PEFT's, and transformers' Llava random
        raise ValueError("export_hf: the language model still holds LoRA adapters (a PEFT model); export the merged "
                         "model: ml.load() of the training output merges them, or merge_and_unload() first")
    config = hf_config(model)
    ip = processor.image_processor
    image_cls = LlavaImageProcessorPil if ip.aspect == "pad" else CLIPImageProcessorPil
    image_processor = image_cls(
        size={"shortest_edge": ip.resize or ip.image_size},
        crop_size={"height": ip.image_size, "width": ip.image_size},
        image_mean=list(ip.mean), image_std=list(ip.std), **({"do_pad": True} if ip.aspect == "pad" else {}))
    tower = model.vision_tower
    hf_processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=processor.tokenizer, patch_size=tower.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=int(tower.has_cls), chat_template=processor.template.to_jinja())
    state = {_rename(k): v for k, v in model.state_dict().items()}
    with atomic_dir(out_dir, marker="config.json") as tmp:
        config.save_pretrained(str(tmp))
        GenerationConfig(eos_token_id=processor.stop_token_ids(), pad_token_id=processor.pad_token_id,
                         bos_token_id=processor.tokenizer.bos_token_id).save_pretrained(str(tmp))
        save_tensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        hf_processor.save_pretrained(str(tmp))
        image_processor.save_pretrained(str(tmp))  # preprocessor_config.json, where transformers 4.x looks
        tok_cfg = read_json(tmp / "tokenizer_config.json", what="tokenizer config")
        if tok_cfg.get("tokenizer_class") == "TokenizersBackend":  # a v5-only name; 4.x knows the fast class
            tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            write_json(tmp / "tokenizer_config.json", tok_cfg)
    return Path(out_dir)


def from_hf_model(hf) -> LlavaModel:
    """A minillava `LlavaModel` sharing the vision tower, language model and head of a transformers Llava model
    (their modules, so their weights: no copy); the projector is minillava's, its two linear layers' weights
    copied in (21M parameters at LLaVA-1.5-7B's sizes)."""
    from transformers import AutoModelForCausalLM

    cfg = hf.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer {cfg.vision_feature_layer}: several layers are not supported")
    if cfg.projector_hidden_act != "gelu" or not cfg.multimodal_projector_bias:
        raise ValueError(f"projector with act '{cfg.projector_hidden_act}', bias {cfg.multimodal_projector_bias}: "
                         "only LLaVA's mlp2x_gelu (exact GELU, with bias) is supported")
    inner = hf.model
    tower = VisionTower(inner.vision_tower, feature_layer=cfg.vision_feature_layer)
    strategy = cfg.vision_feature_select_strategy
    if strategy == "default" and not tower.has_cls:
        raise ValueError("vision_feature_select_strategy 'default' on a tower without a CLS token drops a real "
                         "patch (a known bug in some checkpoints); minillava will not reproduce it")
    tower.select = "patch" if strategy == "default" or not tower.has_cls else "cls_patch"
    src = inner.multi_modal_projector
    projector = build_projector("mlp2x_gelu", tower.hidden_size, cfg.text_config.hidden_size)
    projector[0].load_state_dict(src.linear_1.state_dict())
    projector[2].load_state_dict(src.linear_2.state_dict())
    with torch.device("meta"):  # a shell only: its decoder and head are replaced by the loaded ones
        lm = AutoModelForCausalLM.from_config(cfg.text_config)
    setattr(lm, lm.base_model_prefix, inner.language_model)
    lm.set_output_embeddings(hf.lm_head)
    if any(p.is_meta for p in lm.parameters()):
        raise ValueError(f"language model {type(lm).__name__}: could not be assembled from the Llava checkpoint")
    model = LlavaModel(tower, projector.to(hf.lm_head.weight.device, hf.lm_head.weight.dtype), lm,
                       cfg.image_token_id)
    return model


def load_hf(path: str | Path, device=None, dtype=None, template: str | None = None) -> tuple[LlavaModel, Processor]:
    """Load a transformers Llava folder (e.g. llava-1.5-hf) as (LlavaModel, Processor). Local folders only
    unless `path` is a hub id and the user has network access. Weights are read as safetensors, strictly:
    ValueError names an unreadable file, or the weights that are missing, unexpected (a config with fewer
    layers than the file) or of the wrong shape. `template`: by default the one `export_hf` wrote into the
    folder's chat template (`saved_template`), else `vicuna_v1`, the layout LLaVA-1.5 was trained with."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    path = Path(path)
    if not path.exists() and (path.is_absolute() or str(path).startswith(".") or str(path).count("/") != 1):
        raise FileNotFoundError(f"model folder '{path}': not found (nor is it a hub id like 'llava-hf/name')")
    if path.exists():
        config = read_json(path / "config.json", what="model config")
        if config.get("model_type") != "llava":
            raise ValueError(f"'{path}': config.json has model_type '{config.get('model_type')}', "
                             "not a transformers Llava folder ('llava')")
        if not isinstance(config.get("vision_feature_layer", -2), int):  # before the weights' shapes disagree
            raise ValueError(f"'{path}': vision_feature_layer {config['vision_feature_layer']}: several layers are "
                             "not supported")
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise FileNotFoundError(f"'{path}': no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
        _check_weight_files(path)
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    with quiet_loading(), _no_load_report():  # its problems are raised below, named, instead of logged
        hf, info = LlavaForConditionalGeneration.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True)
    _check_loading_info(info, f"model folder '{path}'")
    model = from_hf_model(hf).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    token = tokenizer.convert_tokens_to_ids("<image>")
    if token != model.image_token_id:
        raise ValueError(f"'{path}': config.json's image_token_index is {model.image_token_id}, but the tokenizer's "
                         f"'<image>' is {token}; they must be the same token")
    ip = _image_processor(path, model.vision_tower)
    processor = Processor(tokenizer, ip, model.num_image_tokens, template or saved_template(path, tokenizer),
                          max_length=getattr(hf.config.text_config, "max_position_embeddings", None))
    return model, processor


def saved_template(path: Path, tokenizer) -> str:
    """The minillava template whose Jinja (`Template.to_jinja`) is the chat template saved in the folder
    `path` (as `export_hf` writes it), or `vicuna_v1` when none is (a released llava-1.5-hf's own Jinja
    drops the system prompt it was trained with)."""
    saved = tokenizer.chat_template
    if (path / "chat_template.jinja").is_file():
        saved = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif (path / "chat_template.json").is_file():
        saved = read_json(path / "chat_template.json", what="chat template").get("chat_template")
    return next((name for name, t in TEMPLATES.items() if saved and t.to_jinja() == saved), "vicuna_v1")


def _check_weight_files(folder: Path) -> None:
    """Every safetensors file in `folder` has a complete header and data (a truncated download does not):
    ValueError naming the file."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise ValueError(f"weights '{file}': cannot be read as safetensors ({e})") from None


def _check_loading_info(info: dict, what: str) -> None:
    """transformers' `output_loading_info` -> ValueError listing missing, unexpected and misshapen weights
    (by transformers' names for them), the wording of `checkpoints.load_state`."""
    wrong = [f"{k} {tuple(theirs)} != {tuple(ours)}" for k, theirs, ours in info.get("mismatched_keys", [])]
    check_weights(what, info.get("missing_keys", []), info.get("unexpected_keys", []), wrong)


@contextlib.contextmanager
def _no_load_report():
    """Hide the "LOAD REPORT" table transformers logs about missing or mismatched weights. (A filter, not a
    higher log level: transformers 5 runs a tensor-parallel check, and warns, when that level is raised.)"""
    from transformers.utils import logging

    def not_the_report(record) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    logger = logging.get_logger("transformers.modeling_utils")
    logger.addFilter(not_the_report)
    try:
        yield
    finally:
        logger.removeFilter(not_the_report)


def _image_processor(path: Path, tower: VisionTower) -> ImageProcessor:
    """Our `ImageProcessor` from a folder's preprocessor_config.json (or the tower's size and CLIP's stats)."""
    if (path / "preprocessor_config.json").is_file():
        cfg = read_json(path / "preprocessor_config.json", what="image processor config")
    elif (path / "processor_config.json").is_file():  # transformers 5 nests it in the processor's file
        cfg = read_json(path / "processor_config.json", what="processor config").get("image_processor", {})
    else:
        return ImageProcessor(image_size=tower.image_size)
    crop = cfg.get("crop_size") or {}
    size = crop.get("height") if isinstance(crop, dict) else crop
    size = size or tower.image_size
    resize = cfg.get("size", {})
    resize = resize.get("shortest_edge") if isinstance(resize, dict) else resize
    return ImageProcessor(image_size=size, resize=resize if resize != size else None,
                          mean=tuple(cfg.get("image_mean", CLIP_MEAN)), std=tuple(cfg.get("image_std", CLIP_STD)),
                          aspect="pad" if cfg.get("do_pad") else "square")
