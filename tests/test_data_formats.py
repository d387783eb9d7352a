"""Every source format gives the ids that a line of text has always had; bad rows are named and skipped."""

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer
from typer.testing import CliRunner

from peftgen import corpus, data
from peftgen import preparation as prepare_lib
from peftgen.cli import app
from peftgen.errors import PeftgenError

SAMPLE = Path(__file__).parent.parent / "data" / "cmu-booksummaries-sample.tsv"
MAX_LENGTH = 512
runner = CliRunner()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTGEN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    tok.add_special_tokens({"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>"})
    return tok


@pytest.fixture(scope="module")
def summaries() -> list[str]:
    """The plot summaries of the shipped sample (its last column), 32 of them."""
    return [line.split("\t")[-1].strip() for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def expected(summaries, tokenizer) -> list[list[int]]:
    """The ids today's line-by-line path gives each summary."""
    return [data.encode(text, tokenizer, MAX_LENGTH) for text in summaries]


def ids_of(path, tokenizer, what="training file", **options) -> list[list[int]]:
    source = corpus.describe(path, what, **options)
    return corpus.tokenize(source, tokenizer, MAX_LENGTH).open()["input_ids"]


def write(folder: Path, kind: str, texts: list[str], column: str = "text") -> Path:
    """The sample converted to one format."""
    rows = [{"title": f"book {i}", column: text} for i, text in enumerate(texts)]
    if kind == "txt":
        path = folder / "sample.txt"
        path.write_text("".join(f"{text}\n" for text in texts), encoding="utf-8")
    elif kind == "jsonl":
        path = folder / "sample.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif kind == "json":
        path = folder / "sample.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind in ("csv", "tsv"):
        import csv

        path = folder / f"sample.{kind}"
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, ["title", column], delimiter="\t" if kind == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        path = folder / "sample.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    elif kind == "disk":
        path = folder / "saved"
        Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise ValueError(kind)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "csv", "tsv", "parquet", "disk"])
def test_every_format_gives_the_ids_of_todays_line_by_line_text(kind, tmp_path, summaries, tokenizer, expected):
    assert ids_of(write(tmp_path, kind, summaries), tokenizer) == expected


def test_the_text_file_path_matches_todays_loader_exactly(tmp_path, summaries, tokenizer):
    path = tmp_path / "mixed.txt"
    lines = [f"<BOS> {text} <EOS>" if i % 3 == 0 else text for i, text in enumerate(summaries)]
    path.write_text("\n\n".join(lines) + "\n  \n<BOS> <EOS>\n", encoding="utf-8")  # blank and marker-only lines
    assert ids_of(path, tokenizer) == data.load_examples(path, tokenizer, MAX_LENGTH)


def test_lines_longer_than_max_length_are_cut_as_before(tmp_path, summaries, tokenizer):
    path = write(tmp_path, "jsonl", summaries)
    source = corpus.describe(path, "training file")
    cut = corpus.tokenize(source, tokenizer, 16).open()["input_ids"]
    assert cut == [data.encode(text, tokenizer, 16) for text in summaries]
    assert all(len(ids) == 16 and ids[-1] != tokenizer.eos_token_id for ids in cut)


def test_text_field_picks_the_column(tmp_path, summaries, tokenizer, expected):
    path = write(tmp_path, "parquet", summaries, column="summary")
    assert ids_of(path, tokenizer, text_field="summary") == expected
    with pytest.raises(PeftgenError, match=r"has no column 'text' \(its columns: title, summary\)\. Pick the text column with --text-field"):
        corpus.describe(path, "training file")


def test_split_picks_a_split_of_a_saved_dataset_dict(tmp_path, summaries, tokenizer, expected):
    folder = tmp_path / "dict"
    DatasetDict(
        {
            "train": Dataset.from_dict({"text": summaries[:20]}),
            "validation": Dataset.from_dict({"text": summaries[20:28]}),
            "test": Dataset.from_dict({"text": summaries[28:]}),
        }
    ).save_to_disk(str(folder))
    assert ids_of(folder, tokenizer) == expected[:20]  # training reads train
    assert ids_of(folder, tokenizer, "validation file") == expected[20:28]
    assert ids_of(folder, tokenizer, "evaluation file") == expected[28:]
    assert ids_of(folder, tokenizer, split="test") == expected[28:]
    with pytest.raises(PeftgenError, match=r"has no split 'dev'\. Its splits: train, validation, test\."):
        corpus.describe(folder, "training file", split="dev")


def test_bad_rows_are_skipped_and_named_by_line(tmp_path, tokenizer, capsys):
    good = ["The old boar calls a meeting.", "Two pigs take command."]
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"text": good[0]}),
                json.dumps({"summary": "no text field"}),  # line 2
                json.dumps({"text": 42}),  # line 3
                json.dumps({"text": "   "}),  # line 4
                "{not json",  # line 5
                json.dumps({"text": None}),  # line 6
                json.dumps({"text": "a <PAD> inside"}),  # line 7
                "",
                json.dumps({"text": good[1]}),  # line 9
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    assert ids_of(path, tokenizer) == [data.encode(text, tokenizer, MAX_LENGTH) for text in good]
    err = capsys.readouterr().err
    for reason, line in [
        ("no 'text' field (pick the text field with --text-field)", 2),
        ("'text' is not a string but int", 3),
        ("empty text", 4),
        ("not valid JSON", 5),
        ("'text' is null", 6),
        ("holds the pad marker <PAD> (it would be learnt as text)", 7),
    ]:
        assert f"Warning: skipped 1 line(s) of the training file {path}: {reason}: line(s) {line}." in err


