"""minillava: LLaVA, the Large Language and Vision Assistant, small enough to read and run on a laptop.

The public API, by chapter of the book:

- vision features: `VisionTower`, `ImageProcessor`, `load_image`
- the projector: `build_projector`
- chat templates: `get_template`, `Template`, `from_llava`, `to_llava`, `IGNORE_INDEX`
- the model: `LlavaModel` (merge, forward, generate, save/load), `Processor` (text + images -> batches)
- training: `TrainConfig`, `train.train(config)`, `merge_lora`
- the chat assistant: `ChatSession`, `ChatWidget`, `transcript_html`
- evaluation: `minillava.eval`
- transformers interop: `export_hf`, `load_hf`
- the shipped weights: `zoo`
"""

from . import train, zoo
from .chat import ChatSession
from .hf import export_hf, from_hf_model, load_hf
from .model import LlavaModel, LlavaOutput
from .processor import Processor
from .projector import build_projector
from .templates import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    Template,
    from_llava,
    get_template,
    to_llava,
)
from .train import TrainConfig, merge_lora
from .utils import pick_device, pick_dtype
from .vision import ImageProcessor, VisionTower, load_image
from .widget import ChatWidget, transcript_html

__version__ = "0.1.0"

__all__ = [
    "ChatSession", "ChatWidget", "IGNORE_INDEX", "IMAGE_PLACEHOLDER", "ImageProcessor", "LlavaModel", "LlavaOutput",
    "Processor", "TEMPLATES", "Template", "TrainConfig", "VisionTower", "build_projector", "export_hf",
    "from_hf_model", "from_llava", "get_template", "load_hf", "load_image", "merge_lora", "pick_device",
    "pick_dtype", "to_llava", "train", "transcript_html", "zoo",
]
