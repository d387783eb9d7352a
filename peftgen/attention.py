"""Attention for packed batches, one example at a time: ``attention_per_example: true``.

A packed row holds several examples end to end. transformers attends over it
with one block-diagonal mask, and PyTorch's fused attention, given any mask,
computes every block of the (N, N) matrix, the masked ones included; only
with ``is_causal`` and no mask does it skip the blocks above the diagonal.
For two GPT-2 examples of 300 and 500 tokens that is 800^2 scores where the
examples need 300^2/2 + 500^2/2: about four times the attention work, and on
a CPU attention is most of a step at these lengths.

GPU libraries solve this with variable-length kernels (FlashAttention's
``cu_seqlens``); PyTorch has none on CPU. So this attention function, which
transformers calls in place of its SDPA one, runs transformers' own SDPA
function once per example (causal, no mask) on the slices the collator's
``cu_seq_lens_q`` name, and joins the outputs. A batch without them (a
padded one) goes to transformers' SDPA function unchanged.

With ``block_attention``, an example on a CPU is attended by
``peftgen.causal_attention`` instead of PyTorch's flash kernel, where nothing
asks for what only SDPA does (dropout, soft-capping, sliding windows,
attention sinks).
"""

from __future__ import annotations

import functools

import torch

from peftgen.causal_attention import causal_attention

NAME = "peftgen_per_example"  # and NAME + "_blocks", NAME + "_blocks_kept" for block attention
# Attention arguments some architectures pass that only SDPA's own function implements.
SDPA_ONLY = ("softcap", "sliding_window", "s_aux", "position_bias")


def per_example_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, blocks=False, keep_probs=True, **kwargs):
    """query (1, H, N, D), key/value (1, H_kv, N, D) over N packed tokens -> ((1, N, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    edges = bounds.tolist() if isinstance(bounds, torch.Tensor) else list(bounds)
    by_blocks = blocks and _blocks_apply(module, query, key, dropout, kwargs)
    pieces = []
    for start, end in zip(edges, edges[1:]):
        if end <= start:
            continue
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if by_blocks:
            pieces.append(causal_attention(q, k, v, query.shape[-1] ** -0.5 if scaling is None else scaling, keep_probs))
        else:
            pieces.append(sdpa_attention_forward(module, q, k, v, None, dropout, scaling, True, **kwargs)[0])  # (1, end - start, H, D)
    return torch.cat(pieces, dim=1), None


def _blocks_apply(module, query, key, dropout, kwargs) -> bool:
    """Whether peftgen.causal_attention computes what SDPA would here (up to rounding)."""
    return (
        query.device.type == "cpu"
        and not dropout
        and getattr(module, "is_causal", True)
        and query.shape[1] % key.shape[1] == 0
        and all(kwargs.get(name) is None for name in SDPA_ONLY)
    )


def use_per_example_attention(model, blocks: bool = False, keep_probs: bool = True) -> bool:
    """Switch a model that attends with SDPA to the per-example function (with ``blocks``, by
    peftgen.causal_attention on a CPU, keeping or recomputing its probabilities); False if it uses something else."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(base.config, "_attn_implementation", None) or ""
    if current != "sdpa" and not current.startswith(NAME):
        return False
    name = NAME + ("_blocks" if blocks else "") + ("_kept" if blocks and keep_probs else "")
    AttentionInterface.register(name, functools.partial(per_example_attention, blocks=blocks, keep_probs=keep_probs))
    AttentionMaskInterface.register(name, sdpa_mask)  # padded batches still get their mask
    base.set_attn_implementation(name)
    return True
