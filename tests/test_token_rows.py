"""The direct forward of the new tokens' rows gives PEFT's outputs and gradients, and PEFT's saved format."""

import pytest
import torch

from peftgen import config as config_lib
from peftgen import model as model_lib
from peftgen import token_rows


def _lora(base, fast: bool):
    settings = {"model": str(base), "mode": "lora", "train_file": "x", "lora_r": 4, "lora_alpha": 8, "fast_token_rows": fast}
    torch.manual_seed(0)
    model = model_lib.prepare_for_training(config_lib.resolve(None, settings))[0]
    with torch.no_grad():  # new rows that differ from the base rows they replace
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    return model


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_outputs_and_gradients_equal_peft_forward(fixture, request):
    base = request.getfixturevalue(fixture)
    fast, slow = _lora(base, True), _lora(base, False)
    ids = torch.tensor([[50257, 464, 50258, 1468, 50259], [50258, 318, 257, 50257, 50258]])  # new ids inside
    results = []
    for model in (fast, slow):
        model.train()
        torch.manual_seed(1)
        logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (fast_logits, fast_grads), (slow_logits, slow_grads) = results
    assert torch.allclose(fast_logits, slow_logits, atol=1e-5)
    assert fast_grads.keys() == slow_grads.keys() and any("trainable_tokens_delta" in n for n in fast_grads)
    for name in fast_grads:
        assert torch.allclose(fast_grads[name], slow_grads[name], atol=1e-6), name


def test_speed_up_covers_every_token_layer_once(tiny_llama):
    model = _lora(tiny_llama, True)
    assert token_rows.speed_up(model) == 0  # prepare_for_training already did it, and not twice
    slow = _lora(tiny_llama, False)
    assert token_rows.speed_up(slow) == 2  # untied Llama: input and output embeddings


def test_a_saved_run_loads_in_plain_peft_with_the_same_logits(tiny_gpt2, make_run):
    from peft import AutoPeftModelForCausalLM

    run = make_run("lora", tiny_gpt2)
    ours, _ = model_lib.load(run)
    plain = AutoPeftModelForCausalLM.from_pretrained(run).eval()
    ids = torch.tensor([[50257, 464, 1468, 50258]])
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
