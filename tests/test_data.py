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
