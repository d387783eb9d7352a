"""The README and docs/ are true: every python block in them is a real file or is run here,
the example plugins under examples/ load, pass the conformance kit and generate from the
command line, and every ``peftgen ...`` command line they show parses."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from peftgen.cli import app
from peftgen.decoders.beam import BeamSearch
from peftgen.generation import generate
from peftgen.testing import check_decoder, isolated_plugins, tiny_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
runner = CliRunner()


def doc(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def blocks(text: str, language: str) -> list[str]:
    """The fenced blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def python_block(name: str, containing: str) -> str:
    """The one python block of doc ``name`` that contains ``containing``."""
    found = [block for block in blocks(doc(name), "python") if containing in block]
    assert len(found) == 1, f"{name}: {len(found)} python blocks contain {containing!r}"
    return found[0]


# Python blocks that are not a copy of a file are run by a test below, which finds its block by
# the same (doc, text in the block) as this list does.
RUN_HERE = {
    ("README.md", "peftgen.prepare("): "test_the_three_commands_print_what_the_readme_shows",
    ("docs/writing-plugins.md", 'get_decoder("topk")'): "test_the_plugin_guides_from_python_example_runs",
    ("docs/generation.md", "peftgen.generate_text("): "test_the_generate_text_example_runs",
    ("docs/comparing-decoders.md", "from peftgen.compare import compare"): "test_the_compare_example_runs",
    ("docs/training.md", 'peftgen.load("runs/lora")'): "test_the_loading_example_runs",
    ("docs/training.md", 'peftgen.train("configs/lora.yaml")'): "test_the_library_example_trains_evaluates_and_merges",
}
SHOWN_FILES = [*sorted(EXAMPLES.glob("*.py")), *sorted((ROOT / "peftgen" / "decoders").glob("*.py"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_python_block_is_a_real_file_or_run_by_a_test(path):
    files = {file.read_text(encoding="utf-8") for file in SHOWN_FILES}
    name = str(path.relative_to(ROOT))
    run_here = [text for (where, text) in RUN_HERE if where == name]
    for block in blocks(path.read_text(encoding="utf-8"), "python"):
        runs = [text for text in run_here if text in block]
        assert block in files or len(runs) == 1, f"{name}: this python block is neither a file under examples/ nor run by a test:\n{block}"


def test_the_readme_plugin_is_the_builtin_greedy_file():
    assert (ROOT / "peftgen/decoders/greedy.py").read_text(encoding="utf-8") in blocks(doc("README.md"), "python")


@pytest.mark.parametrize("example", ["typical_decoder.py", "test_typical_decoder.py", "sample_and_rank.py", "diverse_beam.py"])
def test_the_plugin_guide_shows_each_example_file_as_it_is(example):
    assert (EXAMPLES / example).read_text(encoding="utf-8") in blocks(doc("docs/writing-plugins.md"), "python")
    assert f"(../examples/{example})" in doc("docs/writing-plugins.md")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", [*DOCS, ROOT / "benchmarks" / "README.md"], ids=lambda p: p.name)
def test_every_relative_link_reaches_its_file_and_heading(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: link to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", linked.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{path.name}: link to {target}: no such heading"


def test_slugs_are_githubs():
    assert slug("Evaluation: `peftgen eval`") == "evaluation-peftgen-eval"
    assert slug("Why OMP_WAIT_POLICY=PASSIVE") == "why-omp_wait_policypassive"
    assert slug("The demo's fine-tuned model") == "the-demos-fine-tuned-model"


# ---- every command line shown parses -------------------------------------------------------


def shown_commands(text: str) -> list[tuple[str, bool]]:
    """(command line, whole) for every line of a bash block or '$ ' line of a text block, and
    every inline `peftgen ...` span (whole=False: it may hold placeholders such as RUN)."""
    found = []
    shown = blocks(text, "text") + blocks(text, "")  # terminal sessions: the '$ ' lines
    for block in blocks(text, "bash") + shown:
        for line in block.replace("\\\n", " ").splitlines():
            if block in shown:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            found.append((line, True))
    found += [(span, False) for span in re.findall(r"`((?:[A-Z_]+=\S+ )*peftgen [^`]+)`", text)]
    return found


def _segments(line: str) -> list[list[str]]:
    """The simple commands of a shell line: its words split at ``&&``, ``||``, ``;`` and ``|``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    segments: list[list[str]] = [[]]
    for word in lexer:
        if word in ("&&", "||", ";", "|"):
            segments.append([])
        else:
            segments[-1].append(word)
    return segments


def _peftgen_args(words: list[str]) -> list[str] | None:
    """The arguments of ``peftgen`` when a simple command runs it (also as ``-m peftgen``), else None."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before the command
        words = words[1:]
    if words[:1] == ["peftgen"]:
        return words[1:]
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1] == "peftgen":
            return words[i + 2 :]
    return None


def _module_run(words: list[str]) -> str | None:
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1].startswith("peftgen."):
            return words[i + 1]
    return None


def check_parses(args: list[str], whole: bool) -> None:
    """Each flag exists on its (sub)command; a whole line must also parse as click parses it."""
    command = typer.main.get_command(app)  # Typer's own click: duck-typed below
    context = command.context_class(command, info_name="peftgen")
    while hasattr(command, "commands") and args and args[0] in command.commands:
        command, args = command.commands[args[0]], args[1:]
        if hasattr(command, "commands"):
            context = command.context_class(command, info_name=command.name, parent=context)
    assert not hasattr(command, "commands"), f"no such command: peftgen {' '.join(args)}"
    flags = {"--help", *(option for param in command.params for option in param.opts + param.secondary_opts)}
    for arg in args:
        flag = arg.split("=", 1)[0]
        assert not arg.startswith("-") or flag in flags, f"{command.name} has no option {flag}; it has {sorted(flags)}"
    if whole:
        command.make_context(command.name, list(args), parent=context)  # raises on a bad value or a missing option


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_command_line_shown_parses(path):
    commands = shown_commands(path.read_text(encoding="utf-8"))
    checked = 0
    for line, whole in commands:
        for words in _segments(line):
            module = _module_run(words)
            assert module is None or importlib.util.find_spec(module), f"{path.name}: {line!r} runs a module that does not exist"
            args = _peftgen_args(words)
            if args is None or (args and args[0].isupper()):  # not peftgen, or `peftgen COMMAND --help`
                continue
            try:
                check_parses(args, whole)
            except Exception as error:  # a missing flag, or click's UsageError / BadParameter
                raise AssertionError(f"{path.name}: {line!r}: {error}") from None
            checked += 1
    if path.name in ("README.md", "training.md", "generation.md", "data.md", "writing-plugins.md"):
        assert checked >= 3


def test_the_command_check_catches_a_wrong_flag_and_a_missing_value():
    with pytest.raises(AssertionError, match="no option --learning-rate"):
        check_parses(["train", "--learning-rate", "1e-4"], whole=True)
    with pytest.raises(Exception, match="requires an argument"):
        check_parses(["generate", "--model"], whole=True)
    with pytest.raises(Exception, match="valid integer"):
        check_parses(["generate", "--model", "RUN", "--length", "many"], whole=True)
    with pytest.raises(AssertionError, match="no such command"):
        check_parses(["trian"], whole=False)
    check_parses(["generate", "--model", "RUN", "-o", "k=5", "--json"], whole=True)


# ---- the example plugins --------------------------------------------------------------------


def load_file(path: Path) -> dict:
    """Run a plugin file; returns its namespace."""
    namespace: dict = {"__name__": path.stem}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.setenv("PEFTGEN_DISABLE_PLUGINS", "minp")
    with isolated_plugins():
        yield


def test_the_decoder_in_a_file_lists_and_generates_with_plugin(tiny_gpt2):
    path = EXAMPLES / "typical_decoder.py"
    listing = json.loads(runner.invoke(app, ["decoders", "--json", "--plugin", str(path)]).stdout)
    typical = next(entry for entry in listing if entry["name"] == "typical")
    assert (typical["plugin"], typical["source"]) == (str(path), "local")
    assert [option["name"] for option in typical["options"]] == ["tau", "temperature"]
    result = runner.invoke(
        app, ["generate", "--model", str(tiny_gpt2), "--plugin", str(path), "--decoder", "typical", "-o", "tau=0.9", "--length", "5", "--seed", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert (row["decoder"], row["options"], len(row["token_ids"])) == ("typical", {"tau": 0.9, "temperature": 1.0}, 5)


def test_the_guides_own_test_file_passes():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/test_typical_decoder.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_sequence_decoder_example_passes_the_kit_and_runs(tiny_gpt2):
    path = EXAMPLES / "sample_and_rank.py"
    check_decoder(load_file(path)["SampleAndRank"])
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_gpt2),
            "--plugin",
            str(path),
            "--decoder",
            "sample-and-rank",
            "--num-return-sequences",
            "3",
            "--length",
            "6",
            "--seed",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert [len(json.loads(line)["token_ids"]) for line in result.stdout.splitlines()] == [6, 6, 6]


@pytest.fixture
def diverse_beam():
    """examples/diverse_beam.py: its file, and its class."""
    path = EXAMPLES / "diverse_beam.py"
    return path, load_file(path)["DiverseBeam"]


def test_diverse_beam_passes_the_kit(diverse_beam):
    _, cls = diverse_beam
    check_decoder(cls)
    check_decoder(cls, num_beams=4, num_groups=1, diversity_penalty=0.0)


@pytest.mark.parametrize("num_beams", [2, 3, 4])
def test_diverse_beam_with_one_group_and_no_penalty_is_beam_search(diverse_beam, num_beams):
    _, cls = diverse_beam
    prompts = [[1, 2, 3], [7]]
    ours = generate(tiny_model(), prompts, cls(num_beams=num_beams, num_groups=1, diversity_penalty=0.0), max_new_tokens=10, num_return_sequences=num_beams)
    beam = generate(tiny_model(), prompts, BeamSearch(num_beams=num_beams), max_new_tokens=10, num_return_sequences=num_beams)
    assert [[c.token_ids for c in row] for row in ours] == [[c.token_ids for c in row] for row in beam]


def test_diverse_beam_groups_start_differently_where_beams_do_not(diverse_beam):
    _, cls = diverse_beam
    diverse = generate(tiny_model(), [[5]], cls(num_beams=4, num_groups=4, diversity_penalty=100.0), max_new_tokens=8, num_return_sequences=4)[0]
    plain = generate(tiny_model(), [[5]], BeamSearch(num_beams=4), max_new_tokens=8, num_return_sequences=4)[0]
    assert len({c.token_ids[0] for c in plain}) == 1  # plain beams all share their first token here
    assert len({c.token_ids[0] for c in diverse}) == 4


def test_diverse_beam_runs_from_the_command_line(diverse_beam, tiny_gpt2):
    path, _ = diverse_beam
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_gpt2),
            "--plugin",
            str(path),
            "--decoder",
            "diverse-beam",
            "-o",
            "num_groups=2",
            "-o",
            "num_beams=4",
            "--num-return-sequences",
            "4",
            "--length",
            "5",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 4 and all(row["decoder"] == "diverse-beam" for row in rows)
    assert rows[0]["options"] == {"num_beams": 4, "num_groups": 2, "diversity_penalty": 1.0}


# ---- python blocks run as they are shown, on tiny models ------------------------------------


def run_block(name: str, containing: str, replace: dict[str, str], namespace: dict | None = None) -> list[str]:
    """Run a doc's python block with the given text replaced (paths to tiny models); its printed lines."""
    code = python_block(name, containing)
    for old, new in replace.items():
        assert old in code, f"{name}: the block no longer contains {old!r}"
        code = code.replace(old, new)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, name, "exec"), {} if namespace is None else namespace)
    return printed.getvalue().splitlines()


