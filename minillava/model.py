"""LLaVA itself: a frozen vision tower, a projector and a causal language model, merged at the image tokens.

Follows LLaVA v1.5 (`llava/model/llava_arch.py`) in what it computes, and transformers' Llava in how it lays
the prompt out: every `<image>` placeholder is expanded (by the processor) into one image token per feature,
and the projected features are scattered into those positions of the token embeddings. The reference instead
keeps a single sentinel id (-200) and splices the features in; both feed the language model the same vectors,
but the expanded form makes padding, attention masks, context-length checks and the KV cache plain token
bookkeeping. Any number of images per sample, and samples without images, work the same way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import decoding
from .loss import linear_cross_entropy
from .projector import build_projector
from .templates import IGNORE_INDEX
from .vision import VisionTower


@dataclass
class LlavaOutput:
    """What `LlavaModel.forward` returns. logits: (B, T, V), or None when `return_logits=False`."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    num_tokens: int | torch.Tensor = 0  # supervised tokens behind `loss`, a 0-dim tensor with labels (for exact
    # averaging across accumulation steps)
    cache: object | None = None


def _cache_kwarg(module: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` during v5; pass the cache by whichever name it takes."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class LlavaModel(nn.Module):
    """Vision tower + projector + causal LM. The tower is frozen; the projector maps its features into the LM.

    Args:
        vision_tower: a `VisionTower` (or any transformers vision model, wrapped with LLaVA's defaults).
        projector: a projector name (`mlp2x_gelu`, `linear`, ...) or a module from `build_projector`.
        language_model: any transformers causal LM (`LlamaForCausalLM`, `Qwen2ForCausalLM`, ...).
        image_token_id: the token id that marks image positions in `input_ids`.
    """

    def __init__(self, vision_tower: nn.Module, projector: str | nn.Module, language_model: nn.Module,
                 image_token_id: int):
        super().__init__()
        if not isinstance(vision_tower, VisionTower):
            vision_tower = VisionTower(vision_tower)
        self.vision_tower = vision_tower
        if isinstance(projector, str):
            projector = build_projector(projector, vision_tower.hidden_size, language_model.config.hidden_size)
        if not hasattr(projector, "kind"):
            raise ValueError("projector: pass a name or a module made by build_projector (it records its kind)")
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = int(image_token_id)
        self._cache_kw = _cache_kwarg(self.language_model.get_decoder())

    # ---- configuration and parts ------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """Everything needed to rebuild the model's shapes (weights aside), as plain JSON-able data."""
        return {
            "projector": self.projector.kind,
            "feature_layer": self.vision_tower.feature_layer,
            "feature_select": self.vision_tower.select,
            "image_token_id": self.image_token_id,
            "vision_config": _portable(self.vision_tower.model.config.to_dict()),
            "text_config": _portable(self.language_model.config.to_dict()),
        }

    @property
    def num_image_tokens(self) -> int:
        """Tokens each image occupies in the prompt (576 for CLIP ViT-L/14 at 336 px)."""
        return self.vision_tower.num_tokens

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters(), next(self.language_model.parameters())).device

    @property
    def max_length(self) -> int | None:
        """The language model's context length, image tokens included."""
        return getattr(self.language_model.config, "max_position_embeddings", None)

    # ---- the merge ---------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, S, S) -> vision features (N, P, C_v). Cacheable while the tower is frozen (LLaVA's stages;
        stage 2 with `vision_lr` trains it, and then nothing is cached)."""
        return self.vision_tower(images.to(self.device))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features (N, P, C_v) -> image embeddings in the LM's space (N, P, H)."""
        param = next(self.projector.parameters(), None)
        return self.projector(features.to(param.dtype if param is not None else features.dtype))

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) with image tokens, plus images (N, 3, S, S) or their features (N, P, C_v)
        -> input embeddings (B, T, H), image i's projected features at the i-th run of P image tokens
        (images counted in reading order across the batch)."""
        is_image = input_ids == self.image_token_id
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        n_images = 0 if images is None and image_features is None else len(
            images if image_features is None else image_features)
        if not torch.compiler.is_compiling():  # (reading counts back to Python would split a compiled graph)
            self._check_image_tokens(is_image, n_images)
        if n_images == 0:
            return embeds + self._blank_image_term(embeds) if self.training and torch.is_grad_enabled() else embeds
        if image_features is None:
            image_features = self.encode_images(images)
        image_embeds = self.project(image_features.to(self.device))
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def _blank_image_term(self, embeds: torch.Tensor) -> torch.Tensor | float:
        """0 x the projection (and, when the tower trains, the encoding) of a blank image, for a training batch
        without images: every trainable weight is then used in every micro-batch, as DDP and FSDP need of each
        process (LLaVA gives text-only samples a blank image for the same reason). Adds exactly nothing."""
        tower = self.vision_tower
        if not tower.frozen and any(p.requires_grad for p in tower.parameters()):
            features = self.encode_images(torch.zeros(1, 3, tower.image_size, tower.image_size))
        elif any(p.requires_grad for p in self.projector.parameters()):
            features = torch.zeros(1, 1, tower.hidden_size, device=self.device)
        else:
            return 0.0
        return 0.0 * self.project(features).sum().to(embeds.dtype)

    def _check_image_tokens(self, is_image: torch.Tensor, n_images: int) -> None:
        """Every sample's image tokens (B, T) must come in whole runs of P, one run per image."""
        P = self.num_image_tokens
        per_sample = is_image.sum(dim=1).tolist()
        for i, n in enumerate(per_sample):
            if n % P:
                raise ValueError(f"sample {i}: {n} image tokens is not a multiple of the {P} tokens per image "
                                 "(a prompt cut through an image, or one not built by the processor)")
        if sum(per_sample) // P != n_images:
            raise ValueError(f"the batch has {sum(per_sample) // P} image placeholders "
                             f"({', '.join(str(n // P) for n in per_sample)} per sample) but {n_images} images")

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                images: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None, use_cache: bool = False, return_logits: bool = True) -> LlavaOutput:
        """input_ids (B, T), attention_mask (B, T) (1 = real token; for a cached call it covers past + new),
        images (N, 3, S, S) or image_features (N, P, C_v), labels (B, T) with IGNORE_INDEX where unsupervised.
        Packed rows (`Processor.pack`): no attention_mask, position_ids (B, T) starting at 0 for each sample.

        Returns loss (mean over supervised tokens, labels shifted by one as usual) and logits (B, T, V).
        With `return_logits=False` only the supervised positions go through the LM head, fused with the loss
        (`loss.linear_cross_entropy`: no (positions, vocabulary) matrix of scores is ever kept): the training path.
        """
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if self.max_length and not torch.compiler.is_compiling():  # packed rows: their longest sample counts
            longest = past + T if position_ids is None or cache is not None else int(position_ids.max()) + 1
            if longest > self.max_length:
                raise ValueError(f"input of {longest} tokens (after image expansion) exceeds the language model's "
                                 f"context of {self.max_length}")
        embeds = self.embed(input_ids, images, image_features)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        hidden = self.language_model.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, **{self._cache_kw: cache}).last_hidden_state
        head = self.language_model.get_output_embeddings()
        logits = head(hidden) if return_logits else None
        loss, n = None, 0
        if labels is not None:
            targets = labels[:, 1:].to(hidden.device)
            keep = targets != IGNORE_INDEX
            n = keep.sum()
            if logits is None and not torch.compiler.is_compiling():  # the head on supervised positions alone,
                loss = _supervised_loss(head, hidden[:, :-1][keep], targets[keep])  # fused with the loss
            elif logits is None:  # compiled: every position, unsupervised ones ignored (fixed shapes, one graph)
                loss = _supervised_loss(head, hidden[:, :-1].flatten(0, 1), targets.flatten())
            else:
                scores = logits[:, :-1].flatten(0, 1)
                loss = F.cross_entropy(scores.float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            loss = loss / n.clamp(min=1)
        return LlavaOutput(loss=loss, logits=logits, num_tokens=n, cache=cache)

    # ---- generation (the machinery is in decoding.py) ---------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 images: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """Sample a continuation of each prompt: input_ids (B, T) -> new tokens (B, n <= max_new_tokens).
        Keyword arguments as `decoding.stream` (max_new_tokens, temperature, top_p, eos_token_id, compile...).
        Without `eos_token_id` it runs to max_new_tokens: pass `processor.stop_token_ids()` to stop at the end of
        the answer (`ChatSession` and `evaluation.answer` do)."""
        return decoding.generate(self, input_ids, attention_mask, images, image_features, **kwargs)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               images: torch.Tensor | None = None, image_features: torch.Tensor | None = None, **kwargs):
        """Yield the next token of every row, (B,), step by step: `decoding.stream`."""
        return decoding.stream(self, input_ids, attention_mask, images, image_features, **kwargs)

    @classmethod
    def from_config(cls, config: dict) -> LlavaModel:
        """A randomly initialised model of the shapes in `config` (as `LlavaModel.config` returns)."""
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        vcfg = dict(config["vision_config"])
        tcfg = dict(config["text_config"])
        vision = AutoModel.from_config(AutoConfig.for_model(vcfg.pop("model_type"), **vcfg))
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(tcfg.pop("model_type"), **tcfg))
        tower = VisionTower(vision, feature_layer=config["feature_layer"], select=config["feature_select"])
        return cls(tower, config["projector"], lm, config["image_token_id"])


def _supervised_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of the head's scores for hidden (N, H) against targets (N,): fused and chunked
    (`linear_cross_entropy`) for a plain linear head, the plain loss for any other (a head with a bias, or
    wrapped by an adapter)."""
    if type(head) is nn.Linear and head.bias is None:
        return linear_cross_entropy(hidden, head.weight, targets)
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _portable(config: dict) -> dict:
    """A backbone's config without `_name_or_path`, the folder it was loaded from on the machine that saved it."""
    return {k: v for k, v in config.items() if k != "_name_or_path"}