def test_bad_rows_of_parquet_are_named_by_row(tmp_path, tokenizer, capsys):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["first", None, "", "fourth"]}), path)
    assert len(ids_of(path, tokenizer)) == 2
    err = capsys.readouterr().err
    assert f"skipped 1 row(s) of the training file {path}: 'text' is null: row(s) 2." in err
    assert f"skipped 1 row(s) of the training file {path}: empty text: row(s) 3." in err


def test_a_source_with_no_usable_row_is_refused(tmp_path, tokenizer):
    path = tmp_path / "none.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    with pytest.raises(PeftgenError, match=r"has no usable line: all 2 were skipped \(first: line 1: no 'text' field"):
        ids_of(path, tokenizer)
    assert not any((tmp_path / "cache" / "datasets").iterdir())  # nothing half-built stays


@pytest.mark.parametrize(
    "content,message",
    [
        (b"PAR1 then nothing", "Cannot read the training file {path} as parquet: "),
        (b"", "Cannot read the training file {path} as parquet: "),
    ],
)
def test_an_unreadable_parquet_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "broken.parquet"
    path.write_bytes(content)
    with pytest.raises(PeftgenError) as error:
        corpus.describe(path, "training file")
    assert str(error.value).startswith(message.format(path=path))
    assert "\n" not in str(error.value) and "Is the file complete?" in str(error.value)


def test_a_truncated_parquet_is_refused(tmp_path, summaries):
    whole = write(tmp_path, "parquet", summaries)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(PeftgenError, match=rf"Cannot read the training file {cut} as parquet: .*Is the file complete\?"):
        corpus.describe(cut, "training file")


def test_a_csv_without_the_column_says_which_it_has(tmp_path):
    path = tmp_path / "books.tsv"
    path.write_text("title\tplot\nA\tB\n", encoding="utf-8")
    with pytest.raises(PeftgenError, match=r"has no column 'text' in its header row \(its columns: title, plot\)"):
        corpus.describe(path, "training file")


def test_text_files_keep_their_refusals(tmp_path, tokenizer):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"first line\nsecond\ncaf\xe9 au lait\n")
    with pytest.raises(PeftgenError, match=r"is not UTF-8 text \(byte 21, line 3\)"):
        ids_of(latin1, tokenizer)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"first\nsecond\n" + b"x" * 9000 + b"\n\x00\n")
    with pytest.raises(PeftgenError, match=r"is not text: it is binary, .* \(the first on line 4\)"):
        ids_of(nul, tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(PeftgenError, match="is empty. It needs one example per line."):
        corpus.describe(empty, "training file")
    with pytest.raises(PeftgenError, match=rf"The training file {tmp_path} is a folder; pass a text file"):
        corpus.describe(tmp_path, "training file")


def test_a_hub_dataset_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(PeftgenError, match=r"The training file hub:owner/books is a Hugging Face Hub dataset, and the Hub cannot be reached"):
        corpus.describe("hub:owner/books", "training file")
    assert time.perf_counter() - started < 2
    with pytest.raises(PeftgenError, match="is not a Hub dataset id. Write hub:owner/name"):
        corpus.describe("hub:", "training file")


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_prepare_writes_splits_that_train_reads_as_its_text_splits(output_format, tmp_path, tokenizer):
    as_text = prepare_lib.prepare(SAMPLE, tmp_path / "txt", seed=3)
    other = prepare_lib.prepare(SAMPLE, tmp_path / output_format, seed=3, output_format=output_format)
    assert sorted(p.name for p in (tmp_path / output_format).iterdir()) == sorted(f"{s}.{output_format}" for s in ("test", "train", "valid"))
    assert other.examples == as_text.examples
    for split in ("train", "valid", "test"):
        assert ids_of(other.files[split], tokenizer) == ids_of(as_text.files[split], tokenizer)


def test_prepare_refuses_an_unknown_output_format(tmp_path):
    with pytest.raises(PeftgenError, match=r"Unknown output format 'csv'\. Choose one of: txt, jsonl, parquet\."):
        prepare_lib.prepare(SAMPLE, tmp_path / "out", output_format="csv")


def test_eval_scores_jsonl_as_the_same_lines_of_text(tiny_gpt2, tmp_path, summaries):
    scores = {}
    for kind in ("txt", "jsonl"):
        result = runner.invoke(app, ["eval", "--model", str(tiny_gpt2), "--file", str(write(tmp_path, kind, summaries[:6])), "--json"])
        assert result.exit_code == 0, result.output
        scores[kind] = json.loads(result.stdout)
    # Equal up to float rounding: the same batches, but BLAS kernels may sum in
    # another order when their buffers sit at other addresses.
    assert scores["jsonl"] == pytest.approx(scores["txt"], rel=1e-6)


def test_train_takes_parquet_and_jsonl_with_a_text_field(tiny_gpt2, tmp_path, summaries):
    train = write(tmp_path, "parquet", summaries[:8], column="summary")
    (tmp_path / "v").mkdir()
    valid = write(tmp_path / "v", "jsonl", summaries[8:10], column="summary")
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_gpt2),
            "--train-file",
            str(train),
            "--valid-file",
            str(valid),
            "--text-field",
            "summary",
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
            "--eval-steps",
            "1",
            "--max-length",
            "64",
            "--precision",
            "fp32",
            "--batch-size",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_loss"] > 0
    assert "text_field: summary" in (tmp_path / "run" / "peftgen.yaml").read_text()


def test_train_with_a_missing_column_is_one_error_line(tiny_gpt2, tmp_path, summaries):
    train = write(tmp_path, "csv", summaries[:4])
    result = runner.invoke(app, ["train", "--model", str(tiny_gpt2), "--train-file", str(train), "--text-field", "plot", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert f"Error: The training file {train} has no column 'plot' in its header row (its columns: title, text)." in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
