"""Lean Llama layers compute what the model computes and keep less for the backward pass."""

import contextlib
import weakref

import pytest
import torch
from tiny_runs import bf16_step

from peftgen.lean_layers import use_lean_layers


def _llama(tiny_llama, lean: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.train()
    if lean:
        assert use_lean_layers(model) == 2 * 3 + 1  # per layer two norms and an MLP; the final norm
    return model


def test_lean_layers_give_the_same_logits_and_gradients(tiny_llama):
    ids = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    logits, grads = bf16_step(_llama(tiny_llama, lean=False), ids)
    lean_logits, lean_grads = bf16_step(_llama(tiny_llama, lean=True), ids)
    assert torch.equal(lean_logits, logits)  # the forward pass is bit for bit the model's
    for name, grad in grads.items():
        # the norm's gradient sums three bf16 gradients in bf16: agreement to bf16 rounding
        scale = grad.abs().max().clamp(min=1e-12)
        assert (lean_grads[name] - grad).abs().max() / scale < 2e-2, name


def test_rmsnorm_gradient_is_the_textbook_one_in_fp32():
    from peftgen.lean_layers import _RMSNormOnce

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 16, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(16, generator=generator, dtype=torch.float64).requires_grad_()
    out = _RMSNormOnce.apply(x, weight, 1e-6, torch.float64)
    expected = weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(out, expected)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormOnce.apply(a, b, 1e-6, torch.float64), (x, weight))


def test_gated_product_is_exact_in_value_and_gradient():
    from peftgen.lean_layers import _SiLUProduct

    generator = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(64, 96, generator=generator).bfloat16().requires_grad_() for _ in range(2))
    grad = torch.randn(64, 96, generator=generator).bfloat16()
    (torch.nn.functional.silu(gate) * up).backward(grad)
    want = gate.grad.clone(), up.grad.clone()
    gate.grad = up.grad = None
    out = _SiLUProduct.apply(gate, up)
    out.backward(grad)
    assert torch.equal(out, torch.nn.functional.silu(gate) * up)
    assert torch.equal(gate.grad, want[0]) and torch.equal(up.grad, want[1])


def _saved_bytes(model, ids) -> int:
    """Bytes of activations the decoder layers keep for the backward pass (distinct storages, weights and their casts left out)."""
    seen: dict[int, int] = {}
    weight_shapes = {tuple(p.shape) for p in model.parameters()}

    def pack(t):
        if tuple(t.shape) not in weight_shapes:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.model(input_ids=ids)
    return sum(seen.values())


def test_lean_layers_keep_less_for_the_backward_pass(tiny_llama):
    ids = torch.randint(0, 50257, (1, 200), generator=torch.Generator().manual_seed(1))
    plain = _saved_bytes(_llama(tiny_llama, lean=False), ids)
    lean = _saved_bytes(_llama(tiny_llama, lean=True), ids)
    assert lean < 0.75 * plain, (lean, plain)


def test_outside_autocast_the_norm_is_the_models_own(tiny_llama):
    ids = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _llama(tiny_llama, lean=False)(input_ids=ids).logits
        got = _llama(tiny_llama, lean=True)(input_ids=ids).logits
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_other_architectures_are_left_alone(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    assert use_lean_layers(AutoModelForCausalLM.from_pretrained(tiny_gpt2)) == 0


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_training_switches_them_on_unless_told_otherwise(mode, tiny_llama, text_files, tmp_path):
    from tiny_runs import run_settings

    from peftgen import config as config_lib
    from peftgen.model.training import prepare_for_training

    def norm_is_lean(**overrides):
        config = config_lib.resolve(None, run_settings(tiny_llama, text_files, tmp_path, mode, **overrides))
        model, _, _ = prepare_for_training(config, "bf16")
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        return all("forward" in vars(m) for m in norms)

    assert norm_is_lean()
    assert not norm_is_lean(lean_layers=False)


def test_the_down_projection_input_is_recomputed_bit_for_bit(tiny_llama):
    ids = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(2))
    recomputed = bf16_step(_llama(tiny_llama, lean=True), ids)
    # Other saved-tensor hooks in effect (here a pair that changes nothing) leave the product kept as it is.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        kept = bf16_step(_llama(tiny_llama, lean=True), ids)
    assert torch.equal(recomputed[0], kept[0])
    for name, grad in kept[1].items():
        assert torch.equal(recomputed[1][name], grad), name


@pytest.mark.parametrize("other_hooks", [False, True])
def test_the_gated_product_is_not_kept_for_the_down_projection(tiny_llama, other_hooks):
    model = _llama(tiny_llama, lean=True)
    mlp = model.model.layers[0].mlp
    products = []
    mlp.down_proj.register_forward_pre_hook(lambda module, args: products.append(weakref.ref(args[0])))
    x = torch.randn(1, 20, model.config.hidden_size, requires_grad=True)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if other_hooks else contextlib.nullcontext()
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x)
    # Kept by the down projection for its weight's gradient unless recomputed; recomputed only without other hooks.
    assert (products[0]() is not None) == other_hooks
    out.float().sum().backward()
    assert x.grad is not None and mlp.down_proj.weight.grad is not None
