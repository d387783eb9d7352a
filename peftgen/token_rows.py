"""The new tokens' rows without rebuilding the whole embedding matrix every step.

PEFT's ``trainable_token_indices`` keeps the new rows in a small trainable
``delta`` (K, C) and, on every forward, makes a full copy of the V x C matrix
with those rows written in (``index_copy``) before the embedding lookup or
the output matmul. For GPT-2 that is a 154 MB copy per call, and a
vocabulary-sized gradient flowing into it, to train three rows.

``speed_up(model)`` gives each of the model's TrainableTokensLayer a forward
that computes the same result from the base weight and ``delta`` directly:
a lookup in the base matrix with the few new-token positions swapped for
``delta`` rows, or the base matmul with the few new-token columns replaced
by ``h @ delta.T``. The adapter, its parameters and the saved files are
PEFT's own and unchanged; tests/test_token_rows.py checks outputs and
gradients against PEFT's forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _slots(layer, name: str, vocab: int, device) -> torch.Tensor:
    """(V,) long tensor: position of each token id in the adapter's index, -1 for base tokens."""
    cache = layer.__dict__.setdefault("_peftgen_slots", {})
    if name not in cache or cache[name].device != device or cache[name].shape[0] != vocab:
        slots = torch.full((vocab,), -1, dtype=torch.long, device=device)
        slots[torch.tensor(layer.token_indices[name], device=device)] = torch.arange(len(layer.token_indices[name]), device=device)
        cache[name] = slots
    return cache[name]


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = self.active_adapters
    if self.disable_adapters or self.merged or len(active) != 1:
        return self._peftgen_original_forward(x, *args, **kwargs)
    name = active[0]
    base = self.base_layer
    delta = self.trainable_tokens_delta[name]  # (K, C)
    if isinstance(base, torch.nn.Embedding):
        if base.max_norm is not None or base.sparse:
            return self._peftgen_original_forward(x, *args, **kwargs)
        out = F.embedding(x, base.weight, padding_idx=base.padding_idx)  # (B, T, C)
        out = out.to(torch.promote_types(out.dtype, delta.dtype))  # a bf16-stored base: fp32 out, delta rows unrounded
        slot = _slots(self, name, base.weight.shape[0], x.device)[x]  # (B, T)
        new = slot >= 0
        if new.any():
            rows = delta.to(out.dtype)[slot.clamp(min=0)]  # (B, T, C)
            out = torch.where(new.unsqueeze(-1), rows, out)
        scale = self._get_embed_scale()
        return out * scale.to(out.dtype) if scale is not None else out
    if isinstance(base, torch.nn.Linear) and base.bias is None:
        index = torch.tensor(self.token_indices[name], device=x.device)
        out = F.linear(x, base.weight)  # (..., V)
        return out.index_copy(-1, index, F.linear(x, delta.to(base.weight.dtype)).to(out.dtype))
    return self._peftgen_original_forward(x, *args, **kwargs)


def speed_up(model) -> int:
    """Give every TrainableTokensLayer in model the direct forward; returns how many there were."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    count = 0
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and "_peftgen_original_forward" not in module.__dict__:
            module._peftgen_original_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
