"""Nothing a user had is lost: --overwrite that fails to start, a kill while a checkpoint
is written, a loss gone NaN, and a kill during the final save."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml
from tiny_runs import run_settings
from typer.testing import CliRunner

from peftgen import config as config_lib
from peftgen import model as model_lib
from peftgen import runs
from peftgen import training as train_lib
from peftgen.cli import app
from peftgen.errors import PeftgenError


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def old_run(make_run, tiny_gpt2, tmp_path):
    """A finished run of the user's, in tmp_path/run, with its bytes as they are now."""
    folder = tmp_path / "run"
    shutil.copytree(make_run("lora", tiny_gpt2), folder)
    return folder, snapshot(folder)


def settings(base, text_files, out, **extra):
    return config_lib.resolve(None, run_settings(base, text_files, out, **{"eval_steps": 6, "save_steps": 2, **extra}))


def assert_untouched(old_run):
    folder, before = old_run
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["run"]  # nothing left beside it


@pytest.mark.parametrize("bad", [{"logging_steps": 0}, {"report_to": ["nope"]}, {"warmup_steps": -1}, {"lr": math.nan}])
def test_overwrite_with_a_bad_value_leaves_the_old_run_as_it_was(bad, old_run, tiny_gpt2, text_files):
    folder = old_run[0]
    config = folder.parent / "bad.yaml"
    config.write_text(yaml.safe_dump({**bad, "max_steps": 2}))
    result = CliRunner().invoke(
        app, ["train", "-c", str(config), "--model", str(tiny_gpt2), "--train-file", str(text_files["train"]), "--output-dir", str(folder), "--overwrite"]
    )
    config.unlink()
    assert result.exit_code == 1 and "Error: " in result.output and "Traceback" not in result.output
    assert_untouched(old_run)


def test_overwrite_failing_while_the_trainer_is_built_leaves_the_old_run(old_run, tiny_gpt2, text_files, monkeypatch):
    def broken(self, *args, **kwargs):
        raise ValueError("unsupported setting")

    monkeypatch.setattr(train_lib.PeftgenTrainer, "__init__", broken)
    with pytest.raises(ValueError, match="unsupported setting"):
        train_lib.train(settings(tiny_gpt2, text_files, old_run[0]), overwrite=True, progress=False)
    assert_untouched(old_run)


def test_overwrite_failing_at_the_first_step_leaves_the_old_run(old_run, tiny_gpt2, text_files, monkeypatch):
    def broken(self, *args, **kwargs):
        assert (old_run[0].parent / f".run.partial-{os.getpid()}" / "peftgen.yaml").is_file()
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train_lib.PeftgenTrainer, "training_step", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_lib.train(settings(tiny_gpt2, text_files, old_run[0]), overwrite=True, progress=False)
    assert_untouched(old_run)


