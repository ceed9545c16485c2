"""The training loss without the logits: the LM head and cross-entropy fused, a chunk of positions at a time.

LLaVA's loss is the cross-entropy of the next token at the supervised positions (chapter 4). Computed plainly,
the head first writes a (positions, vocabulary) matrix of scores, in float32 for a stable softmax, and autograd
keeps it for the backward pass: for a 7B model (vocabulary 32,000) and 16 conversations of 500 supervised tokens,
about 1 GB, and as much again for its gradient. `linear_cross_entropy` never holds more than one chunk's scores:
for each chunk of positions it computes the scores, their log-sum-exp and loss, and right away the gradients
with respect to the hidden states and the head's weight (softmax minus the one-hot target), which the backward
pass only scales. The same idea as liger-kernel's fused linear cross-entropy, in plain PyTorch, on any device.
"""

from __future__ import annotations

import math

import torch

from .templates import IGNORE_INDEX


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        need_h, need_w = ctx.needs_input_grad[:2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            scores = (h @ weight.T).float()  # (c, V): with the softmax below, the only ones of their size
            keep = t != IGNORE_INDEX
            safe = t.clamp(min=0)
            lse = torch.logsumexp(scores, dim=-1)
            total += ((lse - scores.gather(1, safe[:, None])[:, 0]) * keep).sum()
            if not (need_h or need_w):
                continue
            grad = torch.softmax(scores, dim=-1)  # d(sum of losses) / d(scores) = softmax - one-hot, per kept row
            del scores
            grad[torch.arange(len(t), device=t.device), safe] -= 1
            grad = grad.mul_(keep[:, None]).to(hidden.dtype)
            if need_h:
                grad_hidden[start:start + chunk] = grad @ weight
            if need_w:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight)))
        ctx.need, ctx.weight_dtype = (need_h, need_w), weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        need_h, need_w = ctx.need
        return (grad_hidden * grad_out.to(grad_hidden.dtype) if need_h else None,
                (grad_weight * grad_out).to(ctx.weight_dtype) if need_w else None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """The summed cross-entropy of `hidden @ weight.T` against `targets`, never materialising all the scores.

    hidden (N, C), weight (V, C) (the LM head's, no bias), targets (N,) with IGNORE_INDEX where unsupervised.
    `chunk`: positions per chunk; by default N / ceil(V / C), liger-kernel's choice, which makes a chunk's
    (chunk, V) scores about as large as the hidden states (N, C). Returns a scalar: the same value and gradients
    (for hidden and weight) as `F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100,
    reduction="sum")`.
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden (N, C), weight (V, C), targets (N,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if chunk is None:
        chunk = max(1, math.ceil(hidden.shape[0] / math.ceil(weight.shape[0] / weight.shape[1])))
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be at least 1, got {chunk}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
