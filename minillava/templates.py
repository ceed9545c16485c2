"""Conversation templates: chat messages -> prompt text -> token ids and a label mask.

A language model fine-tuned on chats only works well when it is prompted with the exact text layout it was
trained on, so the layouts here are LLaVA v1.5's, character for character: the strings follow
`Conversation.get_prompt()` in LLaVA's `llava/conversation.py`, and what is supervised follows
`preprocess_v1`, `preprocess_plain`, `preprocess_llama_2` and `preprocess_mpt` in `llava/train/train.py`
(github.com/haotian-liu/LLaVA).

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`: an
optional system message first (it replaces the template's default system text), then user and assistant
turns alternating, starting with the user. Image positions are marked by the placeholder "<image>". The
content may also be transformers' typed parts, `[{"type": "image"}, {"type": "text", "text": "..."}]`: they
are joined in order, each image part becoming "<image>" (`content_text`), and render the same.

Three decisions differ from the reference and are worth knowing:

* **The space before an answer is part of the answer.** In "ASSISTANT: A cat.</s>" the supervised text is
  " A cat.</s>" and the generation prompt is "ASSISTANT:" (no trailing space). SentencePiece and byte-level
  BPE both glue the space to the next word ("▁A", "ĠA"), so the first token the model must produce after
  the prompt is exactly the first supervised token, which is what the reference supervises too.
* **Labels come from character offsets**, not from counting tokens of re-tokenized pieces: the prompt is
  tokenized once and a token is supervised iff its characters overlap supervised text. Every way this can
  go wrong raises a ValueError naming the sample; nothing is masked silently ("tokenization mismatch").
* **Images may go anywhere.** LLaVA moves its single "<image>" to the front of the first user turn as
  "<image>\\n" + question. We do the same only when the conversation holds exactly one placeholder and it
  sits at the start or end of the first user message (the LLaVA data case); otherwise placeholders stay
  where the user put them, so several images can be interleaved with text.
"""

import functools
import json
import re
from dataclasses import dataclass

IGNORE_INDEX = -100  # label of a position that does not count in the loss (PyTorch's cross-entropy default)
IMAGE_PLACEHOLDER = "<image>"


# The Jinja twin of Template.segments; each @name@ becomes a JSON literal (a string or true/false).
# `text_of` is the twin of content_text: a string as is, typed parts joined with each image as "<image>".
_JINJA = """
{%- macro text_of(content) -%}
  {%- if content is string -%}{{- content -}}
  {%- else -%}
    {%- for part in content -%}
      {%- if part['type'] == 'image' -%}{{- @image@ -}}
      {%- elif part['type'] == 'text' -%}{{- part['text'] -}}
      {%- else -%}{{- raise_exception('content parts must be of type image or text, got ' ~ part['type']) -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- set system_in_first_user = @system_in_first_user@ -%}
{%- set caption_only = @caption_only@ -%}
{%- set ns = namespace(system=@system@, images=0) -%}
{%- set msgs = messages -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set ns.system = text_of(messages[0]['content']) -%}
  {%- set msgs = messages[1:] -%}
{%- endif -%}
{%- for m in msgs -%}{%- set ns.images = ns.images + text_of(m['content']).count(@image@) -%}{%- endfor -%}
{%- set sys_block = (@system_open@ + ns.system + @system_close@) if ns.system else '' -%}
{%- if not system_in_first_user -%}{{- sys_block -}}{%- endif -%}
{%- for m in msgs -%}
  {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('turns must alternate user/assistant, starting with user') -}}
  {%- endif -%}
  {%- set c = text_of(m['content']) -%}
  {%- if m['role'] == 'user' -%}
    {%- if caption_only -%}
      {%- set c = @image@ * c.count(@image@) -%}
    {%- elif loop.first and ns.images == 1 and (c.strip().startswith(@image@)
                                                or c.strip().endswith(@image@)) -%}
      {%- set c = (@image_nl@ + c.replace(@image@, '').strip()).strip() -%}
    {%- endif -%}
    {%- if not loop.first -%}{{- @round_sep@ -}}{%- endif -%}
    {{- @user_open@ -}}
    {%- if loop.first and system_in_first_user -%}{{- sys_block -}}{%- endif -%}
    {{- c + @user_close@ -}}
  {%- else -%}
    {{- @tag@ -}}@generation@{{- @answer_pre@ + c + @answer_close@ -}}@endgeneration@
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- @tag@ -}}{%- endif -%}
"""


