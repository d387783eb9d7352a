"""Training-time model changes: attention dropout set where the model reads it, frozen weights in bf16 changing nothing."""

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftgen import config as config_lib
from peftgen import efficiency
from peftgen import model as model_lib
from peftgen.errors import PeftgenError

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
        config = config_lib.resolve(None, {**settings, "frozen_bf16": frozen_bf16, "frozen_embeddings_bf16": False})
        models[frozen_bf16] = model_lib.prepare_for_training(config, "bf16")[0].eval()
    dtypes = {name: p.dtype for name, p in models[True].named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stored, cast = (models[flag](input_ids=IDS).logits for flag in (True, False))
    assert torch.equal(stored, cast)
    assert dtypes["base_model.model.transformer.h.0.mlp.c_fc.base_layer.bias"] == torch.bfloat16
    assert dtypes["base_model.model.transformer.wte.token_adapter.base_layer.weight"] == torch.float32  # tied head too
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "lora_" in name or "delta" in name)


@pytest.mark.parametrize("mode", ["lora", "8bit"])
def test_bf16_embeddings_compute_what_fp32_embeddings_rounded_to_bf16_compute(mode, tiny_gpt2):
    if mode == "8bit":
        pytest.importorskip("bitsandbytes")
    settings = {"model": str(tiny_gpt2), "mode": mode, "train_file": "x", "lora_r": 4, "lora_alpha": 8}
    models = {}
    for flag in (True, False):
        torch.manual_seed(0)
        config = config_lib.resolve(None, {**settings, "frozen_embeddings_bf16": flag})
        models[flag] = model_lib.prepare_for_training(config, "bf16")[0].eval()
    stored = dict(models[True].named_parameters())
    wte = "base_model.model.transformer.wte.token_adapter.base_layer.weight"
    assert stored[wte].dtype == torch.bfloat16  # the tied head with it
    assert all(p.dtype == torch.float32 for name, p in stored.items() if "lora_" in name or "delta" in name)
    with torch.no_grad():  # the reference: fp32 matrices holding the bf16-rounded values
        for name, param in models[False].named_parameters():
            if name.endswith(("wte.token_adapter.base_layer.weight", "wpe.weight")):
                param.copy_(param.bfloat16().float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = (models[flag](input_ids=IDS, output_hidden_states=True) for flag in (True, False))
    assert got.hidden_states[0].dtype == torch.float32  # the residual stream starts in fp32 as before
    assert torch.equal(got.hidden_states[0], want.hidden_states[0])
    assert torch.equal(got.logits, want.logits)


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


def _resident_bytes_of(path: str) -> int:
    """Bytes of ``path``'s mappings in this process that are in memory (Rss in /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0]:  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def test_released_pages_leave_memory_and_read_back_unchanged(tiny_gpt2):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    weights = str(tiny_gpt2 / "model.safetensors")
    if not efficiency._file_mappings():
        pytest.skip("transformers read the file without mapping it here")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}  # reads every page
    wte = model.transformer.wte.weight
    assert not efficiency.release_mapped(wte.data, model)  # the model still uses it: kept
    old = wte.data
    wte.data = old.clone()
    resident = _resident_bytes_of(weights)
    assert efficiency.release_mapped(old, model)
    assert resident - _resident_bytes_of(weights) >= old.numel() * old.element_size() - 2 * 4096  # 12.9 MB left memory
    assert torch.equal(old, before["transformer.wte.weight"])  # read again from the file, as it was
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_int8_layers_keep_no_input_for_a_weight_gradient_they_never_have(tiny_gpt2):
    pytest.importorskip("bitsandbytes")
    import gc
    import weakref

    from bitsandbytes.autograd import _functions

    model, _ = model_lib.load_pretrained(str(tiny_gpt2), quantize_8bit=True)
    layer = model.transformer.h[0].mlp.c_fc.train()
    efficiency.lean_int8_matmul()
    lean = _functions.MatMul8bitFp.forward

    def run(forward):
        _functions.MatMul8bitFp.forward = staticmethod(forward)
        torch.manual_seed(0)
        x = torch.randn(2, 3, 64, requires_grad=True)
        inner = x * 2  # an activation only the layer could keep alive
        kept = weakref.ref(inner)
        out = layer(inner)
        del inner
        gc.collect()
        alive = kept() is not None
        out.square().sum().backward()
        return alive, x.grad

    try:
        original_alive, original_grad = run(lean._peftgen_original)
        lean_alive, lean_grad = run(lean)
    finally:
        _functions.MatMul8bitFp.forward = staticmethod(lean)
    assert original_alive and not lean_alive
    assert torch.equal(original_grad, lean_grad)
    assert efficiency.lean_int8_matmul()  # applying it again changes nothing
    assert _functions.MatMul8bitFp.forward is lean


def test_the_lean_8bit_load_gives_the_same_int8_weights(tiny_gpt2):
    pytest.importorskip("bitsandbytes")
    from peftgen.model import loading

    lean, _ = loading.load_pretrained(str(tiny_gpt2), quantize_8bit=True)
    original = loading._lean_8bit_load
    loading._lean_8bit_load = __import__("contextlib").nullcontext
    try:
        plain, _ = loading.load_pretrained(str(tiny_gpt2), quantize_8bit=True)
    finally:
        loading._lean_8bit_load = original
    lean_state, plain_state = lean.state_dict(), plain.state_dict()
    assert lean_state.keys() == plain_state.keys()
    assert all(torch.equal(lean_state[k], plain_state[k]) for k in lean_state)
    assert any(v.dtype == torch.int8 for v in lean_state.values())


@pytest.mark.parametrize("share, checkpointed", [(1.0, [True, True]), (0.5, [True, False]), (0.2, [False, False])])
def test_checkpoint_layers_recomputes_the_first_share_of_layers_and_learns_the_same(share, checkpointed, tiny_gpt2):
    settings = {"model": str(tiny_gpt2), "mode": "lora", "train_file": "x", "lora_r": 4, "lora_dropout": 0.0}
    grads = {}
    for value in (share, None):
        torch.manual_seed(0)
        config = config_lib.resolve(None, {**settings, "gradient_checkpointing": value is not None, "checkpoint_layers": value or 1.0})
        model = model_lib.prepare_for_training(config, "fp32")[0].train()
        if value is not None:
            assert [block.gradient_checkpointing for block in model.base_model.model.transformer.h] == checkpointed
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads[value] = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(torch.allclose(grads[share][name], grads[None][name], atol=1e-6) for name in grads[None])


@pytest.mark.parametrize("share", [0, -0.5, 1.5])
def test_checkpoint_layers_outside_zero_to_one_is_refused(share):
    with pytest.raises(PeftgenError, match="checkpoint_layers"):
        config_lib.resolve(None, {"mode": "lora", "train_file": "x", "checkpoint_layers": share}).validate()


def test_lora_recomputes_a_quarter_of_its_layers_unless_told_otherwise():
    def share(**settings):
        return config_lib.resolve(None, {"train_file": "x", **settings}).checkpointed_share

    assert share(mode="lora") == 0.25
    assert share(mode="8bit") == share(mode="full") == 1.0
    assert share(mode="lora", checkpoint_layers=1.0) == 1.0


def _faults_touching_a_fresh_block(size: int = 64 << 20) -> int:
    """Page faults taken while filling a block of ``size`` bytes allocated after an equal one was freed."""
    import resource

    first = torch.empty(size, dtype=torch.uint8)
    first.fill_(1)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.empty(size, dtype=torch.uint8)
    second.fill_(2)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(efficiency._libc() is None or not hasattr(efficiency._libc(), "mallopt"), reason="needs glibc")
def test_reusing_freed_memory_keeps_large_blocks_for_the_next_step():
    pages = (64 << 20) // 4096
    assert _faults_touching_a_fresh_block() > pages // 2  # glibc's default: unmapped when freed, fresh pages again
    with efficiency.reusing_freed_memory():
        _faults_touching_a_fresh_block()  # the heap grows once
        assert _faults_touching_a_fresh_block() < pages // 10  # then the freed block is reused as it is
    assert _faults_touching_a_fresh_block() > pages // 2  # glibc's defaults are back


def test_training_reuses_freed_memory_unless_told_otherwise(tiny_gpt2, text_files, tmp_path, monkeypatch):
    from tiny_runs import run_settings

    from peftgen import config as config_lib
    from peftgen import training as train_lib

    entered = []

    @contextlib.contextmanager
    def spy():
        entered.append(True)
        yield

    monkeypatch.setattr(efficiency, "reusing_freed_memory", spy)
    runs = [("full", {}), ("full", {"reuse_memory": False}), ("lora", {}), ("lora", {"reuse_memory": False})]
    for number, (mode, overrides) in enumerate(runs):
        settings = run_settings(tiny_gpt2, text_files, tmp_path / str(number), mode, max_steps=1, **overrides)
        before = len(entered)
        train_lib.train(config_lib.resolve(None, settings), overwrite=True, progress=False)
        assert len(entered) - before == (number in (0, 2)), (mode, overrides)
    # 8-bit runs keep glibc's unmapping: there it raised the peak.
    assert not config_lib.resolve(None, {"model": "m", "mode": "8bit", "train_file": "x"}).reuses_memory
