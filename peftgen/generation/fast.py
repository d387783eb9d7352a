"""Two CPU-specific speed-ups the engine applies while decoding; the math is unchanged.

1. Skinny matmuls. Decoding multiplies a few rows ``x (N, C_in)`` by every
   weight of the model. CPU BLAS (MKL here) runs ``x @ W.T`` with tiny M and
   large N far below memory bandwidth; the same product laid out as
   ``(W @ x.T).T`` (large M, tiny N) runs close to it. Measured on the 2-core
   machine this was written on, float32, N=5, weights streamed from memory:
   GPT-2-small's 48 block matmuls 44 ms -> 23 ms, its 50257x768 head 27 ms ->
   8 ms. So while the engine runs, every float32 ``nn.Linear`` and GPT-2
   ``Conv1D`` on CPU is swapped for ``_Skinny`` (same weights; a Conv1D,
   stored (in, out), gets a transposed copy, within a memory budget) and put
   back afterwards (``generate(..., matmul_layout="standard")`` leaves the
   model as it is). bfloat16 weights are left alone: there the usual layout
   (oneDNN) is the faster one.
2. The KV cache. transformers' ``DynamicLayer`` grows keys and values with
   ``torch.cat`` every step, copying the whole cache each time: O(T^2) bytes
   over a generation. ``PreallocatedLayer`` writes into a buffer sized for the
   whole run and hands attention a view of the filled part.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.pytorch_utils import Conv1D

# More rows than this per call (a prefill) and the usual layout is as fast: use the module itself.
_SKINNY_MAX_ROWS = 64
# Conv1D weights are stored (in, out); their (out, in) copies may use at most this much memory.
_COPY_BUDGET_BYTES = 2**30


class _Skinny(nn.Module):
    """``y = x @ W.T + b`` for few rows, computed as ``(W @ x.T).T`` with ``W`` (out, in) contiguous."""

    def __init__(self, module: nn.Module, weight_out_in: torch.Tensor):
        super().__init__()
        self.inner = module
        self.weight_out_in = weight_out_in  # a plain tensor, not a parameter: model.parameters() is unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (N, C_in)
        if rows.shape[0] > _SKINNY_MAX_ROWS or rows.dtype != self.weight_out_in.dtype:
            return self.inner(x)
        out = torch.mm(self.weight_out_in, rows.T).T.contiguous()  # (C_out, C_in) @ (C_in, N) -> (N, C_out)
        if self.inner.bias is not None:
            out += self.inner.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def __getattr__(self, name):  # weight, bias, in_features, nf...: the wrapped module's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


@contextlib.contextmanager
def skinny_matmuls(model: nn.Module):
    """Swap the model's float32 CPU ``nn.Linear``/``Conv1D`` modules for ``_Skinny`` ones, then put them back."""
    swaps, budget = [], _COPY_BUDGET_BYTES
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32:
            continue
        if type(module) is nn.Linear:
            weight_out_in = weight.detach()
        elif type(module) is Conv1D and weight.numel() * 4 <= budget:
            weight_out_in = weight.detach().T.contiguous()
            budget -= weight.numel() * 4
        else:
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if type(parent).__name__ == "TrainableTokensLayer":  # PEFT's, which checks its base is an nn.Linear
            continue
        swaps.append((parent, attribute, module, _Skinny(module, weight_out_in)))
    try:
        for parent, attribute, _, skinny in swaps:
            setattr(parent, attribute, skinny)
        yield
    finally:
        for parent, attribute, module, _ in swaps:
            setattr(parent, attribute, module)


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
    config = model.config
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
