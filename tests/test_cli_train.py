"""The train, eval and merge commands as a user types them."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from peftgen.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_then_eval_then_merge(tiny_gpt2, text_files, tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--model",
        tiny_gpt2,
        "--train-file",
        text_files["train"],
        "--valid-file",
        text_files["valid"],
        "--output-dir",
        run,
        "--max-steps",
        2,
        "--eval-steps",
        2,
        "--batch-size",
        4,
        "--precision",
        "fp32",
        "--lr",
        1e-3,
    )
    assert result.exit_code == 0, result.output
    assert "resolved config" in result.stdout and "lr: 0.001" in result.stdout
    assert "Validation loss:" in result.stdout and (run / "loss.png").is_file()
    assert "'eval_loss'" in result.stderr and "'eval_loss'" not in result.stdout  # Trainer's log lines are progress

    result = invoke("eval", "--model", run, "--file", text_files["test"], "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert set(scores) == {"loss", "perplexity", "tokens"} and scores["tokens"] > 0

    result = invoke("merge", run, "--output", tmp_path / "merged")
    assert result.exit_code == 0 and (tmp_path / "merged" / "config.json").is_file()


def test_yaml_config_with_flag_override(tiny_gpt2, text_files, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_gpt2}\ntrain_file: {text_files['train']}\nmax_steps: 1\nlora_r: 2\noutput_dir: {tmp_path / 'run'}\nprecision: fp32\n")
    result = invoke("train", "-c", config, "--lora-r", 3)
    assert result.exit_code == 0, result.output
    assert "lora_r: 3" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--train-file", "{tmp}/missing.txt"], "Error: The training file {tmp}/missing.txt does not exist. Check the path."),
        (["--train-file", "{train}", "--mode", "qlora"], "Error: Unknown mode 'qlora'. Choose one of: full, lora, 8bit."),
        (["--train-file", "{empty}"], "Error: The training file {empty} is empty. It needs one example per line."),
        (["-c", "{bad}"], "is not valid YAML"),
        (["--train-file", "{train}", "--model", "{tmp}/no-such-model"], "Error: Model not found: {tmp}/no-such-model does not exist. Check the path."),
    ],
)
def test_bad_input_is_one_error_line_and_exit_1(args, message, text_files, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.yaml").write_text("lr: [1,\n")
    fill = dict(tmp=tmp_path, train=text_files["train"], empty=tmp_path / "empty.txt", bad=tmp_path / "bad.yaml")
    result = invoke("train", "--output-dir", tmp_path / "out", *[a.format(**fill) for a in args])
    assert result.exit_code == 1
    assert message.format(**fill) in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # nothing created on bad input


def test_eval_of_a_missing_file_is_a_clear_error(tiny_gpt2, tmp_path):
    result = invoke("eval", "--model", tiny_gpt2, "--file", tmp_path / "test.txt", "--json")
    assert result.exit_code == 1
    assert f"Error: The evaluation file {tmp_path / 'test.txt'} does not exist." in result.output


def test_help_lists_the_commands_and_flags():
    result = invoke("--help")
    assert result.exit_code == 0 and all(c in result.output for c in ("train", "eval", "merge"))
    result = invoke("train", "--help")
    assert result.exit_code == 0 and "--lora-alpha" in result.output and "--resume" in result.output


def test_a_run_folder_trains_again_from_its_own_settings(tiny_gpt2, make_run, tmp_path):
    """peftgen train -c RUN/peftgen.yaml --output-dir OTHER: the same run, the same losses."""
    run = make_run("lora", tiny_gpt2)
    again = tmp_path / "again"
    result = invoke("train", "-c", run / "peftgen.yaml", "--output-dir", again)
    assert result.exit_code == 0, result.output
    first, second = (json.loads((folder / "metrics.json").read_text()) for folder in (run, again))
    assert second["train_loss"] == pytest.approx(first["train_loss"], rel=1e-6)
    assert second["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
    settings = [yaml.safe_load((folder / "peftgen.yaml").read_text()) for folder in (run, again)]
    assert settings[1] == {**settings[0], "output_dir": str(again)}


def test_every_setting_is_a_flag_with_its_help_and_default():
    from typer.main import get_command

    from peftgen import config as config_lib

    options = {p.name: p for p in get_command(app).commands["train"].params}
    assert set(options) == {*config_lib.FIELDS, "config", "resume", "overwrite"}
    for name, field in config_lib.FIELDS.items():
        assert options[name].help.startswith(field.metadata["help"]), name
        default = config_lib.shown_default(name)
        assert ("[required]" if default == "required" else f"[default: {default}]") in options[name].help, name
    assert "--sample-option" in options["sample_options"].opts
    assert options["lora_r"].help.endswith("[default: 8]") and options["train_file"].help.endswith("[required]")


def test_flags_of_every_kind_reach_the_config(tiny_gpt2, tmp_path):
    result = invoke(
        "train",
        "--model",
        tiny_gpt2,
        "--train-file",
        tmp_path / "missing.txt",
        "--packing",
        "false",
        "--gradient-checkpointing",
        "yes",
        "--target-modules",
        "c_attn,c_fc",
        "--sample-option",
        "k=5",
        "--sample-option",
        "temperature=0.5",
        "--weight-decay",
        "0.01",
        "--output-dir",
        tmp_path / "out",
    )
    assert result.exit_code == 1 and "Error: The training file" in result.stderr  # stops at the data, after resolving
    for line in ("packing: false", "gradient_checkpointing: true", "- c_attn\n- c_fc", "k: '5'", "temperature: '0.5'", "weight_decay: 0.01"):
        assert line in result.stdout, line
    assert "resume" not in result.stdout and "overwrite" not in result.stdout


def test_resume_and_overwrite_together_are_one_error_line(tiny_gpt2, text_files, tmp_path):
    result = invoke("train", "--model", tiny_gpt2, "--train-file", text_files["train"], "--output-dir", tmp_path / "out", "--resume", "--overwrite")
    assert result.exit_code == 1
    assert result.stderr == "Error: --resume continues the run in the output folder; --overwrite deletes it. Pick one.\n"


def test_a_boolean_setting_takes_a_word_and_refuses_others():
    result = invoke("train", "--packing", "maybe")
    assert result.exit_code == 1
    assert result.stderr == "Error: Invalid value for '--packing': expected a bool (true/false), got 'maybe'. See 'peftgen train --help'.\n"
