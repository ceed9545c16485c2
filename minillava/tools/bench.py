"""Benchmarks: minillava side by side with transformers' `LlavaForConditionalGeneration`.

`minillava bench [--device cpu|cuda] [--config tiny|small|base] [--json]` builds one randomly
initialised LLaVA, exports it with `export_hf` and loads the export with transformers, so both sides hold the
same weights; then, in one process, it times each side on the same batches, alternating between them:

- `train_stage1_epoch`: a second stage-1 epoch over the same image files and captions. minillava as `train`
  runs it (captions tokenized once, frozen features from the `FeatureCache`, logits only where supervised);
  transformers as its users run it (`LlavaProcessor` from the exported folder decodes, preprocesses and
  tokenizes every batch, the model encodes every image and computes every logit).
- `train_stage1_step`, `train_stage2_step`: one optimizer step on identical ready tensors (pixels, ids, labels),
  projector-only (stage 1) or projector + language model (stage 2).
- `decode`: greedy generation of the same number of new tokens for the same prompts, batch 1 and batch 8.
- `chat_ttft_turn5`: time to first token at the fifth turn of a chat about one image, `ChatSession` (KV cache
  and image features kept between turns) versus transformers' `generate` on the whole conversation re-sent.

Ratios are minillava / transformers for times (below 1: minillava is faster) and for throughputs (above 1:
minillava is faster); each timed repetition gives one ratio, and min / median / max are reported.
`--markdown FILE` prints the tables of a saved `--json` result (the book's performance page pastes them).

`--only chat_ttft` runs the older benchmark instead: `ChatSession` against minillava re-prefilling the whole
conversation at every turn, as the reference LLaVA CLI does. Timings depend on the machine, so tests only
check that the benchmarks run and what they report, never how fast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

from ..chat import ChatSession
from ..utils import device_name, write_json
from ..vision import noise_image
from . import bench_trl
from .measure import interleaved, peak_memory, phase_result, spread, sync

QUESTIONS = ["What color is the circle?", "Where is it?", "How many shapes are there?", "Is there a star?",
             "What is at the top left?", "Describe the image."]


def chat_ttft(model, processor, image, turns: int = 5, repeats: int = 3, max_new_tokens: int = 16) -> dict:
    """Time to first token (s) at turn 1 and turn `turns` of a chat about `image` (attached at turn 1).

    Each repeat plays one chat with a `ChatSession`; before each turn, the re-prefill baseline answers the same
    prompt from scratch (tokenize, preprocess and encode every image, prefill everything, first token).
    Returns the best (least) time of `repeats`, the usual summary of timings on a busy machine:
    session_turn_1_s, session_turn_N_s, reprefill_turn_1_s, reprefill_turn_N_s, ratio_turn_N (session /
    re-prefill), and the prompt and prefilled token counts at turn N.
    """
    if turns < 2:
        raise ValueError(f"chat_ttft: turns must be at least 2, got {turns}")
    ChatSession(model, processor, template=None, max_new_tokens=1).ask(QUESTIONS[0], [image])  # warm-up
    times: dict[str, list[float]] = {"session_1": [], "session_n": [], "reprefill_1": [], "reprefill_n": []}
    for _ in range(repeats):
        chat = ChatSession(model, processor, template=None, max_new_tokens=max_new_tokens)
        for turn in range(1, turns + 1):
            question, images = QUESTIONS[(turn - 1) % len(QUESTIONS)], [image] if turn == 1 else []
            if turn in (1, turns):
                old = [im for m in chat.history if m["role"] == "user" for im in m["images"]]
                ask = {"role": "user", "content": "<image>\n" * len(images) + question}
                times[f"reprefill_{1 if turn == 1 else 'n'}"].append(
                    _reprefill_ttft(model, chat.processor, chat.messages + [ask], old + images))
            chat.ask(question, images)
            if turn in (1, turns):
                times[f"session_{1 if turn == 1 else 'n'}"].append(chat.stats["ttft_s"])
    best = {k: min(v) for k, v in times.items()}
    n = turns
    return {"turns": turns, "repeats": repeats, "device": str(model.device),
            f"prompt_tokens_turn_{n}": chat.stats["prompt_tokens"],
            f"prefilled_tokens_turn_{n}": chat.stats["prefilled_tokens"],
            "session_turn_1_s": best["session_1"], f"session_turn_{n}_s": best["session_n"],
            "reprefill_turn_1_s": best["reprefill_1"], f"reprefill_turn_{n}_s": best["reprefill_n"],
            f"ratio_turn_{n}": best["session_n"] / best["reprefill_n"]}


def _reprefill_ttft(model, processor, messages: list[dict], images: list) -> float:
    """Seconds to the first token of a fresh generation over the whole conversation (the reference's way)."""
    start = time.perf_counter()
    batch = processor.encode(messages, images, add_generation_prompt=True)
    int(next(model.stream(batch["input_ids"][None], images=batch["images"], max_new_tokens=1))[0])
    return time.perf_counter() - start


# ---- what the chat_ttft benchmark runs on --------------------------------------------------------------------
def random_tiny_llava(seed: int = 0):
    """A randomly initialised LlavaModel with the zoo's tiny-llava shapes, and its Processor."""
    from ..model import LlavaModel
    from ..pretrain import ClipConfig, LMConfig, new_clip, new_lm, train_tokenizer
    from ..processor import Processor
    from ..templates import get_template
    from ..vision import ImageProcessor, VisionTower

    texts = [get_template("vicuna_v1").system, *QUESTIONS, "The circle is red. There are two shapes."]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    clip, lm = ClipConfig(seed=seed), LMConfig(seed=seed)
    tower = VisionTower(new_clip(clip, tokenizer))
    model = LlavaModel(tower, "mlp2x_gelu", new_lm(lm, tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    processor = Processor(tokenizer, ImageProcessor(image_size=clip.image_size), model.num_image_tokens,
                          "vicuna_v1", max_length=lm.context)
    return model.eval(), processor


def bench_model():
    """(model, processor, description): the zoo's tiny-llava if its weights are there, else a random twin."""
    from .. import checkpoints

    try:
        model, processor = checkpoints.load("tiny-llava")
        return model, processor, "zoo tiny-llava"
    except FileNotFoundError:
        model, processor = random_tiny_llava()
        return model, processor, "randomly initialised tiny model (zoo tiny-llava not found)"


def _run_chat_ttft(args) -> dict:
    model, processor, what = bench_model()
    return {"model": what, **chat_ttft(model, processor, noise_image(), turns=args.turns, repeats=args.repeats)}


# ==== minillava versus transformers ==========================================================================
@dataclass(frozen=True)
class BenchConfig:
    """The model shapes and workload of one comparison. Vision and LM shapes as `pretrain.ClipConfig` /
    `LMConfig` name them; the LM vocabulary is the tokenizer's unless `vocab` asks for more rows."""

    name: str
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    lm_width: int = 256
    lm_layers: int = 4
    lm_heads: int = 8
    lm_kv_heads: int = 4
    lm_ffn: int = 768
    context: int = 512
    vocab: int | None = None  # None: the tokenizer's (about 700 tokens on ShapesWorld's text)
    tie: bool = False  # tie the LM head to the input embeddings (SmolLM2 does)
    batch: int = 16  # training samples per step
    seq: int = 160  # tokens per training sample in the step benchmarks (image tokens included)
    epoch_images: int = 128  # images (and captions) in the stage-1 epoch
    decode_tokens: int = 32  # new tokens per prompt in the decoding benchmark
    chat_tokens: int = 16  # the longest answer at each chat turn
    trl_steps: int = 8  # optimizer steps per run in the TRL comparison (the first is a warm-up)
    trl_micro: int = 8  # its micro-batch (batch / micro steps accumulate)

    def describe(self) -> dict:
        return {"vision": f"CLIP ViT {self.image_size} px / patch {self.patch_size} / width {self.vision_width} "
                          f"/ {self.vision_layers} layers",
                "lm": f"Llama width {self.lm_width} / {self.lm_layers} layers / {self.lm_heads} heads "
                      f"({self.lm_kv_heads} kv) / ffn {self.lm_ffn}" + (" / tied head" if self.tie else ""),
                "weights": "random (seed 0), the same on both sides", **asdict(self)}


CONFIGS = {
    # The zoo's tiny-llava shapes (ClipConfig() + LMConfig() of pretrain.py), a 1024-row vocabulary;
    # batches of 16 x 160 tokens (64 image + 96 text), as the project's CPU speed notes measure.
    "tiny": BenchConfig("tiny", vocab=1024),
    # In between: 144 image tokens, a 512-wide 8-layer LM with an 8k vocabulary.
    "small": BenchConfig("small", image_size=96, patch_size=8, vision_width=384, vision_layers=6, vision_heads=8,
                         lm_width=512, lm_layers=8, lm_heads=8, lm_kv_heads=4, lm_ffn=1536, context=1024,
                         vocab=8192, seq=256),
    # CLIP ViT-B/16 at 224 px (86 M) + a SmolLM2-135M-shaped Llama: the GPU reference figures' shapes.
    "base": BenchConfig("base", image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                        vision_heads=12, lm_width=576, lm_layers=30, lm_heads=9, lm_kv_heads=3, lm_ffn=1536,
                        context=2048, vocab=49152, tie=True, batch=32, seq=512, epoch_images=512,
                        decode_tokens=64, chat_tokens=32),
}

# Which figures the benchmark reports, how to read them, and the targets set for the CPU `tiny` run.
PHASES = ("train_stage1_epoch", "train_stage1_step", "train_stage2_step", "train_stage2_trl", "decode",
          "chat_ttft_turn5")
TARGETS = {"train_stage1_epoch": ("<=", 0.5), "train_stage1_step": ("<=", 0.8), "train_stage2_step": ("<=", 0.8),
           "train_stage2_trl": (">=", 1.2),
           "decode_batch_1": (">=", 1.0), "decode_batch_8": (">=", 1.0), "chat_ttft_turn5": ("<=", 0.3)}
GPU_MFU_TARGET = 0.30  # minillava's stage-2 model FLOP utilisation, `base` config on a GPU
STAGE2_PEAK_RSS_TARGET_MB = 1500  # tiny stage-2 training on a CPU must stay under 1.5 GB resident
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "GH200": 989, "A100": 312, "L40S": 362,
                    "L4": 121}  # dense bf16 peaks from the vendors' data sheets (no sparsity)
FLOPS_FORMULA = ("model FLOPs per training step = k * N(LM, non-embedding) * tokens + k * N(head) * text tokens "
                 "+ 2 * N(vision) * image tokens, k = 6 when the LM trains (stage 2) and 4 when it is frozen "
                 "(stage 1: forward + backward to the inputs only); the projector (< 1%) is left out, as in the "
                 "reference figures. The same count for both sides: MFU is throughput x this / device peak.")
MEMORY_CPU = ("peak resident memory (VmHWM) of the whole process during one untimed run of each side, both "
              "models loaded; growth = that peak minus the resident memory just before the run (peak reset "
              "through /proc/self/clear_refs, freed heap returned with malloc_trim first)")
MEMORY_CUDA = "torch.cuda.max_memory_allocated during one untimed run of each side; growth over memory_allocated"


# ---- the models, the data and the batches ----------------------------------------------------------------------
@dataclass
class Pair:
    """Both sides of the comparison, holding the same weights, and what they run on."""

    cfg: BenchConfig
    device: torch.device
    model: object  # minillava LlavaModel
    processor: object  # minillava Processor (vicuna_v1 template, "square" images)
    hf: object  # transformers LlavaForConditionalGeneration loaded from the export
    hf_processor: object  # transformers LlavaProcessor loaded from the export
    captions: list  # stage-1 caption records (LLaVA JSON on disk, PNG files)
    instruct: list  # stage-2 single-image instruction records
    workdir: Path
    hf_train: object = None  # what trains on the transformers side (torch.compile'd on CUDA)
    ml_train: object = None  # what takes the step benchmarks' steps on minillava's side (likewise)
    notes: list = field(default_factory=list)
    _init: dict = field(default_factory=dict)

    def restore(self) -> None:
        """Put both sides back to the shared initial weights (each phase starts from them)."""
        with torch.no_grad():
            self.model.load_state_dict(self._init["ml"])
            self.hf.load_state_dict(self._init["hf"])

    def counts(self) -> dict:
        """Parameter counts the FLOP formula uses."""
        lm = self.model.language_model
        head = lm.get_output_embeddings().weight.numel()
        embed = lm.get_input_embeddings().weight.numel()
        lm_total = sum(p.numel() for p in lm.parameters())  # a tied head is counted once here
        return {"vision": sum(p.numel() for p in self.model.vision_tower.parameters()),
                "projector": sum(p.numel() for p in self.model.projector.parameters()),
                "lm_non_embedding": lm_total - embed - (0 if self.cfg.tie else head), "head": head}


def _lm(cfg: BenchConfig, tokenizer, seed: int):
    """A random Llama of `pretrain.new_lm`'s construction, with `cfg.vocab` rows and an optionally tied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=max(cfg.vocab or 0, len(tokenizer)), hidden_size=cfg.lm_width, intermediate_size=cfg.lm_ffn,
        num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads, num_key_value_heads=cfg.lm_kv_heads,
        max_position_embeddings=cfg.context, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=cfg.tie))


def build_pair(cfg: BenchConfig, device: torch.device, workdir: Path, compile_hf: bool, seed: int = 0,
               compile_ml: bool = False) -> Pair:
    """ShapesWorld data in `workdir`, a random minillava model, its transformers export loaded back."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..data.records import load_records
    from ..data.shapesworld import build
    from ..hf import export_hf
    from ..model import LlavaModel
    from ..pretrain import ClipConfig, chat_texts, new_clip, train_tokenizer
    from ..processor import Processor
    from ..vision import ImageProcessor, VisionTower

    n = max(cfg.epoch_images, 2 * cfg.batch)
    build(workdir / "shapes", n_train=n, n_val=0, n_test=0, n_comp=0, n_text=0, n_text_val=0, seed=seed,
          image_size=cfg.image_size, kinds=("conversation", "reasoning", "detail"))
    captions = load_records(workdir / "shapes" / "captions_train.json")
    instruct = load_records(workdir / "shapes" / "instruct_train.json")
    tokenizer = train_tokenizer(chat_texts(captions, "plain") + chat_texts(instruct) + QUESTIONS,
                                vocab_size=1024, max_length=cfg.context)
    clip = new_clip(ClipConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                               layers=cfg.vision_layers, heads=cfg.vision_heads, text_width=cfg.vision_width,
                               seed=seed), tokenizer)  # (the text tower is never used; its width must divide)
    lm = _lm(cfg, tokenizer, seed)
    torch.manual_seed(seed)  # the projector
    model = LlavaModel(VisionTower(clip), "mlp2x_gelu", lm, tokenizer.convert_tokens_to_ids("<image>"))
    del clip
    processor = Processor(tokenizer, ImageProcessor(image_size=cfg.image_size, aspect="square"),
                          model.num_image_tokens, "vicuna_v1", max_length=cfg.context)
    export_hf(model, processor, workdir / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(workdir / "hf", dtype=torch.float32,
                                                       attn_implementation="sdpa")
    hf_processor = AutoProcessor.from_pretrained(workdir / "hf")
    model.to(device)
    hf.to(device)
    pair = Pair(cfg, device, model, processor, hf, hf_processor, captions, instruct, workdir)
    pair._init = {"ml": {k: v.detach().clone() for k, v in model.state_dict().items()},
                  "hf": {k: v.detach().clone() for k, v in hf.state_dict().items()}}
    pair.hf_train = torch.compile(hf) if compile_hf else hf  # (default mode; see _guard_compiled)
    pair.ml_train = torch.compile(model) if compile_ml else model  # (the step benchmarks: fixed shapes)
    return pair


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay fp32, as in `train`); nothing on CPU (fp32 throughout)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def fixed_length_batch(pair: Pair, stage: int) -> dict:
    """Identical ready tensors for both sides: `cfg.batch` samples of exactly `cfg.seq` tokens (no padding).

    Stage 1: `plain` template, "<image>" + captions (several joined until long enough), captions supervised.
    Stage 2: `vicuna_v1` conversations (an image record's turns, then turns of the next records, text only),
    answers supervised. Cut to `cfg.seq` tokens. Returns input_ids, labels, attention_mask (B, T), images.
    """
    from ..templates import get_template

    cfg, tok, P = pair.cfg, pair.processor.tokenizer, pair.model.num_image_tokens
    records = pair.captions if stage == 1 else pair.instruct
    template = get_template("plain" if stage == 1 else "vicuna_v1")
    ids, labels = [], []
    for i in range(cfg.batch):
        j, answers, messages = i, [], []
        while True:
            r = records[j % len(records)]
            if stage == 1:
                answers.append(r.messages[1]["content"])
                messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": " ".join(answers)}]
            else:
                turns = [dict(m) for m in r.messages]
                if j > i:
                    turns[0]["content"] = turns[0]["content"].replace("<image>", "").strip()
                messages += turns
            out = template.tokenize(messages, tok, num_image_tokens=P)
            if len(out["input_ids"]) >= cfg.seq:
                break
            j += 1
        ids.append(out["input_ids"][:cfg.seq])
        labels.append(out["labels"][:cfg.seq])
    images = pair.processor.image_processor([records[i % len(records)].images[0] for i in range(cfg.batch)])
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
             "attention_mask": torch.ones(cfg.batch, cfg.seq, dtype=torch.long), "images": images}
    return {k: v.to(pair.device) for k, v in batch.items()}


