"""The tokenized-data cache: built once, reused, never stale, never half-written."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from peftgen import corpus, data
from peftgen.cli import app
from peftgen.errors import PeftgenError

LINES = [
    "The old boar calls the animals to a meeting.",
    "Two young pigs take command of the farm.",
    "<BOS> A boy finds a map and sails to an island. <EOS>",
    "The captain hunts the white whale.",
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "datasets"


def make_tokenizer(folder, **special):
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>", **special})
    return tok


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir):
    return make_tokenizer(gpt2_tokenizer_dir)


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def tokenize(path, tokenizer, max_length=64):
    return corpus.tokenize(corpus.describe(path, "training file"), tokenizer, max_length)


def folders(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_a_second_run_reads_the_cache_without_tokenizing(train_file, tokenizer, cache, monkeypatch, capsys):
    first = tokenize(train_file, tokenizer)
    assert "tokenized the training file" in capsys.readouterr().err
    monkeypatch.setattr(corpus, "_build", lambda *a, **k: pytest.fail("tokenized again"))
    second = tokenize(train_file, tokenizer)
    assert second == first and folders(cache) == [first.folder.name]
    err = capsys.readouterr().err
    assert f"is tokenized already: 4 examples, {first.tokens} tokens, read from {first.folder} (" in err and " MB)" in err
    assert second.open()["input_ids"] == [data.encode(line, tokenizer, 64) for line in LINES]


def test_a_changed_file_of_the_same_size_and_time_is_tokenized_again(train_file, tokenizer, cache):
    first = tokenize(train_file, tokenizer)
    stat = train_file.stat()
    changed = LINES[:3] + ["The captain hunts the black whale."]  # same length in bytes
    train_file.write_text("\n".join(changed) + "\n", encoding="utf-8")
    os.utime(train_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert train_file.stat().st_size == stat.st_size
    second = tokenize(train_file, tokenizer)
    assert second.folder != first.folder
    assert second.open()["input_ids"] == [data.encode(line, tokenizer, 64) for line in changed]
    assert folders(cache) == [second.folder.name]  # the old content's cache is gone with it


def test_another_tokenizer_or_max_length_gets_its_own_cache(train_file, tokenizer, gpt2_tokenizer_dir, cache):
    first = tokenize(train_file, tokenizer)
    other = make_tokenizer(gpt2_tokenizer_dir, additional_special_tokens=["<SEP>"])  # a token more, same ids for the text
    assert corpus.tokenizer_identity(other) != corpus.tokenizer_identity(tokenizer)
    assert tokenize(train_file, other).folder != first.folder
    renamed = make_tokenizer(gpt2_tokenizer_dir, bos_token="<START>")
    started = tokenize(train_file, renamed)
    assert started.open()["input_ids"][0][0] == renamed.convert_tokens_to_ids("<START>")
    short = tokenize(train_file, tokenizer, max_length=5)
    assert all(len(ids) == 5 for ids in short.open()["input_ids"])
    assert len(folders(cache)) == 4 and tokenize(train_file, tokenizer).folder == first.folder


class Interrupted(Exception):
    pass


def test_a_failed_build_leaves_nothing_and_the_next_run_builds(train_file, tokenizer, cache, monkeypatch):
    def fail(self, batch):
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(corpus._Encoder, "__call__", fail)
        with pytest.raises(Interrupted):
            tokenize(train_file, tokenizer)
    assert folders(cache) == []
    assert tokenize(train_file, tokenizer).examples == 4


def test_what_a_killed_build_left_is_removed_and_a_damaged_cache_rebuilt(train_file, tokenizer, cache):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = cache / f".train.txt-x-y.partial-{dead.stdout.strip()}"
    leftover.mkdir(parents=True)
    (leftover / "tokens.arrow").write_bytes(b"half")
    built = tokenize(train_file, tokenizer)
    assert folders(cache) == [built.folder.name]
    (built.folder / built.files[0]).unlink()  # a user cleaning up by hand
    again = tokenize(train_file, tokenizer)
    assert again.folder == built.folder and again.open()["input_ids"] == built.open()["input_ids"]


def test_parallel_tokenizing_gives_the_same_ids(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "many.jsonl"
    lines = [f"{LINES[i % 4]} Number {i}." for i in range(300)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
    monkeypatch.setattr(corpus, "_workers", lambda rows, tokenizer: 2)
    built = tokenize(path, tokenizer)
    assert len(built.files) == 2  # one Arrow file per worker
    assert built.open()["input_ids"] == [data.encode(line, tokenizer, 64) for line in lines]


def test_an_unwritable_cache_folder_is_one_clear_line(train_file, tokenizer, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PEFTGEN_CACHE", str(blocker))
    with pytest.raises(PeftgenError, match=r"The data cache folder \(PEFTGEN_CACHE\) .*a-file/datasets cannot be created: .*a-file is a file"):
        tokenize(train_file, tokenizer)


def test_training_again_and_resuming_reuse_the_cache(tiny_gpt2, train_file, tmp_path, cache):
    run = tmp_path / "run"
    base = [
        "train",
        "--model",
        str(tiny_gpt2),
        "--train-file",
        str(train_file),
        "--valid-file",
        str(train_file),
        "--output-dir",
        str(run),
        "--eval-steps",
        "1",
        "--save-steps",
        "1",
        "--precision",
        "fp32",
        "--batch-size",
        "2",
    ]
    first = CliRunner().invoke(app, [*base, "--max-steps", "1"])
    assert first.exit_code == 0, first.output
    assert first.output.count("note: tokenized the training file") == 1
    assert "note: the validation file" in first.output  # the same file, tokenizer and settings: one cache
    assert len(folders(cache)) == 1
    resumed = CliRunner().invoke(app, [*base, "--max-steps", "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "note: tokenized" not in resumed.output and "note: the training file" in resumed.output


def test_a_corpus_of_several_parts_gives_the_same_ids_in_order(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "many.txt"
    lines = [f"{LINES[i % 4]} Number {i}." for i in range(230)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(corpus, "BATCH_ROWS", 50)
    monkeypatch.setattr(corpus, "PART_BYTES", 1)  # every batch of 50 texts its own part
    built = tokenize(path, tokenizer)
    assert built.files == tuple(f"tokens-{n:05d}.arrow" for n in range(5))
    assert built.open()["input_ids"] == [data.encode(line, tokenizer, 64) for line in lines]
    assert not list(built.folder.glob("texts-*"))  # only the tokens stay in the cache
