"""The zoo: the small pretrained pieces shipped in `data/`, and loading backbones by name or path.

This world has no model hub, so minillava ships its own "pretrained" components, trained by its own scripts on
ShapesWorld, the way LLaVA starts from CLIP and Vicuna:

- `tiny-clip`: a transformers `CLIPModel` (vision + text towers) trained contrastively on ShapesWorld captions;
- `tiny-lm`: a transformers `LlamaForCausalLM` + byte-level BPE tokenizer, pretrained on ShapesWorld text chats;
- `tiny-llava-stage1`: the projector after feature alignment; `tiny-llava`: the model after instruction tuning.

The same functions load real checkpoints from a local folder (or a hub id, when the user has network access):
`load_vision("openai/clip-vit-large-patch14-336")`, `load_lm("lmsys/vicuna-7b-v1.5")`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .vision import CLIP_MEAN, CLIP_STD, ImageProcessor, vision_model_of

COMPONENTS = ("tiny-clip", "tiny-lm", "tiny-llava-stage1", "tiny-llava")


def data_dir() -> Path:
    """Where the shipped weights live: $MINILLAVA_DATA, else `data/` beside the package (a clone or editable
    install)."""
    return Path(os.environ.get("MINILLAVA_DATA", Path(__file__).resolve().parent.parent / "data"))


def path(name: str) -> Path:
    """The folder of a shipped component, with a clear error if the files are missing."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown zoo component '{name}'; known: {', '.join(COMPONENTS)}")
    folder = data_dir() / name
    if not (folder / "config.json").is_file():  # (a clone without the weights, or a pip-installed wheel)
        raise FileNotFoundError(
            f"zoo component '{name}': no weights at '{folder}'. Use a clone of the minillava repository "
            "(pip install -e .), set MINILLAVA_DATA to its data/ folder, or rebuild with `make zoo`.")
    return folder


def resolve(name_or_path: str | Path) -> str:
    """A zoo name -> its folder; a local folder -> itself; anything else is passed on as a hub id."""
    if str(name_or_path) in COMPONENTS:
        return str(path(str(name_or_path)))
    p = Path(name_or_path)
    if p.exists():
        return str(p)
    if p.is_absolute() or str(name_or_path).startswith(".") or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"model '{name_or_path}': no such zoo component or folder")
    return str(name_or_path)


def load_vision(name_or_path: str | Path, dtype=None):
    """A vision backbone -> (transformers vision model, ImageProcessor) with LLaVA's pad-to-square default.

    Accepts CLIP/SigLIP vision models or dual encoders (their vision half is taken)."""
    from transformers import AutoConfig, AutoModel

    where = resolve(name_or_path)
    config = AutoConfig.from_pretrained(where)
    model = AutoModel.from_pretrained(where, dtype=dtype) if dtype else AutoModel.from_pretrained(where)
    vision = vision_model_of(model)
    vcfg = vision.config
    siglip = "siglip" in getattr(config, "model_type", "")
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if siglip else (CLIP_MEAN, CLIP_STD)
    return vision, ImageProcessor(image_size=vcfg.image_size, mean=mean, std=std)


def load_lm(name_or_path: str | Path, dtype=None):
    """A causal language model -> (model, tokenizer), the tokenizer given an `<image>` special token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve(name_or_path)
    kw = {"dtype": dtype} if dtype else {}
    lm = AutoModelForCausalLM.from_pretrained(where, **kw)
    tokenizer = AutoTokenizer.from_pretrained(where)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))  # the new row is never read: image tokens are replaced
    return lm, tokenizer


def load(name: str, device=None, dtype=None):
    """Ready objects for a shipped component, offline:
    `tiny-clip` -> (CLIPModel, tokenizer, ImageProcessor); `tiny-lm` -> (LlamaForCausalLM, tokenizer);
    `tiny-llava-stage1` / `tiny-llava` -> (LlavaModel, Processor)."""
    from transformers import AutoModel, AutoTokenizer

    folder = path(name)
    if name == "tiny-clip":
        clip = AutoModel.from_pretrained(str(folder)).eval()
        return clip, AutoTokenizer.from_pretrained(str(folder)), ImageProcessor(
            image_size=clip.config.vision_config.image_size)
    if name == "tiny-lm":
        lm, tok = load_lm(folder)
        return lm.eval(), tok
    from .model import LlavaModel
    from .processor import Processor

    if name == "tiny-llava-stage1":  # the projector alone, assembled with its backbones
        from .train import load_stage1

        model, processor = load_stage1(folder, template="plain", aspect="square")
        return model.eval(), processor
    return LlavaModel.from_pretrained(folder, device=device, dtype=dtype), Processor.from_pretrained(folder)


def load_model(name_or_dir: str | Path, device=None, dtype=None):
    """Any LLaVA -> (LlavaModel, Processor): a zoo name, a minillava model folder, a stage-1 output, or a
    transformers Llava folder (llava-1.5-hf layout)."""
    from .model import LlavaModel
    from .processor import Processor
    from .utils import read_json

    if str(name_or_dir) in COMPONENTS:
        return load(str(name_or_dir), device=device, dtype=dtype)
    folder = Path(name_or_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"model '{name_or_dir}': no such zoo component or folder "
                                f"(zoo: {', '.join(c for c in COMPONENTS if 'llava' in c)})")
    config = read_json(folder / "config.json", what="model config")
    if config.get("model_type") == "llava":
        from .hf import load_hf

        return load_hf(folder, device=device, dtype=dtype)
    if config.get("format") == "minillava-stage1":
        from .train import load_stage1

        model, processor = load_stage1(folder, template="plain", aspect="square")
        return model.eval(), processor
    if config.get("format") != "minillava":
        raise ValueError(f"model folder '{folder}': not a minillava, stage-1 or transformers Llava model")
    return LlavaModel.from_pretrained(folder, device=device, dtype=dtype), Processor.from_pretrained(folder)
