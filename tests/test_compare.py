"""``peftgen compare``: each measurement on fixed inputs, then every decoder side by side."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from peftgen import compare as compare_lib
from peftgen import config as config_lib
from peftgen.cli import app
from peftgen.testing import bigram_model, isolated_plugins

runner = CliRunner()
FIELDS = [
    "decoder",
    "options",
    "samples",
    "tokens_per_second",
    "eos_rate",
    "mean_length",
    "max_length",
    "distinct_1",
    "distinct_2",
    "repeated_4grams",
    "mean_logprob",
    "judge_perplexity",
    "error",
]


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.setenv("PEFTGEN_DISABLE_PLUGINS", "minp")  # the built-ins, plus what a test registers
    with isolated_plugins():
        yield


# ---------------------------------------------------------------- the measurements


def test_distinct_n_counts_unique_ngrams_over_all_samples():
    samples = ["the cat sat on the mat".split(), "the cat ran".split()]
    assert compare_lib.distinct_n(samples, 1) == 6 / 9  # the, cat, sat, on, mat, ran of 9 words
    assert compare_lib.distinct_n(samples, 2) == 6 / 7  # "the cat" twice among 7 bigrams
    assert compare_lib.distinct_n([[1, 1, 1, 1]], 1) == 1 / 4
    assert compare_lib.distinct_n([[5]], 2) is None  # no bigram at all


def test_repeated_4grams_count_repeats_within_a_sample_only():
    looping, fresh = "a b c d a b c d a".split(), "x y z w".split()
    # looping: abcd bcda cdab dabc abcd bcda, 2 of 6 repeat an earlier one; fresh: 1 4-gram
    assert compare_lib.repeated_ngrams([looping, fresh], 4) == 2 / 7
    assert compare_lib.repeated_ngrams([fresh, fresh], 4) == 0.0  # the same text twice is not a loop
    assert compare_lib.repeated_ngrams([[7] * 12], 4) == 8 / 9  # one token over and over: all but the first
    assert compare_lib.repeated_ngrams([[1, 2, 3]], 4) is None


def test_eos_rate_is_the_share_of_samples_that_stopped():
    assert compare_lib.eos_rate(["stop", "length", "stop", "stop"]) == 0.75
    assert compare_lib.eos_rate([]) is None


# Next-token logits of a 3-token bigram model: after token 0, token 1 is 3 times as likely
# as each other (p = 3/5, 1/5, 1/5); after tokens 1 and 2 all three are equally likely.
TABLE = torch.zeros(3, 3)
TABLE[1, 0] = math.log(3)


def test_log_probability_per_token_under_the_model():
    model = bigram_model(TABLE)
    assert compare_lib.token_logprobs(model, [0], [1, 2]) == pytest.approx([math.log(3 / 5), math.log(1 / 3)], abs=1e-5)
    # two samples, three tokens, token-weighted: (log 3/5 + log 1/3 + log 1/5) / 3
    expected = (math.log(3 / 5) + math.log(1 / 3) + math.log(1 / 5)) / 3
    assert compare_lib.mean_logprob(model, [0], [[1, 2], [2]]) == pytest.approx(expected, abs=1e-5)


class LetterTokenizer:
    """The judge's tokenizer: 'a' is token 1, 'b' token 2, and token 0 is its bos."""

    bos_token_id, eos_token_id = 0, None

    def encode(self, text, add_special_tokens=False):
        return [1 if letter == "a" else 2 for letter in text]


def test_judge_perplexity_retokenises_and_scores_after_the_judges_bos():
    model = bigram_model(TABLE)
    # "ab": p(a | bos) = 3/5, p(b | a) = 1/3; perplexity = (3/5 * 1/3) ** -1/2 = sqrt(5)
    assert compare_lib.judge_perplexity(model, LetterTokenizer(), ["ab"]) == pytest.approx(math.sqrt(5), rel=1e-5)
    assert compare_lib.judge_perplexity(bigram_model(torch.zeros(3, 3)), LetterTokenizer(), ["ab", "bba"]) == pytest.approx(3.0, rel=1e-5)
    assert compare_lib.judge_perplexity(model, LetterTokenizer(), [""]) is None


# ---------------------------------------------------------------- decoders side by side

PLUGIN = """
    import torch
    from peftgen import TokenDecoder, hookimpl

    class Steady(TokenDecoder):
        '''Writes one token over and over.'''
        name = "steady"

        def __init__(self, token: int = 11):
            self.token = token

        def select(self, logits, ctx):
            return torch.full((logits.shape[0],), self.token, dtype=torch.long)

    class Boom(TokenDecoder):
        '''Fails on the first step.'''
        name = "boom"

        def select(self, logits, ctx):
            raise RuntimeError("kaput")

    @hookimpl
    def register_decoders(register):
        register(Steady)
        register(Boom)
"""


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "steady_decoder.py"
    path.write_text(textwrap.dedent(PLUGIN))
    return path


def invoke(*args):
    return runner.invoke(app, ["compare", *map(str, args)])


