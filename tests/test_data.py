"""Line-by-line data: markers, spacing, labels, padding and bad files."""

import pytest
from transformers import AutoTokenizer

from peftgen import data
from peftgen.errors import PeftgenError


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    tok.add_special_tokens({"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>"})
    return tok


def test_lines_with_and_without_markers_encode_the_same(tokenizer):
    plain = data.encode("Hello world", tokenizer, 64)
    wrapped = data.encode("<BOS> Hello world <EOS>", tokenizer, 64)
    tight = data.encode("<BOS>Hello world<EOS>", tokenizer, 64)
    assert plain == wrapped == tight
    # <BOS>, "ĠHello", "Ġworld", <EOS>: a leading space on the first word, no lone space before <EOS>
    assert plain == [tokenizer.bos_token_id, 18435, 995, tokenizer.eos_token_id]


def test_truncation_keeps_bos_and_drops_eos(tokenizer):
    ids = data.encode("one two three four five six seven", tokenizer, 4)
    assert len(ids) == 4 and ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids


def test_collator_labels_eos_and_ignores_padding(tokenizer):
    batch = data.PadCollator(tokenizer.pad_token_id)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, tokenizer.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, 5, data.IGNORE_INDEX]]


def test_eos_is_a_label(tokenizer):
    ids = data.encode("Hello", tokenizer, 64)
    labels = data.PadCollator(tokenizer.pad_token_id)([{"input_ids": ids}])["labels"][0]
    assert labels[-1].item() == tokenizer.eos_token_id


def test_blank_lines_are_skipped(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("\n  \nfirst\n\nsecond\n")
    assert len(data.load_examples(path, tokenizer, 64)) == 2


def test_missing_empty_and_markers_only_files_fail_clearly(tmp_path, tokenizer):
    with pytest.raises(PeftgenError, match=r"The training file .*nope\.txt does not exist"):
        data.load_examples(tmp_path / "nope.txt", tokenizer, 64, "training file")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PeftgenError, match=r"empty\.txt is empty"):
        data.load_examples(tmp_path / "empty.txt", tokenizer, 64)
    (tmp_path / "markers.txt").write_text("<BOS> <EOS>\n<BOS><EOS>\n")
    with pytest.raises(PeftgenError, match="has no usable line"):
        data.load_examples(tmp_path / "markers.txt", tokenizer, 64)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PeftgenError, match="is not UTF-8"):
        data.load_examples(tmp_path / "latin1.txt", tokenizer, 64)


@pytest.mark.parametrize(
    "content, kind",
    [
        (b"first line\nsecond\x00\x00line\n", r"binary, or UTF-16 without a byte-order mark: it holds NUL bytes \(the first on line 2\)\."),
        ("one line\n".encode("utf-16"), "UTF-16 text"),
        ("one line\n".encode("utf-16-le"), "NUL bytes"),
        (__import__("gzip").compress(b"one line\n"), "gzip-compressed"),
    ],
)
def test_files_that_are_not_text_are_refused_with_what_they_are(tmp_path, tokenizer, content, kind):
    path = tmp_path / "train.txt"
    path.write_bytes(content)
    with pytest.raises(PeftgenError, match=rf"The training file .*train\.txt is not text: it is .*{kind}"):
        data.load_examples(path, tokenizer, 64, "training file")
    with pytest.raises(PeftgenError, match="is not text"):
        data.read_lines(path, "training file")  # train reads the files before loading a model


def test_undecodable_bytes_name_byte_and_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"fine\nalso fine\ncaf\xe9\n")
    with pytest.raises(PeftgenError, match=r"is not UTF-8 text \(byte 18, line 3\)"):
        data.read_lines(path)


def test_lines_holding_the_pad_marker_are_skipped_with_their_line_numbers(tmp_path, tokenizer, capsys):
    clean = ["first example", "<BOS> second example <EOS>", "third example"]
    path = tmp_path / "t.txt"
    path.write_text(f"{clean[0]}\n\n<BOS> padded <PAD> text <EOS>\n{clean[1]}\n<PAD>\n{clean[2]}\n")
    examples = data.load_examples(path, tokenizer, 64, "training file")
    # The other lines give exactly the ids they give on their own; no <PAD> is ever a label.
    assert examples == [data.encode(line, tokenizer, 64) for line in clean]
    assert all(tokenizer.pad_token_id not in ids for ids in examples)
    err = capsys.readouterr().err
    assert "skipped 2 line(s) of the training file" in err and "line(s) 3, 5." in err


def test_a_file_of_only_padded_lines_is_an_error(tmp_path, tokenizer, capsys):
    path = tmp_path / "t.txt"
    path.write_text("a <PAD> b\n<PAD>\n")
    with pytest.raises(PeftgenError, match="has no usable line: every line is only markers or holds <PAD>"):
        data.load_examples(path, tokenizer, 64)


def test_many_skipped_lines_are_listed_up_to_twenty():
    assert data.line_list(list(range(1, 26))) == ", ".join(map(str, range(1, 21))) + " and 5 more"


def test_an_output_folder_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PeftgenError, match=r"--output-dir .*file/run cannot be created: .*file is a file"):
        data.check_writable_folder(tmp_path / "file" / "run", "--output-dir")
    with pytest.raises(PeftgenError, match=r"--output .*file is a file, not a folder"):
        data.make_folder(tmp_path / "file", "--output")
    assert data.make_folder(tmp_path / "a" / "b", "--output").is_dir()
