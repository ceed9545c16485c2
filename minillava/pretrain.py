"""Pretraining the zoo's backbones on ShapesWorld: a tokenizer, a tiny CLIP and a tiny chat language model.

LLaVA starts from two pretrained models: CLIP (trained contrastively on 400M image-text pairs) and Vicuna (a
LLaMA fine-tuned on chats). This world has no model hub, so we make small twins of both, with the same
transformers classes, on ShapesWorld:

- a byte-level BPE tokenizer trained on the world's text, with the special tokens the templates need;
- `CLIPModel` trained with CLIP's contrastive loss on image-caption pairs (`train_clip`);
- `LlamaForCausalLM` trained as a language model on text-only chats in the `vicuna_v1` template, so it already
  speaks the template before it ever sees an image (`train_lm`), then fine-tuned on the same chats with the loss
  on the assistant's answers alone (`chat_sft`), as Vicuna is LLaMA fine-tuned on conversations.

Sizes are chosen so each trains in minutes on a 2-core CPU; the real ones are in comments beside them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data.records import Record
from .templates import IGNORE_INDEX, get_template
from .utils import lr_at
from .vision import ImageProcessor

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]  # </s> is not id 2: see
# CLIPTextTransformer, which falls back to an argmax pooling hack when eos_token_id == 2


def train_tokenizer(texts: list[str], vocab_size: int = 1024, max_length: int = 1024):
    """A byte-level BPE tokenizer (as GPT-2/Llama-3 use) that adds BOS like Llama's, with `<image>` special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length,
                                   additional_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"])
    fast.chat_template = get_template("vicuna_v1").to_jinja()
    return fast


def chat_texts(records: list[Record], template: str = "vicuna_v1") -> list[str]:
    """Records rendered as the full text a model reads (for the tokenizer and LM pretraining)."""
    tpl = get_template(template)
    return [tpl.render(r.messages) for r in records]


# ---- tiny CLIP ------------------------------------------------------------------------------------------------
@dataclass
class ClipConfig:
    image_size: int = 64  # CLIP ViT-L/14-336: 336
    patch_size: int = 8  # 14
    width: int = 128  # 1024
    layers: int = 4  # 24
    heads: int = 4  # 16
    text_width: int = 128  # 768
    text_layers: int = 3  # 12
    text_length: int = 64  # 77
    projection: int = 128  # 768
    steps: int = 400
    batch_size: int = 128  # 32,768
    lr: float = 1e-3
    hard_negatives: bool = True
    seed: int = 0


def new_clip(cfg: ClipConfig, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    vision = dict(hidden_size=cfg.width, intermediate_size=4 * cfg.width, num_hidden_layers=cfg.layers,
                  num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads,
                max_position_embeddings=cfg.text_length, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.seed)
    return CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=cfg.projection))


def clip_text(tokenizer, texts: list[str], length: int) -> dict:
    """Captions -> CLIP text inputs: tokens + EOS (where CLIP pools), padded to the batch's longest."""
    ids = [x[: length - 1] + [tokenizer.eos_token_id] for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    T = max(map(len, ids))
    input_ids = torch.full((len(ids), T), tokenizer.pad_token_id)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def train_clip(pixels: torch.Tensor, captions: list[str], tokenizer, cfg: ClipConfig, progress: bool = True,
               device: str | torch.device = "cpu"):
    """Contrastive training (CLIP's symmetric InfoNCE) on images (N, 3, S, S) and their captions.

    With `cfg.hard_negatives`, each image also meets a false twin of its caption (one object changed, see
    `shapesworld.hard_negative`) among the texts it must reject, as NegCLIP does: the image-to-text logits are
    (B, B + k) for the k captions that have a negative (all, for ShapesWorld's), the text-to-image ones (B, B).
    Returns (CLIPModel on the CPU, metrics). Each step draws a random
    batch; caption duplicates in a batch are rare in ShapesWorld, so no masking of false negatives is done.
    """
    import numpy as np

    from .data.shapesworld import hard_negative

    clip = new_clip(cfg, tokenizer).to(device).train()
    pixels, rng = pixels.to(device), np.random.default_rng(cfg.seed)

    def loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(captions), (cfg.batch_size,), generator=g).tolist()
        texts = [captions[i] for i in idx]
        negatives = [hard_negative(t, rng) for t in texts] if cfg.hard_negatives else []
        texts += [n for n in negatives if n is not None]
        text = {k: v.to(device) for k, v in clip_text(tokenizer, texts, cfg.text_length).items()}
        out = clip(pixel_values=pixels[idx], **text)
        target = torch.arange(len(idx), device=device)
        return (F.cross_entropy(out.logits_per_image, target) +
                F.cross_entropy(out.logits_per_text[: len(idx)], target)) / 2

    run = fit(clip, loss, cfg.steps, cfg.lr, (0.9, 0.98), cfg.seed, "tiny-clip", progress)
    return clip.cpu().eval(), {**run, "config": asdict(cfg)}


