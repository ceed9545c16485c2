"""Tiny, randomly initialised parts that build in well under a second: the CPU-sized twins of CLIP + Vicuna."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

SENTENCES = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What color is the circle? ASSISTANT: The circle is red.",
    "There is a blue star at the top left and a green square in the center.",
    "How many shapes are there? Two. Yes. No. Where is the triangle?",
]


def make_tokenizer():
    """A byte-level BPE tokenizer (like the zoo's) with LLaVA's special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"], model_max_length=256)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def vision_config(kind: str = "clip"):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               image_size=32, patch_size=8)  # 16 patches (+ CLS for CLIP)


def text_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def make_model(tokenizer, kind: str = "clip", seed: int = 0, feature_layer: int = -2):
    """A tiny LlavaModel with a CLIP or SigLIP tower (random weights, fixed seed)."""
    from transformers import AutoModel, LlamaForCausalLM

    import minillava as ml

    torch.manual_seed(seed)
    vision = AutoModel.from_config(vision_config(kind))
    lm = LlamaForCausalLM(text_config(len(tokenizer)))
    tower = ml.VisionTower(vision, feature_layer=feature_layer)
    return ml.LlavaModel(tower, "mlp2x_gelu", lm, tokenizer.convert_tokens_to_ids("<image>")).eval()


def make_processor(tokenizer, model, template="vicuna_v1"):
    import minillava as ml

    mean, std = ((0.5,) * 3, (0.5,) * 3) if not model.vision_tower.has_cls else (ml.vision.CLIP_MEAN,
                                                                                  ml.vision.CLIP_STD)
    ip = ml.ImageProcessor(image_size=model.vision_tower.image_size, mean=mean, std=std)
    return ml.Processor(tokenizer, ip, model.num_image_tokens, template, max_length=model.max_length)


@pytest.fixture(scope="session")
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="session")
def processor(tokenizer, model):
    return make_processor(tokenizer, model)


def random_image(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture
def images():
    return [random_image(40, 30, 0), random_image(24, 50, 1), random_image(32, 32, 2)]


def caption_records(n: int, colours: list[str]) -> list[dict]:
    """`n` caption records in LLaVA's format for save_world's images `0.png`...: "A <colour> circle.", `colours`
    in turn."""
    return [{"id": f"c{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "Describe the image briefly.\n<image>"},
        {"from": "gpt", "value": f"A {colours[i % len(colours)]} circle."}]} for i in range(n)]


def save_world(d, tokenizer, n_images: int) -> dict:
    """Backbones saved as transformers folders and `n_images` random images under `d` (seeded):
    {"vision", "lm", "images"} paths, what training tests start from."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    torch.manual_seed(0)
    CLIPVisionModel(vision_config()).save_pretrained(d / "vision")
    LlamaForCausalLM(text_config(len(tokenizer))).save_pretrained(d / "lm")
    tokenizer.save_pretrained(d / "lm")
    (d / "images").mkdir()
    for i in range(n_images):
        random_image(32, 28, seed=i).save(d / "images" / f"{i}.png")
    return {"vision": str(d / "vision"), "lm": str(d / "lm"), "images": str(d / "images")}
