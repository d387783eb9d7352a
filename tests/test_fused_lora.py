"""The fused LoRA forward gives PEFT's outputs and gradients, and steps aside where it does not apply."""

import pytest
import torch
from peft.tuners.lora.layer import Linear

from peftgen import config as config_lib
from peftgen import model as model_lib
from peftgen.fused_lora import _forward

IDS = torch.tensor([[50257, 464, 1468, 50258, 318], [50257, 257, 1332, 11, 50258]])


def _lora(base, fused: bool, precision: str = "fp32", **extra):
    settings = {"model": str(base), "mode": "lora", "train_file": "x", "lora_r": 4, "lora_alpha": 8, "fused_lora": fused, **extra}
    torch.manual_seed(0)
    model = model_lib.prepare_for_training(config_lib.resolve(None, settings), precision)[0]
    with torch.no_grad():  # B starts at zero; make the adapters count
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval()  # no dropout draws to tell the two apart; gradients still flow


def _step(model, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=IDS).logits
    logits.float().pow(2).mean().backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_fp32_outputs_and_gradients_equal_peft_forward(fixture, request):
    base = request.getfixturevalue(fixture)
    fused, plain = _lora(base, True), _lora(base, False)
    assert all(m.forward.__func__ is _forward for m in fused.modules() if type(m) is Linear)
    (got, got_grads), (want, want_grads) = _step(fused, False), _step(plain, False)
    assert torch.allclose(got, want, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and any("lora_A" in n for n in got_grads)
    for name in got_grads:
        assert torch.allclose(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_under_bf16_autocast_it_is_as_close_to_fp32_as_pefts_forward(fixture, request):
    # Under bf16 neither path equals fp32; the fused one rounds base + scaled adapter once
    # where PEFT rounds three times. Both are measured against the fp32 result: the fused
    # one must be of the same order (a wrong scale or a dropped term is off by 100%).
    base = request.getfixturevalue(fixture)
    exact, exact_grads = _step(_lora(base, False), False)
    errors = {}
    for fused in (True, False):
        got, grads = _step(_lora(base, fused, "bf16"), True)
        worst = max(((grads[n] - exact_grads[n]).norm() / exact_grads[n].norm()).item() for n in grads if "lora_" in n)
        errors[fused] = ((got - exact).abs().max() / exact.abs().max()).item(), worst
    assert errors[True][0] < max(3 * errors[False][0], 0.02)
    assert errors[True][1] < max(3 * errors[False][1], 0.05)


def test_peft_forward_runs_where_the_fused_one_does_not_apply(tiny_gpt2):
    # lora_dropout > 0, and adapters switched off: PEFT's own forward, the same numbers as without the patch.
    fused = _lora(tiny_gpt2, True, lora_dropout=0.5).eval()
    plain = _lora(tiny_gpt2, False, lora_dropout=0.5).eval()
    layer = next(m for m in fused.modules() if type(m) is Linear)
    assert layer.forward.__func__ is _forward
    with torch.no_grad():
        assert torch.equal(fused(input_ids=IDS).logits, plain(input_ids=IDS).logits)
        with fused.disable_adapter(), plain.disable_adapter():
            assert torch.equal(fused(input_ids=IDS).logits, plain(input_ids=IDS).logits)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_a_base_layer_swapped_in_later_computes_with_its_own_forward(fixture, request):
    # The generation engine wraps each fp32 linear layer for few-row products
    # (generation/fast.py), LoRA's base layers included, after the fused
    # forward was attached: the sum must still be PEFT's, whatever the base.
    from peftgen.generation.fast import skinny_matmuls

    base = request.getfixturevalue(fixture)
    fused, plain = _lora(base, True), _lora(base, False)
    ids = IDS[:, :1]  # one token a row, as in a decoding step
    with torch.no_grad(), skinny_matmuls(fused), skinny_matmuls(plain):
        layers = [m for m in fused.modules() if type(m) is Linear]
        assert layers and all(type(m.base_layer).__name__ == "_Skinny" for m in layers)
        assert torch.allclose(fused(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
