"""The fused output layer + cross-entropy equals the plain one, in value and in every gradient."""

import pytest
import torch
import torch.nn.functional as F

from peftgen import config as config_lib
from peftgen import model as model_lib
from peftgen.fused_loss import FusedHeadLoss, linear_cross_entropy


def _problem(n=300, c=32, v=1000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=generator).requires_grad_()
    weight = torch.randn(v, c, generator=generator).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=generator)
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [7, 128, 1000])
def test_value_and_gradients_equal_linear_then_cross_entropy(chunk):
    hidden, weight, labels = _problem()
    expected = F.cross_entropy(F.linear(hidden, weight), labels, reduction="sum")
    expected.backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    got = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    (got * 0.25).backward()  # the incoming gradient scales every result
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.allclose(hidden.grad, want_h * 0.25, atol=1e-5)
    assert torch.allclose(weight.grad, want_w * 0.25, atol=1e-5)


@pytest.mark.parametrize("chunk, block", [(7, 14), (7, 20), (128, 256), (64, 4096)])
def test_the_weight_gradient_is_the_same_whatever_blocks_it_is_formed_in(chunk, block, monkeypatch):
    # the head's weight gradient is one matmul per block of chunks; a last block may be partial
    from peftgen import fused_loss

    monkeypatch.setattr(fused_loss, "WEIGHT_BLOCK", block)
    hidden, weight, labels = _problem()
    F.cross_entropy(F.linear(hidden, weight), labels, reduction="sum").backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    linear_cross_entropy(hidden, weight, labels, chunk=chunk).backward()
    assert torch.allclose(hidden.grad, want_h, atol=1e-5)
    assert torch.allclose(weight.grad, want_w, atol=1e-5)


def test_trainable_rows_replace_base_rows_and_only_they_get_a_gradient():
    hidden, weight, labels = _problem()
    frozen = weight.detach()
    index = torch.tensor([3, 500, 999])
    labels[:40] = index[torch.arange(40) % 3]  # the new tokens are targets too
    delta = torch.randn(3, 32).requires_grad_()
    expected = F.cross_entropy(F.linear(hidden, frozen.index_copy(0, index, delta)), labels, reduction="sum")
    expected.backward()
    want_h, want_d = hidden.grad.clone(), delta.grad.clone()
    hidden.grad = delta.grad = None

    got = linear_cross_entropy(hidden, frozen, labels, delta=delta, index=index, chunk=64)
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.allclose(hidden.grad, want_h, atol=1e-5)
    assert torch.allclose(delta.grad, want_d, atol=1e-5)
    assert frozen.grad is None


def test_under_bf16_autocast_it_stays_close_to_fp32():
    hidden, weight, labels = _problem()
    exact = F.cross_entropy(F.linear(hidden, weight), labels, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, labels)
    assert got.dtype == torch.float32
    assert abs(got.item() - exact.item()) / exact.item() < 1e-2


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_model_loss_through_the_bypassed_head_equals_transformers_loss(mode, tiny_gpt2):
    settings = {"model": str(tiny_gpt2), "mode": mode, "train_file": "x", "lora_r": 4, "lora_alpha": 8}
    model = model_lib.prepare_for_training(config_lib.resolve(None, settings))[0].eval()
    base = model.get_base_model() if mode != "full" else model
    base.loss_type = "ForCausalLM"
    ids = torch.tensor([[50257, 464, 1468, 50258, 50259], [50257, 318, 257, 1332, 50258]])
    labels = ids.masked_fill(ids == 50259, -100)
    expected = model(input_ids=ids, labels=labels).loss
    loss = FusedHeadLoss(model)
    with loss.bypass():
        outputs = model(input_ids=ids)
    assert outputs.logits.shape == (2, 5, base.config.n_embd)  # hidden states, not logits
    assert torch.allclose(loss(outputs, labels), expected, atol=1e-5)
    assert model(input_ids=ids).logits.shape[-1] == 50260  # the head is back after the bypass


def test_architectures_with_a_head_it_cannot_fuse_are_refused(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    model.config.model_type = "gemma2"  # logit softcapping after the head
    assert not FusedHeadLoss.supports(model)
    with pytest.raises(ValueError):
        FusedHeadLoss(model)


def test_a_given_dtype_sets_the_matmul_precision_without_autocast():
    # Trainer autocasts only the model's forward; the loss runs after it, so
    # the run's dtype is handed over, and the head multiplies in it.
    hidden, weight, labels = _problem()
    in_bf16 = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().T).float(), labels, reduction="sum")
    in_fp32 = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    got = linear_cross_entropy(hidden, weight, labels, dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    assert torch.allclose(got, in_bf16, rtol=1e-6)
    assert not torch.allclose(got, in_fp32, rtol=1e-6)  # the two precisions are told apart at this tolerance
    assert torch.allclose(linear_cross_entropy(hidden, weight, labels), in_fp32, rtol=1e-6)


def test_training_hands_the_runs_dtype_to_the_loss(tiny_gpt2):
    from peftgen.training import speed_settings

    settings = {"model": str(tiny_gpt2), "mode": "lora", "train_file": "x", "lora_r": 4, "lora_alpha": 8}
    model, tokenizer, _ = model_lib.prepare_for_training(config_lib.resolve(None, settings))
    config = config_lib.resolve(None, settings)
    assert speed_settings(config, model, tokenizer, "bf16")[2].dtype == torch.bfloat16
    assert speed_settings(config, model, tokenizer, "fp32")[2].dtype is None


@pytest.mark.parametrize("n, chunk, multiple", [(300, 128, 64), (256, 128, 64), (5, 128, 64), (300, 7, 64), (130, 8, 512), (1, 4, 3)])
def test_rows_padded_to_a_multiple_change_no_value_and_no_gradient(n, chunk, multiple):
    hidden, weight, labels = _problem(n=n)
    index = torch.tensor([3, 500, 999])
    delta = torch.randn(3, 32).requires_grad_()
    results = []
    for rows in (1, multiple):
        for tensor in (hidden, weight, delta):
            tensor.grad = None
        head = linear_cross_entropy(hidden, weight, labels, chunk=chunk, row_multiple=rows)  # the trained head's path
        rows_path = linear_cross_entropy(hidden, weight.detach(), labels, delta=delta, index=index, chunk=chunk, row_multiple=rows)  # new-token rows
        (head + rows_path).backward()
        results.append((head.detach(), rows_path.detach(), hidden.grad.clone(), weight.grad.clone(), delta.grad.clone()))
    for plain, padded in zip(*results):
        assert torch.allclose(padded, plain, rtol=1e-5, atol=1e-5)  # products of other shapes sum in another order
    assert results[1][2].shape == (n, 32)
