"""Line-by-line text data: one example per non-blank line, wrapped in <BOS> ... <EOS>.

How the markers meet the text (the same in train, eval and prepare):
a line may carry the markers already (``<BOS> Old Major calls ... <EOS>``) or
not (``Old Major calls ...``); either way it becomes the token ids

    [bos_id] + tokenize(" " + text) + [eos_id]

built from ids, not from a string. The text is stripped and given one leading
space, so its first word is tokenised the way it appears inside GPT-2's
training text (``ĠOld``, not ``Old``), and no lone space token sits before
``<EOS>`` (tokenising the string ``"... <EOS>"`` would give ``Ġ`` + ``<EOS>``
and teach the model to emit a space before stopping). Markers inside a line
are left to the tokenizer, which maps them to their special ids.

Lines longer than ``max_length`` tokens are cut; a cut example keeps ``<BOS>``
but loses its ``<EOS>``, since it did not end there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from peftgen.errors import PeftgenError

IGNORE_INDEX = -100  # label value that cross-entropy skips


def read_lines(path: str | Path, what: str = "data file") -> list[str]:
    """The non-blank lines of a UTF-8 text file, with clear errors for unusable files."""
    path = Path(path)
    if not path.exists():
        raise PeftgenError(f"The {what} {path} does not exist. Check the path.")
    if path.is_dir():
        raise PeftgenError(f"The {what} {path} is a folder; pass a text file with one example per line.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PeftgenError(
            f"The {what} {path} is not UTF-8 text (byte {error.start}). "
            "Convert it to UTF-8, or clean it with 'peftgen prepare'."
        ) from None
    if not text.strip():
        raise PeftgenError(f"The {what} {path} is empty. It needs one example per line.")
    return [line.strip() for line in text.splitlines() if line.strip()]


def strip_markers(line: str, bos: str, eos: str) -> str:
    """The text of a line without a leading bos marker and a trailing eos marker."""
    line = line.strip()
    if line.startswith(bos):
        line = line[len(bos):]
    if line.endswith(eos):
        line = line[: -len(eos)]
    return line.strip()


def encode(line: str, tokenizer, max_length: int) -> list[int]:
    """Token ids of one example: [bos] + ids(" " + text) + [eos], cut to max_length."""
    text = strip_markers(line, tokenizer.bos_token, tokenizer.eos_token)
    body = tokenizer(" " + text, add_special_tokens=False)["input_ids"] if text else []
    return ([tokenizer.bos_token_id] + body + [tokenizer.eos_token_id])[:max_length]


def load_examples(path: str | Path, tokenizer, max_length: int, what: str = "data file") -> list[list[int]]:
    """Encode every usable line of a file; a file with none is an error."""
    examples = [ids for ids in (encode(line, tokenizer, max_length) for line in read_lines(path, what)) if len(ids) > 2]
    if not examples:
        raise PeftgenError(
            f"The {what} {path} has no usable line: every line is only markers. "
            "Each line needs some text besides <BOS>/<EOS>."
        )
    return examples


class LineDataset(torch.utils.data.Dataset):
    """Pre-tokenised examples; each item is a dict with input_ids, as Trainer expects."""

    def __init__(self, examples: list[list[int]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.examples[index]}


@dataclass
class PadCollator:
    """Right-pads a batch; labels are the input ids with padding set to IGNORE_INDEX.

    The model shifts labels itself (position t predicts token t+1), so the
    ``<EOS>`` at the end of each example is a label: the model learns to stop.
    ``<PAD>`` never is, and attention never looks at it.
    """

    pad_token_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, item in enumerate(batch):
            ids = item["input_ids"]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
