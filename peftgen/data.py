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
but loses its ``<EOS>``, since it did not end there. A line holding the pad
marker is skipped with a warning: its ``<PAD>`` would become a label, and the
model would learn to emit padding.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from peftgen.errors import PeftgenError

IGNORE_INDEX = -100  # label value that cross-entropy skips

MAX_LISTED = 20  # line numbers named in a warning
NEWLINE = b"\n"

# Leading bytes of files that are not text, so the error can say what the file is.
MAGIC = {
    b"\x1f\x8b": "gzip-compressed",
    b"PK\x03\x04": "a zip archive",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"\xff\xfe": "UTF-16 text",
    b"\xfe\xff": "UTF-16 text",
}


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (token_multiple; peftgen.batching.pad_packed says why),
    the multiple halved while it is more than a quarter of ``length``: short batches stay short (a
    30-token batch grows to 32, not 64), and batches of 256 tokens or more take the whole multiple; 0 leaves it."""
    step = max(multiple, 1)
    while step > 1 and 4 * step > length:
        step //= 2
    return length + -length % step


def not_text_reason(head: bytes) -> str | None:
    """What a file is if its first bytes say it is not UTF-8 text (compressed, UTF-16, binary), else None."""
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    if b"\0" in head:
        return "binary, or UTF-16 without a byte-order mark: it holds NUL bytes"
    return None


def not_text(raw: bytes) -> str | None:
    """What a whole file's bytes are if they are not text: its first bytes say so, or it holds a NUL."""
    return not_text_reason(raw[:8192]) or (not_text_reason(b"\0") if b"\0" in raw else None)


def not_text_error(path: str | Path, what: str, kind: str, nul_line: int | None = None) -> PeftgenError:
    where = f" (the first on line {nul_line})" if nul_line is not None else ""
    return PeftgenError(
        f"The {what} {path} is not text: it is {kind}{where}. "
        "Give a UTF-8 text file with one example per line (decompress or convert it, or use 'peftgen prepare')."
    )


def not_utf8_error(path: str | Path, what: str, byte: int, line: int) -> PeftgenError:
    return PeftgenError(f"The {what} {path} is not UTF-8 text (byte {byte}, line {line}). Convert it to UTF-8, or clean it with 'peftgen prepare'.")


def empty_error(path: str | Path, what: str) -> PeftgenError:
    return PeftgenError(f"The {what} {path} is empty. It needs one example per line.")


def _numbered_lines(path: str | Path, what: str) -> list[tuple[int, str]]:
    """(1-based line number, stripped line) of each non-blank line of a UTF-8 text file."""
    path = Path(path)
    if not path.exists():
        raise PeftgenError(f"The {what} {path} does not exist. Check the path.")
    if path.is_dir():
        raise PeftgenError(f"The {what} {path} is a folder; pass a text file with one example per line.")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise PeftgenError(f"Cannot read the {what} {path}: {error.strerror or error}.") from None
    nul = raw.find(b"\0")
    kind = not_text(raw)
    if kind is not None:
        raise not_text_error(path, what, kind, raw[:nul].count(NEWLINE) + 1 if nul >= 0 and "NUL" in kind else None)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise not_utf8_error(path, what, error.start, raw[: error.start].count(NEWLINE) + 1) from None
    if not text.strip():
        raise empty_error(path, what)
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def read_lines(path: str | Path, what: str = "data file") -> list[str]:
    """The non-blank lines of a UTF-8 text file, with clear errors for unusable files."""
    return [line for _, line in _numbered_lines(path, what)]


def check_writable_folder(path: str | Path, what: str) -> None:
    """Refuse, before any work is done, a folder that cannot be created or written (under a file, read-only)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        if existing == path:
            raise PeftgenError(f"{what} {path} is a file, not a folder. Choose a folder path.")
        raise PeftgenError(f"{what} {path} cannot be created: {existing} is a file. Choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PeftgenError(f"{what} {path} cannot be written: {existing} is read-only or not yours. Choose a folder you can write to.")


def make_folder(path: str | Path, what: str) -> Path:
    """mkdir -p, with one clear line when the file system refuses."""
    path = Path(path)
    check_writable_folder(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a virtual or full file system
        raise PeftgenError(f"{what} {path} cannot be created: {error.strerror or error}.") from None
    return path


def line_list(numbers: list[int], limit: int = MAX_LISTED) -> str:
    """'3, 7, 9' or '3, 7, ... and 12 more': line numbers as a report names them."""
    shown = ", ".join(map(str, numbers[:limit]))
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def strip_markers(line: str, bos: str, eos: str) -> str:
    """The text of a line without a leading bos marker and a trailing eos marker."""
    line = line.strip()
    if line.startswith(bos):
        line = line[len(bos) :]
    if line.endswith(eos):
        line = line[: -len(eos)]
    return line.strip()


def encode(line: str, tokenizer, max_length: int) -> list[int]:
    """Token ids of one example: [bos] + ids(" " + text) + [eos], cut to max_length."""
    text = strip_markers(line, tokenizer.bos_token, tokenizer.eos_token)
    body = tokenizer(" " + text, add_special_tokens=False)["input_ids"] if text else []
    return ([tokenizer.bos_token_id] + body + [tokenizer.eos_token_id])[:max_length]


def load_examples(path: str | Path, tokenizer, max_length: int, what: str = "data file") -> list[list[int]]:
    """Encode every usable line of a file; a file with none is an error.

    Lines holding the pad marker are skipped, with a warning on stderr naming them.
    """
    pad = tokenizer.pad_token
    numbered = _numbered_lines(path, what)
    padded = [number for number, line in numbered if pad and pad in line]
    lines = [line for _, line in numbered if not (pad and pad in line)]
    if padded:
        print(
            f"Warning: skipped {len(padded)} line(s) of the {what} {path} holding the pad marker {pad} "
            f"(it would be learnt as text): line(s) {line_list(padded)}.",
            file=sys.stderr,
        )
    examples = [ids for ids in (encode(line, tokenizer, max_length) for line in lines) if len(ids) > 2]
    if not examples:
        raise PeftgenError(
            f"The {what} {path} has no usable line: every line is only markers"
            + (f" or holds {pad}" if padded else "")
            + ". Each line needs some text besides <BOS>/<EOS>."
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
    multiple: int = 0  # rows padded to a multiple of this many tokens (peftgen.batching.pad_packed says why)

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        width = padded_length(width, self.multiple)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, item in enumerate(batch):
            ids = item["input_ids"]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
