"""Training in full, LoRA and 8-bit modes, with the new special tokens trainable in every mode."""

import json

import pytest
import torch
import yaml
from transformers import set_seed

from peftgen import config as config_lib
from peftgen import model as model_lib
from peftgen import run_files
from peftgen import training as train_lib
from peftgen.errors import PeftgenError

NEW = [50257, 50258, 50259]  # <BOS>, <EOS>, <PAD> appended to GPT-2's 50,257 tokens


def initial_model(base, mode="lora"):
    """The model exactly as training starts: same seed, same resizing."""
    cfg = config_lib.resolve(None, {"model": str(base), "mode": mode, "train_file": "x", "lora_r": 4, "lora_alpha": 8})
    set_seed(cfg.seed)
    return model_lib.prepare_for_training(cfg)[0]


def embeddings(model):
    """(input, output) embedding matrices of a plain (merged) model."""
    return model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()


@pytest.mark.parametrize("mode", ["lora", "8bit"])
def test_only_the_new_rows_train_and_gpt2_stays_tied(mode, tiny_gpt2, make_run):
    pytest.importorskip("bitsandbytes") if mode == "8bit" else None
    start_in, _ = embeddings(initial_model(tiny_gpt2, mode).get_base_model())
    run = make_run(mode, tiny_gpt2)
    trained, _ = model_lib.load(run, merge=False)
    wrapper = trained.get_base_model().transformer.wte.token_adapter
    new_in = wrapper.trainable_tokens_delta["default"].detach()  # (3, C): the rows now in use
    new_out = trained.get_base_model().lm_head.token_adapter.trainable_tokens_delta["default"].detach()
    # every pre-existing row of input and output embedding: bit-identical to the base model
    base_in = wrapper.base_layer.weight.detach()
    assert torch.equal(base_in[:50257], start_in[:50257])
    assert trained.get_base_model().lm_head.token_adapter.base_layer.weight.data_ptr() == base_in.data_ptr()
    # the new rows changed, and input and output rows of the new tokens are equal (tied)
    assert not torch.allclose(new_in, start_in[NEW])
    assert torch.equal(new_in, new_out)


def test_only_new_rows_train_in_merged_weights(tiny_gpt2, make_run):
    start_in, _ = embeddings(initial_model(tiny_gpt2).get_base_model())
    merged, _ = model_lib.load(make_run("lora", tiny_gpt2))
    w_in, w_out = embeddings(merged)
    assert torch.equal(w_in[:50257], start_in[:50257])
    assert not torch.allclose(w_in[NEW], start_in[NEW])
    assert torch.equal(w_in[NEW], w_out[NEW])


def test_untied_llama_trains_new_input_and_output_rows_only(tiny_llama, make_run):
    start = initial_model(tiny_llama).get_base_model()
    start_in, start_out = embeddings(start)
    merged, _ = model_lib.load(make_run("lora", tiny_llama))
    w_in, w_out = embeddings(merged)
    assert torch.equal(w_in[:50257], start_in[:50257]) and torch.equal(w_out[:50257], start_out[:50257])
    assert not torch.allclose(w_in[NEW], start_in[NEW]) and not torch.allclose(w_out[NEW], start_out[NEW])


def test_full_mode_trains_every_weight(tiny_gpt2, make_run):
    merged, _ = model_lib.load(make_run("full", tiny_gpt2))
    start = initial_model(tiny_gpt2, "full")
    assert not torch.allclose(embeddings(merged)[0][:50257], embeddings(start)[0][:50257])
    assert not torch.allclose(merged.transformer.h[0].mlp.c_fc.weight, start.transformer.h[0].mlp.c_fc.weight)


def test_the_loss_goes_down(tiny_gpt2, make_run):
    history = json.loads((make_run("lora", tiny_gpt2) / "log_history.json").read_text())
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(evals) >= 2 and evals[-1] < evals[0]