def test_the_plugin_guides_from_python_example_runs(make_run, tiny_gpt2):
    run = make_run("lora", tiny_gpt2)
    lines = run_block(
        "docs/writing-plugins.md", 'get_decoder("topk")', {'"runs/lora"': repr(str(run)), "max_new_tokens=300": "max_new_tokens=40"}
    )  # context 256
    assert len(lines) == 5
    assert all(line.split(" ", 1)[0] in ("stop", "length") for line in lines)


def test_the_generate_text_example_runs(make_run, tiny_gpt2):
    run = make_run("lora", tiny_gpt2)
    lines = run_block("docs/generation.md", "peftgen.generate_text(", {'"runs/lora"': repr(str(run))})
    assert len(lines) == 3 and all(line.split(" ", 1)[0] in ("stop", "length") for line in lines)


def test_the_library_example_trains_evaluates_and_merges(tiny_gpt2, text_files, tmp_path):
    settings = tmp_path / "lora.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_gpt2),
                "mode": "lora",
                "train_file": str(text_files["train"]),
                "valid_file": str(text_files["valid"]),
                "output_dir": str(tmp_path / "run"),
                "max_steps": 2,
                "eval_steps": 2,
                "precision": "fp32",
            }
        )
    )
    lines = run_block(
        "docs/training.md",
        'peftgen.train("configs/lora.yaml")',
        {
            '"configs/lora.yaml"': repr(str(settings)),
            '"data/test.txt"': repr(str(text_files["test"])),
            '"merged/"': repr(str(tmp_path / "merged")),
        },
    )
    lines = [line for line in lines if not line.startswith("{")]  # Trainer's own log lines
    assert lines[0].split()[0] == str(tmp_path / "run") and float(lines[0].split()[1]) > 0
    assert float(lines[1]) > 1  # a perplexity
    assert (tmp_path / "merged" / "config.json").is_file()


