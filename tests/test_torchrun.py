"""Data-parallel training under torchrun: two CPU processes (gloo) on the tiny GPT-2.

The main process alone prepares the run folder and reports; the two processes
together take the same steps as one process with twice the per-device batch.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml
from tiny_runs import run_settings

from peftgen import config as config_lib
from peftgen import runs
from peftgen import training as train_lib

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def no_dropout_gpt2(tiny_gpt2, tmp_path_factory):
    """tiny_gpt2 without dropout: two processes draw other masks than one, which would be the only difference."""
    folder = tmp_path_factory.mktemp("tiny-gpt2-no-dropout")
    shutil.copytree(tiny_gpt2, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def settings(model, text_files, out, **extra) -> dict:
    return run_settings(model, text_files, out, **{"max_steps": 4, "eval_steps": 4, "save_steps": 2, "batch_size": 2, "lr": 2e-2, **extra})


def torchrun(config: dict, folder, *flags, kill_after_checkpoint: int | None = None) -> subprocess.CompletedProcess:
    path = folder / "settings.yaml"
    path.write_text(yaml.safe_dump(config))
    program = [__file__, str(kill_after_checkpoint)] if kill_after_checkpoint else ["-m", "peftgen"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([*TORCHRUN, *program, "train", "-c", str(path), *flags], capture_output=True, text=True, env=env, timeout=600)


def losses(folder):
    history = json.loads((folder / "log_history.json").read_text())
    return [(e["step"], e["loss"]) for e in history if "loss" in e], json.loads((folder / "metrics.json").read_text())["eval_loss"]


@pytest.fixture(scope="module")
def ddp_run(no_dropout_gpt2, text_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    done = torchrun(settings(no_dropout_gpt2, text_files, folder / "run"), folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "run", done


def test_two_processes_train_once_like_one_process_with_twice_the_batch(ddp_run, no_dropout_gpt2, text_files, tmp_path):
    run, done = ddp_run
    assert done.stdout.count("resolved config") == 1 and done.stdout.count("Run folder:") == 1
    assert sorted(p.name for p in run.parent.iterdir()) == ["run", "settings.yaml"]  # no second folder, nothing left beside
    assert [p.name for p in runs.checkpoints(run)] == ["checkpoint-2", "checkpoint-4"] and (run / "loss.png").is_file()

    single = train_lib.train(config_lib.resolve(None, settings(no_dropout_gpt2, text_files, tmp_path / "one", batch_size=4)), progress=False)
    (first, *_), two_processes = losses(run)
    assert two_processes == pytest.approx(single.metrics["eval_loss"], rel=1e-3)
    assert first[1] - two_processes > 0.05  # it trained: the equality is not that of two untouched models


def test_full_mode_under_torchrun_trains_like_one_process_with_twice_the_batch(no_dropout_gpt2, text_files, tmp_path):
    # Full mode writes the tied head's gradient into .grad and adds the lookup's
    # rows after it (efficiency.embedding_row_grads): DistributedDataParallel
    # must average that sum, not a part of it.
    done = torchrun(settings(no_dropout_gpt2, text_files, tmp_path / "two", mode="full", lr=1e-3), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = settings(no_dropout_gpt2, text_files, tmp_path / "one", mode="full", lr=1e-3, batch_size=4)
    single = train_lib.train(config_lib.resolve(None, one), progress=False)
    (first, *_), two_processes = losses(tmp_path / "two")
    assert two_processes == pytest.approx(single.metrics["eval_loss"], rel=1e-3)
    assert first[1] - two_processes > 0.05


def test_resume_under_torchrun_continues_with_the_same_losses(ddp_run, no_dropout_gpt2, text_files, tmp_path):
    config = settings(no_dropout_gpt2, text_files, tmp_path / "run")
    killed = torchrun(config, tmp_path, kill_after_checkpoint=2)
    assert killed.returncode != 0
    assert [p.name for p in runs.checkpoints(tmp_path / "run")] == ["checkpoint-2"]

    resumed = torchrun(config, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming from checkpoint-2") == 1
    assert losses(tmp_path / "run") == losses(ddp_run[0])


if __name__ == "__main__":
    # torchrun tests/test_torchrun.py STEP train ...: peftgen train, whose main
    # process is killed (SIGKILL) right after it wrote checkpoint-STEP.
    from peftgen.cli import main
    from peftgen.training import PeftgenTrainer

    step, save = int(sys.argv.pop(1)), PeftgenTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == step and self.is_world_process_zero():
            os.kill(os.getpid(), signal.SIGKILL)

    PeftgenTrainer._save_checkpoint = save_then_die
    sys.argv[0] = "peftgen"
    main()
