"""The demo's code path, end to end, on a tiny GGUF model and the real 32-book sample."""

from __future__ import annotations

import math
import re

import pytest

pytest.importorskip("gguf")

from gguf_writer import write_tiny_llama_gguf  # noqa: E402

from peftgen import compare, demo, plugins  # noqa: E402


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("demo")
    # Like the real SmolLM2 file, Q8_0 blocks: loads through transformers' GGUF quantizer.
    gguf = write_tiny_llama_gguf(folder / "model" / "tiny.gguf", quantization="Q8_0")
    # The first 10 books of the real sample: 7 train, 2 valid, 1 test, cut into ~20 pieces each.
    rows = demo.SAMPLE.read_text(encoding="utf-8").splitlines()[:10]
    (folder / "sample.tsv").write_text("\n".join(rows), encoding="utf-8")
    overrides = dict(
        max_length=96, max_steps=12, batch_size=8, lr=3e-3, eval_steps=6, precision="fp32", sample_max_new_tokens=8
    )  # configs/demo.yaml's recipe, shrunk
    lines: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to thread handoffs, more so on busy CPUs
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PEFTGEN_CACHE", str(folder / "cache"))  # the dequantised copy goes here, not ~/.cache
            result = demo.run(
                str(gguf),
                folder / "out",
                data=folder / "sample.tsv",
                overrides=overrides,
                max_new_tokens=12,
                compare_samples=2,
                progress=False,
                echo=lines.append,
            )
    finally:
        torch.set_num_threads(threads)
    return result, "\n".join(lines)


def test_test_perplexity_drops_and_the_table_says_so(demo_run):
    result, printed = demo_run
    assert math.isfinite(result.before.perplexity) and result.after.perplexity < result.before.perplexity
    assert result.before.tokens == result.after.tokens > 0  # the same tokens scored both times
    assert "test perplexity" in result.table and "trainable parameters" in result.table
    stops = sum(s.finish_reason == "stop" for s in result.samples)
    assert re.search(rf"samples ending at <EOS>\s+{stops} of {len(result.samples)}$", result.table, re.M)
    assert f"{result.train.trainable_params:,} of" in result.table
    assert result.table in printed


def test_every_example_fits_and_keeps_its_eos(demo_run):
    result, _ = demo_run
    from transformers import AutoTokenizer

    counted = AutoTokenizer.from_pretrained(result.train.output_dir)  # the run's tokenizer, markers included
    for name in ("train", "valid", "test"):
        for line in (result.output_dir / "data" / f"{name}.txt").read_text(encoding="utf-8").splitlines():
            assert line.endswith(" <EOS>")
            assert len(counted(" " + line[6:-6], add_special_tokens=False)["input_ids"]) + 2 <= 96


def test_run_folder_has_curves_results_and_a_sample_per_decoder(demo_run):
    result, printed = demo_run
    assert (result.output_dir / "lora" / "loss.png").stat().st_size > 1000
    assert result.train.loss_plot == result.output_dir / "lora" / "loss.png"
    assert sorted(s.decoder for s in result.samples) == sorted(plugins.get_decoders())
    markdown = (result.output_dir / "results.md").read_text(encoding="utf-8")
    for s in result.samples:
        assert s.finish_reason in ("stop", "length") and 0 < s.tokens <= 12 and "<EOS>" not in s.text
        ending = "ended at <EOS>" if s.finish_reason == "stop" else f"stopped at the length limit ({s.tokens} tokens)"
        assert f"### {s.label}: {ending}" in markdown
    beam = next(s for s in result.samples if s.decoder == "beam")
    assert beam.label == "beam -o no_repeat_ngram_size=3"  # repetition-free beam search, as the README shows
    assert "[6/8] Samples from <BOS>" in printed


def test_training_samples_show_the_eos_rate_at_each_evaluation(demo_run):
    import json

    result, _ = demo_run
    lines = [json.loads(line) for line in (result.output_dir / "lora" / "samples.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [6, 6, 12, 12]  # two samples at each of the two evaluations
    expected = [(step, sum(line["finish_reason"] == "stop" for line in lines if line["step"] == step) / 2) for step in (6, 12)]
    assert result.eos_rates == expected
    rates = " → ".join(f"{rate:.0%}" for _, rate in expected)
    assert re.search(rf"^<EOS> rate while training\s+{rates} \(steps 6, 12\)$", result.table, re.M)


def test_results_hold_a_comparison_of_every_decoder(demo_run):
    result, printed = demo_run
    assert [row.decoder for row in result.comparison] == sorted(plugins.get_decoders())
    for row in result.comparison:
        assert row.error is None and row.samples == 2 and 0 <= row.max_length <= 12 and row.mean_logprob < 0
    beam = next(row for row in result.comparison if row.decoder == "beam")
    assert beam.options["no_repeat_ngram_size"] == 3  # the same beam as the demo's sample
    markdown = (result.output_dir / "results.md").read_text(encoding="utf-8")
    assert "## Decoders compared" in markdown
    assert compare.table(result.comparison, markdown=True) in markdown
    assert compare.table(result.comparison) in printed
    assert "comparison " in result.table  # its time is part of the total


def test_missing_sample_is_a_clear_error(tmp_path):
    from peftgen.errors import PeftgenError

    with pytest.raises(PeftgenError, match="Demo data .*nope.tsv not found"):
        demo.run("unused", tmp_path, data=tmp_path / "nope.tsv", echo=lambda _: None)


def test_the_run_uses_the_recipe_in_configs_with_the_overrides(demo_run):
    import yaml

    from peftgen import config as config_lib

    result, _ = demo_run
    saved = config_lib.read_yaml(result.output_dir / "lora" / "peftgen.yaml")
    recipe = yaml.safe_load(demo.RECIPE.read_text())
    for key in ("lora_r", "lora_alpha", "warmup_steps", "gradient_checkpointing", "sample_every", "seed", "save_steps"):
        assert saved[key] == recipe[key], key
    assert (saved["max_steps"], saved["max_length"], saved["lr"]) == (12, 96, 3e-3)
    assert saved["train_file"] == str(result.output_dir / "data" / "train.txt")
    assert "Recipe: `" + str(demo.RECIPE) in (result.output_dir / "results.md").read_text(encoding="utf-8")


def test_a_bad_override_fails_before_anything_is_fetched(tmp_path):
    from peftgen.errors import PeftgenError

    with pytest.raises(PeftgenError, match="lora_r must be at least 1, got 0"):
        demo.run(None, tmp_path, overrides={"lora_r": 0}, echo=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_command_line_help_and_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from peftgen.cli import app

    runner = CliRunner()
    helped = runner.invoke(app, ["demo", "--help"])
    assert helped.exit_code == 0 and "--output-dir" in helped.output and "--max-steps" in helped.output
    failed = runner.invoke(app, ["demo", "--model", str(tmp_path / "missing.gguf"), "--output-dir", str(tmp_path / "out")])
    assert failed.exit_code == 1
    assert failed.stderr == f"Error: Model not found: {tmp_path / 'missing.gguf'} does not exist. Check the path.\n"


def test_python_m_peftgen_demo_is_the_demo_command(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "peftgen.demo", "--model", str(tmp_path / "missing.gguf"), "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and done.stdout.startswith("[1/8] Model")
    assert done.stderr.endswith(f"Error: Model not found: {tmp_path / 'missing.gguf'} does not exist. Check the path.\n")