def set_trainable(pair: Pair, stage: int) -> tuple[list, list]:
    """Stage 1: projector only; stage 2: projector + LM (head included). Vision frozen. Returns both sides'
    trainable parameters."""
    ml, hf = pair.model, pair.hf
    ml.requires_grad_(False)
    hf.requires_grad_(False)
    ml.projector.requires_grad_(True)
    hf.model.multi_modal_projector.requires_grad_(True)
    if stage == 2:
        ml.language_model.requires_grad_(True)
        hf.model.language_model.requires_grad_(True)
        hf.lm_head.requires_grad_(True)
    ml_params = [p for p in ml.parameters() if p.requires_grad]
    hf_params = [p for p in hf.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ml_params) == sum(p.numel() for p in hf_params), "trainable parts differ"
    return ml_params, hf_params


def _optimizer_step(loss: torch.Tensor, params: list, opt) -> None:
    """What `train` does after the forward: backward, clip the gradient norm to 1, AdamW step, zero grads."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _guard_compiled(pair: Pair, fn, side: str = "hf") -> None:
    """Run one extra untimed step of `side` ("hf" or "ml"); if its compiled model fails there, note it and go
    on eagerly (torch.compile reports most failures at the first call, not when it wraps the model)."""
    eager = pair.hf if side == "hf" else pair.model
    if getattr(pair, f"{side}_train") is eager:
        return
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- any compile failure: report it, measure the eager model
        name = "transformers" if side == "hf" else "minillava"
        pair.notes.append(f"torch.compile failed, {name} ran eagerly: {type(e).__name__}: {str(e)[:300]}")
        setattr(pair, f"{side}_train", eager)
        fn()


def _lr(stage: int) -> float:
    from ..training import RECIPES

    return RECIPES[stage].lr


def model_flops(pair: Pair, stage: int, tokens: int, image_tokens: int) -> float:
    """Model FLOPs of one training step over `tokens` tokens of which `image_tokens` are image tokens."""
    n, k = pair.counts(), (6 if stage == 2 else 4)
    return k * n["lm_non_embedding"] * tokens + k * n["head"] * (tokens - image_tokens) + 2 * n["vision"] * image_tokens


# ---- the phases ---------------------------------------------------------------------------------------------
def phase_train_step(pair: Pair, stage: int, warmup: int, repeats: int) -> dict:
    """One optimizer step on identical ready tensors; minillava as `train` calls it (`return_logits=False`)."""
    pair.restore()
    pair.model.train()
    pair.hf.train()
    b = fixed_length_batch(pair, stage)
    ml_params, hf_params = set_trainable(pair, stage)
    lr = _lr(stage)
    ml_opt = torch.optim.AdamW(ml_params, lr=lr, weight_decay=0.0)
    hf_opt = torch.optim.AdamW(hf_params, lr=lr, weight_decay=0.0)
    cast = _autocast(pair.device)

    def ml_step():
        with cast:
            loss = pair.ml_train(input_ids=b["input_ids"], attention_mask=b["attention_mask"], images=b["images"],
                              labels=b["labels"], return_logits=False).loss
        _optimizer_step(loss, ml_params, ml_opt)

    def hf_step():
        with cast:
            loss = pair.hf_train(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 pixel_values=b["images"], labels=b["labels"]).loss
        _optimizer_step(loss, hf_params, hf_opt)

    _guard_compiled(pair, hf_step)
    _guard_compiled(pair, ml_step, "ml")
    ml_t, hf_t = interleaved(ml_step, hf_step, pair.device, warmup, repeats)
    ml_mem, hf_mem = peak_memory(ml_step, pair.device), peak_memory(hf_step, pair.device)
    B, T = b["input_ids"].shape
    image_tokens = int((b["input_ids"] == pair.model.image_token_id).sum())
    flops = model_flops(pair, stage, B * T, image_tokens)
    what = (f"one AdamW step, batch {B} x {T} tokens ({image_tokens // B} image tokens each), "
            + ("projector only" if stage == 1 else "projector + language model"))
    result = phase_result(ml_t, hf_t, ml_mem, hf_mem, {"samples": B, "tokens": B * T, "model_tflop": flops / 1e12},
                    throughput=False, what=what,
                    extra={"supervised_tokens": int((b["labels"][:, 1:] != -100).sum()), "model_flops": flops})
    return result


def phase_stage1_epoch(pair: Pair, warmup: int, repeats: int) -> dict:
    """A second stage-1 epoch over image files + captions: minillava with its feature cache, transformers with
    its processor on every batch. Same batches (one fixed shuffle), same optimizer settings."""
    from ..templates import IGNORE_INDEX, get_template
    from ..training import FeatureCache, collate, encode_all

    pair.restore()
    pair.model.train()
    pair.hf.train()
    cfg, device = pair.cfg, pair.device
    records = pair.captions[:cfg.epoch_images]
    plain = pair.processor.with_template("plain")
    examples = encode_all(records, plain, progress=False)  # once, before training (as `train` does)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[k * cfg.batch:(k + 1) * cfg.batch] for k in range(len(order) // cfg.batch)]
    if not batches:
        raise ValueError(f"stage-1 epoch: {len(records)} images is fewer than one batch of {cfg.batch}")
    texts = [get_template("plain").render(r.messages) for r in records]  # "<image>" + caption + "\n"
    image_id = pair.model.image_token_id
    ml_params, hf_params = set_trainable(pair, 1)
    ml_opt = torch.optim.AdamW(ml_params, lr=_lr(1), weight_decay=0.0)
    hf_opt = torch.optim.AdamW(hf_params, lr=_lr(1), weight_decay=0.0)
    cache = FeatureCache(pair.model.vision_tower, plain.image_processor)
    cast = _autocast(device)

    def ml_epoch():
        for idx in batches:
            inputs = collate([examples[i] for i in idx], plain, cache, device)
            with cast:
                loss = pair.model(**inputs, return_logits=False).loss
            _optimizer_step(loss, ml_params, ml_opt)

    def hf_inputs(idx):
        images = [Image.open(records[i].images[0]).convert("RGB") for i in idx]
        enc = pair.hf_processor(text=[texts[i] for i in idx], images=images, padding=True, return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[(labels == image_id) | (enc["attention_mask"] == 0)] = IGNORE_INDEX
        labels[:, 0] = IGNORE_INDEX  # BOS
        return {**{k: v.to(device) for k, v in enc.items()}, "labels": labels.to(device)}

    def hf_epoch():
        for idx in batches:
            inputs = hf_inputs(idx)
            with cast:
                loss = pair.hf_train(**inputs).loss
            _optimizer_step(loss, hf_params, hf_opt)

    # both sides see the same tokens and the same pixels
    first = collate([examples[i] for i in batches[0]], plain, None, device)
    theirs = hf_inputs(batches[0])
    same = bool(torch.equal(first["input_ids"], theirs["input_ids"]) and torch.equal(first["labels"], theirs["labels"])
                and torch.allclose(first["images"], theirs["pixel_values"], atol=1e-5))
    _guard_compiled(pair, hf_epoch)
    ml_t, hf_t = interleaved(ml_epoch, hf_epoch, device, warmup, repeats)  # the warm-up fills the cache
    ml_mem, hf_mem = peak_memory(ml_epoch, device), peak_memory(hf_epoch, device)
    n = len(batches) * cfg.batch
    tokens = sum(len(examples[i]["input_ids"]) for idx in batches for i in idx)
    result = phase_result(ml_t, hf_t, ml_mem, hf_mem, {"samples": n, "tokens": tokens}, throughput=False,
                    what=f"a second epoch of {len(batches)} steps x {cfg.batch} image-caption pairs (PNG files), "
                         "projector only",
                    extra={"same_batches": same, "feature_cache": {"hits": cache.hits, "misses": cache.misses}})
    return result


def _decode_prompts(pair: Pair, batch: int) -> dict:
    """`batch` one-image prompts (vicuna_v1, generation prompt, left-padded): input_ids, attention_mask, images."""
    conversations = [[{"role": "user", "content": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]}] for i in range(batch)]
    images = [[pair.instruct[i].images[0]] for i in range(batch)]
    b = pair.processor(conversations, images, add_generation_prompt=True)
    return {k: v.to(pair.device) for k, v in b.items() if k != "labels"}


def phase_decode(pair: Pair, batch: int, warmup: int, repeats: int, compile_hf: bool, compile_ml: bool = False) -> dict:
    """Greedy decoding of exactly `cfg.decode_tokens` new tokens per prompt, prefill included, no_grad both;
    each side compiled (a static cache and a compiled one-token step) or not as asked."""
    pair.model.eval()
    pair.hf.eval()
    n = pair.cfg.decode_tokens
    b = _decode_prompts(pair, batch)
    tok = pair.processor.tokenizer
    hf_kwargs = {"do_sample": False, "min_new_tokens": n, "max_new_tokens": n, "pad_token_id": tok.pad_token_id,
                 "eos_token_id": tok.eos_token_id}
    if compile_hf:  # transformers' fast path: a static cache, which makes `generate` compile the decoding step
        from transformers import CompileConfig

        hf_kwargs["cache_implementation"] = "static"
        if pair.device.type != "cuda":  # (transformers compiles automatically only on accelerators)
            config = CompileConfig()
            config._compile_all_devices = True
            hf_kwargs["compile_config"] = config
    out, compiled = {}, {"minillava": compile_ml, "transformers": compile_hf}

    def ml_gen():
        with torch.no_grad():
            out["ml"] = pair.model.generate(b["input_ids"], b["attention_mask"], images=b["images"],
                                            max_new_tokens=n, compile=compiled["minillava"])

    def hf_gen():
        with torch.no_grad():
            out["hf"] = pair.hf.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                         pixel_values=b["images"], **hf_kwargs)

    for side, run in (("minillava", ml_gen), ("transformers", hf_gen)):
        if compiled[side]:  # a compile failure is reported, then that side is measured eagerly
            try:
                run()
            except Exception as e:  # noqa: BLE001
                pair.notes.append(f"{side}: compiled decoding (static cache) failed, it decoded eagerly: "
                                  f"{type(e).__name__}: {str(e)[:300]}")
                compiled[side] = False
                if side == "transformers":  # its default generate: a growing cache, nothing compiled
                    hf_kwargs = {k: v for k, v in hf_kwargs.items()
                                 if k not in ("cache_implementation", "compile_config")}
    ml_t, hf_t = interleaved(ml_gen, hf_gen, pair.device, warmup, repeats)
    ml_mem, hf_mem = peak_memory(ml_gen, pair.device), peak_memory(hf_gen, pair.device)
    T = b["input_ids"].shape[1]
    same = out["ml"].shape == out["hf"][:, T:].shape and bool(torch.equal(out["ml"], out["hf"][:, T:]))
    return phase_result(ml_t, hf_t, ml_mem, hf_mem, {"tokens": batch * n}, throughput=True,
                  what=f"greedy decoding, batch {batch}, prompts of {T} tokens ({pair.model.num_image_tokens} image "
                       f"tokens), {n} new tokens each; throughput = new tokens / wall time of the whole call",
                  extra={"same_tokens": same, "compiled": compiled})


def phase_chat(pair: Pair, warmup: int, repeats: int, turns: int = 5) -> dict:
    """Time to first token at turn `turns` of a chat about one image (attached at turn 1): `ChatSession` versus
    transformers' `generate` on the whole conversation re-sent, prompt built with the exported chat template
    and `LlavaProcessor`, as the llava-hf examples do. Both answer the same conversation (minillava's)."""
    pair.model.eval()
    pair.hf.eval()
    image = Image.open(pair.instruct[0].images[0]).convert("RGB")
    hp, tok = pair.hf_processor, pair.hf_processor.tokenizer
    info = {}

    def hf_ttft(messages, images) -> float:
        start = time.perf_counter()
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = hp(text=prompt, images=images or None, return_tensors="pt").to(pair.device)
        with torch.no_grad():
            out = pair.hf.generate(**enc, do_sample=False, max_new_tokens=1, pad_token_id=tok.pad_token_id)
        int(out[0, -1])
        sync(pair.device)
        info["hf_prompt_tokens"] = enc["input_ids"].shape[1]
        return time.perf_counter() - start

    ml_t, hf_t = [], []
    for rep in range(warmup + repeats):
        chat = ChatSession(pair.model, pair.processor, template=None, max_new_tokens=pair.cfg.chat_tokens)
        for turn in range(1, turns + 1):
            question, images = QUESTIONS[(turn - 1) % len(QUESTIONS)], [image] if turn == 1 else []
            if turn < turns:
                chat.ask(question, images)
                continue
            messages = chat.messages + [{"role": "user", "content": question}]
            all_images = [im for m in chat.history if m["role"] == "user" for im in m["images"]]
            sync(pair.device)
            if rep % 2:  # alternate which side goes first
                t_hf = hf_ttft(messages, all_images)
                chat.ask(question)
            else:
                chat.ask(question)
                t_hf = hf_ttft(messages, all_images)
            if rep >= warmup:
                ml_t.append(chat.stats["ttft_s"])
                hf_t.append(t_hf)
    stats = dict(chat.stats)
    replay = _replay(pair, image, turns - 1)  # a chat at turn N - 1: measure turn N alone on each side
    last = QUESTIONS[(turns - 1) % len(QUESTIONS)]
    hf_mem = peak_memory(lambda: hf_ttft(replay.messages + [{"role": "user", "content": last}], [image]),
                         pair.device)
    ml_mem = peak_memory(lambda: replay.ask(last), pair.device)
    return phase_result(ml_t, hf_t, ml_mem, hf_mem, None, throughput=False,
                  what=f"time to first token at turn {turns} of a chat about one image, answers of up to "
                       f"{pair.cfg.chat_tokens} tokens; minillava prefills {stats['prefilled_tokens']} new tokens, "
                       f"transformers all {info['hf_prompt_tokens']}",
                  extra={"prompt_tokens": stats["prompt_tokens"], "prefilled_tokens": stats["prefilled_tokens"],
                         "same_prompt_tokens": stats["prompt_tokens"] == info["hf_prompt_tokens"],
                         "memory_note": "memory: the turn-N question alone on each side (minillava's whole "
                                        "answer decoded, transformers' first token)"})


def _replay(pair: Pair, image, turns: int) -> ChatSession:
    """A `ChatSession` that has played `turns` turns about `image`."""
    chat = ChatSession(pair.model, pair.processor, template=None, max_new_tokens=pair.cfg.chat_tokens)
    for turn in range(1, turns + 1):
        chat.ask(QUESTIONS[(turn - 1) % len(QUESTIONS)], [image] if turn == 1 else [])
    return chat


def parity(pair: Pair) -> float:
    """Largest |logit difference| between the two sides on a stage-2 batch: proof they hold the same model."""
    pair.model.eval()
    pair.hf.eval()
    b = fixed_length_batch(pair, 2)
    with torch.no_grad(), _autocast(pair.device):
        ours = pair.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], images=b["images"]).logits
        theirs = pair.hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         pixel_values=b["images"]).logits
    return float((ours.float() - theirs.float()).abs().max())


