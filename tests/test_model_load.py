"""peftgen.model.load takes a Hub id, a folder, a GGUF file or a run of any mode."""

import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftgen import model as model_lib
from peftgen.errors import PeftgenError

IDS = torch.tensor([[50257, 464, 2068, 7586, 21831, 50258]])  # <BOS> The quick brown fox <EOS>


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("mode", ["lora", "8bit", "full"])
def test_a_run_of_every_mode_loads_ready_for_inference(mode, tiny_gpt2, make_run):
    pytest.importorskip("bitsandbytes") if mode == "8bit" else None
    model, tokenizer = model_lib.load(make_run(mode, tiny_gpt2))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<BOS>", "<EOS>", "<PAD>")
    assert model.config.eos_token_id == tokenizer.eos_token_id == 50258
    assert not model.training
    assert logits(model).shape == (1, 6, 50260)  # resized: no size mismatch


def test_merged_and_unmerged_lora_runs_agree(tiny_gpt2, make_run):
    run = make_run("lora", tiny_gpt2)
    merged, _ = model_lib.load(run)
    unmerged, _ = model_lib.load(run, merge=False)
    assert type(unmerged).__name__ == "PeftModelForCausalLM" and type(merged).__name__ == "GPT2LMHeadModel"
    assert torch.allclose(logits(merged), logits(unmerged), atol=1e-5)


def test_a_checkpoint_folder_of_a_run_loads(tiny_gpt2, make_run):
    run = make_run("lora", tiny_gpt2)
    model, tokenizer = model_lib.load(run / "checkpoint-3")
    assert len(tokenizer) == 50260 and logits(model).shape[-1] == 50260


def test_a_llama_run_loads(tiny_llama, make_run):
    model, _ = model_lib.load(make_run("lora", tiny_llama))
    assert type(model).__name__ == "LlamaForCausalLM" and logits(model).shape == (1, 6, 50260)


def test_a_plain_folder_loads_and_can_get_the_special_tokens_untrained(tiny_gpt2):
    model, tokenizer = model_lib.load(tiny_gpt2)
    assert len(tokenizer) == 50257
    model, tokenizer = model_lib.load(tiny_gpt2, special_tokens=("<BOS>", "<EOS>", "<PAD>"))
    assert tokenizer.convert_tokens_to_ids(["<BOS>", "<EOS>", "<PAD>"]) == [50257, 50258, 50259]
    assert logits(model).shape[-1] == 50260


