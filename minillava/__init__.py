"""minillava: LLaVA, the Large Language and Vision Assistant, small enough to read and run on a laptop.

The library, in the order the book builds it (one module each):

- `vision`: the frozen vision tower and image preprocessing (`VisionTower`, `ImageProcessor`, `load_image`)
- `projector`: the only part learned from scratch (`build_projector`)
- `templates`: the chat templates LLaVA models were trained with (`get_template`, `Template`, `IGNORE_INDEX`)
- `model`: the merge of image features into the token sequence, and the forward pass (`LlavaModel`)
- `loss`: the LM head and the cross-entropy fused, without the (positions x vocabulary) scores (not yet the
  training path: `minillava plan` counts the plain one)
- `decoding`: prefill, KV caches and the compiled decoding step behind `LlavaModel.generate`
- `processor`: conversations + images -> model inputs (`Processor`)
- `checkpoints`: every on-disk format behind one loader (`load`, `save`, `merge_lora`, `load_vision`, `load_lm`)
- `hf`: transformers' Llava format both ways (`export_hf`, `from_hf_model`)
- `data`: LLaVA-format records and ShapesWorld, the synthetic world the zoo is trained on
- `training`: the two stages (`TrainConfig`, `train`, `RECIPES`)
- `chat`, `widget`: the assistant (`ChatSession`, `ChatWidget`, `transcript_html`)
- `evaluation`: VQA accuracy, POPE metrics, answer scoring
- `pretrain`: pretraining the zoo's tiny backbones (CLIP's contrastive loss, a chat LM)
- `zoo`: the shipped components, by name; `gguf`: pretrained chat LMs from PyPI wheels (SmolLM2-135M-Instruct),
  converted once into a cache; `display`: the helpers the book's chapters share
- `outputs`: saves that never lose a user's file (guarded atomic folders, a lock per output); `utils`: devices,
  atomic file writes, safetensors I/O

Maintainer tooling (the zoo builder, ablations, the benchmark) lives in `minillava.tools`, which the library never
imports; `cli` is the `minillava` command.
"""

from . import (
    chat,
    checkpoints,
    data,
    decoding,
    display,
    evaluation,
    gguf,
    hf,
    loss,
    model,
    outputs,
    pretrain,
    processor,
    projector,
    templates,
    training,
    utils,
    vision,
    widget,
    zoo,
)
from .chat import ChatSession
from .checkpoints import load, load_clip, load_lm, load_vision, merge_lora, save
from .hf import export_hf, from_hf_model
from .model import LlavaModel, LlavaOutput
from .processor import Processor
from .projector import build_projector
from .templates import IGNORE_INDEX, IMAGE_PLACEHOLDER, TEMPLATES, Template, from_llava, get_template, to_llava
from .training import RECIPES, TrainConfig, train
from .utils import pick_device, pick_dtype
from .vision import ImageProcessor, VisionTower, load_image
from .widget import ChatWidget, transcript_html

__version__ = "0.2.0"

__all__ = [
    # modules
    "chat", "checkpoints", "data", "decoding", "display", "evaluation", "gguf", "hf", "loss", "model", "pretrain",
    "processor", "projector", "templates", "training", "outputs", "utils", "vision", "widget", "zoo",
    # loading and saving
    "load", "save", "load_vision", "load_clip", "load_lm", "merge_lora", "export_hf", "from_hf_model",
    # the model
    "VisionTower", "ImageProcessor", "load_image", "build_projector", "LlavaModel", "LlavaOutput", "Processor",
    "Template", "TEMPLATES", "get_template", "from_llava", "to_llava", "IGNORE_INDEX", "IMAGE_PLACEHOLDER",
    # training and use
    "TrainConfig", "RECIPES", "train", "ChatSession", "ChatWidget", "transcript_html", "pick_device", "pick_dtype",
]
