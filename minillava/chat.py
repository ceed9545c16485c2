"""Chatting with LLaVA: many turns, images at any turn, and a KV cache that carries over from turn to turn.

The reference CLI (`llava/serve/cli.py`) allows one image per chat and, at every turn, re-tokenizes the whole
conversation and runs all of it through the model again, image included. A `ChatSession` keeps the KV cache of
the conversation so far and prefills only what a turn adds:

1. tokenize the whole conversation with the template (cheap), ending with the generation prompt: ids (T,);
2. compare it with the tokens in the cache, image tokens compared by *which* image they hold (two pictures at
   the same place never match), and keep the longest common prefix, never cut inside an image;
3. crop the cache to that prefix and prefill the rest, passing the vision features of exactly the images whose
   tokens are in the rest. Each image is encoded once, when it joins the chat, and its features are kept.

Step 1 reads the conversation exactly as the template renders it, so the answer is token for token what
re-prefilling the whole conversation gives (greedy), whatever the tokenizer does with earlier answers; the
cache only decides how much work is skipped.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import decoding
from .templates import IMAGE_PLACEHOLDER, Template, check_text, refuse_special_text, special_text, to_llava

CONTEXT_POLICIES = ("error", "drop_oldest")
STATIC_CONTEXT = 4096  # positions of a compiled chat's static cache for a model that states no context length
_image_keys = itertools.count()  # identifies each image of every session, so the cache can tell images apart


@dataclass
class ChatImage:
    """An image of a chat: the picture, the file it came from (if any), a unique key, its vision features."""

    image: Image.Image
    path: str | None
    key: int
    features: torch.Tensor | None = None  # (P, C_v), computed once by `LlavaModel.encode_images`

    @property
    def name(self) -> str:
        """Its path, or `image-KEY.png` for an image given in memory."""
        return self.path or f"image-{self.key}.png"


@dataclass
class Turn:
    question: str  # the user message as the template sees it: one "<image>" per image
    images: list[ChatImage]
    answer: str | None = None  # None while it is being generated


class ChatSession:
    """A conversation with a `LlavaModel` about any number of images, added at any turn.

    Args:
        model, processor: a `LlavaModel` and its `Processor`.
        template: the chat template, a name or a `Template` (None: the processor's own).
        max_new_tokens, temperature, top_p: decoding of each answer (greedy when temperature == 0).
        system: the system prompt (None: the template's default; "": none).
        seed: seeds sampling; `reset()` re-seeds, so a replayed chat gives the same answers.
        reuse_cache: keep the KV cache and image features between turns (False: prefill the whole conversation
            and re-encode every image at each turn, as the reference CLI does).
        compile: decode through a static KV cache kept for the whole chat, with the one-token step compiled by
            `torch.compile` (CUDA graphs on a GPU), as `generate(compile=True)`: the same tokens, fewer kernel
            launches per token. The first answer compiles (seconds). The cache has the model's context length
            (4096 positions for a model without one), allocated once.
        context_policy: what to do when a turn does not fit the model's context (`model.max_length`).
            "error": raise a ValueError saying how many tokens the turn needs (its question, images and
            `max_new_tokens` for the answer) and how many are left; the session stays as it was.
            "drop_oldest": forget the oldest whole turns, their images with them (the system prompt stays),
            until the prompt leaves room for `max_new_tokens`, or only the new question is left.

    After each turn `stats` says what it cost: prompt_tokens (T), reused_tokens (read from the cache),
    prefilled_tokens (T - reused), images_encoded, dropped_turns, new_token_ids (what the model generated,
    the stop token included) and ttft_s (seconds from the question to the first token).
    """

    # What a context overflow error suggests; a front end with other controls (the CLI) says its own.
    overflow_hint = "reset() the chat, or use context_policy='drop_oldest' to forget the oldest turns"

    def __init__(self, model, processor, template: str | Template | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, system: str | None = None, seed: int = 0,
                 reuse_cache: bool = True, context_policy: str = "error", compile: bool = False):
        if context_policy not in CONTEXT_POLICIES:
            raise ValueError(f"context_policy {context_policy!r}: expected one of {', '.join(CONTEXT_POLICIES)}")
        decoding.check_sampling(max_new_tokens, temperature, top_p)  # at once, not at the first question
        limit = getattr(model, "max_length", None) or (STATIC_CONTEXT if compile else None)
        if limit and max_new_tokens >= limit:
            raise ValueError(f"max_new_tokens {max_new_tokens}: must leave room for the question in the model's "
                             f"context of {limit} tokens")
        self.model = model
        self.processor = processor if template is None else processor.with_template(template)
        if system is not None:
            _check_message(system, "system", self.processor.tokenizer)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.system, self.seed, self.reuse_cache, self.context_policy = system, seed, reuse_cache, context_policy
        self.context, self.compile, self._static = limit, compile, None  # the static cache, made at the first turn
        self.stop_ids = self.processor.stop_token_ids()
        self.stats: dict = {}
        self._open = None  # the answer being streamed, if any
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, its images and the KV cache; re-seed sampling."""
        self._close_open()
        self._turns: list[Turn] = []
        self._cache, self._cache_keys = None, []  # the KV cache and the keys (see `_tokenize`) of what it holds
        self._generator = torch.Generator(device=self.model.device).manual_seed(self.seed)

    # ---- the conversation -----------------------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        """The conversation, oldest first: {"role": "user", "content", "images": [PIL images]} and
        {"role": "assistant", "content"} messages: new lists and dicts (changing them changes nothing), holding the
        session's own PIL images (not copies: do not draw on them)."""
        out = []
        for t in self._turns:
            out += [{"role": "user", "content": t.question, "images": [im.image for im in t.images]},
                    {"role": "assistant", "content": t.answer}]
        return out

    @property
    def messages(self) -> list[dict]:
        """The conversation as template messages {"role", "content"}, the system prompt first when set."""
        return self._messages(self._turns)

    def _messages(self, turns: list[Turn]) -> list[dict]:
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return system + [{"role": role, "content": text} for t in turns
                         for role, text in (("user", t.question), ("assistant", t.answer)) if text is not None]

    def to_llava_json(self, id: str = "chat", image_dir: str | Path | None = None) -> dict:
        """The conversation as a LLaVA data record {"id", "image", "conversations": [{"from", "value"}]}.

        "image" is one name or a list (absent without images): each image's path, or `image-N.png` for images
        given in memory. With `image_dir`, those are written there as PNG and paths are made relative to it
        (absolute when outside it), so the record loads with that folder as its image folder.
        """
        if not any(t.answer for t in self._turns):
            raise ValueError("to_llava_json: no answered turn to export yet")
        images = [im for t in self._turns for im in t.images]
        names = [im.name for im in images]
        if image_dir is not None:
            folder = Path(image_dir).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(images):
                if im.path is None:
                    im.image.save(folder / im.name)
                elif Path(im.path).resolve().is_relative_to(folder):
                    names[i] = str(Path(im.path).resolve().relative_to(folder))
                else:
                    names[i] = str(Path(im.path).resolve())
        record: dict = {"id": id}
        if images:
            record["image"] = names[0] if len(names) == 1 else names
        record["conversations"] = to_llava(self.messages)
        return record

    # ---- asking -----------------------------------------------------------------------------------------------
    def ask(self, question: str, images=()) -> str:
        """Ask `question` about `images` (PIL images, paths or bytes) -> the answer (see `stream`)."""
        return "".join(self.stream(question, images))

    def stream(self, question: str, images=()):
        """Ask `question` about `images` and get the answer as an iterator of text pieces, as they are generated.

        A question without "<image>" gets its images before it ("<image>\\n" each, in order, as LLaVA does); a
        question with placeholders needs exactly one image per placeholder. Everything is checked here, before
        the iterator exists: a bad question (not valid Unicode, a special token's text), an image that cannot
        be loaded or preprocessed, or a turn that does not fit the context raises (ValueError,
        FileNotFoundError) and leaves the session exactly as it was. The turn joins `history` when its answer
        is complete (or the iterator is closed early).
        """
        start = time.perf_counter()
        if not isinstance(question, str):
            raise TypeError(f"question: a {type(question).__name__}; ask with the text of the question (a str) and "
                            "pass its images as `images`")
        if not question.strip():
            raise ValueError("question: empty; ask something (images go with a question)")
        _check_message(question, "question", self.processor.tokenizer, images_allowed=True)
        if isinstance(images, (str, Path, bytes, bytearray, Image.Image)):
            images = [images]
        new = []
        for source in images:
            path = str(source) if isinstance(source, (str, Path)) else None
            image = self.processor.image_processor.load(source, name=path)
            new.append(ChatImage(image, path, next(_image_keys)))
        question, n_slots = question.strip(), question.count(IMAGE_PLACEHOLDER)
        if n_slots and n_slots != len(new):
            raise ValueError(f"question: {n_slots} '{IMAGE_PLACEHOLDER}' placeholders but {len(new)} images; give "
                             "one image per placeholder, or no placeholder to put the images before the question")
        if not n_slots:
            question = f"{IMAGE_PLACEHOLDER}\n" * len(new) + question
        elif n_slots == 1 and not self._turns and (
                question.startswith(IMAGE_PLACEHOLDER) or question.endswith(IMAGE_PLACEHOLDER)):
            # kept as the template renders a first question of a one-image chat ("<image>\nQ", LLaVA's rule),
            # so that a second image later does not re-render the turn the model has already answered
            question = f"{IMAGE_PLACEHOLDER}\n" + question.replace(IMAGE_PLACEHOLDER, "").strip()
        self._close_open()  # an answer still streaming ends here, with what it has shown
        turns, ids, keys = self._fit(self._turns + [Turn(question, new)])
        self._open = self._answer(turns, ids, keys, start)
        return self._open

    def _close_open(self) -> None:
        """End the answer still being streamed, if any: its turn keeps what was shown (`_answer`'s finally), so a
        later turn never finds the cache holding a conversation other than `_turns`."""
        if self._open is not None:
            self._open.close()
            self._open = None

    def _tokenize(self, turns: list[Turn], generation_prompt: bool = True) -> tuple[list[int], list[int]]:
        """The prompt of `turns` -> token ids (T,) and cache keys (T,): the ids, except that each image token
        becomes -1 - (its image's key), so that tokens of different images never compare equal."""
        p = self.processor
        ids = p.template.tokenize(self._messages(turns), p.tokenizer, add_generation_prompt=generation_prompt,
                                  num_image_tokens=p.num_image_tokens)["input_ids"]
        owners = iter([im.key for t in turns for im in t.images for _ in range(p.num_image_tokens)])
        return ids, [-1 - next(owners) if i == p.image_token_id else i for i in ids]

    def _fit(self, turns: list[Turn]) -> tuple[list[Turn], list[int], list[int]]:
        """Apply the context policy: the turns to keep and their prompt (ids, keys), or a ValueError.

        A turn fits when its prompt (T,) leaves room for the answer: T + max_new_tokens <= model.max_length."""
        limit, room = self.context, self.max_new_tokens
        ids, keys = self._tokenize(turns)
        while self.context_policy == "drop_oldest" and limit and len(turns) > 1 and len(ids) + room > limit:
            turns = turns[1:]
            ids, keys = self._tokenize(turns)
        if limit and len(ids) + room > limit:
            used = len(self._tokenize(turns[:-1], generation_prompt=False)[0]) if len(turns) > 1 else 0
            n_images = len(turns[-1].images)
            hint = "even with all older turns dropped" if self.context_policy == "drop_oldest" else self.overflow_hint
            raise ValueError(f"context: this turn needs {len(ids) - used + room} tokens ({len(ids) - used} for the "
                             f"question and its {n_images} image(s) of {self.model.num_image_tokens} tokens each, "
                             f"{room} for the answer), but only {max(limit - used, 0)} of the model's {limit} are "
                             f"left after the {used} of the conversation so far; {hint}")
        return turns, ids, keys

    def _answer(self, turns: list[Turn], ids: list[int], keys: list[int], start: float):
        """Prefill what the cache lacks of the prompt `ids`, then decode; yields the answer's text pieces."""
        if not self.reuse_cache or self._cache is None:
            self._cache, self._cache_keys = self._empty_cache(), []
        reused = common_prefix(self._cache_keys, keys)
        by_key = {im.key: im for t in turns for im in t.images}
        rest = [by_key[-1 - k] for k in dict.fromkeys(k for k in keys[reused:] if k < 0)]
        features, encoded = self._features(rest)  # before the cache changes: a failure here leaves it whole
        _crop(self._cache, reused)
        self._cache_keys = self._cache_keys[:reused]
        self.stats = {"prompt_tokens": len(ids), "reused_tokens": reused, "prefilled_tokens": len(ids) - reused,
                      "images_encoded": encoded, "dropped_turns": len(self._turns) + 1 - len(turns),
                      "new_token_ids": [], "ttft_s": None}
        steps = self.model.stream(torch.tensor([ids[reused:]]), image_features=features, cache=self._cache,
                                  max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, eos_token_id=self.stop_ids, generator=self._generator,
                                  compile=self.compile)
        new, shown, done, stop_str = self.stats["new_token_ids"], "", False, self.processor.template.stop_str
        try:
            for token in steps:
                new.append(int(token[0]))
                if len(new) == 1:
                    self.stats["ttft_s"] = time.perf_counter() - start
                if new[-1] in self.stop_ids:
                    break
                text = self.processor.decode(new)
                stopped = bool(stop_str) and stop_str in text
                visible = self.visible_text(text, final=stopped)
                if visible.startswith(shown) and len(visible) > len(shown):
                    shown, piece = visible, visible[len(shown):]
                    yield piece
                if stopped:
                    break
            visible = self.visible_text(self.processor.decode([t for t in new if t not in self.stop_ids]), final=True)
            if visible.startswith(shown) and len(visible) > len(shown):
                shown, piece = visible, visible[len(shown):]
                yield piece
            done = True
        except GeneratorExit:  # closed early: the turn keeps what was said so far
            done = True
            raise
        finally:
            steps.close()
            self._open = None
            said = special_text(self.processor.tokenizer).sub("", shown)  # (text the template cannot carry)
            if done and said == shown:  # the cache holds the prompt and every generated token but the last
                self._cache_keys = (keys + new)[:int(self._cache.get_seq_length())]
            else:  # an error mid-step (an interrupt) may leave the cache half-updated: the next turn starts afresh
                self._cache, self._cache_keys = None, []
            if done or shown:  # the turn keeps what was shown (an interrupt before any text drops it)
                self._turns = turns[:-1] + [Turn(turns[-1].question, turns[-1].images, said)]

    def _empty_cache(self):
        """A KV cache for a new conversation: one that grows, or (compile) the session's static one."""
        if not self.compile:
            return decoding.new_cache(self.model)
        if self._static is None:
            self._static = decoding.new_cache(self.model, max_length=self.context)
        return self._static

    def _features(self, images: list[ChatImage]) -> tuple[torch.Tensor | None, int]:
        """Vision features (N, P, C_v) of `images` and how many had to be encoded: only new ones, unless the
        session does not reuse its cache (then all, every turn)."""
        todo = [im for im in images if im.features is None or not self.reuse_cache]
        encoded = {}
        if todo:
            pixels = self.processor.image_processor([im.image for im in todo])  # (n, 3, S, S)
            encoded = dict(zip([im.key for im in todo], self.model.encode_images(pixels)))
            if self.reuse_cache:
                for im in todo:
                    im.features = encoded[im.key]
        if not images:
            return None, 0
        return torch.stack([encoded[im.key] if im.key in encoded else im.features for im in images]), len(todo)

    def visible_text(self, text: str, final: bool) -> str:
        """The part of the decoded answer `text` to show: cut at the stop string, without "<image>", stripped.
        Unless `final`, also hold back what may still change: the start of a stop string or of "<image>", an
        unfinished UTF-8 character (decoded as U+FFFD), trailing spaces. An answer cut short by max_new_tokens
        in the middle of a character ends in U+FFFD, as transformers' decoding of the same tokens does."""
        stop = self.processor.template.stop_str
        if stop and stop in text:
            text = text[:text.index(stop)]
        text = text.replace(IMAGE_PLACEHOLDER, "").lstrip()
        if not final:
            text = text[:len(text) - max(_partial_suffix(text, m) for m in (stop, IMAGE_PLACEHOLDER))]
            text = text.rstrip("\ufffd")
        return text.rstrip()


def _check_message(text, what: str, tokenizer, images_allowed: bool = False) -> None:
    """A system prompt or question the template can carry: a str of valid Unicode without a special token's text
    (nor "<image>" in a system prompt: images go with questions). ValueError names `what`."""
    if not isinstance(text, str):
        raise TypeError(f"{what}: a {type(text).__name__}; expected text (a str)")
    check_text(text, what)
    if not images_allowed and IMAGE_PLACEHOLDER in text:
        raise ValueError(f"{what}: holds '{IMAGE_PLACEHOLDER}'; images go with a question, not the system prompt")
    refuse_special_text(text, tokenizer, f"{what}:")


def common_prefix(cached: list[int], keys: list[int]) -> int:
    """How many leading `keys` the cache already holds: the longest common prefix, backed off to the start of an
    image it would cut, and leaving at least one token to prefill (its logits give the first new token)."""
    n, most = 0, min(len(cached), len(keys) - 1)
    while n < most and cached[n] == keys[n]:
        n += 1
    while 0 < n and keys[n - 1] < 0 and keys[n] == keys[n - 1]:
        n -= 1
    return n


def _crop(cache, n: int) -> None:
    """Keep the first `n` positions of a KV cache (its `crop` takes minus the number to remove; a static one
    keeps the rest as stale positions that the next tokens overwrite)."""
    extra = int(cache.get_seq_length()) - n
    if extra > 0:
        cache.crop(-extra)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker` (0 if none)."""
    return next((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:k])), 0)
