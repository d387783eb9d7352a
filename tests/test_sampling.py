"""Samples during training: samples.jsonl, the <EOS> rate, trackers, and training left unchanged."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest
import torch
from tiny_runs import run_settings
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerState
from typer.testing import CliRunner

from peftgen import config as config_lib
from peftgen import plot, sampling
from peftgen import training as train_lib
from peftgen.cli import app
from peftgen.errors import PeftgenError

SAMPLING = dict(sample_every=1, sample_decoder="topk", sample_count=2, sample_max_new_tokens=6)
ARGS = SimpleNamespace(fsdp=None)  # TrainingArguments as far as the callback reads them
KEYS = ["step", "decoder", "options", "prompt", "text", "finish_reason", "new_tokens"]


def losses(run):
    history = json.loads((run / "log_history.json").read_text())
    return [e["loss"] for e in history if "loss" in e], [e["eval_loss"] for e in history if "eval_loss" in e]


def png_width(path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_sampling_leaves_the_losses_exactly_as_they_were(tiny_gpt2, make_run):
    plain, sampled = make_run("lora", tiny_gpt2), make_run("lora", tiny_gpt2, **SAMPLING)
    train_loss, eval_loss = losses(plain)
    assert len(train_loss) == 6 and len(eval_loss) == 2  # GPT-2's dropout is on: any RNG use would show
    assert losses(sampled) == (train_loss, eval_loss)


def test_a_sampler_that_used_the_global_rng_would_be_caught(tiny_gpt2, make_run, text_files, tmp_path, monkeypatch):
    """The equality above can fail: one draw from torch's global RNG per round changes the losses."""
    sample = sampling.SampleCallback.sample

    def careless(self, model, step):
        torch.rand(1)
        return sample(self, model, step)

    monkeypatch.setattr(sampling.SampleCallback, "sample", careless)
    settings = run_settings(tiny_gpt2, text_files, tmp_path / "run", **SAMPLING)
    train_lib.train(config_lib.resolve(None, settings), progress=False)
    train_loss, _ = losses(make_run("lora", tiny_gpt2))
    careless_loss, _ = losses(tmp_path / "run")
    assert careless_loss[:3] == train_loss[:3] and careless_loss[3:] != train_loss[3:]  # same until the first round


def test_each_round_writes_samples_jsonl_and_logs_the_eos_rate(tiny_gpt2, make_run):
    run = make_run("lora", tiny_gpt2, **SAMPLING)
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 3, 6, 6]  # two evaluations, two samples each
    tokenizer = AutoTokenizer.from_pretrained(run)
    for row in rows:
        assert list(row) == KEYS
        assert (row["decoder"], row["prompt"]) == ("topk", "<BOS>")
        assert row["options"] == {"k": 50, "temperature": 1.0, "p": 1.0}
        assert row["finish_reason"] in ("stop", "length") and 1 <= row["new_tokens"] <= 6
        if row["finish_reason"] == "length":
            assert row["new_tokens"] == 6 and len(tokenizer(row["text"])["input_ids"]) >= 1
    history = json.loads((run / "log_history.json").read_text())
    rates = [(e["step"], e[plot.EOS_RATE]) for e in history if plot.EOS_RATE in e]
    expected = [(step, sum(r["finish_reason"] == "stop" for r in rows if r["step"] == step) / 2) for step in (3, 6)]
    assert rates == expected


def test_the_eos_rate_is_drawn_beside_the_loss_curves(tiny_gpt2, make_run):
    assert png_width(make_run("lora", tiny_gpt2) / "loss.png") == 7 * 120  # loss only
    assert png_width(make_run("lora", tiny_gpt2, **SAMPLING) / "loss.png") == 11 * 120  # loss | <EOS> rate


@pytest.fixture(scope="module")
def eos_model(gpt2_tokenizer_dir):
    """A GPT-2 whose every position predicts its eos token (<|endoftext|>): every sample stops at once.

    ln_f is zeroed but for its bias, which points along the eos token's (tied) embedding."""
    from transformers import GPT2Config

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer)))
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
        model.transformer.wte.weight[tokenizer.eos_token_id] = direction
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(100 * direction)
    return model, tokenizer


class FakeWriter:
    """What TensorBoardCallback holds as tb_writer; records add_text."""

    def __init__(self):
        self.texts = []

    def add_text(self, tag, text, global_step=None):
        self.texts.append((tag, text, global_step))


def callback_for(model, tokenizer, tmp_path, **settings):
    config = config_lib.TrainConfig(**{**SAMPLING, "sample_max_new_tokens": 4, **settings})
    logged, writer, printed = [], FakeWriter(), []
    trainer = SimpleNamespace(model=model, log=logged.append, callback_handler=SimpleNamespace(callbacks=[SimpleNamespace(tb_writer=writer)]))
    callback = sampling.SampleCallback(config, tokenizer, tmp_path, trainer, echo=printed.append)
    return callback, logged, writer, printed


