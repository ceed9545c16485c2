"""Decoding: turning a prompt into an answer one token at a time, with a KV cache.

Prefill runs the whole prompt (images spliced in by `LlavaModel.embed`) once and fills the cache; each decode
step then feeds one token and reads the keys and values of all earlier ones from the cache. Three ways to run it,
the same tokens from each:

- `use_cache=False`: recompute the whole sequence every step (slow; the reference the tests compare to);
- the default: a cache that grows by one position per step (transformers' `DynamicCache`);
- `compile=True`: a static cache of fixed size and a one-token step compiled by `torch.compile` (CUDA graphs on a
  GPU), as transformers' fast `generate` does.
"""

from __future__ import annotations

import math
import numbers
import weakref

import torch


def new_cache(model, max_length: int | None = None):
    """An empty KV cache for this model's language model: one that grows, or with `max_length` a static one
    of that many positions (what a compiled decoding step needs)."""
    from transformers import DynamicCache, StaticCache

    if max_length is not None:
        return StaticCache(config=model.language_model.config, max_cache_len=max_length)
    return DynamicCache(config=model.language_model.config)

@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             images: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
             **kwargs) -> torch.Tensor:
    """Sample a continuation of each prompt: input_ids (B, T) -> new tokens (B, n <= max_new_tokens).

    Prompts are left-padded (attention_mask 0 on the left); rows that stop early are filled with
    `pad_token_id`. Takes the keyword arguments of `stream`, which yields the same tokens one step at a time.
    """
    steps = list(stream(model, input_ids, attention_mask, images, image_features, **kwargs))
    return torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)

@torch.no_grad()
def stream(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           images: torch.Tensor | None = None, image_features: torch.Tensor | None = None, *,
           max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
           eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
           use_cache: bool = True, cache=None, generator: torch.Generator | None = None, compile: bool = False):
    """Yield the next token of every row, (B,), step by step, until all rows hit EOS or max_new_tokens.

    Prefill runs the whole prompt (images spliced in) once and fills the KV cache; each decode step then
    feeds one token. Greedy when temperature == 0, else temperature + nucleus (top-p) sampling.
    `cache`: continue from a KV cache holding earlier tokens (attention_mask then covers them too); it is
    updated in place and ends holding everything but the last yielded token. A static cache
    (`new_cache(model, max_length)`) cropped to fewer positions keeps stale ones after them: the new tokens
    overwrite them, and until then causality hides them (each token sees only positions up to its own).
    `use_cache=False` recomputes the whole sequence each step (slow; the reference the tests compare to).
    `compile=True` decodes through a static KV cache with room for the prompt and `max_new_tokens` (kept and
    reused by later calls that fit in it), with the one-token step compiled by `torch.compile` (CUDA graphs
    on a GPU), as transformers' fast `generate` does: the same tokens with far fewer kernel launches per
    step. The first call compiles (seconds); later calls of the same shapes reuse it. Its `cache`, if given,
    must be a static one (a chat keeps one for the whole conversation).
    """
    check_sampling(max_new_tokens, temperature, top_p)
    if compile and (not use_cache or not (cache is None or _is_static(cache))):
        raise ValueError("compile=True decodes through a static KV cache: it needs use_cache=True, and a `cache` "
                         "given must be a StaticCache (decoding.new_cache(model, max_length))")
    if cache is not None and not use_cache:
        raise ValueError("a `cache` with use_cache=False: the uncached path recomputes the whole sequence and "
                         "cannot continue a cache; pass one or the other")
    device = model.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    past = int(cache.get_seq_length()) if cache is not None else 0
    if attention_mask is None:
        attention_mask = torch.ones(B, past + T, dtype=torch.long, device=device)
    attention_mask = attention_mask.to(device)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    max_new_tokens = _room(model, past + T, max_new_tokens)
    if max_new_tokens <= 0:
        return
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if compile:  # fixed shapes for the compiled step: a static cache, and a mask as long as the cache
        if cache is None:
            cache, length = _static_cache(model, B, T + max_new_tokens)
        else:
            length = cache.get_max_length()
        if past + T + max_new_tokens > length:
            raise ValueError(f"static cache of {length} positions: no room for {past} earlier tokens, a prompt of "
                             f"{T} and {max_new_tokens} new ones")
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, length - past - T)], dim=1)
    elif use_cache and cache is None:
        cache = new_cache(model)
    embeds = model.embed(input_ids, images, image_features)  # prefill input
    done = torch.zeros(B, dtype=torch.bool, device=device)
    seq = embeds  # the uncached path keeps the whole sequence's embeddings
    for step in range(max_new_tokens):  # step 0 is the prefill, every later step decodes one token
        if compile:
            hidden = _static_step(model, step, past, T, embeds, attention_mask, position_ids, cache)
        elif use_cache:
            hidden = _decode(model, embeds, attention_mask, position_ids[:, -embeds.shape[1]:], cache)
        else:
            seq = seq if step == 0 else torch.cat([seq, embeds], dim=1)
            hidden = _decode(model, seq, attention_mask, position_ids, None)
        logits = model.language_model.get_output_embeddings()(hidden[:, -1]).float()
        token = _sample(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        yield token
        done |= torch.isin(token, eos_t)
        if bool(done.all()):
            return
        embeds = model.language_model.get_input_embeddings()(token[:, None])
        if not compile:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)