def test_a_plugin_decoder_is_a_row_and_a_failing_one_a_row_with_its_error(tiny_gpt2, plugin_file):
    result = invoke(
        "--model",
        tiny_gpt2,
        "--decoders",
        "boom,steady,greedy",
        "--plugin",
        plugin_file,
        "--num-samples",
        3,
        "--max-new-tokens",
        5,
        "-o",
        "steady.token=13",
        "--json",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["decoder"] for r in rows] == ["boom", "steady", "greedy"]
    assert all(list(r) == FIELDS for r in rows)
    boom, steady, greedy = rows
    assert boom["error"] == "Decoder 'boom' failed in select() at step 0: RuntimeError: kaput" and boom["samples"] == 0
    assert "Warning: decoder 'boom' failed: Decoder 'boom' failed in select()" in result.stderr
    # steady writes token 13 five times per sample, three samples
    assert steady["options"] == {"token": 13} and steady["error"] is None
    assert (steady["samples"], steady["eos_rate"], steady["mean_length"], steady["max_length"]) == (3, 0.0, 5.0, 5)
    assert (steady["distinct_1"], steady["distinct_2"], steady["repeated_4grams"]) == (1 / 15, 1 / 12, 3 / 6)
    assert steady["mean_logprob"] < 0 and steady["tokens_per_second"] > 0
    assert greedy["samples"] == 3 and greedy["error"] is None


def test_the_same_seed_gives_the_same_table(tiny_gpt2):
    def measured(seed):
        rows = compare_lib.compare(
            str(tiny_gpt2), decoders="topk,greedy,beam", num_samples=4, max_new_tokens=6, seed=seed, batch_size=3, options={"beam": {"num_beams": 2}}
        )
        return [{**row.to_dict(), "tokens_per_second": None, "texts": row.texts} for row in rows]

    first = measured(0)
    assert measured(0) == first
    assert measured(1)[0] != first[0]  # topk draws differ with another seed (the test can fail)
    assert [row["decoder"] for row in first] == ["topk", "greedy", "beam"]
    assert first[2]["options"]["num_beams"] == 2


def test_all_compares_every_loaded_decoder_in_a_table(tiny_gpt2, tmp_path):
    picture = tmp_path / "decoders.png"
    result = invoke("--model", tiny_gpt2, "--num-samples", 2, "--max-new-tokens", 4, "--judge", tiny_gpt2, "--prompt", "The whale", "--plot", picture)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "decoder",
        "tokens/s",
        "<EOS>",
        "mean",
        "len",
        "max",
        "len",
        "distinct-1",
        "distinct-2",
        "rep.",
        "4-grams",
        "log",
        "p/token",
        "judge",
        "ppl",
    ]
    assert [line.split()[0] for line in lines[1:]] == ["beam", "greedy", "topk", "topp"]
    assert all(len(line.split()) == 10 for line in lines[1:])
    assert "beam: 2 samples of at most 4 tokens" in result.stderr
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_text_table_shows_a_failed_decoder_on_its_line():
    rows = [
        compare_lib.Row(
            "greedy",
            samples=2,
            tokens_per_second=10.0,
            eos_rate=0.5,
            mean_length=3.0,
            max_length=4,
            distinct_1=0.5,
            distinct_2=0.25,
            repeated_4grams=0.0,
            mean_logprob=-1.5,
        ),
        compare_lib.Row("boom", error="Decoder 'boom' failed"),
    ]
    assert compare_lib.table(rows).splitlines() == [
        "decoder  tokens/s  <EOS>  mean len  max len  distinct-1  distinct-2  rep. 4-grams  log p/token",
        "greedy       10.0    50%       3.0        4       0.500       0.250          0.0%       -1.500",
        "boom     error: Decoder 'boom' failed",
    ]
    assert compare_lib.table(rows, markdown=True).splitlines()[2] == "| greedy | 10.0 | 50% | 3.0 | 4 | 0.500 | 0.250 | 0.0% | -1.500 |"


@pytest.mark.parametrize(
    "args, message",
    [
        (["-o", "num_beams=3"], "Error: -o num_beams=3: name the decoder, as in -o beam.num_beams=3 or -o topk.k=40."),
        (["--decoders", "greedy", "-o", "beam.num_beams=3"], "Error: -o beam.num_beams=3 is for decoder 'beam', which is not compared. Compared: greedy."),
        (["-o", "beam.num_beams=0"], "Error: Decoder 'beam' rejected its options: num_beams must be at least 1, got 0."),
        (["--decoders", "topkk"], "Error: Unknown decoder 'topkk'. Available: beam, greedy, topk, topp"),
        (["--num-samples", "0"], "Error: --num-samples must be at least 1, got 0."),
    ],
)
def test_errors_are_one_clear_line(tiny_gpt2, args, message):
    result = invoke("--model", tiny_gpt2, *args)
    assert result.exit_code == 1
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1


def test_help_shows_every_flag():
    result = invoke("--help")
    for flag in ["--model", "--decoders", "--plugin", "-o", "--prompt", "--num-samples", "--max-new-tokens", "--seed", "--judge", "--json", "--plot"]:
        assert flag in result.output


DOC = Path(__file__).resolve().parent.parent / "docs" / "comparing-decoders.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_docs_python_example_runs_as_written(tiny_gpt2, capsys):
    (code,) = blocks("python")
    exec(code.replace('"runs/lora"', repr(str(tiny_gpt2))), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:2] == ["decoder", "tokens/s"]
    assert [line.split()[0] for line in printed[1:4]] == ["greedy", "topk", "beam"]


def test_the_docs_sampling_yaml_is_the_config(tmp_path):
    (yaml_block,) = blocks("yaml")
    path = tmp_path / "sampling.yaml"
    path.write_text("train_file: t.txt\nvalid_file: v.txt\n" + yaml_block)
    config = config_lib.resolve(path)
    assert (config.sample_every, config.sample_decoder, config.sample_options) == (1, "topk", {"k": 50, "p": 0.9})
    for name in ("sample_count", "sample_max_new_tokens", "sample_prompt"):  # the documented defaults are the code's
        assert getattr(config, name) == config_lib.FIELDS[name].default
