"""Llama-family layers that keep fewer tensors for the backward pass: ``lean_layers: true``.

Under bf16 autocast a Llama decoder layer (Llama, Mistral, Qwen2/3, SmolLM)
keeps more for its backward pass than it needs:

- ``RMSNorm`` computes in fp32 and returns fp32; autograd keeps its input and
  its normalised fp32 output, and autocast then casts that output to bf16
  once per projection that reads it, each cast kept by its projection: three
  bf16 copies of the same tensor after the attention norm (q, k, v), two
  after the MLP norm (gate, up). Here the norm keeps its input and the
  ``rsqrt`` only, and returns the bf16 tensor once, which every projection
  then shares.
- the gated MLP ``down(act(gate(x)) * up(x))`` keeps ``gate(x)``,
  ``act(gate(x))``, ``up(x)`` and the product. Here the activation is
  recomputed from ``gate(x)`` in the backward pass (one elementwise kernel),
  and so is the product, the down projection's input, which the projection
  keeps for its weight's gradient (a trained weight or a LoRA adapter's):
  ``gate(x)`` and ``up(x)`` are kept anyway, and the product is as large as
  either (SmolLM2-135M's shape: 94 MB of a step of 1,024 tokens). It is
  recomputed once per layer, bit for bit, when the projection's backward
  first asks for it. Where other saved-tensor hooks are in effect
  (gradient checkpointing without reentry, offloading), they keep theirs.

For SmolLM2-135M's shape that is about a third of the activations of a step;
benchmarks/README.md has the numbers. The forward pass is bit for bit what
the model computes (tests/test_lean_layers.py); in the backward pass the
norm's gradient is the textbook closed form in fp32, and its three incoming
bf16 gradients are summed in bf16 before that, so gradients agree to bf16
rounding, not bit for bit.

Written by hand because transformers' layers are written for clarity, and
torch's selective checkpointing would recompute matmul inputs through the
checkpoint machinery at every layer; these two patterns are short.
"""

from __future__ import annotations

import contextlib
import types

import torch

# Architectures whose RMSNorm and MLP are exactly Llama's (checked in tests
# against transformers' own forward).
LEAN_MODELS = {"llama", "mistral", "qwen2", "qwen3"}


class _RMSNormOnce(torch.autograd.Function):
    """weight * x / rms(x) in fp32, returned in ``out_dtype``; keeps x and 1/rms(x) only."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        # x (..., C) fp32, weight (C,) fp32: the same operations as LlamaRMSNorm.forward
        inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, inv_rms)
        return (weight * (x * inv_rms)).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x * inv_rms  # (..., C), recomputed
        grad = grad_out.float()
        grad_weight = (grad * normed).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * r with r = (mean(x^2) + eps)^-1/2: r * (g - x_hat * mean(g * x_hat))
            g = grad * weight
            grad_x = inv_rms * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_x, grad_weight, None, None


def _norm_forward(self, hidden_states):
    device = hidden_states.device.type
    if not (torch.is_autocast_enabled(device) and hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32):
        return type(self).forward(self, hidden_states)  # nothing to save: the model's own
    out_dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return _RMSNormOnce.apply(hidden_states, self.weight, self.variance_epsilon, out_dtype)


class _SiLUProduct(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only; the same kernels autograd would run."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_up = grad_out * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = _SiLUProduct.apply(gate, up)
    keep = not torch.is_grad_enabled() or _other_saved_tensor_hooks()
    with contextlib.nullcontext() if keep else torch.autograd.graph.saved_tensors_hooks(*_recomputed_from(product, gate, up)):
        return self.down_proj(product)


def _other_saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are in effect (which ours would override inside the down projection)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(True) is not None


def _recomputed_from(product, gate, up):
    """Saved-tensor hooks that keep views of ``product`` as a recipe (silu(gate) * up) instead of its memory."""
    # Only numbers, no reference: holding the product here would keep it alive.
    address, dtype = product.untyped_storage().data_ptr(), product.dtype
    made: list[torch.Tensor] = []  # the recomputed product, shared by every view the backward pass unpacks

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != address or tensor.dtype != dtype:
            return tensor
        return (tensor.shape, tensor.stride(), tensor.storage_offset())  # the view; gate and up are the recipe's

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        shape, stride, offset = packed
        if not made:
            with torch.no_grad():
                made.append(torch.nn.functional.silu(gate) * up)
        return made[0].as_strided(shape, stride, offset)

    return pack, unpack


def _is_silu(module) -> bool:
    return isinstance(module, torch.nn.SiLU) or type(module).__name__ == "SiLUActivation"


def use_lean_layers(model) -> int:
    """Give a Llama-family model's RMSNorms and SiLU-gated MLPs their lean forward; returns how many modules changed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in LEAN_MODELS:
        return 0
    changed = 0
    for module in base.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None:
            module.forward = types.MethodType(_norm_forward, module)
            changed += 1
        elif name.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
            changed += 1
    return changed
