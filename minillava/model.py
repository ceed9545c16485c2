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
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .projector import build_projector
from .templates import IGNORE_INDEX
from .utils import atomic_dir, load_tensors, read_json, save_tensors, write_json
from .vision import VisionTower

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
FORMAT = "minillava"


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
            "format": FORMAT,
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
        """Pixels (N, 3, S, S) -> frozen vision features (N, P, C_v). Cacheable: the tower never trains."""
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
            return embeds
        if image_features is None:
            image_features = self.encode_images(images)
        image_embeds = self.project(image_features.to(self.device))
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

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

        Returns loss (mean over supervised tokens, labels shifted by one as usual) and logits (B, T, V).
        With `return_logits=False` only the supervised positions go through the LM head: the training path.
        """
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if self.max_length and past + T > self.max_length:
            raise ValueError(f"input of {past + T} tokens (after image expansion) exceeds the language model's "
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
            if logits is None and not torch.compiler.is_compiling():  # the head on supervised positions alone
                scores, targets = head(hidden[:, :-1][keep]), targets[keep]
            else:  # every position, unsupervised ones ignored: fixed shapes, one graph when compiled
                scores = (logits if logits is not None else head(hidden))[:, :-1].flatten(0, 1)
                targets = targets.flatten()
            loss = F.cross_entropy(scores.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / n.clamp(min=1)
        return LlavaOutput(loss=loss, logits=logits, num_tokens=n, cache=cache)

    # ---- generation --------------------------------------------------------------------------------------
    def new_cache(self, max_length: int | None = None):
        """An empty KV cache for this model's language model: one that grows, or with `max_length` a static one
        of that many positions (what a compiled decoding step needs)."""
        from transformers import DynamicCache, StaticCache

        if max_length is not None:
            return StaticCache(config=self.language_model.config, max_cache_len=max_length)
        return DynamicCache(config=self.language_model.config)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 images: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """Sample a continuation of each prompt: input_ids (B, T) -> new tokens (B, n <= max_new_tokens).

        Prompts are left-padded (attention_mask 0 on the left); rows that stop early are filled with
        `pad_token_id`. Takes the keyword arguments of `stream`, which yields the same tokens one step at a time.
        """
        steps = list(self.stream(input_ids, attention_mask, images, image_features, **kwargs))
        return torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               images: torch.Tensor | None = None, image_features: torch.Tensor | None = None, *,
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
               use_cache: bool = True, cache=None, generator: torch.Generator | None = None, compile: bool = False):
        """Yield the next token of every row, (B,), step by step, until all rows hit EOS or max_new_tokens.

        Prefill runs the whole prompt (images spliced in) once and fills the KV cache; each decode step then
        feeds one token. Greedy when temperature == 0, else temperature + nucleus (top-p) sampling.
        `cache`: continue from a KV cache holding earlier tokens (attention_mask then covers them too); it is
        updated in place and ends holding everything but the last yielded token.
        `use_cache=False` recomputes the whole sequence each step (slow; the reference the tests compare to).
        `compile=True` decodes through a static KV cache with room for the prompt and `max_new_tokens` (kept and
        reused by later calls that fit in it), with the one-token step compiled by `torch.compile` (CUDA graphs
        on a GPU), as transformers' fast `generate` does: the same tokens with far fewer kernel launches per
        step. The first call compiles (seconds); later calls of the same shapes reuse it. It takes no `cache`.
        """
        if compile and (cache is not None or not use_cache):
            raise ValueError("compile=True decodes through a static KV cache of its own: it needs use_cache=True "
                             "and takes no `cache`")
        device = self.device
        input_ids = input_ids.to(device)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device)
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        eos_t = torch.tensor(eos, device=device, dtype=torch.long)
        if self.max_length:  # never run past the context: stop early, or refuse a prompt that fills it
            if past + T >= self.max_length:
                raise ValueError(f"prompt of {past + T} tokens leaves no room in the language model's context "
                                 f"of {self.max_length} tokens")
            max_new_tokens = min(max_new_tokens, self.max_length - past - T)
        if max_new_tokens <= 0:
            return
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if compile:  # fixed shapes for the compiled step: a static cache, and a mask as long as the cache
            cache, length = self._static_cache(B, T + max_new_tokens)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, length - T)], dim=1)
        elif use_cache and cache is None:
            cache = self.new_cache()
        embeds = self.embed(input_ids, images, image_features)  # prefill input
        done = torch.zeros(B, dtype=torch.bool, device=device)
        seq = embeds  # the uncached path keeps the whole sequence's embeddings
        for step in range(max_new_tokens):
            if compile:  # the mask's not yet written rest is hidden by causality; `where` names the positions
                # written for transformers releases that read it (newer static caches count them themselves)
                t, filled = embeds.shape[1], T + step - 1 if step else 0
                where = torch.arange(filled, filled + t, device=device)
                decode = _compiled_step(device.type) if step else _one_step
                positions = position_ids[:, -t:].clone(memory_format=torch.contiguous_format)  # fixed strides
                hidden = decode(self, embeds, attention_mask, positions, cache, where)
            elif use_cache:  # prefill (step 0), then decode one token at a time
                hidden = self._decode(embeds, attention_mask, position_ids[:, -embeds.shape[1]:], cache)
            else:
                seq = seq if step == 0 else torch.cat([seq, embeds], dim=1)
                hidden = self._decode(seq, attention_mask, position_ids, None)
            logits = self.language_model.get_output_embeddings()(hidden[:, -1]).float()
            token = _sample(logits, temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            yield token
            done |= torch.isin(token, eos_t)
            if bool(done.all()):
                return
            embeds = self.language_model.get_input_embeddings()(token[:, None])
            if not compile:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)

    def _decode(self, embeds, attention_mask, position_ids, cache, cache_position=None) -> torch.Tensor:
        """LM hidden states (B, t, H) for embeddings (B, t, H), the mask covering cache + these t tokens
        (`cache_position` (t,): where they go in a static cache)."""
        where = {} if cache_position is None else {"cache_position": cache_position}
        return self.language_model.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=cache is not None, **{self._cache_kw: cache}, **where).last_hidden_state

    def _static_cache(self, batch: int, length: int):
        """An empty static KV cache for `batch` rows and at least `length` positions, and its length: the one this
        model used last when it fits, emptied (CUDA graphs record fixed addresses; transformers reuses its
        static cache across `generate` calls for the same reason). It stays as long as the longest call so far
        asked for, for as long as the model lives."""
        kind = self.device.type  # the cache stores what the layers compute: the weights' dtype, or autocast's
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        key = (batch, self.device, next(self.language_model.parameters()).dtype, autocast)
        kept = _STATIC_CACHES.get(self)
        if kept and kept[0] == key and kept[1] >= length:
            kept[2].reset()
            return kept[2], kept[1]
        _STATIC_CACHES[self] = (key, length, self.new_cache(max_length=length))
        return _STATIC_CACHES[self][2], length

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, processor=None) -> Path:
        """Write config.json + model.safetensors (+ the processor's files) atomically into `out_dir`."""
        with atomic_dir(out_dir, marker="config.json") as tmp:
            self.write_files(tmp, processor)
        return Path(out_dir)

    def write_files(self, folder: Path, processor=None) -> None:
        """Write the checkpoint files into an existing (temporary) folder; `save_pretrained` makes it atomic."""
        write_json(folder / CONFIG_NAME, self.config)
        save_tensors(self.state_dict(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
        if processor is not None:
            processor.save_pretrained(folder)

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

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None) -> LlavaModel:
        """Load a folder written by `save_pretrained` (safetensors only), checking every weight is present."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder '{path}': not found")
        config = read_json(path / CONFIG_NAME, what="model config")
        if config.get("format") != FORMAT:
            hint = " (a transformers Llava folder? use minillava.load_hf)" if config.get("model_type") else ""
            raise ValueError(f"model folder '{path}': config.json is not a minillava config{hint}")
        model = cls.from_config(config)
        load_state(model, load_tensors(path / WEIGHTS_NAME), f"model folder '{path}'")
        from .utils import pick_device, pick_dtype

        device = pick_device(device)
        return model.to(device=device, dtype=pick_dtype(device, dtype)).eval()


# ---- compiled decoding: kept outside the model, so that copying or pickling a model never carries them -------
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, length, its cache)
_COMPILED_STEPS: dict[str, object] = {}  # device type -> the compiled one-token step


def _one_step(model: LlavaModel, embeds, attention_mask, position_ids, cache, cache_position) -> torch.Tensor:
    return model._decode(embeds, attention_mask, position_ids, cache, cache_position)


def _compiled_step(device_type: str):
    """`_one_step` compiled once per device type (CUDA graphs on a GPU, as transformers' compiled `generate`)."""
    if device_type not in _COMPILED_STEPS:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED_STEPS[device_type] = torch.compile(_one_step, mode=mode)
    return _COMPILED_STEPS[device_type]


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `module` strictly, with an error listing missing, unexpected or misshapen weights."""
    own = module.state_dict()
    tied = _tied_keys(module)
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    problems = [(missing, "missing"), (unexpected, "unexpected"), (wrong, "wrong shape")]
    msg = "; ".join(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for keys, label in problems if keys)
    if msg:
        raise ValueError(f"{what}: weights do not match the model ({msg})")
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


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax, or temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _portable(config: dict) -> dict:
    """A backbone's config without `_name_or_path`, the folder it was loaded from on the machine that saved it."""
    return {k: v for k, v in config.items() if k != "_name_or_path"}