@dataclass(frozen=True)
class Template:
    """How one family of models lays out a conversation as text.

    A conversation renders as::

        system block, then per round: [round_sep] user[0] + question + user[1], assistant_tag,
        answer[0] + answer + answer[1]

    where the system block is system_wrap[0] + system + system_wrap[1] (left out when the system text is
    empty) and goes inside the first user turn when `system_in_first_user` (Llama-2's [INST] <<SYS>>).
    Only answer[0] + answer + answer[1] is supervised; `assistant_tag` alone is the generation prompt.
    `caption_only` is LLaVA's stage-1 `plain` layout: one round, the user text reduced to its placeholders.
    """

    name: str
    system: str = ""
    system_wrap: tuple[str, str] = ("", "")
    system_in_first_user: bool = False
    user: tuple[str, str] = ("", "")
    assistant_tag: str = ""
    answer: tuple[str, str] = ("", "")
    round_sep: str = ""
    caption_only: bool = False
    stop: str = ""  # where a turn ends when `answer[1]` does not say (llava-hf's layout: at EOS, "</s>")

    @property
    def stop_str(self) -> str:
        """The text that ends an assistant turn; generation stops when the model writes it."""
        return self.stop or self.answer[1].strip() or self.answer[1]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The prompt text of `messages`; with `add_generation_prompt`, followed by the assistant tag."""
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt))

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The rendered text cut into consecutive pieces `(text, supervised)`; joined, they give `render`.

        Supervised pieces are the answers with their end separators; neighbours never share a flag.
        """
        system, rounds = self._parse(messages, add_generation_prompt)
        system_block = f"{self.system_wrap[0]}{system}{self.system_wrap[1]}" if system else ""
        pieces = [] if self.system_in_first_user else [(system_block, False)]
        for i, (question, answer) in enumerate(rounds):
            if i == 0 and self.system_in_first_user:
                question = system_block + question
            pieces.append(((self.round_sep if i else "") + self.user[0] + question + self.user[1], False))
            if answer is not None:
                pieces += [(self.assistant_tag, False), (self.answer[0] + answer + self.answer[1], True)]
        if add_generation_prompt:
            pieces.append((self.assistant_tag, False))
        merged: list[tuple[str, bool]] = []
        for text, supervised in pieces:
            if merged and merged[-1][1] == supervised:
                merged[-1] = (merged[-1][0] + text, supervised)
            elif text:
                merged.append((text, supervised))
        return merged

    def _parse(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[list]]:
        """Check `messages`; return the system text and the rounds `[question, answer or None]`."""
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
                raise ValueError(f"message {i}: expected {{'role': str, 'content': str or typed parts}}, "
                                 f"got {message!r}")
        contents = [content_text(m["content"], f"message {i}") for i, m in enumerate(messages)]
        system, start = self.system, 0
        if messages and messages[0]["role"] == "system":
            if self.caption_only:
                raise ValueError(f"message 0: template {self.name!r} takes no system message")
            system, start = contents[0], 1
        rounds: list[list] = []
        for i in range(start, len(messages)):
            role, content = messages[i]["role"], contents[i]
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"message {i}: expected role {expected!r}, got {role!r} (after an optional "
                                 "system message, turns alternate user/assistant, starting with user)")
            if role == "user":
                rounds.append([content, None])
            elif IMAGE_PLACEHOLDER in content:
                raise ValueError(f"message {i}: an assistant message cannot hold {IMAGE_PLACEHOLDER!r}")
            else:
                rounds[-1][1] = content
        if not rounds:
            raise ValueError("messages: a conversation needs at least one user message")
        if add_generation_prompt and rounds[-1][1] is not None:
            raise ValueError(f"message {len(messages) - 1}: add_generation_prompt needs the conversation "
                             "to end with a user message")
        first = rounds[0][0]
        if self.caption_only:
            if len(rounds) > 1:
                raise ValueError(f"message {start + 2}: template {self.name!r} is single-turn "
                                 "(one image, one caption)")
            if IMAGE_PLACEHOLDER not in first:
                raise ValueError(f"message {start}: template {self.name!r} needs {IMAGE_PLACEHOLDER!r} "
                                 "in the user message")
            rounds[0][0] = IMAGE_PLACEHOLDER * first.count(IMAGE_PLACEHOLDER)
        elif sum(question.count(IMAGE_PLACEHOLDER) for question, _ in rounds) == 1 and (
                first.strip().startswith(IMAGE_PLACEHOLDER) or first.strip().endswith(IMAGE_PLACEHOLDER)):
            # LLaVA's preprocess_multimodal: "Q\n<image>" or "<image> Q" becomes "<image>\nQ".
            rounds[0][0] = (IMAGE_PLACEHOLDER + "\n" + first.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
        return system, rounds

    def to_jinja(self, assistant_masks: bool = False) -> str:
        """The same layout as a Jinja chat template, for `tokenizer.chat_template` and other runtimes.

        `tokenizer.apply_chat_template(messages, chat_template=t.to_jinja(), tokenize=False,
        add_generation_prompt=g) == t.render(messages, g)` for valid messages, their content a string or
        transformers' typed parts (what its processors and pipelines pass); the Jinja checks only the role
        order and the part types, `render` checks the rest. With `assistant_masks`, the supervised part of each
        answer sits between `{% generation %}` markers, so `return_assistant_tokens_mask=True` marks the tokens
        `tokenize` labels (what TRL's `assistant_only_loss` trains on); they are off by default, since runtimes
        other than transformers may not know the tag.
        """
        values = {"system": self.system, "system_open": self.system_wrap[0],
                  "system_close": self.system_wrap[1],
                  "system_in_first_user": self.system_in_first_user, "caption_only": self.caption_only,
                  "round_sep": self.round_sep, "user_open": self.user[0], "user_close": self.user[1],
                  "answer_pre": self.answer[0], "answer_close": self.answer[1],
                  "tag": self.assistant_tag, "image": IMAGE_PLACEHOLDER, "image_nl": IMAGE_PLACEHOLDER + "\n"}
        tags = {"generation": "{%- generation -%}", "endgeneration": "{%- endgeneration -%}"}
        jinja = re.sub(r"@(end)?generation@", lambda slot: tags[slot.group(0)[1:-1]] if assistant_masks else "", _JINJA)
        return re.sub(r"@(\w+)@", lambda slot: json.dumps(values[slot.group(1)]), jinja).strip()

    def tokenize(self, messages: list[dict], tokenizer, add_generation_prompt: bool = False,
                 num_image_tokens: int = 1, max_length: int | None = None, sample_id: str | None = None,
                 add_bos: bool | None = None) -> dict:
        """Token ids and labels of one conversation, ready for a causal-LM loss.

        In: `messages` as for `render`; a fast (tokenizers-backed) Hugging Face `tokenizer` in which "<image>"
        is one added token; `num_image_tokens` N, the positions each image's features will fill;
        `add_bos` (None: prepend BOS iff the tokenizer itself does).
        Out: {"input_ids": list[int] (T,), "labels": list[int] (T,)} where each "<image>" became N copies of
        its id and labels are the ids on supervised tokens, IGNORE_INDEX elsewhere (BOS, system, user turns,
        role tags, images). Raises ValueError, naming `sample_id`, when the token/character alignment breaks,
        when the tokenizer cannot return offsets or lacks the image token, when T > `max_length`
        (nothing is ever truncated), and when a message holds the text of a special token (see
        `check_special_text`: refused, never escaped).
        """
        where = "sample" if sample_id is None else f"sample {sample_id!r}"
        try:
            segments = self.segments(messages, add_generation_prompt)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        check_special_text(messages, tokenizer, where)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{where}: tokenizer {type(tokenizer).__name__} cannot return character "
                             "offsets; load a fast (tokenizers-backed) tokenizer")
        if num_image_tokens < 1:
            raise ValueError(f"{where}: num_image_tokens must be at least 1, got {num_image_tokens}")
        text = "".join(piece for piece, _ in segments)
        num_images = text.count(IMAGE_PLACEHOLDER)
        image_id = _image_token_id(tokenizer, where) if num_images else None
        ids, labels = label_by_offsets(segments, tokenizer, where)

        bos_id = tokenizer.bos_token_id
        if add_bos is None:
            add_bos = bos_id is not None and tokenizer("a").input_ids[:1] == [bos_id]
        if add_bos and bos_id is None:
            raise ValueError(f"{where}: add_bos=True but the tokenizer has no BOS token")
        input_ids = [bos_id] if add_bos else []
        out_labels = [IGNORE_INDEX] if add_bos else []
        for token_id, label in zip(ids, labels):
            repeat = num_image_tokens if token_id == image_id else 1
            input_ids += [token_id] * repeat
            out_labels += [label] * repeat
        if max_length is not None and len(input_ids) > max_length:
            raise ValueError(f"{where}: {len(input_ids)} tokens exceed max_length {max_length} "
                             f"({num_images * num_image_tokens} of them image tokens: {num_images} "
                             f"image(s) x {num_image_tokens}); shorten or drop the sample, "
                             "nothing is truncated")
        return {"input_ids": input_ids, "labels": out_labels}


