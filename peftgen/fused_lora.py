"""LoRA layers that add their adapter into the base output in one product: ``fused_lora: true``.

PEFT's LoRA ``Linear.forward`` computes ``base(x) + lora_B(lora_A(dropout(x))) *
scaling``: the input is cast to the adapter's dtype (fp32; under bf16
autocast a bf16 input goes up to fp32 and back down again) and to bf16 for
the base product separately, and the (tokens x out) adapter product is
written, scaled and added as three full-size tensors, each pass repeated in
the backward pass. For GPT-2 small that is 7M elements a layer per pass.

``speed_up(model)`` gives each plain LoRA ``Linear`` (one active adapter, no
dropout, no DoRA-style variant, not merged) a forward that casts the input once and computes the
same sum as ``torch.addmm(base(x), x A^T, B^T, alpha=scaling)``: the scaled
adapter product is added into the base output by the product itself. The
base product is taken directly for an ``nn.Linear`` or GPT-2's ``Conv1D``,
through the base module's own forward for anything else. Other adapters go
to PEFT's forward. The adapter's parameters and files
are PEFT's own; tests/test_fused_lora.py checks outputs and gradients against
PEFT's forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _plain_adapter(layer) -> str | None:
    """The one active adapter that the fused forward can run, or None."""
    active = layer.active_adapters
    if layer.disable_adapters or layer.merged or len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    return name


def _base_product(base, x: torch.Tensor) -> torch.Tensor:
    """base(x): the product itself for a plain nn.Linear or GPT-2 Conv1D (weight stored (in, out)),
    else the module's own forward (a layer swapped in later, e.g. the generation engine's
    skinny-matmul wrapper, keeps its own arithmetic)."""
    from transformers.pytorch_utils import Conv1D

    if type(base) is torch.nn.Linear:
        return F.linear(x, base.weight, base.bias)
    if type(base) is Conv1D:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(base.bias, flat, base.weight) if base.bias is not None else flat @ base.weight  # as Conv1D.forward
        return out.reshape(*x.shape[:-1], base.weight.shape[-1])
    return base(x)


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_adapter(self)
    if name is None or args or kwargs:
        return self._peftgen_original_forward(x, *args, **kwargs)
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast:
        x = x.to(torch.get_autocast_dtype(device))  # once, for the base and the adapter
    base = _base_product(self.base_layer, x)  # (..., out)
    lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
    if not autocast:
        x = x.to(lora_A.dtype)
    down = x.reshape(-1, x.shape[-1]) @ lora_A.T.to(x.dtype)  # (N, r)
    up = lora_B.T.to(down.dtype)  # (r, out)
    flat = base.reshape(-1, base.shape[-1])
    result = torch.addmm(flat.to(down.dtype), down, up, alpha=self.scaling[name])
    return result.reshape(base.shape).to(base.dtype)


def speed_up(model) -> int:
    """Give every PEFT LoRA Linear the fused forward (its base product is chosen per call); returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and "_peftgen_original_forward" not in module.__dict__:
            module._peftgen_original_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