def test_the_compare_example_runs(make_run, tiny_gpt2):
    run = make_run("lora", tiny_gpt2)
    lines = run_block("docs/comparing-decoders.md", "from peftgen.compare import compare", {'"runs/lora"': repr(str(run))})
    assert lines[0].split()[0] == "decoder" and [line.split()[0] for line in lines[1:4]] == ["greedy", "topk", "beam"]
    best = lines[4].split(" ", 1)  # the decoder with the most distinct 2-grams, its options, its first text
    assert best[0] in ("greedy", "topk", "beam") and best[1].startswith("{")


def test_the_loading_example_runs(make_run, tiny_gpt2, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from gguf_writer import gpt2_bpe_prefix, tiny_llama, write_tiny_llama_gguf

    monkeypatch.setenv("PEFTGEN_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(len(gpt2_bpe_prefix(400)[0])))
    run = make_run("lora", tiny_gpt2)
    namespace: dict = {}
    run_block(
        "docs/training.md",
        'peftgen.load("runs/lora")',
        {
            '"runs/lora"': repr(str(run)),
            '"gpt2"': repr(str(tiny_gpt2)),
            '"model.Q4_1.gguf"': repr(str(gguf)),
        },
        namespace,
    )
    assert type(namespace["model"]).__name__ == "LlamaForCausalLM"  # the last line loaded the GGUF file


# ---- the README's three commands print what it shows -----------------------------------------


def copy_sample(folder: Path) -> None:
    """data/cmu-booksummaries-sample.tsv, as the commands shown name it, under folder."""
    (folder / "data").mkdir()
    sample = "cmu-booksummaries-sample.tsv"
    (folder / "data" / sample).write_bytes((ROOT / "data" / sample).read_bytes())


def shown_run(name: str, command: str) -> list[str]:
    """The lines a ```text block of doc ``name`` shows after ``$ <command>``."""
    (block,) = [block for block in blocks(doc(name), "text") if block.startswith(f"$ {command}\n")]
    return block.splitlines()[1:]


def test_the_three_commands_print_what_the_readme_shows(tmp_path, monkeypatch):
    from conftest import _save_tiny
    from transformers import GPT2Config

    (commands,) = [block for block in blocks(doc("README.md"), "bash") if "peftgen prepare data/cmu" in block]
    prepare, train, sample = commands.splitlines()
    monkeypatch.chdir(tmp_path)  # the commands' relative paths land here
    copy_sample(tmp_path)
    # tiny-gpt2 is what the README says its output came from: 2 layers, random weights, GPT-2's context and tokenizer
    _save_tiny(tmp_path / "tiny-gpt2", GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=1024, vocab_size=50257))

    args = shlex.split(prepare)[1:]
    args[args.index("--tokenizer") + 1] = "tiny-gpt2"  # gpt2's tokenizer files, as shipped for the tests
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == shown_run("README.md", prepare)

    tiny_train = train.replace("--model gpt2 ", "--model tiny-gpt2 ")
    result = runner.invoke(app, [*shlex.split(tiny_train)[1:], "--max-steps", "1"])  # the shown run took 160 steps
    assert result.exit_code == 0, result.output
    printed = result.stdout.splitlines() + result.stderr.splitlines()
    for line in shown_run("README.md", tiny_train):
        if line.startswith(("Precision:", "Validation loss:")):  # bf16 where the CPU has it; 159 steps fewer
            assert any(p.startswith(line.split(":")[0] + ":") for p in printed), line
        elif line not in ("...", "") and not line.startswith("{"):  # Trainer's log lines
            assert line in printed

    result = runner.invoke(app, shlex.split(sample)[1:])
    assert result.exit_code == 0, result.output
    shown = shown_run("README.md", sample)
    headers = [line for line in result.stdout.splitlines() if line.startswith("=== ")]
    shown_headers = [line for line in shown if line.startswith("=== ")]
    assert [re.sub("(stop|length) ===", "", h) for h in headers] == [re.sub("(stop|length) ===", "", s) for s in shown_headers]
    seed = re.fullmatch(r"\(seed (\d+): pass --seed \1 to repeat this output\)", shown[-1])
    assert seed and re.fullmatch(r"\(seed (\d+): pass --seed \1 to repeat this output\)", result.stderr.splitlines()[-1])

    # The same three steps from Python, as the README shows them, into folders of their own
    lines = run_block(
        "README.md",
        "peftgen.prepare(",
        {
            '"gpt2"': '"tiny-gpt2"',
            '"data/books"': '"data/books-py"',
            '"data/books/': '"data/books-py/',
            '"output_dir": "runs/books"': '"output_dir": "runs/books-py", "max_steps": 1',
        },
    )
    assert (tmp_path / "data" / "books-py" / "train.txt").is_file() and (tmp_path / "runs" / "books-py" / "run.json").is_file()
    assert sum(line.startswith(("stop ", "length ")) for line in lines) >= 2


def test_the_generate_errors_shown_are_the_ones_generate_gives(make_run, tiny_gpt2):
    run = make_run("lora", tiny_gpt2)
    causes = {  # the start of each error line shown -> flags that cause it
        "Error: Unknown decoder 'topkk'": ["--decoder", "topkk"],
        "Error: Decoder 'topk' rejected its options": ["-o", "k=0"],
        "Error: Decoder 'beam': num_return_sequences (6)": ["--decoder", "beam", "--num-return-sequences", "6"],
        "Error: The prompt is": ["--prompt", "word " * 300],  # numbers differ: this run's context is 256
        "Error: --stop-token 'two words'": ["--stop-token", "two words"],
    }
    (block,) = [block for block in blocks(doc("docs/generation.md"), "text") if block.startswith("Error:")]
    shown = block.splitlines()
    assert [next(line for line in shown if line.startswith(start)) for start in causes] == shown
    for line in shown:
        flags = next(flags for start, flags in causes.items() if line.startswith(start))
        result = runner.invoke(app, ["generate", "--model", str(run), "--length", "5", *flags])
        assert result.exit_code == 1
        given = result.stderr.strip().splitlines()[-1]
        if line.startswith("Error: The prompt is"):
            given, line = re.sub(r"\d+", "N", given), re.sub(r"\d+", "N", line)
        assert given == line


def test_the_prepare_output_shown_without_a_tokenizer_is_what_prepare_prints(tmp_path, monkeypatch):
    command = "peftgen prepare data/cmu-booksummaries-sample.tsv --output-dir data/books"
    monkeypatch.chdir(tmp_path)
    copy_sample(tmp_path)
    result = runner.invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    shown = shown_run("docs/data.md", command)
    assert result.stdout.splitlines() == shown[: shown.index("")]  # the block goes on with a second command


def test_the_speed_switches_shown_are_settings_with_those_defaults():
    from peftgen import config as config_lib

    text = doc("docs/training.md")
    table = text[text.index("| key | default | what it does |") :].split("\n\n")[0]
    rows = [re.match(r"\| `(\w+)` \| `([^`]*)` \|", line) for line in table.splitlines()[2:]]
    assert rows and all(rows), table
    for row in rows:
        key, default = row.groups()
        assert key in config_lib.FIELDS, f"docs/training.md shows a switch {key!r} that TrainConfig does not have"
        assert yaml.safe_load(default) == config_lib.FIELDS[key].default, f"{key}: docs/training.md says {default}"
