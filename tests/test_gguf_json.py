"""``--json`` output stays clean on the first use of a .gguf file, when it is dequantised into the cache.

The note saying so goes to stderr; stdout holds only the JSON lines. Each
command runs as its own process, as a user runs it, so anything written to
the real stdout is caught.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("gguf")

from gguf_writer import write_tiny_llama_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def peftgen(args, cache):
    env = dict(os.environ, PEFTGEN_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "peftgen", *args], capture_output=True, text=True, env=env, timeout=600)


def json_lines(stdout: str) -> list:
    return [json.loads(line) for line in stdout.splitlines()]  # any other line fails here


def test_eval_json_on_a_first_gguf_load_prints_only_json(tiny_gguf, tmp_path):
    text = tmp_path / "test.txt"
    text.write_text("The old boar calls the animals to the barn.\nTwo pigs take command of the farm.\n", encoding="utf-8")
    result = peftgen(["eval", "--model", str(tiny_gguf), "--file", str(text), "--json"], tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "Dequantising tiny.gguf" in result.stderr  # a first load, then
    [scores] = json_lines(result.stdout)
    assert set(scores) == {"loss", "perplexity", "tokens"} and scores["tokens"] > 0


def test_generate_json_on_a_first_gguf_load_prints_only_json(tiny_gguf, tmp_path):
    args = ["generate", "--model", str(tiny_gguf), "--decoder", "greedy", "--length", "3", "--seed", "1", "--prompt", "The farm", "--prompt", "A boy", "--json"]
    result = peftgen(args, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "Dequantising tiny.gguf" in result.stderr
    lines = json_lines(result.stdout)
    assert [line["prompt"] for line in lines] == ["The farm", "A boy"]
    assert all(len(line["token_ids"]) <= 3 for line in lines)
