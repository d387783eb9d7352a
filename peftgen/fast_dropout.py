"""Dropout masks drawn from 16-bit random integers on CPU: ``fast_dropout: true``.

PyTorch's CPU dropout draws its mask with ``bernoulli_``, one floating-point
sample per element: about 8 ms for one of GPT-2 small's (1010, 768)
activations on 2 cores, drawn 25 times a step (after every attention and MLP
block, and on the embeddings), about a twentieth of a LoRA step. Here one
``random_`` fill of 64-bit integers gives four 16-bit draws per number, and
an element is kept where its draw is at least ``p * 65536`` of the 65536
levels: the same Bernoulli(1 - p) mask, with p rounded to a multiple of
1/65536 (0.1 becomes 0.1000061). Kept elements are scaled by 1 / (1 - p) as
in torch, and the backward pass multiplies by the same kept mask.

Only CPU training uses it; on a GPU (whose dropout kernel is fast) and in
evaluation the module is torch's own. Written by hand because torch offers
no cheaper mask sampler; tests/test_fast_dropout.py checks the keep rate,
the scaling and the gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEVELS = 1 << 16


def _threshold(p: float) -> int:
    """The int16 value at or above which a draw keeps its element: a share 1 - p of the 65536 levels."""
    return -(LEVELS // 2) + round(p * LEVELS)


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """A bool tensor of ``shape``, each element True with probability 1 - p (p rounded to 1/65536)."""
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), (1 << 63) - 1)  # every bit random (the default range leaves the sign bit 0)
    draws = words.view(torch.int16)[:count].view(shape)
    return draws >= _threshold(p)


class _MaskedScale(torch.autograd.Function):
    """x * keep / (1 - p), the gradient the same mask and scale."""

    @staticmethod
    def forward(ctx, x, p):
        keep = keep_mask(x.shape, p, x.device)
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad_out):
        (keep,) = ctx.saved_tensors
        return grad_out.mul(keep).mul_(ctx.scale), None


class FastDropout(torch.nn.Dropout):
    """torch.nn.Dropout whose CPU training masks come from ``keep_mask``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.p >= 1 or self.inplace:
            return F.dropout(x, self.p, self.training, self.inplace)
        return _MaskedScale.apply(x, self.p)


def use_fast_dropout(model) -> int:
    """Every torch.nn.Dropout with p > 0 in model made a FastDropout in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Dropout and module.p > 0:
            module.__class__ = FastDropout  # same attributes; only forward differs
            count += 1
    return count
