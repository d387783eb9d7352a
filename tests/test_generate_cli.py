"""``peftgen generate`` and ``peftgen decoders`` from the command line."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from peftgen.cli import app
from peftgen.testing import isolated_plugins

runner = CliRunner()
KEYS = ["prompt", "text", "token_ids", "finish_reason", "decoder", "options", "seed"]


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.setenv("PEFTGEN_DISABLE_PLUGINS", "minp")  # listings below are of the built-ins only
    with isolated_plugins():
        yield


@pytest.fixture(scope="module")
def eos_run(tmp_path_factory, gpt2_tokenizer_dir):
    """A model folder shaped like a trained run: <BOS>/<EOS>/<PAD> tokens, and weights that always predict <EOS>.

    ln_f is zeroed except its bias, which points along <EOS>'s (tied) embedding: every
    position's hidden state is that vector, so <EOS> has by far the largest logit.
    """
    from transformers import GPT2Config

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    tokenizer.add_special_tokens({"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=512, vocab_size=len(tokenizer)))
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
        model.transformer.wte.weight[eos] = direction
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(100 * direction)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = (tokenizer.bos_token_id, eos, tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("eos-run")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def lines(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_generate_json_one_object_per_sequence(tiny_gpt2):
    args = [
        "generate",
        "--model",
        tiny_gpt2,
        "--prompt",
        "Hello",
        "--prompt",
        "Once upon a time",
        "--num-return-sequences",
        "2",
        "--length",
        "6",
        "--seed",
        "3",
        "--json",
    ]
    rows = lines(invoke(*args))
    assert [row["prompt"] for row in rows] == ["Hello", "Hello", "Once upon a time", "Once upon a time"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    for row in rows:
        assert list(row) == KEYS
        assert len(row["token_ids"]) == 6 and row["finish_reason"] == "length"
        assert row["text"] == tokenizer.decode(row["token_ids"])
        assert (row["decoder"], row["options"], row["seed"]) == ("topk", {"k": 50, "temperature": 1.0, "p": 1.0}, 3)
    assert lines(invoke(*args)) == rows  # the same seed repeats the run


def test_the_articles_command_defaults_to_bos_and_stops_at_eos(eos_run):
    # run_generation.py --prompt "<BOS>" --stop_token "<EOS>" --k 50 --length 300 --num_return_sequences 5
    rows = lines(invoke("generate", "--model", eos_run, "-o", "k=50", "--length", "300", "--num-return-sequences", "5", "--seed", "0", "--json"))
    eos = AutoTokenizer.from_pretrained(eos_run).eos_token_id
    assert len(rows) == 5
    for row in rows:
        assert (row["prompt"], row["text"], row["token_ids"], row["finish_reason"]) == ("<BOS>", "", [eos], "stop")


def test_stop_token_flag_ends_generation_and_is_left_out_of_the_text(tiny_gpt2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    base = ["generate", "--model", tiny_gpt2, "--decoder", "greedy", "--prompt", "The", "--max-new-tokens", "12", "--json"]
    free = lines(invoke(*base))[0]
    # a generated token, after the first, that is a single token on its own and has not appeared before
    index, token = next(
        (i, t) for i, t in enumerate(free["token_ids"]) if i > 0 and tokenizer.encode(tokenizer.decode([t])) == [t] and t not in free["token_ids"][:i]
    )
    stopped = lines(invoke(*base, "--stop-token", tokenizer.decode([token])))[0]
    assert stopped["token_ids"] == free["token_ids"][: index + 1]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == tokenizer.decode(free["token_ids"][:index])


def test_a_single_sequence_streams_as_readable_text(tiny_gpt2):
    base = ["generate", "--model", tiny_gpt2, "--prompt", "Hi", "--length", "8", "--seed", "5"]
    streamed = invoke(*base)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == lines(invoke(*base, "--json"))[0]["text"] + "\n"


def test_several_sequences_print_with_headers(tiny_gpt2, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First prompt\n\nSecond prompt\n")
    result = invoke(
        "generate", "--model", tiny_gpt2, "--prompt-file", prompts, "--length", "4", "--decoder", "beam", "-o", "num_beams=2", "--num-return-sequences", "2"
    )
    assert result.exit_code == 0, result.output
    headers = [line for line in result.stdout.splitlines() if line.startswith("===")]
    assert headers == [
        "=== sequence 1 · prompt 'First prompt' · length ===",
        "=== sequence 2 · prompt 'First prompt' · length ===",
        "=== sequence 3 · prompt 'Second prompt' · length ===",
        "=== sequence 4 · prompt 'Second prompt' · length ===",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--decoder", "topkk"], "Unknown decoder 'topkk'. Available: beam, greedy, topk, topp (installed plugins add more; see 'peftgen decoders')."),
        (
            ["-o", "k=0"],
            "Decoder 'topk' rejected its options: k must be at least 1, got 0. "
            "Its options: k (int, default 50), temperature (float, default 1.0), p (float, default 1.0).",
        ),
        (["-o", "kk=3"], "Decoder 'topk' has no option 'kk'. Its options: k (int, default 50), temperature (float, default 1.0), p (float, default 1.0)."),
        (["-o", "k"], "-o expects key=value, got 'k'. Example: -o temperature=0.7"),
        (
            ["--decoder", "topp", "-o", "p=1.5"],
            "Decoder 'topp' rejected its options: p must be in (0, 1], got 1.5. Its options: p (float, default 0.9), temperature (float, default 1.0).",
        ),
        (
            ["--decoder", "beam", "--num-return-sequences", "6"],
            "Decoder 'beam': num_return_sequences (6) is more than num_beams (5); beam search returns at most num_beams sequences per prompt. "
            "Lower --num-return-sequences or pass -o num_beams=6",
        ),
        (
            ["--decoder", "beam", "-o", "num_beams=0"],
            "Decoder 'beam' rejected its options: num_beams must be at least 1, got 0. "
            "Its options: num_beams (int, default 5), length_penalty (float, default 1.0), "
            "early_stopping (bool | 'never', default False), no_repeat_ngram_size (int, default 0).",
        ),
        (
            ["--prompt", " word" * 300],
            "The prompt is 300 tokens, but the model's context is 256 tokens and generation needs room for new ones. Shorten the prompt.",
        ),
        (
            ["--prompt", "Hi", "--max-new-tokens", "300"],
            "The prompt (1 token) plus --max-new-tokens 300 is 301 tokens, more than the model's context of 256. Use --max-new-tokens 255 or less.",
        ),
        (
            ["--stop-token", "two words"],
            "--stop-token 'two words' is 2 tokens ['two', 'Ġwords'], not one. "
            "A stop token must be a single token of the vocabulary, such as the eos token '<|endoftext|>'.",
        ),
        (["--prompt", "a", "--prompt-file", "p.txt"], "Pass --prompt or --prompt-file, not both."),
        (["--prompt-file", "missing.txt"], "--prompt-file missing.txt does not exist."),
        (["--batch-size", "0"], "--batch-size must be between 1 and 65536, got 0."),
        (["--num-return-sequences", "100000000"], "--num-return-sequences must be between 1 and 65536, got 100000000."),
        (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1."),
        (["--seed", str(2**64)], f"--seed must be between 0 and 4294967295, got {2**64}."),
    ],
)
def test_errors_are_one_clear_line(tiny_gpt2, args, message):
    result = invoke("generate", "--model", tiny_gpt2, *args)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {message}\n"


def test_generate_help_shows_every_flag():
    result = invoke("generate", "--help")
    assert result.exit_code == 0
    for flag in [
        "--model",
        "--decoder",
        "--prompt",
        "--prompt-file",
        "--max-new-tokens",
        "--length",
        "--num-return-sequences",
        "--stop-token",
        "--seed",
        "--option",
        "-o",
        "--json",
        "--plugin",
    ]:
        assert flag in result.stdout


def test_decoders_lists_every_decoder_with_plugin_docstring_and_options():
    result = invoke("decoders")
    assert result.exit_code == 0, result.output
    assert "topk  (plugin peftgen.decoders.topk, built-in)" in result.stdout
    assert "Sample from the k most probable tokens" in result.stdout
    assert "-o early_stopping=<bool | 'never'>  default False" in result.stdout
    listing = json.loads(invoke("decoders", "--json").stdout)
    assert [d["name"] for d in listing] == ["beam", "greedy", "topk", "topp"]
    topk = listing[2]
    assert (topk["plugin"], topk["kind"]) == ("peftgen.decoders.topk", "token")
    assert topk["options"] == [
        {"name": "k", "type": "int", "default": 50, "required": False},
        {"name": "temperature", "type": "float", "default": 1.0, "required": False},
        {"name": "p", "type": "float", "default": 1.0, "required": False},
    ]
    assert listing[0]["kind"] == "sequence"


PLUGIN = """
    import torch
    from peftgen import TokenDecoder, hookimpl

    class Boom(TokenDecoder):
        '''Fails on the first step.'''
        name = "boom"

        def __init__(self, reason: str = "kaput"):
            self.reason = reason

        def select(self, logits, ctx):
            raise RuntimeError(self.reason)

    @hookimpl
    def register_decoders(register):
        register(Boom)