def content_text(content, what: str = "content") -> str:
    """A message's content as text: a string as is; transformers' typed parts `[{"type": "image"},
    {"type": "text", "text": str}, ...]` joined in order with nothing between them, each image part becoming
    "<image>". ValueError, naming `what`, for other content, other part types, and text that is not valid
    Unicode (see `check_text`)."""
    if isinstance(content, list):
        pieces = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                pieces.append(IMAGE_PLACEHOLDER)
            elif kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                raise ValueError(f"{what}: part {k} must be {{'type': 'image'}} or {{'type': 'text', 'text': str}}, "
                                 f"got {part!r}")
        content = "".join(pieces)
    if not isinstance(content, str):
        raise ValueError(f"{what}: content must be a string or a list of typed parts, got {type(content).__name__}")
    check_text(content, what)
    return content


def check_text(text: str, what: str) -> None:
    """Refuse a string that is not valid Unicode text: a lone surrogate (an unpaired "\\udcff" escape in JSON,
    or bytes that were not UTF-8 read with errors="surrogateescape") cannot be encoded, so no tokenizer can
    read it. ValueError names `what` and where the character is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what}: not valid Unicode text (lone surrogate {text[e.start]!r} at character "
                         f"{e.start}; bytes that were not UTF-8, or an unpaired \\u escape in JSON)") from None


def check_special_text(messages: list[dict], tokenizer, where: str) -> None:
    """Refuse messages whose text holds a special token's text, "<image>" aside.

    The tokenizer reads "</s>" in an answer as the end-of-sequence token, not as four characters, so the
    model would be taught to stop mid-answer (and a user's ``<|im_end|>`` would end their turn). Such text is
    refused, not escaped: escaping would need a tokenization of messages apart from the template's own
    special tokens, and chat and training would have to agree on it. ValueError names `where`, the message
    and the token.
    """
    for i, message in enumerate(messages):
        refuse_special_text(content_text(message["content"], f"{where}: message {i}"), tokenizer,
                            f"{where}: message {i}")


def refuse_special_text(text: str, tokenizer, what: str) -> None:
    """ValueError naming `what` when `text` holds the text of a special token of `tokenizer` ("<image>" aside)."""
    found = special_text(tokenizer).search(text)
    if found:
        raise ValueError(f"{what} holds {found.group()!r}, the text of a special token of the tokenizer; it would "
                         "be read as that token, not as text: remove or reword it")


def special_text(tokenizer) -> re.Pattern:
    """A regex matching the text of any special token of `tokenizer` but "<image>" (one that matches nothing when
    there is none)."""
    specials = tuple(t for t in getattr(tokenizer, "all_special_tokens", []) if t and t != IMAGE_PLACEHOLDER)
    return _any_of(specials) if specials else re.compile(r"(?!)")


@functools.lru_cache(maxsize=16)
def _any_of(texts: tuple[str, ...]) -> re.Pattern:
    """A regex matching any of `texts`, longest first (one search beats a loop over hundreds of tokens)."""
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def label_by_offsets(segments: list[tuple[str, bool]], tokenizer, where: str) -> tuple[list[int], list[int]]:
    r"""Tokenize the joined `segments` once; label each token by the characters it covers.

    A token is supervised iff it overlaps a supervised segment. Whitespace may ride along (" A" holds the
    space before an answer, "\nA" a tag's newline), but a token that also covers unsupervised
    non-whitespace, a supervised segment without tokens, or supervised tokens that decode to other text
    raise ValueError. Returns (ids, labels) with labels = id or IGNORE_INDEX, both (T,).
    """
    text = "".join(piece for piece, _ in segments)
    supervised, spans, position = [], [], 0
    for piece, flag in segments:
        supervised += [flag] * len(piece)
        if flag:
            spans.append((position, position + len(piece)))
        position += len(piece)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]

    labels = []
    for token_id, (start, end) in zip(ids, offsets):
        chars = range(start, end)
        is_supervised = any(supervised[k] for k in chars)
        if is_supervised and any(not supervised[k] and not text[k].isspace() for k in chars):
            raise ValueError(f"{where}: token {tokenizer.convert_ids_to_tokens(token_id)!r} "
                             f"({text[start:end]!r}) straddles supervised and unsupervised text")
        labels.append(token_id if is_supervised else IGNORE_INDEX)
    for start, end in spans:
        inside = [ids[i] for i, (s, e) in enumerate(offsets) if s < end and e > start]
        if not inside:
            raise ValueError(f"{where}: supervised text {text[start:end]!r} got no token")
        decoded = tokenizer.decode(inside, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded.strip() != text[start:end].strip():
            raise ValueError(f"{where}: supervised tokens decode to {decoded!r}, not to {text[start:end]!r}")
    return ids, labels


def _image_token_id(tokenizer, where: str) -> int:
    """The id of "<image>", which must be one added (never split) token of `tokenizer`."""
    ids = tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False)
    if len(ids) != 1 or IMAGE_PLACEHOLDER not in tokenizer.get_added_vocab():
        raise ValueError(f"{where}: the tokenizer does not map {IMAGE_PLACEHOLDER!r} to one added token "
                         f"(it gives ids {ids}); add it as a special token: "
                         f"tokenizer.add_tokens([{IMAGE_PLACEHOLDER!r}], special_tokens=True), "
                         "and resize the model's embeddings")
    return ids[0]


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. "
                   "You are able to understand the visual content that the user provides, "
                   "and assist the user with a variety of tasks using natural language.")
_CHATML = dict(system_wrap=("<|im_start|>system\n", "<|im_end|>"), user=("<|im_start|>user\n", "<|im_end|>"),
               assistant_tag="<|im_start|>assistant\n", answer=("", "<|im_end|>"))
_LLAMA_2 = dict(system_wrap=("<<SYS>>\n", "\n<</SYS>>\n\n"), system_in_first_user=True,
                user=("[INST] ", " [/INST]"), answer=(" ", " </s>"))

TEMPLATES: dict[str, Template] = {t.name: t for t in [
    # Stage 1 (feature alignment): "<image>" + caption + "\n"; the instruction text is dropped.
    Template("plain", answer=("", "\n"), caption_only=True),
    # Stage 2 and evaluation of LLaVA-1.5 (Vicuna backbone).
    Template("vicuna_v1", system=_VICUNA_SYSTEM, system_wrap=("", " "), user=("USER: ", " "),
             assistant_tag="ASSISTANT:", answer=(" ", "</s>")),
    # The reference CLI's variant: "human"/"human's" in the system text.
    Template("llava_v1", system=_VICUNA_SYSTEM.replace("user", "human"), system_wrap=("", " "),
             user=("USER: ", " "), assistant_tag="ASSISTANT:", answer=(" ", "</s>")),
    # transformers' chat template for llava-hf/llava-1.5-*-hf: vicuna_v1's tags without its system prompt and
    # without "</s>" between turns (an inference layout; no LLaVA model was trained with it).
    Template("llava_hf", system_wrap=("", " "), user=("USER: ", " "), assistant_tag="ASSISTANT:", answer=(" ", ""),
             round_sep=" ", stop="</s>"),
    Template("llava_llama_2", system=_LLAMA_2_SYSTEM, round_sep="<s>", **_LLAMA_2),
    Template("mistral_instruct", **_LLAMA_2),
    Template("chatml_direct", system="Answer the questions.", **_CHATML),
    Template("mpt", system="A conversation between a user and an LLM-based AI assistant. "
                           "The assistant gives helpful and honest answers.", **_CHATML),
    # SmolLM2-Instruct's own chat template (ChatML, a newline after each turn, a default system prompt); the
    # newline after <|im_end|> is supervised with it, as LLaVA-NeXT's preprocess_qwen does.
    Template("smollm2", system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
             system_wrap=("<|im_start|>system\n", "<|im_end|>\n"), user=("<|im_start|>user\n", "<|im_end|>\n"),
             assistant_tag="<|im_start|>assistant\n", answer=("", "<|im_end|>\n")),
]}


def get_template(name: str | Template) -> Template:
    """The template called `name` (a Template passes through); unknown names raise ValueError."""
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


_FROM_TO_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}
_ROLE_TO_FROM = {role: source for source, role in _FROM_TO_ROLE.items()}


def from_llava(conversations: list[dict]) -> list[dict]:
    """LLaVA's `[{"from": "human" | "gpt" | "system", "value": str}]` -> `[{"role", "content"}]` messages."""
    return [{"role": role, "content": content}
            for role, content in _convert(conversations, "from", "value", _FROM_TO_ROLE, "turn")]


def to_llava(messages: list[dict]) -> list[dict]:
    """Messages `[{"role", "content"}]` -> LLaVA's `[{"from", "value"}]` turns; inverse of from_llava."""
    return [{"from": source, "value": value}
            for source, value in _convert(messages, "role", "content", _ROLE_TO_FROM, "message")]


def _convert(items: list[dict], key: str, text_key: str, mapping: dict, noun: str) -> list[tuple[str, str]]:
    """Map each item's `key` through `mapping` and keep its `text_key`; ValueError names the bad item."""
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{noun} {i}: expected a dict with {key!r} and {text_key!r}, got {item!r}")
        for k in (key, text_key):
            if k not in item:
                raise ValueError(f"{noun} {i}: missing key {k!r} in {item!r}")
        if item[key] not in mapping:
            raise ValueError(f"{noun} {i}: unknown {key!r} value {item[key]!r}; expected one of "
                             f"{', '.join(map(repr, mapping))}")
        if not isinstance(item[text_key], str):
            kind = type(item[text_key]).__name__
            raise ValueError(f"{noun} {i}: {text_key!r} must be a string, got {kind}")
        check_text(item[text_key], f"{noun} {i}: {text_key!r}")
        out.append((mapping[item[key]], item[text_key]))
    return out