def state_after(evaluations: int, step: int = 10, main: bool = True) -> TrainerState:
    state = TrainerState(global_step=step, is_world_process_zero=main)
    state.log_history = [{"eval_loss": 1.0, "step": 5 * (i + 1)} for i in range(evaluations)]
    return state


def test_a_round_logs_prints_and_reports_to_trackers_and_restores_the_model(eos_model, tmp_path):
    model, tokenizer = eos_model
    callback, logged, writer, printed = callback_for(model, tokenizer, tmp_path)
    model.train()
    rng = torch.get_rng_state()
    callback.on_evaluate(ARGS, state_after(1), None, model=model)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert logged == [{plot.EOS_RATE: 1.0}]  # both samples ended at the stop token
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["text"], r["finish_reason"], r["new_tokens"]) for r in rows] == [(10, "", "stop", 1)] * 2
    assert printed[0] == "--- sample 1 of 2 at step 10 (topk, <EOS>)"
    assert writer.texts == [("samples", "| # | finish | text |\n|---|---|---|\n| 1 | stop |  |\n| 2 | stop |  |", 10)]
    model.eval()
    callback.on_evaluate(ARGS, state_after(2), None, model=model)
    assert not model.training  # a model that was not training stays so


def test_length_limited_samples_count_against_the_rate(tiny_gpt2, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    callback, logged, _, printed = callback_for(model, tokenizer, tmp_path, sample_prompt="The whale", sample_decoder="greedy")
    callback.on_evaluate(ARGS, state_after(1), None, model=model)
    assert logged == [{plot.EOS_RATE: 0.0}]
    row = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert (row["prompt"], row["finish_reason"], row["new_tokens"], row["options"]) == ("The whale", "length", 4, {})
    assert printed[0] == "--- sample 1 of 2 at step 10 (greedy, length limit, 4 tokens)"


def test_only_every_nth_evaluation_and_only_the_main_process_samples(eos_model, tmp_path):
    model, tokenizer = eos_model
    callback, logged, _, _ = callback_for(model, tokenizer, tmp_path, sample_every=2)
    callback.on_evaluate(ARGS, state_after(1), None, model=model)
    callback.on_evaluate(ARGS, state_after(3), None, model=model)
    callback.on_evaluate(ARGS, state_after(2, main=False), None, model=model)  # another torchrun process
    assert logged == [] and not (tmp_path / "samples.jsonl").exists()
    callback.on_evaluate(ARGS, state_after(4), None, model=model)
    assert len(logged) == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"sample_decoder": "topkk"}, "Unknown decoder 'topkk'. Available: "),
        ({"sample_options": {"k": 0}}, "Decoder 'topk' rejected its options: k must be at least 1, got 0."),
        ({"sample_options": {"kk": 5}}, "Decoder 'topk' has no option 'kk'."),
        ({"sample_decoder": "beam", "sample_count": 6}, "num_return_sequences (6) is more than num_beams (5)"),
        ({"sample_count": 0}, "sample_count must be at least 1, got 0."),
        ({"sample_every": -1}, "sample_every must be 0 (no samples) or a number of evaluations, got -1."),
        ({"valid_file": None}, "sample_every counts evaluations, and there are none without --valid-file."),
        ({"sample_prompt": ""}, "sample_prompt is empty."),
    ],
)
def test_bad_sampling_settings_fail_before_any_model_loads(settings, message):
    values = {"train_file": "t.txt", "valid_file": "v.txt", **SAMPLING, **settings}
    with pytest.raises(PeftgenError) as caught:
        config_lib.resolve(None, values)
    assert message in str(caught.value)


def test_sampling_settings_from_yaml_and_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_file: t.txt\nvalid_file: v.txt\nsample_every: 2\nsample_options: {k: 5, p: 0.9}\n")
    config = config_lib.resolve(path, {"sample_count": 3})
    assert (config.sample_every, config.sample_options, config.sample_count) == (2, {"k": 5, "p": 0.9}, 3)
    assert (config.sample_decoder, config.sample_max_new_tokens, config.sample_prompt) == ("topk", 64, None)
    assert config_lib.TrainConfig().sample_every == 0  # off unless asked for
    result = CliRunner().invoke(app, ["train", "-c", str(path), "--sample-option", "k=0", "--sample-option", "p=0.5"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: Decoder 'topk' rejected its options: k must be at least 1, got 0.")
    helped = CliRunner().invoke(app, ["train", "--help"])
    for flag in ("--sample-every", "--sample-decoder", "--sample-option", "--sample-count", "--sample-max-new-tokens", "--sample-prompt"):
        assert flag in helped.output
