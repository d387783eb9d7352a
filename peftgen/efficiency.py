"""Training-time changes to a model that make a step cheaper without changing what it learns.

Each one has a switch in TrainConfig and a row in benchmarks/README.md:

- ``attention_dropout``: GPT-2 ships with dropout 0.1 on its attention
  probabilities. PyTorch's fused (flash) attention on CPU has no dropout, so
  with it SDPA falls back to the unfused path that materialises every
  (T, T) attention matrix and draws a random mask over it: a quarter of
  GPT-2 small's step on 2 cores. Newer models (Llama, SmolLM2, Qwen) train
  with 0; so does peftgen unless told otherwise.
- ``frozen_bf16``: under bf16 autocast every matmul casts its fp32 weight to
  bf16 on every call, forward and backward. A frozen weight can be stored in
  bf16 once: the products are bit for bit what autocast computes, at half
  the memory and without the casts. Embeddings (and a head tied to them)
  stay fp32, since the residual stream starts there.
- ``fused_activations``: GPT-2's ``gelu_new`` is written as seven tensor
  operations in Python, each keeping its output for the backward pass (five
  (T, 4C) tensors per layer); transformers' ``gelu_pytorch_tanh`` is the same
  function as one kernel that keeps only its input. Equal up to rounding.
- the new tokens' rows (``peftgen.token_rows``): exact.
- ``own_weights``: transformers maps the safetensors file into memory and
  hands out tensors that point into it. After the casts and the resize above
  only a few small tensors (position embeddings, norms) still do, but they
  keep the whole file mapped and resident (470 MB for GPT-2 small). Copying
  those few into ordinary memory lets the mapping go.
"""
from __future__ import annotations

import torch

ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")


def set_attention_dropout(model, p: float) -> None:
    """Attention-probability dropout p in the config and in every attention module already built."""
    for key in ATTENTION_DROPOUT_KEYS:
        if isinstance(getattr(model.config, key, None), (int, float)):
            setattr(model.config, key, p)
    for module in model.modules():
        if "Attention" not in type(module).__name__:
            continue
        if isinstance(getattr(module, "attention_dropout", None), (int, float)):
            module.attention_dropout = p  # Llama family: a float read at every forward
        for name in ("attn_dropout", "attention_dropout", "dropout"):
            child = getattr(module, name, None)
            if isinstance(child, torch.nn.Dropout):
                child.p = p  # GPT-2 family: a Dropout module whose p SDPA reads


def store_frozen_in_bf16(model) -> int:
    """Frozen float weights and biases of linear layers to bf16, embeddings excepted; returns bytes saved."""
    from transformers.pytorch_utils import Conv1D

    # By storage, not by module: a tied output head is a Linear over the embedding's own matrix.
    keep = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    saved = 0
    for module in model.modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad or param.dtype != torch.float32 or param.data_ptr() in keep:
                continue
            saved += param.numel() * 2
            param.data = param.data.to(torch.bfloat16)
    return saved


def fuse_activations(model) -> int:
    """GPT-2's Python gelu_new modules swapped for transformers' one-kernel tanh GELU; returns how many."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed memory mappings (Linux; empty elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].startswith("/") and fields[5].endswith(".safetensors"):
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return ranges


def own_weights(model) -> int:
    """Copy every parameter and buffer that points into a mapped weights file to ordinary memory; returns how many."""
    ranges = _file_mappings()
    if not ranges:
        return 0
    copied = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "cpu":
            continue
        address = tensor.untyped_storage().data_ptr()
        if any(start <= address < end for start, end in ranges):
            tensor.data = tensor.data.clone()
            copied += 1
    return copied