def test_a_gguf_file_loads_through_transformers_and_is_cached(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from gguf_writer import gpt2_bpe_prefix, tiny_llama, write_tiny_llama_gguf

    monkeypatch.setenv("PEFTGEN_CACHE", str(tmp_path / "cache"))
    tokens, _ = gpt2_bpe_prefix(400)
    source = tiny_llama(len(tokens))
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", source)
    model, tokenizer = model_lib.load(str(path))
    ids = torch.arange(3, 40)[None]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.allclose(logits(model, ids), logits(source, ids), atol=1e-5)
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    again, _ = model_lib.load(str(path))  # second load comes from the cache
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_tokenizer_of_reads_any_source_without_its_weights(tiny_gpt2, gpt2_tokenizer_dir, make_run, tmp_path):
    assert len(model_lib.tokenizer_of(tiny_gpt2)) == 50257
    assert len(model_lib.tokenizer_of(gpt2_tokenizer_dir)) == 50257  # tokenizer files alone, no config.json
    run = make_run("lora", tiny_gpt2)
    for folder in (run, run / "checkpoint-3"):  # a run's own tokenizer, markers included
        assert model_lib.tokenizer_of(folder).eos_token == "<EOS>"
    with pytest.raises(PeftgenError, match=r"Model not found: .*nowhere does not exist"):
        model_lib.tokenizer_of(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftgenError, match=r"(tokenizer of .*empty|empty has no tokenizer).*copy them from the model"):
        model_lib.tokenizer_of(tmp_path / "empty")


def test_tokenizer_of_a_gguf_file_reads_the_file_and_dequantises_nothing(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from gguf_writer import ENDOFTEXT, write_tiny_llama_gguf

    monkeypatch.setenv("PEFTGEN_CACHE", str(tmp_path / "cache"))
    tokenizer = model_lib.tokenizer_of(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    assert tokenizer.eos_token == ENDOFTEXT and len(tokenizer) == 657
    assert not (tmp_path / "cache").exists()


def test_context_length_and_hidden_width_come_from_the_config(tiny_gpt2, tiny_llama):
    for folder in (tiny_gpt2, tiny_llama):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert (model_lib.context_length(model), model_lib.hidden_width(model)) == (256, 64)
    unsized = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=None, n_ctx=0))
    assert model_lib.context_length(unsized) is None and model_lib.hidden_width(unsized) is None


def test_missing_local_paths_fail_at_once_with_the_path(tmp_path):
    with pytest.raises(PeftgenError, match=r"Model not found: .*nowhere\.gguf does not exist"):
        model_lib.load(str(tmp_path / "nowhere.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftgenError, match="is a folder without config.json"):
        model_lib.load(str(tmp_path / "empty"))


def test_offline_hub_id_says_the_hub_cannot_be_reached_and_how_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(PeftgenError) as error:
        model_lib.load("someone/some-model-that-is-not-cached")
    assert "Hugging Face Hub cannot be reached" in str(error.value)
    assert "Pass a local model folder" in str(error.value)
    assert time.perf_counter() - started < 10  # no long retry loop


def test_offline_check_respects_an_unreachable_endpoint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    assert model_lib.sources.hub_reachable(timeout=1) is False


def test_8bit_without_bitsandbytes_says_how_to_install(monkeypatch, tiny_gpt2):
    import importlib.metadata

    real = importlib.metadata.version

    def version(name):
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(PeftgenError, match=r"--mode 8bit needs bitsandbytes>=0\.47: pip install bitsandbytes"):
        model_lib.load_pretrained(str(tiny_gpt2), quantize_8bit=True)


@pytest.mark.parametrize("base", ["tiny_gpt2", "tiny_llama"])
def test_the_new_eos_starts_as_the_base_models_own_end_token(base, request):
    """<EOS> begins as a copy of <|endoftext|> (input row, and output row when untied), so the
    untrained model already predicts <EOS> where it would have ended its text; <BOS> and <PAD>
    begin as average rows."""
    folder = request.getfixturevalue(base)
    old_eos = AutoTokenizer.from_pretrained(folder).eos_token_id
    model, tokenizer = model_lib.load(folder, special_tokens=("<BOS>", "<EOS>", "<PAD>"))
    eos, bos, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<EOS>", "<BOS>", "<PAD>"))
    assert eos != old_eos
    for matrix in {id(m): m for m in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values():
        assert torch.equal(matrix[eos], matrix[old_eos])
        assert not torch.equal(matrix[bos], matrix[old_eos]) and not torch.equal(matrix[pad], matrix[old_eos])
    last = logits(model, torch.tensor([[464, 2068, 7586]]))[0, -1]
    assert last[eos] == last[old_eos]


def test_a_base_without_an_end_token_gets_an_average_eos(tiny_gpt2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.eos_token = None
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    model_lib.add_special_tokens(model, tokenizer, "<BOS>", "<EOS>", "<PAD>")
    rows = model.get_input_embeddings().weight
    assert not (rows[:50257] == rows[tokenizer.eos_token_id]).all(dim=-1).any()  # a copy of no existing row


# Damaged folders: one line naming the file and what is wrong with it ----------


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


RUN_DAMAGE = {
    "truncated adapter": (
        lambda d: _truncate(d / "adapter_model.safetensors"),
        r"adapter weights of .*run \(adapter_model\.safetensors\) are damaged: .* truncated",
    ),
    "empty adapter": (lambda d: (d / "adapter_model.safetensors").write_bytes(b""), r"adapter weights of .*run \(adapter_model\.safetensors\) are damaged"),
    "no adapter weights": (lambda d: (d / "adapter_model.safetensors").unlink(), r"run has adapter_config\.json but no adapter weights"),
    "garbage adapter_config": (
        lambda d: (d / "adapter_config.json").write_text("{garbage"),
        r"run/adapter_config\.json is not valid JSON \(Expecting property name",
    ),
    "adapter_config not an object": (
        lambda d: (d / "adapter_config.json").write_text("[1, 2]"),
        r"run/adapter_config\.json must hold a JSON object, not a list",
    ),
    "no tokenizer": (
        lambda d: [p.unlink() for p in d.iterdir() if p.name.startswith("tokenizer")],
        r"(tokenizer of .*run|run has no tokenizer).*copy them from the model it was trained from",
    ),
    "garbage peftgen.yaml": (lambda d: (d / "peftgen.yaml").write_text("mode: [lora\n"), r"run/peftgen\.yaml is damaged \(.*line 2"),
    "empty peftgen.yaml": (lambda d: (d / "peftgen.yaml").write_text(""), r"run/peftgen\.yaml is incomplete: it has no model or mode"),
    "incomplete peftgen.yaml": (lambda d: (d / "peftgen.yaml").write_text("mode: lora\n"), r"run/peftgen\.yaml is incomplete: it has no model\."),
    "binary peftgen.yaml": (lambda d: (d / "peftgen.yaml").write_bytes(b"\xff\xfe\x00\x01"), r"run/peftgen\.yaml is damaged \('utf-8' codec"),
}


@pytest.mark.parametrize("damage", list(RUN_DAMAGE))
def test_a_damaged_run_folder_gets_one_line_naming_the_file(damage, tiny_gpt2, make_run, tmp_path):
    import shutil

    run = shutil.copytree(make_run("lora", tiny_gpt2), tmp_path / "run")
    damage_fn, message = RUN_DAMAGE[damage]
    damage_fn(run)
    with pytest.raises(PeftgenError, match=message):
        model_lib.load(run)


MODEL_DAMAGE = {
    "truncated weights": (lambda d: _truncate(d / "model.safetensors"), r"model weights of .*model \(model\.safetensors\) are damaged: .*truncated"),
    "config.json not an object": (lambda d: (d / "config.json").write_text('["gpt2"]'), r"model/config\.json must hold a JSON object, not a list"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("model_type: gpt2"), r"model/config\.json is not valid JSON"),
    "no tokenizer": (
        lambda d: [p.unlink() for p in d.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges"))],
        r"model has no tokenizer \(an empty vocabulary was all it held\)",
    ),
}


@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
def test_a_damaged_model_folder_gets_one_line_naming_the_file(damage, tiny_gpt2, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_gpt2, tmp_path / "model")
    damage_fn, message = MODEL_DAMAGE[damage]
    damage_fn(folder)
    with pytest.raises(PeftgenError, match=message):
        model_lib.load(folder)


def test_the_cli_prints_a_damaged_folder_as_one_error_line(tiny_gpt2, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from peftgen.cli import app

    folder = shutil.copytree(tiny_gpt2, tmp_path / "model")
    _truncate(folder / "model.safetensors")
    for command in (
        ["generate", "--model", str(folder), "--seed", "1", "--length", "2"],
        ["eval", "--model", str(folder), "--file", str(folder / "config.json")],
    ):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1, result.output
        assert result.output.count("Error:") == 1 and "Traceback" not in result.output
        assert "model.safetensors) are damaged" in result.output


# Settings that depend on the model ---------------------------------------------


def test_max_length_beyond_the_context_is_capped_to_it(tiny_gpt2, capsys):
    from peftgen import config as config_lib

    config = config_lib.resolve(None, {"train_file": "t", "model": str(tiny_gpt2), "max_length": 4096, "mode": "full"})
    model_lib.prepare_for_training(config)
    assert config.max_length == 256  # tiny_gpt2's n_positions
    assert "max_length 4096 is longer than the context" in capsys.readouterr().err


def test_target_modules_the_model_lacks_are_refused_with_those_it_has(tiny_gpt2):
    from peftgen import config as config_lib

    config = config_lib.resolve(None, {"train_file": "t", "model": str(tiny_gpt2), "target_modules": "c_attn,q_proj"})
    with pytest.raises(
        PeftgenError,
        match=r"target_modules 'q_proj' not in this gpt2 model\. "
        r"Its layers LoRA can adapt: c_attn, c_fc, c_proj, lm_head, wpe, wte\.",
    ):
        model_lib.prepare_for_training(config)
    # Full names and name suffixes match, as PEFT matches them.
    model, _ = model_lib.load_pretrained(str(tiny_gpt2))
    model_lib.check_target_modules(model, ["transformer.h.0.attn.c_attn", "mlp.c_fc"])