@pytest.mark.parametrize("mode", ["lora", "8bit", "full"])
def test_run_folder_holds_weights_tokenizer_config_and_curves(mode, tiny_gpt2, make_run):
    pytest.importorskip("bitsandbytes") if mode == "8bit" else None
    run = make_run(mode, tiny_gpt2)
    names = {p.name for p in run.iterdir()}
    weights = {"adapter_model.safetensors", "adapter_config.json"} if mode != "full" else {"model.safetensors", "config.json"}
    assert weights | {"tokenizer.json", "peftgen.yaml", "run.json", "loss.png", "metrics.json"} <= names
    saved = yaml.safe_load((run / "peftgen.yaml").read_text())
    assert saved["mode"] == mode and saved["model"] == str(tiny_gpt2)
    assert saved["bos_token"] == "<BOS>" and saved["lr"] == 1e-2 and saved["max_steps"] == 6
    assert set(saved) == set(config_lib.FIELDS)  # settings only: train -c takes the file as it is
    facts = json.loads((run / "run.json").read_text())
    assert facts["new_token_ids"] == NEW and facts["precision_used"] == "fp32" and facts["train_examples"] == 16
    assert set(facts["versions"]) >= {"torch", "transformers", "peft"}
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("max_steps", [6, 5])
def test_the_final_weights_are_evaluated_once(tiny_gpt2, make_run, max_steps):
    """Evaluations every 3 steps; the last step is scheduled (6) or not (5): either way the
    run's metrics are the final weights' and no evaluation of them is repeated."""
    run = make_run("lora", tiny_gpt2, max_steps=max_steps)
    history = json.loads((run / "log_history.json").read_text())
    evaluated = [entry["step"] for entry in history if "eval_loss" in entry]
    assert evaluated == [3, max_steps]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_loss"] == next(e for e in reversed(history) if "eval_loss" in e)["eval_loss"]


def test_adapter_stores_only_the_new_rows_not_the_whole_embedding(tiny_gpt2, make_run):
    from safetensors import safe_open

    with safe_open(make_run("lora", tiny_gpt2) / "adapter_model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    token_keys = [k for k in shapes if "trainable_tokens" in k]
    assert token_keys and all(shapes[k] == (3, 64) for k in token_keys)
    assert not any(shape[0] >= 50257 for shape in shapes.values())


def _settings(base, text_files, out, **extra):
    values = dict(
        model=str(base),
        mode="lora",
        train_file=str(text_files["train"]),
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        batch_size=4,
        precision="fp32",
    )
    values.update(extra)
    return config_lib.resolve(None, values)


def test_an_existing_run_is_refused_without_overwrite_or_resume(tiny_gpt2, text_files, make_run):
    run = make_run("lora", tiny_gpt2)
    before = (run / "adapter_model.safetensors").read_bytes()
    with pytest.raises(PeftgenError, match="already holds a peftgen run. Pass --overwrite"):
        train_lib.train(_settings(tiny_gpt2, text_files, run), progress=False)
    assert (run / "adapter_model.safetensors").read_bytes() == before


def test_a_folder_of_other_files_is_never_written_into(tiny_gpt2, text_files, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PeftgenError, match="is not empty and is not a peftgen run"):
        train_lib.train(_settings(tiny_gpt2, text_files, tmp_path), overwrite=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_continues_from_the_last_checkpoint(tiny_gpt2, text_files, tmp_path):
    first = train_lib.train(_settings(tiny_gpt2, text_files, tmp_path / "r", max_steps=2), progress=False)
    assert (first.output_dir / "checkpoint-2").is_dir()
    resumed = train_lib.train(_settings(tiny_gpt2, text_files, tmp_path / "r", max_steps=4), resume=True, progress=False)
    steps = [e["step"] for e in resumed.log_history if "loss" in e]
    assert steps == [1, 2, 3, 4]  # steps 1-2 restored from the checkpoint's state, 3-4 trained now
    state = json.loads((tmp_path / "r" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_resume_without_a_checkpoint_is_an_error(tiny_gpt2, text_files, tmp_path):
    with pytest.raises(PeftgenError, match="Nothing to resume"):
        train_lib.train(_settings(tiny_gpt2, text_files, tmp_path / "empty"), resume=True, progress=False)


def test_resume_and_overwrite_together_are_refused_before_anything_loads(tiny_gpt2, text_files, tmp_path):
    with pytest.raises(PeftgenError, match=r"--resume continues the run in the output folder; --overwrite deletes it\. Pick one\."):
        train_lib.train(_settings(tiny_gpt2, text_files, tmp_path / "r"), resume=True, overwrite=True, progress=False)
    assert not (tmp_path / "r").exists()


def test_precision_auto_picks_bf16_on_fast_bf16_cpus(monkeypatch):
    from peftgen import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.resolve("auto") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.resolve("auto") == "fp32"
    with pytest.raises(PeftgenError, match="fp16 needs a CUDA GPU"):
        precision.resolve("fp16")


def test_bf16_training_runs_on_cpu(tiny_gpt2, make_run):
    run = make_run("lora", tiny_gpt2, precision="bf16", max_steps=2)
    assert run_files.read_run_facts(run)["precision_used"] == "bf16"
