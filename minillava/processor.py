"""The processor: conversations and images in, model-ready batches out.

It joins the three pieces that must agree for LLaVA to work: the chat template (what text the model sees and
which tokens are supervised), the tokenizer (with `<image>` as a special token, expanded to one token per image
feature), and the image preprocessing. Samples are collated with padding on the right for training and on the
left for generation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .templates import IGNORE_INDEX, IMAGE_PLACEHOLDER, Template, get_template
from .utils import read_json, write_json
from .vision import ImageProcessor

PROCESSOR_NAME = "minillava_processor.json"


class Processor:
    """Tokenizer + image preprocessing + chat template.

    Args:
        tokenizer: a transformers (fast) tokenizer in which `<image>` is a special token.
        image_processor: an `ImageProcessor` (size, mean/std, pad or square).
        num_image_tokens: tokens each image takes in the prompt (the vision tower's feature count).
        template: a template name or `Template` (`vicuna_v1` for chat, `plain` for stage-1 captions).
        max_length: the context length; longer samples are an error (never silently truncated).
    """

    def __init__(self, tokenizer, image_processor: ImageProcessor, num_image_tokens: int,
                 template: str | Template = "vicuna_v1", max_length: int | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = int(num_image_tokens)
        self.template = get_template(template)
        self.max_length = max_length
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if image_id is None or image_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer: '{IMAGE_PLACEHOLDER}' is not a token; add it with "
                             f"tokenizer.add_special_tokens({{'additional_special_tokens': ['{IMAGE_PLACEHOLDER}']}})")
        self.image_token_id = int(image_id)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)

    def with_template(self, template: str | Template) -> Processor:
        """The same processor rendering with another template."""
        return Processor(self.tokenizer, self.image_processor, self.num_image_tokens, template, self.max_length)

    def encode(self, messages: list[dict], images=(), add_generation_prompt: bool = False,
               sample_id: str | None = None) -> dict:
        """One conversation -> {"input_ids": (T,), "labels": (T,), "images": (N, 3, S, S)}.

        Every `<image>` placeholder in the messages must have exactly one image, in order. Message content
        is a string or transformers' typed parts (see `templates.content_text`).
        """
        images = list(images or [])
        who = f"sample '{sample_id}'" if sample_id is not None else "conversation"
        try:  # the template's checks first: "<image>" in an answer is an error of its own, not a miscount
            n_slots = self.template.render(messages, add_generation_prompt).count(IMAGE_PLACEHOLDER)
        except ValueError as e:
            raise ValueError(f"{who}: {e}") from None
        if n_slots != len(images):
            raise ValueError(f"{who}: {n_slots} '{IMAGE_PLACEHOLDER}' placeholders but {len(images)} images")
        ids = self.template.tokenize(messages, self.tokenizer, add_generation_prompt=add_generation_prompt,
                                     num_image_tokens=self.num_image_tokens, max_length=self.max_length,
                                     sample_id=sample_id)
        return {
            "input_ids": torch.tensor(ids["input_ids"], dtype=torch.long),
            "labels": torch.tensor(ids["labels"], dtype=torch.long),
            "images": self.image_processor(images) if images else None,
        }

    def collate(self, samples: list[dict], padding_side: str = "right") -> dict:
        """Encoded samples -> a batch: input_ids, labels, attention_mask (B, T) and images (N, 3, S, S)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side '{padding_side}': expected 'left' or 'right'")
        T = max(len(s["input_ids"]) for s in samples)
        B = len(samples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            cols = slice(T - n, T) if padding_side == "left" else slice(0, n)
            input_ids[i, cols] = s["input_ids"]
            labels[i, cols] = s["labels"]
            attention_mask[i, cols] = 1
        images = [s["images"] for s in samples if s.get("images") is not None]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "images": torch.cat(images) if images else None}

    def pack(self, samples: list[dict]) -> dict:
        """Encoded samples -> one padding-free row: input_ids, labels, position_ids (1, sum of T) and images.

        The samples are laid end to end with no padding; each one's positions start again at 0, which is what
        tells the language model where a sample ends (transformers turns such position_ids, with no attention
        mask, into a block-diagonal causal mask: no token sees another sample). Each sample's first label is
        ignored, so that no sample is trained to predict the next one's first token: the loss is that of the
        padded batch, without the padding's compute. attention_mask is None.
        """
        labels = [s["labels"].clone() for s in samples]
        for row in labels:
            row[0] = IGNORE_INDEX
        images = [s["images"] for s in samples if s.get("images") is not None]
        return {"input_ids": torch.cat([s["input_ids"] for s in samples])[None],
                "labels": torch.cat(labels)[None], "attention_mask": None,
                "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None],
                "images": torch.cat(images) if images else None}

    def __call__(self, conversations, images=None, add_generation_prompt: bool = False,
                 padding_side: str | None = None, sample_ids: list[str] | None = None) -> dict:
        """One conversation (a list of messages) or several, with their images (for one conversation: an
        image, a path or a list of them; for several: a list per conversation) -> a batch as `collate`
        returns. Pads on the left when prompting for generation. `sample_ids` name the conversations in
        errors (default: their positions)."""
        if not conversations:
            raise ValueError("no conversation given: expected a list of messages, or a list of such lists")
        if isinstance(conversations[0], dict):  # one conversation
            one = images if isinstance(images, (list, tuple)) else [] if images is None else [images]
            conversations, images = [conversations], [one]
        images = images if images is not None else [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        images = [[] if one is None else one for one in images]
        flat = next((i for i, one in enumerate(images) if not isinstance(one, (list, tuple))), None)
        if flat is not None:
            raise ValueError(f"images[{flat}]: a {type(images[flat]).__name__}; with several conversations, images "
                             "is one list of images per conversation ([] for none)")
        ids = sample_ids if sample_ids is not None else [str(i) for i in range(len(conversations))]
        samples = [self.encode(c, im, add_generation_prompt, sample_id=sid)
                   for sid, c, im in zip(ids, conversations, images)]
        side = padding_side or ("left" if add_generation_prompt else "right")
        return self.collate(samples, padding_side=side)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Token ids -> text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def stop_token_ids(self) -> list[int]:
        """Token ids at which generation ends: EOS and the template's end-of-turn token, if it is one token."""
        ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        stop = self.tokenizer.encode(self.template.stop_str, add_special_tokens=False)
        if len(stop) == 1 and stop[0] not in ids:
            ids.append(stop[0])
        return ids

    # ---- saving --------------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the tokenizer files and `minillava_processor.json` into `out_dir` (an existing folder). The
        tokenizer's chat template is written as the processor's template renders it (`Template.to_jinja`), so
        `apply_chat_template` on the saved folder gives the prompts the model was trained on."""
        kept = self.tokenizer.chat_template
        self.tokenizer.chat_template = self.template.to_jinja()
        try:
            self.tokenizer.save_pretrained(str(out_dir))
        finally:
            self.tokenizer.chat_template = kept
        write_json(Path(out_dir) / PROCESSOR_NAME, {
            "image_processor": self.image_processor.to_dict(),
            "num_image_tokens": self.num_image_tokens,
            "template": self.template.name,
            "max_length": self.max_length,
        })

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Processor:
        from transformers import AutoTokenizer

        cfg = read_json(Path(path) / PROCESSOR_NAME, what="processor config",
                        keys=("image_processor", "num_image_tokens", "template"))
        if not any((Path(path) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise FileNotFoundError(f"model folder '{path}': no tokenizer files (tokenizer.json, "
                                    "tokenizer_config.json)")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(tokenizer, ImageProcessor(**cfg["image_processor"]), cfg["num_image_tokens"],
                   cfg["template"], cfg.get("max_length"))
