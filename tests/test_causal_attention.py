"""Block attention computes causal attention: the outputs and gradients PyTorch's attention gives, for any length and head grouping."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from peftgen import attention, batching, causal_attention


def _inputs(length, heads, kv_heads, dim, dtype, seed):
    """query, key, value laid out as transformers hands them over: (1, H, T, D) views of (1, T, H, D) projections."""
    generator = torch.Generator().manual_seed(seed)
    made = [torch.randn(1, length, h, dim, generator=generator).to(dtype).transpose(1, 2).requires_grad_() for h in (heads, kv_heads, kv_heads)]
    grad = torch.randn(1, length, heads, dim, generator=generator).to(dtype)
    return made, grad


def _reference(query, key, value, grad, scaling):
    """PyTorch's causal attention in float64: (output as (1, T, H, D), dquery, dkey, dvalue)."""
    q, k, v = (x.detach().double().requires_grad_() for x in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True).transpose(1, 2)
    out.backward(grad.double())
    return out, q.grad, k.grad, v.grad


def _error(got, expected) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


def _mine(query, key, value, grad, scaling, keep_probs):
    out = causal_attention.causal_attention(query, key, value, scaling, keep_probs)
    out.backward(grad)
    return out, query.grad, key.grad, value.grad


# Lengths around the block size (one query, one block, a block and one, several blocks), generated head groupings.
CASES = [(length, heads, kv) for length, (heads, kv) in zip([1, 2, 127, 128, 129, 300, 513], [(4, 4), (12, 12), (9, 3), (4, 1), (6, 2), (12, 12), (9, 3)])]
random.seed(8)
CASES += [(random.randint(1, 600), 6, random.choice([1, 2, 3, 6])) for _ in range(4)]


@pytest.mark.parametrize("keep_probs", [True, False], ids=["probs-kept", "probs-recomputed"])
@pytest.mark.parametrize("length,heads,kv_heads", CASES)
def test_fp32_block_attention_equals_pytorch_causal_attention(length, heads, kv_heads, keep_probs):
    inputs, grad = _inputs(length, heads, kv_heads, 16, torch.float32, seed=length)
    mine = _mine(*inputs, grad, 0.3, keep_probs)
    for got, expected in zip(mine, _reference(*inputs, grad, 0.3)):
        assert got.shape == expected.shape
        assert torch.allclose(got.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("length,heads,kv_heads", [(200, 12, 12), (300, 9, 3)])
def test_bf16_block_attention_is_as_close_to_exact_as_pytorchs_flash_kernel(length, heads, kv_heads):
    """Rounded to bf16, both err by a few thousandths of the exact result; block attention by at most twice the kernel's error."""
    inputs, grad = _inputs(length, heads, kv_heads, 64, torch.bfloat16, seed=1)
    exact = _reference(*inputs, grad, 0.125)
    mine = _mine(*inputs, grad, 0.125, True)
    for x in inputs:
        x.grad = None
    flash = F.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=True).transpose(1, 2)
    flash.backward(grad)
    flash = (flash, *(x.grad for x in inputs))
    for got, theirs, expected in zip(mine, flash, exact):
        assert got.dtype == torch.bfloat16
        assert _error(got, expected) < 1e-2 and _error(got, expected) <= 2 * _error(theirs, expected) + 1e-3


def test_recomputed_probabilities_give_the_kept_ones_gradients_bit_for_bit():
    inputs, grad = _inputs(300, 6, 2, 32, torch.bfloat16, seed=3)
    kept = [t.clone() for t in _mine(*inputs, grad, 0.2, True)]
    for x in inputs:
        x.grad = None
    recomputed = _mine(*inputs, grad, 0.2, False)
    assert all(torch.equal(a, b) for a, b in zip(kept, recomputed))


def test_under_autocast_mixed_inputs_are_cast_as_sdpa_casts_them():
    """Rotary embeddings leave queries and keys in fp32 and values in bf16 under autocast; SDPA casts all to bf16."""
    (query, key, value), grad = _inputs(70, 4, 2, 16, torch.float32, seed=4)
    value = value.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_attention.causal_attention(query, key, value, 0.25)
    assert out.dtype == torch.bfloat16
    out.float().backward(grad)
    assert (query.grad.dtype, key.grad.dtype, value.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_a_packed_batch_trains_the_same_by_blocks_as_by_pytorchs_attention(fixture, request):
    """The model's loss and every weight gradient, fp32, per-example attention by SDPA against by blocks (no dropout: eval mode)."""
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), attn_implementation="sdpa").eval()
    examples = [{"input_ids": [(7 * i + 3 * n) % 1000 for i in range(length)]} for n, length in enumerate([150, 3, 200])]
    batch = batching.collator(True, 0, per_example=True)(examples)
    results = []
    for blocks in (False, True):
        assert attention.use_per_example_attention(model, blocks=blocks)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (loss_sdpa, grads_sdpa), (loss_blocks, grads_blocks) = results
    assert torch.allclose(loss_blocks, loss_sdpa, atol=1e-5)
    for name, grad in grads_sdpa.items():
        assert torch.allclose(grads_blocks[name], grad, atol=1e-5, rtol=1e-3), name


def test_block_attention_steps_aside_for_what_only_sdpa_does(tiny_gpt2, monkeypatch):
    """Attention dropout goes to SDPA: a model with it never calls block attention."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, attn_implementation="sdpa", attn_pdrop=0.5).train()
    calls = []
    monkeypatch.setattr(attention, "causal_attention", lambda *a, **k: calls.append(1))
    assert attention.use_per_example_attention(model, blocks=True)
    model(**batching.collator(True, 0, per_example=True)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}]))
    assert calls == []


def test_probabilities_are_kept_in_full_mode_and_recomputed_in_the_memory_modes():
    from peftgen import config as config_lib

    def keeps(**settings):
        return config_lib.resolve(None, {"train_file": "x", **settings}).keeps_attention_probs

    assert keeps(mode="full") and not keeps(mode="lora") and not keeps(mode="8bit")
    assert keeps(mode="lora", keep_attention_probs=True) and not keeps(mode="full", keep_attention_probs=False)


def test_training_switches_the_model_to_the_attention_its_settings_name(tiny_gpt2, tmp_path):
    from peftgen import config as config_lib
    from peftgen import training as train_lib

    for settings, expected in [
        ({}, "peftgen_per_example_blocks"),
        ({"mode": "full"}, "peftgen_per_example_blocks_kept"),
        ({"block_attention": False}, "peftgen_per_example"),
    ]:
        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, attn_implementation="sdpa")
        config = config_lib.resolve(None, {"train_file": "x", "model": str(tiny_gpt2), **settings})
        train_lib.speed_settings(config, model, _tokenizer(tiny_gpt2), "fp32")
        assert model.config._attn_implementation == expected


def _tokenizer(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