"""


def test_a_plugin_file_adds_a_decoder_and_its_failure_names_it(tiny_gpt2, tmp_path):
    path = tmp_path / "boom_decoder.py"
    path.write_text(textwrap.dedent(PLUGIN))
    listing = json.loads(invoke("decoders", "--json", "--plugin", path).stdout)
    assert {"name": "boom", "plugin": str(path), "source": "local"}.items() <= listing[1].items()
    result = invoke("generate", "--model", tiny_gpt2, "--plugin", path, "--decoder", "boom", "-o", "reason=no luck")
    assert result.exit_code == 1
    assert result.stderr.endswith("Error: Decoder 'boom' failed in select() at step 0: RuntimeError: no luck\n")


def test_a_plugin_that_fails_to_import_is_a_warning(tmp_path):
    path = tmp_path / "broken_decoder.py"
    path.write_text("raise ImportError('needs a GPU library')\n")
    result = invoke("decoders", "--plugin", path)
    assert result.exit_code == 0
    assert result.stderr == f"Warning: Plugin '{path}' failed to load and is skipped: ImportError: needs a GPU library\n"
    assert "greedy  (plugin peftgen.decoders.greedy, built-in)" in result.stdout


def test_without_a_length_it_generates_300_tokens_or_what_the_context_leaves(tiny_gpt2):
    row = lines(invoke("generate", "--model", tiny_gpt2, "--decoder", "greedy", "--prompt", "Hi", "--json"))[0]
    assert len(row["token_ids"]) == 256 - 1  # the tiny model's context is 256, the prompt 1 token


def test_a_trained_run_starts_at_bos_and_stops_at_eos_by_default(learnt_run):
    """The article's workflow end to end: fine-tune on line-by-line text, then generate with
    no --prompt and no --stop-token. A run trained on its lines for a while (each of which
    ends in <EOS>) continues <BOS> with a sentence and stops at <EOS>."""
    rows = lines(invoke("generate", "--model", learnt_run, "--decoder", "greedy", "--json"))
    tokenizer = AutoTokenizer.from_pretrained(learnt_run)
    assert len(rows) == 1
    row = rows[0]
    assert (row["prompt"], row["finish_reason"]) == ("<BOS>", "stop")
    assert row["token_ids"][-1] == tokenizer.convert_tokens_to_ids("<EOS>")
    assert row["text"] == tokenizer.decode(row["token_ids"][:-1]) and "<EOS>" not in row["text"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("café\n".encode("latin-1"), "is not UTF-8 text (byte 3, line 1). Save it as UTF-8."),
        ("first\nsecond\n".encode("utf-16"), "is not text: it is UTF-16 text. Give UTF-8 text, one prompt per line."),
        (b"first\n\x00\x01\n", "is not text: it is binary, or UTF-16 without a byte-order mark: it holds NUL bytes. Give UTF-8 text, one prompt per line."),
    ],
)
def test_a_prompt_file_that_is_not_utf8_text_is_one_clear_line(tiny_gpt2, tmp_path, content, message):
    (tmp_path / "prompts.txt").write_bytes(content)
    result = invoke("generate", "--model", tiny_gpt2, "--prompt-file", tmp_path / "prompts.txt")
    assert result.exit_code == 1
    assert result.stderr == f"Error: --prompt-file {tmp_path / 'prompts.txt'} {message}\n"
