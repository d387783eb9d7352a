"""The README's plugin guide is complete and runnable: its code blocks, taken from the README
as they are, load as plugins, pass the conformance kit and generate from the command line."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftgen.cli import app
from peftgen.decoders.beam import BeamSearch
from peftgen.generation import generate
from peftgen.testing import check_decoder, isolated_plugins, tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"
runner = CliRunner()


def python_blocks(after_heading: str) -> list[str]:
    """The ```python blocks of the README section that starts with ``after_heading``, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index(after_heading)
    following = re.search(r"\n##+ ", text[start + len(after_heading):])
    section = text[start : start + len(after_heading) + following.start()] if following else text[start:]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def plugin_file(block: str, path: Path) -> dict:
    """Write a README block to ``path`` (for --plugin) and run it; returns its namespace."""
    path.write_text(block, encoding="utf-8")
    namespace: dict = {}
    exec(compile(block, str(path), "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.setenv("PEFTGEN_DISABLE_PLUGINS", "minp")
    with isolated_plugins():
        yield


@pytest.fixture
def typical_files(tmp_path) -> Path:
    """typical_decoder.py and test_typical_decoder.py, written as the README shows them."""
    decoder, test = python_blocks("### 1. A decoder in a file")
    (tmp_path / "typical_decoder.py").write_text(decoder, encoding="utf-8")
    (tmp_path / "test_typical_decoder.py").write_text(test, encoding="utf-8")
    return tmp_path


def test_the_decoder_in_a_file_lists_and_generates_with_plugin(typical_files, tiny_gpt2):
    path = typical_files / "typical_decoder.py"
    listing = json.loads(runner.invoke(app, ["decoders", "--json", "--plugin", str(path)]).stdout)
    typical = next(entry for entry in listing if entry["name"] == "typical")
    assert (typical["plugin"], typical["source"]) == (str(path), "local")
    assert [option["name"] for option in typical["options"]] == ["tau", "temperature"]
    result = runner.invoke(app, ["generate", "--model", str(tiny_gpt2), "--plugin", str(path), "--decoder", "typical",
                                 "-o", "tau=0.9", "--length", "5", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert (row["decoder"], row["options"], len(row["token_ids"])) == ("typical", {"tau": 0.9, "temperature": 1.0}, 5)


def test_the_guides_own_test_file_passes(typical_files):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_typical_decoder.py"],
                            cwd=typical_files, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_sequence_decoder_example_passes_the_kit_and_runs(tmp_path, tiny_gpt2):
    block, _ = python_blocks("### Sequence decoders")
    path = tmp_path / "sample_and_rank.py"
    check_decoder(plugin_file(block, path)["SampleAndRank"])
    result = runner.invoke(app, ["generate", "--model", str(tiny_gpt2), "--plugin", str(path), "--decoder", "sample-and-rank",
                                 "--num-return-sequences", "3", "--length", "6", "--seed", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert [len(json.loads(line)["token_ids"]) for line in result.stdout.splitlines()] == [6, 6, 6]


def test_the_from_python_example_runs_on_a_trained_run(make_run, tiny_gpt2):
    (block,) = python_blocks("### From Python")
    assert '"runs/lora"' in block and "max_new_tokens=300" in block
    run = make_run("lora", tiny_gpt2)
    code = block.replace('"runs/lora"', repr(str(run))).replace("max_new_tokens=300", "max_new_tokens=40")  # context 256
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {})
    lines = printed.getvalue().splitlines()
    assert len(lines) == 5
    assert all(line.split(" ", 1)[0] in ("stop", "length") for line in lines)


@pytest.fixture
def diverse_beam(tmp_path):
    """The README's diverse beam search: its file, and its class."""
    _, block = python_blocks("### Sequence decoders")
    path = tmp_path / "diverse_beam.py"
    return path, plugin_file(block, path)["DiverseBeam"]


def test_diverse_beam_passes_the_kit(diverse_beam):
    _, cls = diverse_beam
    check_decoder(cls)
    check_decoder(cls, num_beams=4, num_groups=1, diversity_penalty=0.0)


@pytest.mark.parametrize("num_beams", [2, 3, 4])
def test_diverse_beam_with_one_group_and_no_penalty_is_beam_search(diverse_beam, num_beams):
    _, cls = diverse_beam
    prompts = [[1, 2, 3], [7]]
    ours = generate(tiny_model(), prompts, cls(num_beams=num_beams, num_groups=1, diversity_penalty=0.0),
                    max_new_tokens=10, num_return_sequences=num_beams)
    beam = generate(tiny_model(), prompts, BeamSearch(num_beams=num_beams), max_new_tokens=10,
                    num_return_sequences=num_beams)
    assert [[c.token_ids for c in per_prompt] for per_prompt in ours] == [[c.token_ids for c in per_prompt] for per_prompt in beam]


def test_diverse_beam_groups_start_differently_where_beams_do_not(diverse_beam):
    _, cls = diverse_beam
    diverse = generate(tiny_model(), [[5]], cls(num_beams=4, num_groups=4, diversity_penalty=100.0),
                       max_new_tokens=8, num_return_sequences=4)[0]
    plain = generate(tiny_model(), [[5]], BeamSearch(num_beams=4), max_new_tokens=8, num_return_sequences=4)[0]
    assert len({c.token_ids[0] for c in plain}) == 1  # plain beams all share their first token here
    assert len({c.token_ids[0] for c in diverse}) == 4


def test_diverse_beam_runs_from_the_command_line(diverse_beam, tiny_gpt2):
    path, _ = diverse_beam
    result = runner.invoke(app, ["generate", "--model", str(tiny_gpt2), "--plugin", str(path), "--decoder", "diverse-beam",
                                 "-o", "num_groups=2", "-o", "num_beams=4", "--num-return-sequences", "4",
                                 "--length", "5", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 4 and all(row["decoder"] == "diverse-beam" for row in rows)
    assert rows[0]["options"] == {"num_beams": 4, "num_groups": 2, "diversity_penalty": 1.0}
