"""The library under the CLI: each command is one call a notebook can make the same way."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

import peftgen
from peftgen import run_files
from peftgen.cli import app
from peftgen.errors import PeftgenError

runner = CliRunner()


def test_import_peftgen_is_cheap_and_names_the_library():
    script = (
        "import sys, peftgen; print(sorted(m for m in ('torch', 'transformers', 'peftgen.training') if m in sys.modules)); "
        "print(all(name in dir(peftgen) for name in peftgen.__all__))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["[]", "True"], done.stderr
    from peftgen import evaluation, merging, preparation, text_generation, training

    assert (peftgen.train, peftgen.evaluate, peftgen.generate_text, peftgen.prepare, peftgen.merge) == (
        training.train,
        evaluation.evaluate,
        text_generation.generate_text,
        preparation.prepare,
        merging.merge,
    )
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        getattr(peftgen, "trian")  # noqa: B009  the name is the point


@pytest.fixture(scope="module")
def short_run(tiny_gpt2, text_files, tmp_path_factory):
    """peftgen.train() from a dict of settings, with a max_length shorter than most lines."""
    settings = dict(
        model=str(tiny_gpt2),
        train_file=str(text_files["train"]),
        valid_file=str(text_files["valid"]),
        output_dir=str(tmp_path_factory.mktemp("library") / "run"),
        max_steps=2,
        eval_steps=2,
        batch_size=4,
        max_length=8,
        precision="fp32",
        lora_r=2,
    )
    return peftgen.train(settings, progress=False)


def test_train_takes_a_mapping_of_settings_and_says_where_the_run_went(short_run):
    assert short_run.output_dir.name == "run" and run_files.is_run(short_run.output_dir)
    assert run_files.read_run_config(short_run.output_dir)["max_length"] == 8
    assert run_files.read_run_facts(short_run.output_dir)["precision_used"] == "fp32" == short_run.precision
    assert "eval_loss" in short_run.metrics


def test_evaluate_a_run_scores_it_at_the_runs_max_length_as_the_command_does(short_run, text_files):
    result = peftgen.evaluate(short_run.output_dir, text_files["test"], progress=False)
    model, tokenizer = peftgen.load(short_run.output_dir)
    assert result == peftgen.evaluate(model, text_files["test"], tokenizer=tokenizer, max_length=8, progress=False)
    assert result.tokens < peftgen.evaluate(model, text_files["test"], tokenizer=tokenizer, progress=False).tokens
    printed = runner.invoke(app, ["eval", "--model", str(short_run.output_dir), "--file", str(text_files["test"]), "--json"])
    assert json.loads(printed.stdout) == result.to_dict()


def test_evaluate_a_plain_model_adds_the_markers_and_says_so(tiny_gpt2, text_files, capsys):
    result = peftgen.evaluate(tiny_gpt2, text_files["test"], batch_size=2)
    assert result.tokens > 0
    assert f"note: {tiny_gpt2} is not a peftgen run; scoring it with <BOS>/<EOS>/<PAD>" in capsys.readouterr().err
    model, _ = peftgen.load(tiny_gpt2)
    with pytest.raises(TypeError, match="needs its tokenizer="):
        peftgen.evaluate(model, text_files["test"])
    with pytest.raises(PeftgenError, match="--batch-size must be between 1 and 65536, got 0"):
        peftgen.evaluate(tiny_gpt2, text_files["test"], batch_size=0)


def test_generate_text_gives_what_the_generate_command_prints(tiny_gpt2):
    results = peftgen.generate_text(str(tiny_gpt2), ["Hello", "Once"], decoder="topk", options={"k": "5"}, max_new_tokens=4, num_return_sequences=2, seed=3)
    printed = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_gpt2),
            "--prompt",
            "Hello",
            "--prompt",
            "Once",
            "-o",
            "k=5",
            "--length",
            "4",
            "--num-return-sequences",
            "2",
            "--seed",
            "3",
            "--json",
        ],
    )
    assert [json.loads(line) for line in printed.stdout.splitlines()] == [r.to_dict() for r in results]
    assert [r.prompt for r in results] == ["Hello", "Hello", "Once", "Once"] and results[0].options["k"] == 5


def test_generate_text_streams_one_sequence_and_takes_a_loaded_model(tiny_gpt2):
    from peftgen.decoders.greedy import Greedy

    model, tokenizer = peftgen.load(tiny_gpt2)
    pieces = []
    [result] = peftgen.generate_text(model, ["The"], tokenizer=tokenizer, decoder=Greedy(), max_new_tokens=6, on_text=pieces.append)
    assert "".join(pieces) == result.text and len(pieces) == len(result.token_ids) == 6
    assert result.decoder == "greedy" and result.finish_reason == "length" and 0 <= result.seed < 2**31
    with pytest.raises(PeftgenError, match="--seed must be between 0 and 4294967295, got -1"):
        peftgen.generate_text(model, tokenizer=tokenizer, seed=-1)


def test_an_older_run_folder_with_everything_in_peftgen_yaml_still_loads(make_run, tiny_gpt2, text_files, tmp_path):
    """Runs saved before run.json kept their facts and resume/overwrite in peftgen.yaml."""
    old = shutil.copytree(make_run("lora", tiny_gpt2), tmp_path / "old")
    facts = json.loads((old / "run.json").read_text())
    (old / "run.json").unlink()
    settings = yaml.safe_load((old / "peftgen.yaml").read_text())
    del facts["versions"], facts["total_params"]  # what older runs did not record
    (old / "peftgen.yaml").write_text(yaml.safe_dump({**settings, "resume": False, "overwrite": True, **facts}, sort_keys=False))

    assert run_files.read_run_facts(old) == facts
    assert peftgen.evaluate(old, text_files["test"], progress=False) == peftgen.evaluate(make_run("lora", tiny_gpt2), text_files["test"], progress=False)
    [result] = peftgen.generate_text(old, decoder="greedy", max_new_tokens=3)
    assert result.prompt == "<BOS>"
    assert (peftgen.merge(old, tmp_path / "merged") / "config.json").is_file()
