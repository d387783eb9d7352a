"""Two CPU-specific speed-ups the engine applies while decoding; the math is unchanged.

1. The output head. Decoding multiplies a few hidden states ``h (N, C)`` by the
   head ``W (V, C)``. PyTorch computes ``h @ W.T`` as a GEMM with tiny M and
   huge N, which on CPU BLAS runs ~4x slower than the same product laid out as
   ``W @ h.T`` (huge M, tiny N): 9.6 ms against 2.6 ms for N=5, C=256,
   V=50257 on the 2-core machine this was written on. For a small model that
   one matmul is most of a step, so while the engine runs, a plain
   ``nn.Linear`` head on CPU is swapped for ``_SkinnyHead`` (same weight).
2. The KV cache. transformers' ``DynamicLayer`` grows keys and values with
   ``torch.cat`` every step, copying the whole cache each time: O(T^2) bytes
   over a generation. ``PreallocatedLayer`` writes into a buffer sized for the
   whole run and hands attention a view of the filled part.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

try:
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # older transformers: plain caches only
    DynamicCache = DynamicLayer = None

# Above this many rows per call (a long prefill without logits_to_keep) the usual layout is as fast.
_SKINNY_MAX_ROWS = 64


class _SkinnyHead(nn.Module):
    """``linear(h, W, b)`` computed as ``(W @ h.T).T``, the fast layout for few rows on CPU."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
        if rows.shape[0] > _SKINNY_MAX_ROWS:
            return self.linear(hidden)
        weight, bias = self.linear.weight, self.linear.bias
        logits = torch.mm(weight, rows.T).T.contiguous()  # (V, C) @ (C, N) -> (N, V)
        if bias is not None:
            logits += bias
        return logits.reshape(*hidden.shape[:-1], weight.shape[0])


@contextlib.contextmanager
def skinny_head(model: nn.Module):
    """Swap the model's output head for ``_SkinnyHead`` if it is a plain CPU ``nn.Linear``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.device.type != "cpu" or not head.weight.is_floating_point():
        yield
        return
    parent_name, attribute = _owner(model, head)
    parent = model.get_submodule(parent_name)
    setattr(parent, attribute, _SkinnyHead(head))
    try:
        yield
    finally:
        setattr(parent, attribute, head)


def _owner(model: nn.Module, module: nn.Module) -> tuple[str, str]:
    for name, candidate in model.named_modules():
        if candidate is module:
            parent, _, attribute = name.rpartition(".")
            return parent, attribute
    raise LookupError("output head not found among the model's modules")


if DynamicLayer is not None:

    class PreallocatedLayer(DynamicLayer):
        """A full-attention cache layer that writes into a buffer instead of concatenating.

        ``keys``/``values`` are views ``(N, H, T, D)`` of buffers ``(N, H, capacity, D)``.
        Reordering rows (beam search) gathers into a second buffer and swaps the
        two: no allocation per step, and only the filled ``T`` positions move.
        """

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.length = 0
            self.buffers = self.spares = None

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            self.buffers = tuple(self._empty(s, s.shape[0]) for s in (key_states, value_states))
            self.is_initialized = True

        def _empty(self, states, rows):
            return states.new_empty(rows, states.shape[1], self.capacity, states.shape[3])

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self.length, self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} positions)")
            self.buffers[0][:, :, start:end] = key_states
            self.buffers[1][:, :, start:end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def _views(self):
            self.keys = self.buffers[0][:, :, : self.length]
            self.values = self.buffers[1][:, :, : self.length]

        def get_seq_length(self) -> int:
            return self.length

        def _select(self, rows: torch.Tensor) -> None:
            if self.length == 0:
                return
            rows = rows.to(self.device)
            if self.spares is None or self.spares[0].shape[0] != rows.shape[0]:
                self.spares = tuple(self._empty(buffer, rows.shape[0]) for buffer in self.buffers)
            for buffer, spare in zip(self.buffers, self.spares):
                filled = slice(0, self.length)
                torch.index_select(buffer[:, :, filled], 0, rows, out=spare[:, :, filled])
            self.buffers, self.spares = self.spares, self.buffers
            self._views()

        def reorder_cache(self, beam_idx: torch.Tensor) -> None:
            self._select(beam_idx)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._select(indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.length:
                rows = torch.arange(self.buffers[0].shape[0], device=self.device).repeat_interleave(repeats)
                self._select(rows)


def make_cache(model: nn.Module, capacity: int):
    """A DynamicCache for ``model`` whose full-attention layers are preallocated for ``capacity`` positions."""
    if DynamicCache is None:
        return None
    config = model.config
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
