"""The peftgen program trains in a process whose glibc reuses freed tensor blocks (peftgen.allocator)."""

import json
import os
import subprocess
import sys

import pytest

from peftgen import allocator

# Allocate, fill and free a tensor of one size eight times; print the page faults each time took.
SAME_SIZE_AGAIN = """
import ctypes, resource
import torch
libc = ctypes.CDLL(None)
libc.mallopt(-3, 1 << 30); libc.mallopt(-1, 1 << 30)  # blocks from the heap, kept there when freed
faults = []
for step in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(16 << 20, dtype=torch.uint8)
    block.fill_(1)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""
PAGES = (16 << 20) // 4096


def without_the_tunables() -> dict[str, str]:
    """This process's environment as a user's shell would give it, before peftgen sets anything."""
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.MARK)}


def faults_per_allocation(env):
    done = subprocess.run([sys.executable, "-c", SAME_SIZE_AGAIN], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not allocator.available(), reason="glibc only")
def test_with_the_tunables_a_freed_tensor_block_is_reused_by_the_next_tensor_of_its_size():
    as_it_comes = faults_per_allocation(without_the_tunables())
    lean = faults_per_allocation(allocator.environment())
    # mostly a new stretch of heap each time, faulted in page by page (now and then a freed block happens to fit)
    assert sum(f > PAGES // 2 for f in as_it_comes[1:]) >= 5
    assert all(f < PAGES // 20 for f in lean[1:])  # the first block's pages, reused


def test_the_environment_keeps_the_users_tunables_and_adds_ours():
    env = allocator.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/home/reader"})
    assert env["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.arena_max=2", *allocator.TUNABLES]
    assert env["HOME"] == "/home/reader"
    assert env[allocator.MARK] == "1"
    assert allocator.environment(env) == env


def test_restart_runs_the_same_command_line_again_with_the_tunables(monkeypatch):
    started = []
    monkeypatch.delenv(allocator.MARK, raising=False)
    monkeypatch.setattr(allocator, "available", lambda: True)
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.append((path, argv, env)))
    allocator.restart()
    assert started == [(sys.executable, list(sys.orig_argv), allocator.environment())]


@pytest.mark.parametrize("why", ["restarted already", "not glibc"])
def test_restart_does_nothing_where_it_cannot_help(why, monkeypatch):
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("restarted"))
    if why == "restarted already":
        monkeypatch.setenv(allocator.MARK, "1")
        monkeypatch.setattr(allocator, "available", lambda: True)
    else:
        monkeypatch.delenv(allocator.MARK, raising=False)
        monkeypatch.setattr(allocator, "available", lambda: False)
    allocator.restart()


def lean_malloc_of(run) -> bool:
    return json.loads((run / "run.json").read_text())["malloc_tunables"]


@pytest.mark.skipif(not allocator.available(), reason="glibc only")
@pytest.mark.parametrize("flag, restarted", [(["--lean-malloc", "true"], True), ([], False)])
def test_the_peftgen_program_trains_in_a_restarted_process_when_asked(flag, restarted, tiny_gpt2, text_files, tmp_path):
    command = [sys.executable, "-m", "peftgen", "train", "--model", str(tiny_gpt2), "--train-file", str(text_files["train"])]
    command += ["--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--precision", "fp32", *flag]
    done = subprocess.run(command, env=without_the_tunables(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert lean_malloc_of(tmp_path / "run") is restarted


def test_the_app_called_in_process_never_restarts_it(tiny_gpt2, text_files, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from peftgen.cli import app

    monkeypatch.delenv(allocator.MARK, raising=False)
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("restarted the test process"))
    arguments = ["train", "--model", str(tiny_gpt2), "--train-file", str(text_files["train"]), "--output-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*arguments, "--max-steps", "1", "--precision", "fp32", "--lean-malloc", "true"])
    assert result.exit_code == 0, result.output
    assert lean_malloc_of(tmp_path / "run") is False


def test_8bit_asks_for_the_tunables_unless_told_otherwise():
    from peftgen import config as config_lib

    def leans(**settings):
        return config_lib.resolve(None, {"train_file": "x", **settings}).leans_malloc

    assert leans(mode="8bit") and not leans(mode="lora") and not leans(mode="full")
    assert leans(mode="lora", lean_malloc=True) and not leans(mode="8bit", lean_malloc=False)
