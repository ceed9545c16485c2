"""The fused, chunked LM-head cross-entropy equals the plain one, in value and in gradients."""

import pytest
import torch
import torch.nn.functional as F

from minillava.loss import IGNORE_INDEX, linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 5, 64, None])  # None: chunks of N / ceil(V / C) = 8 positions
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_plain_cross_entropy(chunk, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=g)
    targets[::4] = IGNORE_INDEX  # unsupervised positions count for nothing
    plain = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    gh, gw = torch.autograd.grad(plain * 0.37, (hidden, weight))
    fused = linear_cross_entropy(hidden, weight, targets, chunk)
    fh, fw = torch.autograd.grad(fused * 0.37, (hidden, weight))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, plain, **tol)
    torch.testing.assert_close(fh, gh, **tol)
    torch.testing.assert_close(fw, gw, **tol)


def test_frozen_head_and_all_ignored():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(10, 8)  # a frozen head: no gradient asked for it
    targets = torch.full((6,), IGNORE_INDEX)
    loss = linear_cross_entropy(hidden, weight, targets, chunk=4)
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().max() == 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="hidden \\(N, C\\)"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), chunk=0)
