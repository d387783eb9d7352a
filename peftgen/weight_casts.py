"""Linear layers that cast their trainable fp32 weights to bf16 at each use: ``recast_weights: true``.

Full fine-tuning under bf16 autocast keeps fp32 weights (the optimizer needs
them) and lets autocast cast each one to bf16 for its matmul. autocast keeps
that bf16 copy until the end of the forward pass, and the matmul keeps it
for its backward pass, so from the first layer's forward to its backward a
bf16 copy of every weight is alive next to the activations: 2 bytes per
parameter at the step's peak (0.17 GB for GPT-2 small's layers, 0.21 GB for
SmolLM2-135M's). Here the layer keeps only a reference to the fp32 weight it
already has and casts it again in the backward pass: one more read of the
weights per step, for that memory.

The arithmetic is autocast's, kernel for kernel: inputs and weight cast to
bf16, the product in bf16, the weight's gradient made in bf16 and then
handed to the fp32 weight (tests/test_weight_casts.py compares bit for bit).
Written by hand because autocast has no switch to stop caching or saving
casts of particular tensors.
"""

from __future__ import annotations

import types

import torch


class _RecastLinear(torch.autograd.Function):
    """x @ W^T + b with W cast to ``dtype`` in the forward pass and again in the backward pass.

    ``transposed``: W is stored (in, out), as transformers' Conv1D (GPT-2) stores it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, transposed):
        x16 = x.to(dtype)  # (..., in)
        w16 = weight.to(dtype)
        b16 = bias.to(dtype) if bias is not None else None
        flat = x16.reshape(-1, x16.shape[-1])
        w = w16 if transposed else w16.T  # (in, out)
        out = torch.addmm(b16, flat, w) if b16 is not None else flat @ w
        ctx.save_for_backward(x16, weight)
        ctx.dtype, ctx.transposed, ctx.x_dtype = dtype, transposed, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x16, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)  # (N, out)
        flat = x16.reshape(-1, x16.shape[-1])  # (N, in)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w16 = weight.to(ctx.dtype)  # the cast again, instead of keeping it from the forward pass
            grad_x = (grad @ (w16.T if ctx.transposed else w16)).view(*x16.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (flat.T @ grad if ctx.transposed else grad.T @ flat).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def _forward(self, x):
    device = x.device.type
    if not (torch.is_autocast_enabled(device) and self.weight.dtype == torch.float32):
        return type(self).forward(self, x)
    with torch.autocast(device, enabled=False):
        return _RecastLinear.apply(x, self.weight, self.bias, torch.get_autocast_dtype(device), self._peftgen_transposed)


def recast_weights(model) -> int:
    """Trainable fp32 linear layers (nn.Linear, GPT-2's Conv1D) cast their weight at each use; returns how many.

    Layers whose weight is tied to an embedding are left to autocast (the
    embedding's own lookup reads the same matrix).
    """
    from transformers.pytorch_utils import Conv1D

    embeddings = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    changed = 0
    for module in model.modules():
        if type(module) not in (torch.nn.Linear, Conv1D):
            continue
        weight = module.weight
        if not weight.requires_grad or weight.dtype != torch.float32 or weight.data_ptr() in embeddings:
            continue
        module._peftgen_transposed = isinstance(module, Conv1D)
        module.forward = types.MethodType(_forward, module)
        changed += 1
    return changed
