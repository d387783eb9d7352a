"""Training-time model changes: attention dropout set where the model reads it, frozen weights in bf16 changing nothing."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from peftgen import config as config_lib, efficiency, model as model_lib

IDS = torch.tensor([[50256, 464, 1468, 1110, 318, 257]])


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_attention_dropout_zero_makes_a_training_forward_deterministic(fixture, request):
    # Every dropout but the attention one is off, so only attention dropout can make two passes differ.
    others = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.5} if fixture == "tiny_gpt2" else {"attention_dropout": 0.5}
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), **others).train()
    assert not torch.equal(model(input_ids=IDS).logits, model(input_ids=IDS).logits)
    efficiency.set_attention_dropout(model, 0.0)
    assert torch.equal(model(input_ids=IDS).logits, model(input_ids=IDS).logits)
    assert torch.allclose(model(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits, atol=1e-6)


@pytest.mark.parametrize("mode", ["lora", "8bit"])
def test_frozen_bf16_weights_compute_what_autocast_computes(mode, tiny_gpt2):
    if mode == "8bit":
        pytest.importorskip("bitsandbytes")
    settings = {"model": str(tiny_gpt2), "mode": mode, "train_file": "x", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    models = {}
    for frozen_bf16 in (True, False):
        torch.manual_seed(0)
        config = config_lib.resolve(None, {**settings, "frozen_bf16": frozen_bf16})
        models[frozen_bf16] = model_lib.prepare_for_training(config, "bf16")[0].eval()
    dtypes = {name: p.dtype for name, p in models[True].named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stored, cast = (models[flag](input_ids=IDS).logits for flag in (True, False))
    assert torch.equal(stored, cast)
    assert dtypes["base_model.model.transformer.h.0.mlp.c_fc.base_layer.bias"] == torch.bfloat16
    assert dtypes["base_model.model.transformer.wte.token_adapter.base_layer.weight"] == torch.float32  # tied head too
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "lora_" in name or "delta" in name)


def test_frozen_weights_stay_fp32_unless_training_in_bf16(tiny_gpt2):
    config = config_lib.resolve(None, {"model": str(tiny_gpt2), "mode": "lora", "train_file": "x"})
    model = model_lib.prepare_for_training(config, "fp32")[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_fused_gelu_computes_gpt2s_gelu_new(tiny_gpt2):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        assert efficiency.fuse_activations(model) == model.config.n_layer
        after = model(input_ids=IDS).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert efficiency.fuse_activations(model) == 0


def test_own_weights_lets_the_mapped_weights_file_go(tiny_gpt2):
    import gc

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    weights = str(tiny_gpt2 / "model.safetensors")

    def mapped() -> bool:
        gc.collect()
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return any(line.rstrip().endswith(weights) for line in maps)

    if not mapped():
        pytest.skip("transformers read the file without mapping it here")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert efficiency.own_weights(model) > 0
    assert not mapped()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
