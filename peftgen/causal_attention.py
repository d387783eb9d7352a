"""Causal attention over one example on a CPU, by batched products in blocks of queries: ``block_attention``.

PyTorch's fused (flash) attention kernel for CPUs runs GPT-2's attention at
about 0.05 TFLOP/s on the machines this project is measured on, where the
same machine's batched bf16 products reach 0.35-0.4: with every matrix
product of a LoRA step running near that rate, attention was a fifth of the
step. This computes the same function from PyTorch's own batched products
and softmax kernels, a block of 128 queries at a time against the keys up
to the block's end, so that the products above the diagonal, which causal
attention never needs, are skipped but for the block's own triangle:

    scores = (q_block * scaling) @ k[:end]^T      (fp32, masked above the diagonal)
    probs  = softmax(scores)
    out    = probs @ v[:end]

The backward pass uses the probabilities kept from the forward pass
(``keep_probs``: about 4 MB per example and layer of GPT-2 small at 512
tokens, which the flash kernel recomputes instead) or recomputes them the
same way, bit for bit:

    dv[:end] += probs^T @ dout_block,  dprobs = dout_block @ v[:end]^T
    dscores   = softmax's backward (probs * (dprobs - rowsum(dprobs * probs)))
    dq_block  = dscores @ k[:end] * scaling,  dk[:end] += dscores^T @ (q_block * scaling)

The scores are fp32 products of the queries and keys in fp32, as the flash
kernel keeps them: real models' attention logits are large enough that bf16
scores (as transformers' eager attention computes them) left
SmolLM2-135M-Instruct's output logits 1.8 away from the flash kernel's (the
largest being 27), fp32 scores 0.8, about what bf16 autocast itself moves
them from fp32. The probabilities are rounded to the inputs' dtype for the
products with the values, as the flash kernel rounds them; the gradients of
the keys and values add up over the blocks in fp32. Grouped-query attention
(SmolLM2, Llama) runs each key/value head against all its query heads in one
product, without repeating the keys. tests/test_causal_attention.py checks
outputs and gradients against PyTorch's attention; benchmarks/README.md
measures the step.
"""

from __future__ import annotations

import torch

BLOCK = 128  # queries per product: of 64, 128 and 256, the fastest over examples of 128-512 tokens taken together


def _prefix(tensor, end):
    """tensor[:, :end] as a whole (contiguous) matrix per head, which bmm needs to run without copying it again."""
    return tensor if end == tensor.shape[1] else tensor[:, :end].contiguous()


def _block_probs(query32, key32, start, end, dtype):
    """Softmax probabilities (KV, G * b, end) in ``dtype`` of the queries start:end against the keys up to end, causal.

    The scores are fp32 products of fp32 queries and keys (the module's docstring says why).
    """
    heads, groups, _, dim = query32.shape
    width = end - start
    block = query32[:, :, start:end].reshape(heads, groups * width, dim)
    scores = torch.bmm(block, _prefix(key32, end).transpose(1, 2)).view(heads, groups, width, end)
    above = torch.ones(width, width, dtype=torch.bool, device=query32.device).triu_(1)
    scores[..., start:end].masked_fill_(above, float("-inf"))
    return torch.softmax(scores.view(heads, groups * width, end), dim=-1).to(dtype)


class BlockCausalAttention(torch.autograd.Function):
    """query (KV, G, T, D), key and value (KV, T, D) -> out (KV, G, T, D); see the module's docstring."""

    @staticmethod
    def forward(ctx, query, key, value, scaling: float, keep_probs: bool):
        with torch.autocast(device_type=query.device.type, enabled=False):
            heads, groups, length, dim = query.shape
            dtype = query.dtype
            query32, key32 = query.float() * scaling, key.float().contiguous()
            value = value.contiguous()
            outs, kept = [], []
            for start in range(0, length, BLOCK):
                end = min(start + BLOCK, length)
                probs = _block_probs(query32, key32, start, end, dtype)
                outs.append(torch.bmm(probs, _prefix(value, end)).view(heads, groups, end - start, dim))
                if keep_probs:
                    kept.append(probs)
            ctx.save_for_backward(query, key, value, *kept)
            ctx.scaling = scaling
            return torch.cat(outs, dim=2)

    @staticmethod
    def backward(ctx, dout):
        query, key, value, *kept = ctx.saved_tensors
        with torch.autocast(device_type=query.device.type, enabled=False):
            heads, groups, length, dim = query.shape
            dtype, scaling = query.dtype, ctx.scaling
            dout = dout.to(dtype)
            query32 = query.float() * scaling
            key32 = None if kept else key.float().contiguous()  # only recomputed probabilities need them
            scaled, key = query32.to(dtype), key.contiguous()
            dqs = []
            dkey = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
            dvalue = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
            for index, start in enumerate(range(0, length, BLOCK)):
                end = min(start + BLOCK, length)
                rows = groups * (end - start)
                probs = kept[index] if kept else _block_probs(query32, key32, start, end, dtype)
                grad = dout[:, :, start:end].reshape(heads, rows, dim)
                dvalue[:, :end] += torch.bmm(probs.transpose(1, 2), grad)
                dprobs = torch.bmm(grad, _prefix(value, end).transpose(1, 2))
                dscores = torch._softmax_backward_data(dprobs, probs, -1, dtype)
                dqs.append(torch.bmm(dscores, _prefix(key, end)).view(heads, groups, end - start, dim))
                dkey[:, :end] += torch.bmm(dscores.transpose(1, 2), scaled[:, :, start:end].reshape(heads, rows, dim))
            dquery = torch.cat(dqs, dim=2)
            if scaling != 1:
                dquery = (dquery.float() * scaling).to(dtype)
            return dquery, dkey.to(key.dtype), dvalue.to(value.dtype), None, None


def causal_attention(query, key, value, scaling: float, keep_probs: bool = True):
    """query (1, H, T, D), key/value (1, KV, T, D), H a multiple of KV -> (1, T, H, D), as transformers' SDPA function returns it."""
    device = query.device.type
    # What SDPA does under autocast, where rotary embeddings leave the queries and keys in fp32 and the values in bf16.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    _, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query[0].reshape(kv_heads, heads // kv_heads, length, dim)
    out = BlockCausalAttention.apply(grouped, key[0], value[0], scaling, keep_probs)
    return out.reshape(1, heads, length, dim).transpose(1, 2).contiguous()