def _is_static(cache) -> bool:
    from transformers import StaticCache

    return isinstance(cache, StaticCache)


def _room(model, prompt_length: int, max_new_tokens: int) -> int:
    """How many new tokens fit: never run past the context; refuse a prompt that fills it."""
    if not model.max_length:
        return max_new_tokens
    if prompt_length >= model.max_length:
        raise ValueError(f"prompt of {prompt_length} tokens leaves no room in the language model's context "
                         f"of {model.max_length} tokens")
    return min(max_new_tokens, model.max_length - prompt_length)


def _static_step(model, step: int, past: int, T: int, embeds, attention_mask, position_ids, cache) -> torch.Tensor:
    """Hidden states (B, t, H) of step `step` through the static cache after `past` earlier positions: the
    prefill (t = T) runs eagerly, each later step (t = 1) through the compiled one-token step. The mask spans
    the whole cache; its not yet written rest is hidden by causality. `where` names the positions written."""
    t, filled = embeds.shape[1], past + (T + step - 1 if step else 0)
    where = torch.arange(filled, filled + t, device=embeds.device)
    decode = _compiled_step(embeds.device.type) if step else _one_step
    positions = position_ids[:, -t:].clone(memory_format=torch.contiguous_format)  # fixed strides
    return decode(model, embeds, attention_mask, positions, cache, where)


def _decode(model, embeds, attention_mask, position_ids, cache, cache_position=None) -> torch.Tensor:
    """LM hidden states (B, t, H) for embeddings (B, t, H), the mask covering cache + these t tokens
    (`cache_position` (t,): where they go in a static cache)."""
    where = {} if cache_position is None else {"cache_position": cache_position}
    return model.language_model.get_decoder()(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=cache is not None, **{model._cache_kw: cache}, **where).last_hidden_state

def _static_cache(model, batch: int, length: int):
    """An empty static KV cache for `batch` rows and at least `length` positions, and its length: the one this
    model used last when it fits, emptied (CUDA graphs record fixed addresses; transformers reuses its
    static cache across `generate` calls for the same reason). It stays as long as the longest call so far
    asked for, for as long as the model lives."""
    kind = model.device.type  # the cache stores what the layers compute: the weights' dtype, or autocast's
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    key = (batch, model.device, next(model.language_model.parameters()).dtype, autocast)
    kept = _STATIC_CACHES.get(model)
    if kept and kept[0] == key and kept[1] >= length:
        kept[2].reset()
        return kept[2], kept[1]
    _STATIC_CACHES[model] = (key, length, new_cache(model, max_length=length))
    return _STATIC_CACHES[model][2], length


# ---- compiled decoding: kept outside the model, so that copying or pickling a model never carries them -------
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, length, its cache)
_COMPILED_STEPS: dict[str, object] = {}  # device type -> the compiled one-token step


def _one_step(model, embeds, attention_mask, position_ids, cache, cache_position) -> torch.Tensor:
    return _decode(model, embeds, attention_mask, position_ids, cache, cache_position)


def _compiled_step(device_type: str):
    """`_one_step` compiled once per device type (CUDA graphs on a GPU, as transformers' compiled `generate`)."""
    if device_type not in _COMPILED_STEPS:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED_STEPS[device_type] = torch.compile(_one_step, mode=mode)
    return _COMPILED_STEPS[device_type]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse decoding settings that would quietly mean something else: ValueError naming the setting."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens!r}: expected a whole number of at least 1")
    if not 0 <= temperature < math.inf:  # (NaN fails too)
        raise ValueError(f"temperature {temperature}: expected 0 (greedy) or a positive, finite number")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p}: expected a probability mass in (0, 1]")


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax, or temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # (B, V) <= 0: a tiny temperature gives -inf, not NaN
    probs = torch.softmax(shifted / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
