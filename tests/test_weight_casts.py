"""Full fine-tuning's linear layers recast their weights instead of keeping autocast's bf16 copies."""

import pytest
import torch
from tiny_runs import bf16_step

from peftgen.weight_casts import _RecastLinear, recast_weights


def _gpt2(tiny_gpt2, recast: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32)
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, config=model.config, dtype=torch.float32)
    model.train()
    if recast:
        assert recast_weights(model) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per layer; the tied head is left alone
    return model


@pytest.mark.parametrize("transposed", [False, True])
def test_the_layer_computes_what_autocast_computes(transposed):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 24, generator=generator).requires_grad_()
    weight = torch.randn(24, 16, generator=generator) if transposed else torch.randn(16, 24, generator=generator)
    weight.requires_grad_()
    bias = torch.randn(16, generator=generator).requires_grad_()
    grad = torch.randn(3, 40, 16, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.addmm(bias, x.view(-1, 24), weight).view(3, 40, 16) if transposed else torch.nn.functional.linear(x, weight, bias)
    want.backward(grad)
    wants = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    got = _RecastLinear.apply(x, weight, bias, torch.bfloat16, transposed)
    got.backward(grad)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    for t, w in zip((x, weight, bias), wants):
        assert t.grad.dtype == torch.float32
        assert torch.allclose(t.grad, w, rtol=1e-2, atol=1e-2 * w.abs().max().item())


def test_a_recast_model_learns_what_the_model_learns(tiny_gpt2):
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    logits, grads = bf16_step(_gpt2(tiny_gpt2, recast=False), ids)
    got_logits, got_grads = bf16_step(_gpt2(tiny_gpt2, recast=True), ids)
    assert torch.equal(got_logits, logits)
    for name, grad in grads.items():
        assert (got_grads[name] - grad).abs().max() <= 1e-2 * grad.abs().max().clamp(min=1e-12), name


def test_no_bf16_copy_of_a_weight_is_kept_for_the_backward_pass(tiny_gpt2):
    ids = torch.randint(0, 50257, (1, 30), generator=torch.Generator().manual_seed(1))

    def bf16_weights_kept(model):
        shapes = {tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2 and "wte" not in n and "wpe" not in n}
        kept = []

        def pack(t):
            if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes:
                kept.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().sum().backward()  # frees what the graph kept
        return kept

    assert len(bf16_weights_kept(_gpt2(tiny_gpt2, recast=False))) >= 8
    assert bf16_weights_kept(_gpt2(tiny_gpt2, recast=True)) == []


def test_outside_autocast_layers_are_the_models_own(tiny_gpt2):
    ids = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_gpt2(tiny_gpt2, recast=True)(input_ids=ids).logits, _gpt2(tiny_gpt2, recast=False)(input_ids=ids).logits)


@pytest.mark.parametrize("precision, expected", [("bf16", True), ("fp32", False)])
def test_full_training_recasts_under_autocast_when_asked(precision, expected, tiny_gpt2, text_files, tmp_path):
    from tiny_runs import run_settings

    from peftgen import config as config_lib
    from peftgen.model.training import prepare_for_training

    def recasting(**overrides):
        config = config_lib.resolve(None, run_settings(tiny_gpt2, text_files, tmp_path, "full", **overrides))
        model, _, _ = prepare_for_training(config, precision)
        return "forward" in vars(model.transformer.h[0].mlp.c_fc)

    assert recasting(recast_weights=True) is expected
    assert recasting() is False  # off by default: it cost speed in the benchmark
