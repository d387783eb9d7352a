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
- the new tokens' rows (``peftgen.token_rows``): exact, always on.
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