# ---- the whole comparison ------------------------------------------------------------------------------------
def _load() -> float | None:
    """The 1-minute load average (other processes competing for the CPU make timings noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 peak (TFLOP/s): `override`, else looked up by GPU name (None on CPUs)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def compare(cfg: BenchConfig, device: torch.device, warmup: int = 2, repeats: int = 5, phases=PHASES,
            compile_hf: bool | None = None, peak: float | None = None, command: str | None = None,
            compile_ml: bool | None = None, save: str | Path | None = None, packing: bool = False) -> dict:
    """Run the comparison; returns the JSON-able result (see the module docstring and `markdown`). With `save`,
    the result so far is also written there (atomically) after every phase, so a run cut short keeps what it
    measured; `result["complete"]` says whether every phase asked for ran."""
    import transformers

    from .. import __version__

    if compile_hf is None:
        compile_hf = device.type == "cuda"
    if compile_ml is None:
        compile_ml = compile_hf
    peak = peak_tflops(device, peak)
    transformers.utils.logging.set_verbosity_error()
    result = {"benchmark": "minillava vs transformers LlavaForConditionalGeneration",
              "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device_name(device), "device_type": device.type, "threads": torch.get_num_threads(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "minillava": __version__},
              "config": cfg.describe(), "dtype": "bf16 autocast (fp32 weights)" if device.type == "cuda" else "float32",
              "attention": "sdpa", "transformers_compiled": compile_hf,
              "minillava_compiled": compile_ml,
              "repeats": {"warmup": warmup, "timed": repeats},
              "memory_method": MEMORY_CUDA if device.type == "cuda" else MEMORY_CPU,
              "flops_formula": FLOPS_FORMULA, "peak_bf16_tflops": peak, "load_average": {"start": _load()}}
    with tempfile.TemporaryDirectory(prefix="minillava-bench-") as tmp:
        pair = build_pair(cfg, device, Path(tmp), compile_hf, compile_ml=compile_ml)
        result["params"] = pair.counts()
        result["config"]["lm"] += f" / vocabulary {pair.model.language_model.get_output_embeddings().weight.shape[0]}"
        result["parity_max_abs_logit_diff"] = parity(pair)
        result["notes"] = pair.notes
        out = {}

        def record(complete: bool) -> None:  # the figures so far into `result`, and into `save`
            _summarise(result, out)
            result["load_average"]["end"], result["complete"] = _load(), complete
            if save:
                write_json(save, result)

        def done(name: str, phase: dict) -> None:
            out[name] = phase
            record(complete=False)

        if "train_stage1_epoch" in phases:
            done("train_stage1_epoch", phase_stage1_epoch(pair, warmup, repeats))
        for stage in (1, 2):
            if f"train_stage{stage}_step" in phases:
                done(f"train_stage{stage}_step", phase_train_step(pair, stage, warmup, repeats))
        if "train_stage2_trl" in phases:
            missing = bench_trl.available()
            if missing:
                pair.notes.append(f"{bench_trl.LABEL} not measured: {missing}")
            else:
                done(bench_trl.LABEL, bench_trl.phase_trl(pair, repeats, cfg.trl_steps, cfg.trl_micro, packing))
        pair.restore()
        pair.model.requires_grad_(False)
        pair.hf.requires_grad_(False)
        if device.type == "cuda":  # inference in bf16 weights on both sides
            pair.model.to(torch.bfloat16)
            pair.hf.to(torch.bfloat16)
        if "decode" in phases:
            for batch in (1, 8):
                done(f"decode_batch_{batch}", phase_decode(pair, batch, warmup, repeats, compile_hf, compile_ml))
        if "chat_ttft_turn5" in phases:
            done("chat_ttft_turn5", phase_chat(pair, warmup, repeats))
        record(complete=True)
    return result


def _summarise(result: dict, out: dict) -> None:
    """Fill `result` with the phases measured so far (`out`): MFU, targets, the headline ratios."""
    judged = result["config"]["name"] == "tiny" and result["device_type"] == "cpu"
    peak = result["peak_bf16_tflops"]
    result["targets_judged"] = judged
    for name, phase in out.items():
        for side in ("minillava", "transformers"):
            tf = phase[side].get("model_tflop_per_s")
            phase[side]["mfu"] = spread([v / peak for v in tf.values()]) if tf and peak else None
        if name in TARGETS:  # the targets were set for the tiny config on a CPU: judged there only
            op, bound = TARGETS[name]
            value = phase["ratio"]["median"]
            phase["target"] = f"{op} {bound}"
            phase["met"] = bool(value <= bound if op == "<=" else value >= bound) if judged else None
    if "train_stage2_step" in out:
        peak_mb = out["train_stage2_step"]["minillava"]["memory"]["peak_mb"]
        out["train_stage2_step"]["memory_target"] = f"minillava peak < {STAGE2_PEAK_RSS_TARGET_MB} MB"
        out["train_stage2_step"]["memory_met"] = (
            bool(peak_mb is not None and peak_mb < STAGE2_PEAK_RSS_TARGET_MB) if judged else None)
    result["phases"] = out
    decoded = [phase["compiled"]["minillava"] for phase in out.values() if "compiled" in phase]
    result["minillava_decode_compiled"] = all(decoded) if decoded else None  # only if every decode phase was
    ratio = {name: out[name]["ratio"] for name in out}
    for name in ("train_stage1_epoch", "train_stage1_step", "train_stage2_step"):
        if name in ratio:
            result[f"{name}_ratio"] = ratio[name]
    if "decode_batch_1" in ratio:
        result["decode_tokens_per_s_ratio"] = {f"batch_{b}": ratio[f"decode_batch_{b}"] for b in (1, 8)
                                               if f"decode_batch_{b}" in ratio}
    if "chat_ttft_turn5" in ratio:
        result["chat_ttft_turn5_ratio"] = ratio["chat_ttft_turn5"]


SAME_SETTING = ("device", "device_type", "threads", "versions", "config", "dtype", "attention", "transformers_compiled",
                "minillava_compiled", "repeats", "peak_bf16_tflops", "params")


def merge(results: list[dict]) -> dict:
    """One result from several runs of the same setting that each measured some phases (a long GPU benchmark run
    in parts, e.g. `--only decode` after a run cut short): the phases side by side, each run's command, date and
    phases under "runs". Refuses runs whose setting (device, versions, config, compilation, repetitions)
    differs, or that measured the same phase twice."""
    if not results:
        raise ValueError("merge: no results given")
    first, out, runs = results[0], {}, []
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "phases" not in r:
            raise ValueError(f"merge: result {i + 1} is not a saved `minillava bench --json` result")
        differ = [k for k in SAME_SETTING if r.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"merge: result {i + 1} was measured in another setting than result 1 "
                             f"(differs in {', '.join(differ)})")
        twice = sorted(set(r["phases"]) & set(out))
        if twice:
            raise ValueError(f"merge: result {i + 1} measures {', '.join(twice)} again")
        out.update(r["phases"])
        runs.append({"command": r["command"], "date": r["date"], "phases": list(r["phases"]),
                     "complete": r.get("complete")})
    merged = {k: v for k, v in first.items() if k not in ("phases", "complete")}
    merged.update(command="; ".join(r["command"] for r in runs), date=max(r["date"] for r in runs), runs=runs,
                  notes=[n for r in results for n in r.get("notes", [])],
                  load_average={"start": first["load_average"]["start"],
                                "end": results[-1]["load_average"].get("end")})
    figures = [key for key, _, _ in ROWS]
    _summarise(merged, {k: out[k] for k in figures if k in out})
    merged["complete"] = set(out) >= set(figures)
    return merged


# ---- the report ---------------------------------------------------------------------------------------------
ROWS = [("train_stage1_epoch", "stage-1 epoch (second epoch)", "s"), ("train_stage1_step", "stage-1 step", "s"),
        ("train_stage2_step", "stage-2 step", "s"), ("train_stage2_trl", "stage-2 training vs TRL", "samples/s"),
        ("decode_batch_1", "decode, batch 1", "tokens/s"),
        ("decode_batch_8", "decode, batch 8", "tokens/s"), ("chat_ttft_turn5", "chat TTFT at turn 5", "s")]


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) >= 0.01 else f"{x:.2g}"


def _cell(s: dict | None) -> str:
    """median [min-max]"""
    if not s:
        return "n/a"
    return f"{_num(s['median'])} [{_num(s['min'])}–{_num(s['max'])}]"


def _load_text(result: dict) -> str:
    load = result.get("load_average") or {}
    if load.get("start") is None or result["device_type"] != "cpu":
        return ""
    end = f" and {load['end']:.1f} at the end" if load.get("end") is not None else ""
    return f", load average {load['start']:.1f} at the start{end}"


def _ml_compiled_text(result: dict) -> str:
    if not result.get("minillava_compiled"):
        return ""
    return ", minillava compiled (" + ("step figures and decoding" if result.get("minillava_decode_compiled")
                                       else "step figures") + ")"


def _runs_text(result: dict) -> str:
    runs = result.get("runs") or []
    text = f" Measured in {len(runs)} runs of the same setting, merged with `--merge`." if len(runs) > 1 else ""
    missing = [label for key, label, _ in ROWS if key not in result["phases"]]
    if result.get("complete") is False and missing:
        text += f" Incomplete: {', '.join(missing)} not measured."
    return text


def markdown(result: dict) -> str:
    """The tables of a `compare` result as Markdown: the ratios and targets, then absolute figures and memory."""
    cfg, reps, phases = result["config"], result["repeats"], result["phases"]
    v = result["versions"]
    lines = [f"Measured {result['date'][:10]} on {result['device']}, {result['threads']} threads, "
             f"{result['dtype']}{_load_text(result)}; torch {v['torch']}, transformers {v['transformers']}"
             f"{', transformers compiled' if result['transformers_compiled'] else ''}"
             f"{_ml_compiled_text(result)}. "
             f"Config `{cfg['name']}`: "
             f"{cfg['vision']} + {cfg['lm']}. {reps['warmup']} warm-up + {reps['timed']} timed repetitions per "
             "figure, each side in turn; cells give the median [min–max]. Same weights on both sides (largest "
             f"logit difference {result['parity_max_abs_logit_diff']:.1g})." + _runs_text(result), "",
             "| figure | unit | minillava | transformers | ratio | target | met |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, label, unit in ROWS:
        if key not in phases:
            continue
        p = phases[key]
        label += ", minillava packed" if p.get("packing") else ""
        field_ = {"s": "time_s", "tokens/s": "tokens_per_s", "samples/s": "samples_per_s"}[unit]
        met = {True: "yes", False: "**no**"}.get(p.get("met"), "")
        target = p.get("target", "").replace("<=", "≤").replace(">=", "≥") if result.get("targets_judged") else ""
        lines.append(f"| {label} | {unit} | {_cell(p['minillava'][field_])} | {_cell(p['transformers'][field_])} "
                     f"| {_cell(p['ratio'])} | {target} | {met} |")
    if "train_stage2_step" in phases:
        p = phases["train_stage2_step"]
        met = {True: "yes", False: "**no**"}.get(p["memory_met"], "")
        target = f"< {STAGE2_PEAK_RSS_TARGET_MB}" if result.get("targets_judged") else ""
        lines.append(f"| stage-2 step, peak memory | MB | {_num(p['minillava']['memory']['peak_mb'])} | "
                     f"{_num(p['transformers']['memory']['peak_mb'])} | | {target} | {met} |")
    if "train_stage2_trl" in phases:  # (TRL's side: transformers' Llava trained by TRL's SFTTrainer)
        p = phases["train_stage2_trl"]
        ml_mb, trl_mb = p["minillava"]["memory"]["peak_mb"], p["transformers"]["memory"]["peak_mb"]
        ratio = _num(ml_mb / trl_mb) if ml_mb and trl_mb else ""
        lines.append(f"| stage-2 training vs TRL, peak memory | MB | {_num(ml_mb)} | {_num(trl_mb)} | {ratio} | | |")
    mfu = any(p[side].get("mfu") for p in phases.values() for side in ("minillava", "transformers"))
    lines += ["", "| figure | side | samples/s | tokens/s | model TFLOP/s |" + (" MFU |" if mfu else "")
              + " peak memory, MB | growth, MB |", "| --- " * (7 + mfu) + "|"]
    for key, label, _ in ROWS:
        if key not in phases:
            continue
        for side in ("minillava", "transformers"):
            s = phases[key][side]
            lines.append(f"| {label} | {side} | {_cell(s.get('samples_per_s'))} | {_cell(s.get('tokens_per_s'))} "
                         f"| {_cell(s.get('model_tflop_per_s'))} |" + (f" {_cell(s.get('mfu'))} |" if mfu else "")
                         + f" {_num(s['memory']['peak_mb'])} | {_num(s['memory']['growth_mb'])} |")
    gpu_mfu = (phases.get("train_stage2_step", {}).get("minillava", {}).get("mfu") or {}).get("median")
    if cfg["name"] == "base" and gpu_mfu is not None:
        lines += ["", f"Target on a GPU, `base` config: minillava's stage-2 MFU ≥ {GPU_MFU_TARGET:.0%}; measured "
                  f"{gpu_mfu:.1%} (median): {'met' if gpu_mfu >= GPU_MFU_TARGET else '**not met**'}. The CPU "
                  "targets of the ratios are judged on the `tiny` config on a CPU only."]
    if result.get("notes"):
        lines += ["", "Notes: " + "; ".join(result["notes"]) + "."]
    return "\n".join(lines)


# ---- the command line -----------------------------------------------------------------------------------------
def _run_compare(args) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = CONFIGS[args.config]
    overrides = {k: v for k, v in (("epoch_images", args.images), ("decode_tokens", args.new_tokens),
                                   ("chat_tokens", args.new_tokens), ("batch", args.batch)) if v}
    if overrides:
        cfg = BenchConfig(**{**asdict(cfg), **overrides})
    phases = [p for p in args.only if p in PHASES] or list(PHASES)
    compile_hf = {"auto": None, "yes": True, "no": False}[args.compile]
    compile_ml = {"auto": None, "yes": True, "no": False}[args.compile_minillava]
    return compare(cfg, device, args.warmup, args.repeats, phases, compile_hf, args.peak_tflops, compile_ml=compile_ml,
                   command=_command(args.argv), save=args.out, packing=args.packing)


def _command(argv: list[str]) -> str:
    """The command that reproduces a run, less where it was saved (`--out FILE`)."""
    kept = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
    return " ".join(["minillava bench", *kept])


BENCHMARKS = {"chat_ttft": _run_chat_ttft, "compare": _run_compare}


def _print_plain(name: str, result: dict) -> None:
    print(f"== {name}")
    for key, value in result.items():
        print(f"  {key:<24} {value:.4f}" if isinstance(value, float) else f"  {key:<24} {value}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="minillava bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--config", choices=list(CONFIGS), default="tiny")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--markdown", metavar="FILE", help="print the tables of a saved --json result and exit")
    parser.add_argument("--only", nargs="+", choices=["chat_ttft", *PHASES], default=list(PHASES),
                        help="phases of the comparison to run, or chat_ttft for the older ChatSession benchmark")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each side before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side (chat_ttft: chats)")
    parser.add_argument("--images", type=int, help="images in the stage-1 epoch (default: the config's)")
    parser.add_argument("--new-tokens", type=int, help="tokens per decode and per chat answer (default: config's)")
    parser.add_argument("--batch", type=int, help="training batch (default: the config's)")
    parser.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                        help="torch.compile transformers' model (auto: on CUDA, as the reference figures)")
    parser.add_argument("--compile-minillava", choices=["auto", "yes", "no"], default="auto",
                        help="torch.compile minillava's model in the step benchmarks and decode with "
                             "generate(compile=True) (auto: as --compile)")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON result here, after every phase")
    parser.add_argument("--merge", metavar="FILE", nargs="+",
                        help="print one JSON result from saved --json results of the same setting, and exit")
    parser.add_argument("--peak-tflops", type=float, help="the device's bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--turns", type=int, default=5, help="chat_ttft: turns per chat")
    parser.add_argument("--packing", action="store_true",
                        help="train_stage2_trl: minillava trains on packed rows (`train --packing`)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.merge:
        merged = merge([json.loads(Path(f).read_text()) for f in args.merge])
        if args.out:
            write_json(args.out, merged)
        print(json.dumps(merged, indent=1))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    results = {}
    if "chat_ttft" in args.only:
        results["chat_ttft"] = BENCHMARKS["chat_ttft"](args)
    if any(p in PHASES for p in args.only):
        results["compare"] = BENCHMARKS["compare"](args)
    if args.json:
        print(json.dumps(results["compare"] if list(results) == ["compare"] else results, indent=1))
    else:
        if "chat_ttft" in results:
            _print_plain("chat_ttft", results["chat_ttft"])
        if "compare" in results:
            print(markdown(results["compare"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