def fit(model, loss_fn, steps: int, lr: float, betas: tuple, seed: int, name: str, progress: bool = True,
        on_step=None) -> dict:
    """The pretraining loop both backbones share: AdamW (weight decay 0.1), 5% warmup then cosine, gradient
    clipping at 1. `loss_fn(generator)` draws a batch and returns its loss; `on_step(steps done)`, if given, runs
    after each optimizer step (to measure along the way). Ends with a one-line summary."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=betas)
    g = torch.Generator().manual_seed(seed)
    warmup = math.ceil(0.05 * steps)
    metrics, t0 = [], time.perf_counter()
    bar = tqdm(range(steps), desc=name, disable=not progress, mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step, steps, warmup)
        loss = loss_fn(g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics.append({"step": step + 1, "loss": loss.detach()})
        if on_step is not None:
            on_step(step + 1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    metrics = [{**m, "loss": float(m["loss"])} for m in metrics]
    seconds = time.perf_counter() - t0
    print(f"{name}: {steps} steps in {seconds:.0f} s, final loss {metrics[-1]['loss']:.3f}")
    return {"train_seconds": seconds, "curve": metrics}


@torch.no_grad()
def text_embeddings(clip, tokenizer, texts: list[str], length: int = 64, batch: int = 256) -> torch.Tensor:
    """Normalised CLIP text embeddings (N, D)."""
    out = [clip.get_text_features(**clip_text(tokenizer, texts[i:i + batch], length)) for i in
           range(0, len(texts), batch)]
    return F.normalize(torch.cat([_pooled(o) for o in out]), dim=-1)


@torch.no_grad()
def image_embeddings(clip, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Normalised CLIP image embeddings (N, D)."""
    out = [clip.get_image_features(pixel_values=pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    return F.normalize(torch.cat([_pooled(o) for o in out]), dim=-1)


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def zero_shot_probs(clip, tokenizer, pixels: torch.Tensor, prompts: dict[str, list[str]],
                    ensemble: str = "marginal") -> torch.Tensor:
    """Zero-shot class probabilities (N, C) of images (N, 3, S, S), classes in the order of `prompts`
    ({class: [prompt, ...]}); the image-text scores are `logit_scale` * cosine, as in CLIP's loss.

    - "mean", CLIP's prompt ensemble: a class is the normalised mean embedding of its prompts, then a softmax
      over the classes. Right for phrasings of one content ("a photo of a {}", "a drawing of a {}").
    - "marginal": the image picks one prompt among all (a softmax over every class's prompts, as CLIP's loss
      picks a caption), and a class gets the summed probability of its prompts. Right when the prompts are
      different scenes that share the class ("a large red circle at the top left", "a small blue circle in
      the center"): their mean is a blur of every colour and place, which no image resembles.
    """
    classes = list(prompts)
    img, scale = image_embeddings(clip, pixels), clip.logit_scale.exp()
    if ensemble == "mean":
        emb = torch.stack([text_embeddings(clip, tokenizer, prompts[c]).mean(0) for c in classes])
        return torch.softmax(scale * img @ F.normalize(emb, dim=-1).T, dim=-1)
    if ensemble == "marginal":
        owner = torch.tensor([k for k, c in enumerate(classes) for _ in prompts[c]])
        logp = torch.log_softmax(scale * img @ text_embeddings(clip, tokenizer, sum(prompts.values(), [])).T, -1)
        return torch.stack([logp[:, owner == k].logsumexp(-1) for k in range(len(classes))], -1).exp()
    raise ValueError(f"ensemble {ensemble!r}: expected 'marginal' or 'mean'")


def zero_shot(clip, tokenizer, pixels: torch.Tensor, labels: list[str], prompts: dict[str, list[str]],
              ensemble: str = "marginal") -> float:
    """Zero-shot accuracy of images (N, 3, S, S) against their `labels` (N): the most probable class of
    `zero_shot_probs`."""
    classes = list(prompts)
    pred = zero_shot_probs(clip, tokenizer, pixels, prompts, ensemble).argmax(-1)
    return sum(classes[p] == y for p, y in zip(pred.tolist(), labels)) / len(labels)


def retrieval_at_1(clip, tokenizer, pixels: torch.Tensor, captions: list[str]) -> float:
    """Image-to-text retrieval R@1: how often an image's own caption is the nearest of all N captions."""
    sims = image_embeddings(clip, pixels) @ text_embeddings(clip, tokenizer, captions).T
    return float((sims.argmax(-1) == torch.arange(len(captions))).float().mean())


def render_pixels(images, image_size: int) -> torch.Tensor:
    """PIL images -> CLIP-normalised pixels (N, 3, S, S)."""
    return ImageProcessor(image_size=image_size, aspect="square")(images)


# ---- tiny chat LM ---------------------------------------------------------------------------------------------
@dataclass
class LMConfig:
    width: int = 256  # Vicuna-7B: 4096
    layers: int = 4  # 32
    heads: int = 8  # 32
    kv_heads: int = 4  # 32
    ffn: int = 768  # 11008
    context: int = 512  # 2048 (LLaVA-1.5) / 4096 (Vicuna v1.5)
    steps: int = 600
    batch_size: int = 16  # blocks of 256 tokens
    lr: float = 2e-3
    sft_steps: int = 0  # then answer-only chat fine-tuning (Vicuna: 3 epochs of 70K ShareGPT chats)
    sft_batch_size: int = 128  # chats
    sft_lr: float = 1e-3  # 2e-5
    sft_weight: float = 0.5  # the fine-tuned weights' share in the shipped ones, the rest pretrained (WiSE-FT)
    seed: int = 0


def new_lm(cfg: LMConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.width, intermediate_size=cfg.ffn, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.context,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False))


def lm_batch(tokenizer, texts: list[str], context: int) -> dict:
    """Texts -> (input_ids, attention_mask, labels) with BOS, right padding, labels -100 on padding."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=context, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def pack(tokenizer, texts: list[str], block: int) -> torch.Tensor:
    """Concatenate the tokenized texts (each with its BOS, ending in EOS) and cut the stream into blocks
    (N, block): no padding, so no compute is wasted on it (GPT-style pretraining)."""
    stream = [t for x in texts for t in tokenizer(x)["input_ids"] + [tokenizer.eos_token_id]]
    n = len(stream) // block
    return torch.tensor(stream[: n * block]).view(n, block)


def train_lm(texts: list[str], tokenizer, cfg: LMConfig, progress: bool = True, block: int = 256,
             device: str | torch.device = "cpu"):
    """Causal language modelling on rendered chats, packed into blocks of `block` tokens;
    returns (LlamaForCausalLM on the CPU, metrics)."""
    lm = new_lm(cfg, tokenizer).to(device).train()
    blocks = pack(tokenizer, texts, block).to(device)

    def loss(g: torch.Generator) -> torch.Tensor:
        batch = blocks[torch.randint(len(blocks), (cfg.batch_size,), generator=g).to(device)]
        return lm(input_ids=batch, labels=batch).loss

    run = fit(lm, loss, cfg.steps, cfg.lr, (0.9, 0.95), cfg.seed, "tiny-lm", progress)
    return lm.cpu().eval(), {**run, "config": asdict(cfg), "blocks": len(blocks), "block": block}


def chat_sft(lm, tokenizer, records: list[Record], cfg: LMConfig, progress: bool = True,
             device: str | torch.device = "cpu"):
    """Supervised fine-tuning on chats, the step from LLaMA to Vicuna: each chat is one row (never packed or
    cut), rendered in `vicuna_v1`, and the loss falls on the assistant's answers alone (`Template.tokenize`'s
    labels). Pretraining spends most of its loss on the scenes the user tells, which are random; this spends
    all of it on answering them. `cfg.sft_steps` batches of `cfg.sft_batch_size` chats drawn at random.

    At our high learning rate the fine-tuned model forgets the rest of its language (the captions LLaVA's stage
    1 asks of the frozen LM): so the result is `cfg.sft_weight` * fine-tuned + (1 - `cfg.sft_weight`) *
    pretrained weights, as WiSE-FT (Wortsman et al., 2022) ensembles robust pretrained and fine-tuned weights.
    Returns (the model on the CPU, metrics)."""
    pretrained = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    template = get_template("vicuna_v1")
    enc = [template.tokenize(r.messages, tokenizer, sample_id=r.id) for r in records]
    lm = lm.to(device).train()

    def loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(enc), (cfg.sft_batch_size,), generator=g).tolist()
        return chat_loss(lm, [enc[i] for i in idx], tokenizer.pad_token_id, device)

    run = fit(lm, loss, cfg.sft_steps, cfg.sft_lr, (0.9, 0.95), cfg.seed, "tiny-lm chat sft", progress)
    a, tuned = cfg.sft_weight, lm.state_dict()
    lm.load_state_dict({k: (1 - a) * pretrained[k] + a * tuned[k] for k in tuned})
    return lm.cpu().eval(), run


def chat_loss(lm, rows: list[dict], pad_id: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The causal-LM loss of tokenized chats (`Template.tokenize` outputs), right-padded into one batch (B, T):
    the mean over their labelled tokens."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id)
    labels = torch.full((len(rows), T), IGNORE_INDEX)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"])
    ids, labels = ids.to(device), labels.to(device)
    return lm(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=labels).loss


@torch.no_grad()
def perplexity(lm, tokenizer, texts: list[str], context: int = 512, batch: int = 32) -> float:
    """exp(mean token negative log-likelihood) over `texts`, every token counted once."""
    total, count = 0.0, 0
    for i in range(0, len(texts), batch):
        b = lm_batch(tokenizer, texts[i:i + batch], context)
        logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        targets = b["labels"][:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    return math.exp(total / count)
