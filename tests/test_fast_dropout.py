"""Fast dropout: the same Bernoulli(1 - p) mask and scaling as torch's, drawn from 16-bit integers."""

import pytest
import torch

from peftgen import config as config_lib
from peftgen import model as model_lib
from peftgen.fast_dropout import FastDropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1 / 3])
def test_the_keep_rate_is_one_minus_p(p):
    torch.manual_seed(0)
    kept = keep_mask((1000, 1000), p).float().mean().item()
    assert abs(kept - (1 - p)) < 5e-3  # 1e6 draws: the standard error is below 5e-4


def test_each_of_the_four_draws_in_a_random_word_is_fair():
    # Each 64-bit number gives four 16-bit draws; a biased lane (a sign bit always 0) would show here.
    torch.manual_seed(0)
    kept = keep_mask((4 * 250_000,), 0.5).view(-1, 4).float().mean(0)
    assert torch.allclose(kept, torch.full((4,), 0.5), atol=5e-3)


def test_masks_depend_on_the_seed_and_repeat_with_it():
    torch.manual_seed(1)
    first = keep_mask((64, 64), 0.1)
    torch.manual_seed(1)
    assert torch.equal(first, keep_mask((64, 64), 0.1))
    assert not torch.equal(first, keep_mask((64, 64), 0.1))


def test_kept_elements_are_scaled_and_the_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    drop = FastDropout(0.25).train()
    x = torch.randn(300, 70, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert 0.7 < kept.float().mean() < 0.8
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, kept.float() / 0.75)


def test_it_is_torchs_dropout_in_evaluation_and_at_p_zero():
    x = torch.randn(10, 10)
    assert torch.equal(FastDropout(0.5).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)


def test_training_makes_the_models_dropouts_fast_unless_switched_off(tiny_gpt2):
    settings = {"model": str(tiny_gpt2), "mode": "full", "train_file": "x"}
    model = model_lib.prepare_for_training(config_lib.resolve(None, settings))[0]
    plain = model_lib.prepare_for_training(config_lib.resolve(None, {**settings, "fast_dropout": False}))[0]
    assert any(isinstance(m, FastDropout) for m in model.modules())
    assert not any(isinstance(m, FastDropout) for m in plain.modules())