def test_a_new_run_that_fails_to_start_leaves_no_folder(tiny_gpt2, text_files, tmp_path, monkeypatch):
    monkeypatch.setattr(train_lib.PeftgenTrainer, "training_step", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train_lib.train(settings(tiny_gpt2, text_files, tmp_path / "new"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(old_run, tiny_gpt2, text_files):
    folder = old_run[0]
    result = train_lib.train(settings(tiny_gpt2, text_files, folder, max_steps=4, lora_r=2), overwrite=True, progress=False)
    assert result.output_dir == folder and result.loss_plot == folder / "loss.png"
    assert yaml.safe_load((folder / "peftgen.yaml").read_text())["lora_r"] == 2
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["run"]
    assert not (folder / runs.STAGING).exists()


# --------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def straight_run(tiny_gpt2, text_files, tmp_path_factory):
    """Six steps without interruption: the losses every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train_lib.train(settings(tiny_gpt2, text_files, out), progress=False)
    return out


def losses(folder):
    history = json.loads((folder / "log_history.json").read_text())
    return [(e["step"], e["loss"]) for e in history if "loss" in e], json.loads((folder / "metrics.json").read_text())["eval_loss"]


KILL_DURING_SAVE = textwrap.dedent("""
    import json, os, signal, sys
    from transformers import Trainer
    from peftgen import config as config_lib, training as train_lib

    original = Trainer._save_rng_state
    def save_rng_state(self, output_dir):
        if self.state.global_step == 4:  # the optimizer is written, the RNG state and trainer state are not
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, output_dir)
    Trainer._save_rng_state = save_rng_state
    train_lib.train(config_lib.resolve(None, json.loads(sys.argv[1])), progress=False)
""")


def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_previous_one_with_the_same_losses(tiny_gpt2, text_files, tmp_path, straight_run, capsys):
    out = tmp_path / "run"
    values = settings(tiny_gpt2, text_files, out).to_dict()
    done = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, json.dumps(values)], capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    assert [p.name for p in runs.checkpoints(out)] == ["checkpoint-2"]
    assert (out / runs.STAGING / "checkpoint-4" / "optimizer.pt").is_file()  # the half-written one

    train_lib.train(settings(tiny_gpt2, text_files, out), resume=True, progress=False)
    note = capsys.readouterr().err
    assert "resuming from checkpoint-2" in note and f"skipped {runs.STAGING}/checkpoint-4 (its save was interrupted)" in note
    assert losses(out) == losses(straight_run)
    assert not (out / runs.STAGING).exists()


def test_resume_passes_over_an_incomplete_checkpoint_folder(tiny_gpt2, text_files, tmp_path, straight_run, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    for name in ("model.safetensors", "adapter_model.safetensors", "adapter_config.json", "metrics.json", "log_history.json"):
        (out / name).unlink(missing_ok=True)
    (out / "checkpoint-6" / "optimizer.pt").unlink()  # written by a version that saved in place, then killed
    train_lib.train(settings(tiny_gpt2, text_files, out), resume=True, progress=False)
    note = capsys.readouterr().err
    assert "resuming from checkpoint-4" in note and "checkpoint-6 (no optimizer state)" in note
    assert losses(out) == losses(straight_run)


def test_resume_with_only_incomplete_checkpoints_is_a_clear_error(tiny_gpt2, text_files, tmp_path, straight_run):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    for checkpoint in runs.checkpoints(out):
        (checkpoint / "trainer_state.json").unlink()
    with pytest.raises(
        PeftgenError,
        match=r"Nothing to resume in .*: no complete checkpoint-N folder \(checkpoint-6 \(no trainer_state.json\), "
        r"checkpoint-4 \(no trainer_state.json\)\)\. Drop --resume",
    ):
        train_lib.train(settings(tiny_gpt2, text_files, out), resume=True, progress=False)


# -------------------------------------------------------- a loss gone NaN


def test_a_diverging_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_gpt2, text_files, tmp_path):
    out = tmp_path / "run"
    # Warmup from 0: step 1 leaves the weights as they were (checkpoint-1 is good), step 2's
    # learning rate of 1e29 ruins them, and step 3's loss is not finite.
    absurd = settings(tiny_gpt2, text_files, out, lr=1e30, warmup_steps=10, save_steps=1)
    with pytest.raises(PeftgenError) as stopped:
        train_lib.train(absurd, progress=False)
    message = str(stopped.value)
    assert "The training loss became nan at step 3 (learning rate 1e+30); training stopped." in message
    assert "Removed checkpoint-2: saved from the weights that gave it." in message
    assert f"{out / 'checkpoint-1'} holds the last good weights" in message and "--resume --lr 1e+29" in message
    assert [p.name for p in runs.checkpoints(out)] == ["checkpoint-1"] and runs.incomplete(out / "checkpoint-1") is None

    resumed = train_lib.train(settings(tiny_gpt2, text_files, out, lr=1e-3, max_steps=3, save_steps=1), resume=True, progress=False)
    rates = [e["learning_rate"] for e in resumed.log_history if "loss" in e]
    assert len(rates) == 3 and all(0 < rate <= 1e-3 for rate in rates[1:])  # the new peak, not the checkpoint's 1e30
    assert math.isfinite(resumed.metrics["eval_loss"])


# ------------------------------------------------- the final save is renamed into place


def test_a_kill_during_the_final_save_leaves_a_run_that_reads_as_unfinished(tiny_gpt2, text_files, tmp_path, monkeypatch):
    moved = runs.move_into

    def killed_half_way(source, target, last):
        if not last:  # a checkpoint: let it through
            return moved(source, target, last)
        for path in sorted(source.iterdir()):
            if path.name not in last:
                path.rename(target / path.name)
                break
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "move_into", killed_half_way)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(settings(tiny_gpt2, text_files, out, max_steps=2), progress=False)
    assert (out / "checkpoint-2").is_dir() and not (out / "adapter_config.json").exists()
    with pytest.raises(PeftgenError, match="training did not finish"):
        model_lib.load(out)


def test_an_output_folder_that_cannot_be_created_is_refused_before_the_model_loads(tiny_gpt2, text_files, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(model_lib, "prepare_for_training", must_not_load)
    with pytest.raises(PeftgenError, match="cannot be created: .*a-file is a file"):
        train_lib.train(settings(tiny_gpt2, text_files, blocker / "run"), progress=False)
    assert blocker.read_text(encoding="utf-8") == "not a folder"
