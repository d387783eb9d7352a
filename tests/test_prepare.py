"""``peftgen prepare``: formats, split sizes, determinism, no overlap, bad rows, overwrite."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import pytest

from peftgen import preparation as p
from peftgen.errors import PeftgenError

SAMPLE = Path(__file__).parent.parent / "data" / "cmu-booksummaries-sample.tsv"
LINE = re.compile(r"^<BOS> \S(?:.*\S)? <EOS>$")


def cmu_row(i: int, summary: str) -> str:
    return "\t".join([str(i), f"/m/{i}", f"Title {i}", "Author", "1999", "{}", summary])


def read_split(folder: Path) -> dict[str, list[str]]:
    return {name: (folder / f"{name}.txt").read_text(encoding="utf-8").splitlines() for name in p.SPLITS}


def test_real_sample_is_split_70_20_10_into_canonical_lines(tmp_path):
    result = p.prepare(SAMPLE, tmp_path)
    out = read_split(tmp_path)
    assert result.format == "cmu"
    assert {k: len(v) for k, v in out.items()} == result.examples == {"train": 22, "valid": 7, "test": 3}
    for line in sum(out.values(), []):
        assert LINE.match(line) and "  " not in line
    # Every summary of the sample comes out whole, once.
    summaries = {" ".join(row.split("\t")[6].split()) for row in SAMPLE.read_text(encoding="utf-8").splitlines()}
    assert {line[len("<BOS> ") : -len(" <EOS>")] for line in sum(out.values(), [])} == summaries


@pytest.mark.parametrize(
    "n, fractions, sizes",
    [
        (32, (0.7, 0.2, 0.1), (22, 7, 3)),
        (10, (0.5, 0.3, 0.2), (5, 3, 2)),
        (3, (0.7, 0.2, 0.1), (1, 1, 1)),  # a non-empty fraction never gets an empty split
        (1, (0.7, 0.2, 0.1), (1, 0, 0)),
        (7, (1.0, 0.0, 0.0), (7, 0, 0)),
    ],
)
def test_split_sizes_add_up(n, fractions, sizes):
    assert p.split_sizes(n, fractions) == sizes


@pytest.mark.parametrize("spec", ["0.7,0.2", "0.5,0.5,0.5", "a,b,c", "0,0.5,0.5", "1.2,-0.1,-0.1", "nan,0,1", "inf,-inf,1"])
def test_bad_split_is_refused(spec):
    with pytest.raises(PeftgenError, match="Invalid split"):
        p.parse_split(spec)


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    p.prepare(SAMPLE, tmp_path / "a", seed=3)
    p.prepare(SAMPLE, tmp_path / "b", seed=3)
    p.prepare(SAMPLE, tmp_path / "c", seed=4)
    for name in p.SPLITS:
        assert (tmp_path / "a" / f"{name}.txt").read_bytes() == (tmp_path / "b" / f"{name}.txt").read_bytes()
    assert (tmp_path / "a" / "train.txt").read_bytes() != (tmp_path / "c" / "train.txt").read_bytes()


def test_duplicates_never_land_in_two_splits(tmp_path):
    rows = [f"Summary number {i % 10} is here." for i in range(40)]  # each text four times
    (tmp_path / "in.txt").write_text("\n".join(rows), encoding="utf-8")
    result = p.prepare(tmp_path / "in.txt", tmp_path / "out", split="0.5,0.3,0.2")
    out = {k: set(v) for k, v in read_split(tmp_path / "out").items()}
    assert not (out["train"] & out["valid"] or out["train"] & out["test"] or out["valid"] & out["test"])
    assert sum(map(len, out.values())) == 10
    assert [r.line for r in result.skipped][:3] == [11, 12, 13]
    assert result.skipped[0].reason == "duplicate of line 1"


def test_bad_rows_are_skipped_and_reported_with_line_numbers(tmp_path):
    rows = [
        cmu_row(1, "A tab\tinside the summary.").encode(),  # line 1: an eighth column
        b"only\tfour\tcolumns\there",  # line 2: wrong column count
        cmu_row(3, "   ").encode(),  # line 3: empty summary
        cmu_row(4, "Caf\xe9 au lait.").encode("latin-1"),  # line 4: not UTF-8
        cmu_row(5, "Fine too.").encode(),
        cmu_row(6, "Ends the <EOS> early.").encode(),  # line 6: contains a marker
        cmu_row(7, "Last one, no newline.").encode(),
    ]
    (tmp_path / "books.txt").write_bytes(b"\n".join(rows))
    result = p.prepare(tmp_path / "books.txt", tmp_path / "out", format="cmu", split="0.5,0.5,0")
    assert [(r.line, r.reason) for r in result.skipped] == [
        (1, "8 columns, expected 7"),
        (2, "4 columns, expected 7"),
        (3, "empty text"),
        (4, f"undecodable bytes (not UTF-8) at byte {len(cmu_row(4, 'Caf'))}"),
        (6, "text contains the marker <EOS>"),
    ]
    assert sorted(sum(read_split(tmp_path / "out").values(), [])) == ["<BOS> Fine too. <EOS>", "<BOS> Last one, no newline. <EOS>"]
    text = p.report(result)
    assert "Skipped 5 bad line(s)" in text
    assert "4 columns, expected 7: line(s) 2 (1)" in text
    assert "empty text: line(s) 3 (1)" in text


def test_whitespace_is_normalised_and_jsonl_text_field_is_read(tmp_path):
    rows = [{"summary": f"Book {i}:\n\tit\u00a0 ends, café.  ", "id": i} for i in range(5)] + [{"id": 9}, "not json"]
    (tmp_path / "in.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    result = p.prepare(tmp_path / "in.jsonl", tmp_path / "out", text_field="summary")
    assert result.format == "jsonl"
    lines = sorted(sum(read_split(tmp_path / "out").values(), []))
    assert lines == [f"<BOS> Book {i}: it ends, café. <EOS>" for i in range(5)]
    assert [(r.line, r.reason) for r in result.skipped] == [(6, "no 'summary' field (choose another with --text-field)"), (7, "not valid JSON")]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("books.txt", cmu_row(1, "A summary.") + "\n", "cmu"),
        ("data.json", '{"text": "a"}\n', "jsonl"),
        ("x.jsonl", "whatever\n", "jsonl"),
        ("notes.txt", "\n\nJust a line of prose.\n", "text"),
    ],
)
def test_format_is_detected(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content, encoding="utf-8")
    assert p.detect_format(tmp_path / name) == expected


def test_plain_text_given_explicitly_keeps_tabs_as_spaces(tmp_path):
    (tmp_path / "in.txt").write_text(cmu_row(1, "x") + "\nsecond line\n", encoding="utf-8")
    p.prepare(tmp_path / "in.txt", tmp_path / "out", format="text", split="1,0,0")
    assert sorted(read_split(tmp_path / "out")["train"]) == ["<BOS> 1 /m/1 Title 1 Author 1999 {} x <EOS>", "<BOS> second line <EOS>"]


def test_a_file_without_good_rows_is_an_error(tmp_path):
    (tmp_path / "bad.tsv").write_text("a\tb\n\n", encoding="utf-8")
    with pytest.raises(PeftgenError, match=r"No usable example .* as format 'cmu' \(2 lines skipped, first: line 1: 2 columns"):
        p.prepare(tmp_path / "bad.tsv", tmp_path / "out", format="cmu")
    assert not (tmp_path / "out").exists()


def test_existing_outputs_are_not_overwritten_without_overwrite(tmp_path):
    (tmp_path / "valid.txt").write_text("mine\n", encoding="utf-8")
    with pytest.raises(PeftgenError, match=r"Output exists: .*valid.txt\. Pass --overwrite to replace it\."):
        p.prepare(SAMPLE, tmp_path)
    assert (tmp_path / "valid.txt").read_text() == "mine\n" and not (tmp_path / "train.txt").exists()
    p.prepare(SAMPLE, tmp_path, overwrite=True)
    assert len(read_split(tmp_path)["valid"]) == 7


def test_memory_stays_flat_on_a_big_file(tmp_path):
    # 8 MB of summaries: prepare keeps offsets and hashes, not text.
    row = "word " * 200
    with open(tmp_path / "big.txt", "w", encoding="utf-8") as f:
        for i in range(8000):
            f.write(f"{i} {row}\n")
    tracemalloc.start()
    p.prepare(tmp_path / "big.txt", tmp_path / "out")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3_000_000, peak


# Token lengths and long examples, with the real GPT-2 tokenizer -------------


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)


def test_counts_match_what_training_encodes(gpt2_tok):
    from peftgen.data import encode

    tok = gpt2_tok.__class__.from_pretrained(gpt2_tok.name_or_path)
    tok.add_special_tokens({"bos_token": p.BOS, "eos_token": p.EOS, "pad_token": p.PAD})
    line = "<BOS> Old Major, the old boar, calls the animals. Mr. Jones is drunk! <EOS>"
    assert p.TokenCounter(gpt2_tok).example(line[6:-6]) == len(encode(line, tok, 10_000))


def test_sentences_split_after_ends_not_after_titles():
    assert p.sentences('Mr. Jones sleeps. "Run!" J. R. said. End') == ["Mr. Jones sleeps.", '"Run!"', "J. R. said.", "End"]


@pytest.mark.parametrize("long", ["chunk", "first", "skip"])
def test_long_examples_fit_max_tokens(tmp_path, gpt2_tok, long):
    result = p.prepare(SAMPLE, tmp_path, tokenizer=gpt2_tok, max_tokens=128, long=long)
    counter = p.TokenCounter(gpt2_tok)
    out = read_split(tmp_path)
    lines = sum(out.values(), [])
    assert lines and all(LINE.match(x) and counter.example(x[6:-6]) <= 128 for x in lines)
    assert result.lengths["tokens"].max <= 128
    summaries = [" ".join(r.split("\t")[6].split()) for r in SAMPLE.read_text(encoding="utf-8").splitlines()]
    if long == "chunk":
        # Pieces in file order rebuild each summary, all inside one split.
        for name, split_lines in out.items():
            joined = " ".join(x[6:-6] for x in split_lines)
            assert sum(s in joined for s in summaries) == result.sources[name]
        assert sum(result.sources.values()) == 32 and len(lines) > 200
        # Pieces end at sentence ends, bar sentences longer than 126 tokens (cut at words)
        # and the odd stage direction such as "(Finale)".
        at_ends = sum(bool(re.search(r"[.!?][\"'”’)]* <EOS>$", x)) for x in lines)
        assert at_ends >= 0.95 * len(lines)
    elif long == "first":
        assert len(lines) == 32 and all(any(s.startswith(x[6:-6]) for s in summaries) for x in lines)
    else:
        assert sorted(x[6:-6] for x in lines) == sorted(s for s in summaries if counter.example(s) <= 128)
        assert result.long_rows == 32 - len(lines) > 0
        assert f"{result.long_rows} row(s) longer than 128 tokens were dropped (--long skip)" in p.report(result)


def test_token_lengths_are_reported(tmp_path, gpt2_tok):
    result = p.prepare(SAMPLE, tmp_path, tokenizer=gpt2_tok)
    s = result.lengths["tokens"]
    assert s.min < s.median < s.p90 < s.max and s.max > 3000  # the Hume summary
    assert "tokens" in p.report(result) and "(incl. <BOS>, <EOS>)" in p.report(result)


def test_max_tokens_needs_a_tokenizer(tmp_path):
    with pytest.raises(PeftgenError, match="--max-tokens counts tokens, so it needs --tokenizer"):
        p.prepare(SAMPLE, tmp_path, max_tokens=100)


# The command -----------------------------------------------------------------


def test_cli_prepares_and_prints_counts(tmp_path):
    from typer.testing import CliRunner

    from peftgen.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["prepare", str(SAMPLE), "--output-dir", str(tmp_path), "--seed", "1"])
    assert ok.exit_code == 0, ok.output
    assert "train      22  (from 22 input rows)" in ok.output and "median" in ok.output
    again = runner.invoke(app, ["prepare", str(SAMPLE), "--output-dir", str(tmp_path)])
    assert again.exit_code == 1
    assert f"Error: Output exists: {tmp_path}/train.txt" in again.output
    helped = runner.invoke(app, ["prepare", "--help"])
    assert helped.exit_code == 0 and "--max-tokens" in helped.output and "--overwrite" in helped.output


# Compressed and non-text input, the output folder ------------------------------


def _tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    import io
    import tarfile

    with tarfile.open(path, mode) as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


@pytest.mark.parametrize("name, mode", [("booksummaries.tar.gz", "w:gz"), ("books.tgz", "w:gz"), ("books.tar", "w")])
def test_a_tar_of_the_sample_gives_the_same_splits_as_the_tsv(tmp_path, name, mode):
    # Laid out as the dataset's own archive: a folder with a README beside booksummaries.txt.
    archive = _tar(
        tmp_path / name,
        {
            "booksummaries/README": b"CMU Book Summary Dataset\n",
            "booksummaries/booksummaries.txt": SAMPLE.read_bytes(),
        },
        mode,
    )
    from_tsv = p.prepare(SAMPLE, tmp_path / "tsv", seed=5)
    from_tar = p.prepare(archive, tmp_path / "tar", seed=5)
    assert from_tar.format == "cmu" and from_tar.examples == from_tsv.examples == {"train": 22, "valid": 7, "test": 3}
    for split in p.SPLITS:
        assert (tmp_path / "tar" / f"{split}.txt").read_bytes() == (tmp_path / "tsv" / f"{split}.txt").read_bytes()


@pytest.mark.parametrize(
    "suffix, compress",
    [
        (".gz", __import__("gzip").compress),
        (".bz2", __import__("bz2").compress),
        (".xz", __import__("lzma").compress),
    ],
)
def test_compressed_files_are_read_transparently(tmp_path, suffix, compress):
    (tmp_path / f"sample.tsv{suffix}").write_bytes(compress(SAMPLE.read_bytes()))
    p.prepare(SAMPLE, tmp_path / "plain")
    assert p.prepare(tmp_path / f"sample.tsv{suffix}", tmp_path / "packed").format == "cmu"
    assert read_split(tmp_path / "packed") == read_split(tmp_path / "plain")


def test_a_gzipped_jsonl_keeps_its_format(tmp_path):
    import gzip

    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(b'{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n'))
    result = p.prepare(tmp_path / "rows.jsonl.gz", tmp_path / "out")
    assert result.format == "jsonl" and sum(result.examples.values()) == 3


def test_a_tar_without_one_text_file_names_its_members(tmp_path):
    archive = _tar(tmp_path / "mixed.tar.gz", {"a.txt": b"one\n", "b.txt": b"two\n"})
    with pytest.raises(PeftgenError, match=r"mixed\.tar\.gz is a tar archive of 2 files \(a\.txt, b\.txt\), not one text file"):
        p.prepare(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_truncated_archive_is_refused(tmp_path):
    import gzip

    packed = gzip.compress(SAMPLE.read_bytes())
    (tmp_path / "cut.tsv.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(PeftgenError, match=r"Cannot unpack .*cut\.tsv\.gz: .*Is the file complete\?"):
        p.prepare(tmp_path / "cut.tsv.gz", tmp_path / "out")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"one line\n" + b"\x00" * 40 + b"\nanother\n", r"is not text: it is binary, or UTF-16 without a byte-order mark"),
        (cmu_row(1, "A summary.").encode("utf-16"), r"is not text: it is UTF-16 text"),
        (cmu_row(1, "A summary.").encode("utf-16-le"), r"is not text: it is binary, or UTF-16"),
        (b"PK\x03\x04" + b"zipped" * 10, r"is not text: it is a zip archive"),
        # Random bytes without a NUL: lines that mostly do not decode, and the ones that do hold control bytes.
        (bytes(b for b in __import__("random").Random(0).randbytes(30000) if b), r"is not text: \d+ of its \d+ lines are not UTF-8 text"),
    ],
)
def test_input_that_is_not_text_is_refused_and_nothing_is_written(tmp_path, content, message):
    (tmp_path / "in.txt").write_bytes(content)
    with pytest.raises(PeftgenError, match=message):
        p.prepare(tmp_path / "in.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_few_undecodable_lines_are_skipped_not_refused(tmp_path):
    rows = [f"Summary {i} of the book.".encode() for i in range(10)] + [b"caf\xe9", b"bell \x07 rings"]
    (tmp_path / "in.txt").write_bytes(b"\n".join(rows))
    result = p.prepare(tmp_path / "in.txt", tmp_path / "out")
    assert sum(result.examples.values()) == 10
    assert [(r.line, r.reason) for r in result.skipped] == [(11, "undecodable bytes (not UTF-8) at byte 3"), (12, "not text (control byte 0x07)")]


def test_an_output_folder_that_cannot_be_created_is_refused_before_reading(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PeftgenError, match=r"--output-dir .*file/out cannot be created: .*file is a file"):
        p.prepare(SAMPLE, tmp_path / "file" / "out")


def test_splits_appear_only_when_all_three_are_complete(tmp_path, monkeypatch):
    p.prepare(SAMPLE, tmp_path, seed=1)
    before = {name: (tmp_path / f"{name}.txt").read_bytes() for name in p.SPLITS}
    written = []

    def failing(text):  # the disk fills up while the valid split is being written
        written.append(text)
        if len(written) == 25:
            raise OSError(28, "No space left on device")
        return f"<BOS> {text} <EOS>"

    monkeypatch.setattr(p, "to_line", failing)
    with pytest.raises(PeftgenError, match=r"Cannot write the splits into .*: No space left on device\."):
        p.prepare(SAMPLE, tmp_path, seed=2, overwrite=True)
    assert {name: (tmp_path / f"{name}.txt").read_bytes() for name in p.SPLITS} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
