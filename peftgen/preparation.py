"""Turn raw text into the ``train.txt`` / ``valid.txt`` / ``test.txt`` that ``peftgen train`` reads.

    peftgen prepare booksummaries.txt --output-dir data/books --seed 0
    result = peftgen.prepare("booksummaries.txt", "data/books", seed=0)   # from Python

Input is the CMU Book Summary Dataset's ``booksummaries.txt`` (7 tab-separated
columns, the plot summary last), a plain text file (one example per line) or
JSONL (one object per line, the text under ``--text-field``), each also as
``.gz``, ``.bz2`` or ``.xz``, or inside a tar archive such as the dataset's own
``booksummaries.tar.gz`` (its one text member, or ``booksummaries.txt``);
compressed input is unpacked to a temporary file first. Input that is not
text (NUL bytes, UTF-16, mostly undecodable lines) is refused. Every output line
is one example in the canonical form ``<BOS> text <EOS>``, whitespace inside the
text collapsed to single spaces. With ``--output-format jsonl`` or ``parquet``
the splits are ``train.jsonl`` (``{"text": ...}`` a line) or ``train.parquet``
(a ``text`` column) instead, holding the same text without the markers; training
gives all three the same token ids.

The file is read twice and never held in memory: the first pass checks each
line and remembers only its byte offset (and a 16-byte hash, to drop exact
duplicates); the offsets are then shuffled with ``--seed`` and dealt into the
splits, and the second pass seeks to each offset and writes the example. The
same input and seed therefore give byte-identical files, and since the splits
are dealt from one list of distinct examples none appears in two of them.

Examples longer than the model's context lose their ``<EOS>`` when training
truncates them, and a model that never sees ``<EOS>`` never learns to stop.
With ``--max-tokens`` (and a ``--tokenizer`` to count with) a long summary is
instead cut at sentence ends into several complete examples (``--long chunk``),
reduced to its opening sentences (``first``), or dropped (``skip``). The pieces
of one summary always land in the same split.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from peftgen import data
from peftgen.config import short
from peftgen.errors import PeftgenError
from peftgen.markers import BOS, EOS, PAD

FORMATS = ("cmu", "text", "jsonl")
OUTPUT_FORMATS = ("txt", "jsonl", "parquet")
PARQUET_ROWS = 10_000  # rows per parquet row group: memory stays flat however large the split
LONG_POLICIES = ("chunk", "first", "skip")
SPLITS = ("train", "valid", "test")
CMU_COLUMNS = 7
CMU_MEMBER = "booksummaries.txt"  # the text inside the dataset's booksummaries.tar.gz
NOT_TEXT_SHARE = 0.25  # more lines than this that are not text: the whole input is not text
COMPRESSED = {b"\x1f\x8b": (gzip.open, ".gz"), b"BZh": (bz2.open, ".bz2"), b"\xfd7zXZ\x00": (lzma.open, ".xz")}
# C0 control characters that no prose holds (tab, line breaks and the separators
# that str.split() takes for whitespace excepted): random bytes decode to them.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")


@dataclass(frozen=True)
class BadRow:
    line: int  # 1-based line number in the input
    reason: str


@dataclass(frozen=True)
class LengthStats:
    min: int
    median: int
    p90: int
    max: int

    @classmethod
    def of(cls, values: list[int]) -> LengthStats:
        # Nearest-rank percentiles: every reported number is a real example's length.
        ordered = sorted(values)
        rank = lambda q: ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * q // 100) - 1))]
        return cls(ordered[0], rank(50), rank(90), ordered[-1])


@dataclass
class PrepareResult:
    output_dir: Path
    format: str
    files: dict[str, Path]
    examples: dict[str, int]  # lines written per split
    sources: dict[str, int]  # input rows behind them, per split
    skipped: list[BadRow] = field(default_factory=list)
    lengths: dict[str, LengthStats] = field(default_factory=dict)  # "chars", "words", "tokens"
    long_rows: int = 0  # rows over --max-tokens (chunked, shortened or dropped)
    max_tokens: int | None = None
    long: str = "chunk"


def normalise(text: str) -> str:
    """Collapse every run of whitespace (tabs, newlines, NBSP...) to one space."""
    return " ".join(text.split())


def to_line(text: str) -> str:
    """The canonical prepared form of one example (without the newline)."""
    return f"{BOS} {text} {EOS}"


def parse_split(spec: str | tuple[float, ...]) -> tuple[float, float, float]:
    """``"0.7,0.2,0.1"`` -> (0.7, 0.2, 0.1); three non-negative fractions summing to 1."""
    try:
        parts = tuple(float(p) for p in (spec.split(",") if isinstance(spec, str) else spec))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(0 <= p <= 1 for p in parts) or abs(sum(parts) - 1) > 1e-6 or parts[0] == 0:
        raise PeftgenError(f"Invalid split {short(spec)}: give three fractions for train,valid,test that sum to 1 with train above 0, e.g. --split 0.7,0.2,0.1")
    return parts  # type: ignore[return-value]


def split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sizes summing to ``n``: largest remainders, but a non-zero fraction gets at least one."""
    exact = [n * f for f in fractions]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    for i in range(3):  # e.g. 5 rows at 0.7/0.2/0.1 would leave test empty
        if fractions[i] > 0 and sizes[i] == 0 and n >= sum(f > 0 for f in fractions):
            sizes[i] += 1
            sizes[max(range(3), key=lambda j: sizes[j])] -= 1
    return tuple(sizes)  # type: ignore[return-value]


# Reading -------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line without its newline), streaming."""
    with open(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            yield number, offset, raw.rstrip(b"\r\n")
            offset += len(raw)


def detect_format(path: Path) -> str:
    """Guess cmu/jsonl/text from the extension, else from the first non-blank line."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    for _, _, raw in _lines(path):
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        if line.count("\t") == CMU_COLUMNS - 1:
            return "cmu"
        if line.lstrip().startswith("{"):
            try:
                if isinstance(json.loads(line), dict):
                    return "jsonl"
            except json.JSONDecodeError:
                pass
        return "text"
    return "text"


def parse_line(raw: bytes, fmt: str, text_field: str = "text") -> str:
    """The normalised example text of one raw input line; ValueError(reason) if it is bad."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"undecodable bytes (not UTF-8) at byte {e.start}") from None
    control = _CONTROL.search(line)
    if control:
        raise ValueError(f"not text (control byte {ord(control.group()):#04x})")
    if fmt == "cmu":
        columns = line.split("\t")
        if len(columns) != CMU_COLUMNS:
            raise ValueError(f"{len(columns)} columns, expected {CMU_COLUMNS}")
        text = columns[-1]
    elif fmt == "jsonl":
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError("not valid JSON") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise ValueError(f"no {text_field!r} field (choose another with --text-field)")
        text = obj[text_field]
        if not isinstance(text, str):
            raise ValueError(f"field {text_field!r} is not a string")
    else:
        text = line
    text = normalise(text)
    if not text:
        raise ValueError("empty text")
    for marker in (BOS, EOS, PAD):
        if marker in text:  # it would be tokenised as the special token mid-example
            raise ValueError(f"text contains the marker {marker}")
    return text


# Cutting long examples -------------------------------------------------------

_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "e.g.", "i.e.", "etc.", "no."}
_SENTENCE_END = re.compile(r"[.!?][\"'”’»)\]]*$")


def sentences(text: str) -> list[str]:
    """Split normalised text after words ending in . ! ? (not after Mr., initials like J.)."""
    out, current = [], []
    for word in text.split(" "):
        current.append(word)
        if _SENTENCE_END.search(word) and word.lower() not in _ABBREVIATIONS and not re.fullmatch(r"[A-Z]\.", word):
            out.append(" ".join(current))
            current = []
    if current:
        out.append(" ".join(current))
    return out


class TokenCounter:
    """Counts tokens the way ``peftgen train`` builds an example: [bos] + tok(" " + text) + [eos]."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def body(self, pieces: list[str]) -> list[int]:
        """Token counts of ``" " + piece`` for each piece (the markers excluded)."""
        if not pieces:
            return []
        ids = self.tokenizer([" " + p for p in pieces], add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def example(self, text: str) -> int:
        return self.body([text])[0] + 2


def _greedy(units: list[str], counts: list[int], budget: int) -> list[list[str]]:
    """Pack consecutive units into groups whose summed count stays within budget."""
    groups, current, used = [], [], 0
    for unit, n in zip(units, counts):
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(unit)
        used += n
    if current:
        groups.append(current)
    return groups


def chunk(text: str, counter: TokenCounter, max_tokens: int) -> list[str]:
    """Cut text at sentence ends into pieces that each fit ``max_tokens`` with both markers.

    A byte-level BPE splits before each space-prefixed word, so the count of
    " s1 s2" is the sum of the counts of " s1" and " s2"; each piece is checked
    exactly anyway, and one that is still too long (or a single sentence longer
    than the budget) is cut again at word boundaries.
    """
    budget = max_tokens - 2
    if budget < 1:
        raise PeftgenError(f"--max-tokens {max_tokens} leaves no room between {BOS} and {EOS}; use at least 3")
    parts = sentences(text)
    pieces = [" ".join(g) for g in _greedy(parts, counter.body(parts), budget)]
    out = []
    for piece, n in zip(pieces, counter.body(pieces)):
        if n <= budget:
            out.append(piece)
            continue
        words = piece.split(" ")
        for group in _greedy(words, counter.body(words), budget):
            words_piece = " ".join(group)
            # One word alone longer than the budget: keep it whole, training truncates it.
            out.append(words_piece)
    return out


# Compressed input ------------------------------------------------------------

_TEXT_NEEDED = "Give UTF-8 text: booksummaries.txt, one example a line, or JSONL (also as .gz, .bz2, .xz or in a tar archive)."


def _tar_member(archive: tarfile.TarFile, source: Path) -> tarfile.TarInfo:
    """booksummaries.txt if the archive holds it, else its only file, else its only text file."""
    files = [m for m in archive.getmembers() if m.isfile()]
    texts = [m for m in files if Path(m.name).suffix.lower() in (".txt", ".tsv", ".jsonl", ".ndjson", ".json")]
    for candidates in ([m for m in files if Path(m.name).name == CMU_MEMBER], files, texts):
        if len(candidates) == 1:
            return candidates[0]
    names = ", ".join(m.name for m in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    raise PeftgenError(
        f"{source} is a tar archive of {len(files)} files ({names or 'none'}), not one text file or {CMU_MEMBER}. "
        "Extract the file to prepare and pass it instead."
    )


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, zlib.error, lzma.LZMAError):
        return False


@contextlib.contextmanager
def plain_text(source: Path) -> Iterator[Path]:
    """The path of ``source``'s text: ``source`` itself, or a temporary file holding it unpacked.

    The splits are written by seeking to each example's offset in shuffled
    order, which a compressed stream cannot do cheaply: it is unpacked once.
    """
    with open(source, "rb") as f:
        head = f.read(6)
    opener = next((found for magic, found in COMPRESSED.items() if head.startswith(magic)), None)
    is_tar = _is_tar(source)
    if opener is None and not is_tar:
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="peftgen-prepare-") as scratch:
        try:
            if is_tar:
                with tarfile.open(source, "r:*") as archive:
                    member = _tar_member(archive, source)
                    target = Path(scratch) / Path(member.name).name
                    with archive.extractfile(member) as packed, open(target, "wb") as unpacked:
                        shutil.copyfileobj(packed, unpacked)
            else:
                open_, suffix = opener
                name = source.name[: -len(suffix)] if source.name.lower().endswith(suffix) else source.stem
                target = Path(scratch) / (name or "input")
                with open_(source, "rb") as packed, open(target, "wb") as unpacked:
                    shutil.copyfileobj(packed, unpacked)
        except (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError) as error:
            raise PeftgenError(f"Cannot unpack {source}: {error}. Is the file complete?") from None
        yield target


# Writing -------------------------------------------------------------------


class SplitWriter:
    """Writes one split as its file's extension says: ``.txt`` lines ``<BOS> text <EOS>``, JSONL objects
    ``{"text": ...}`` or a parquet column ``text`` (the plain text: the markers are a text-file convention)."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind  # kind: the final file's suffix, .txt, .jsonl or .parquet
        self.rows: list[str] = []
        self.file = self.parquet = None

    def __enter__(self) -> SplitWriter:
        if self.kind == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("text", pa.string())])
            self.parquet = pq.ParquetWriter(self.path, self.schema)
        else:
            self.file = open(self.path, "w", encoding="utf-8", newline="\n")
        return self

    def write(self, text: str) -> None:
        if self.parquet is not None:
            self.rows.append(text)
            if len(self.rows) >= PARQUET_ROWS:
                self._flush()
        elif self.kind == ".jsonl":
            self.file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        else:
            self.file.write(to_line(text) + "\n")

    def _flush(self) -> None:
        import pyarrow as pa

        self.parquet.write_table(pa.table({"text": pa.array(self.rows, pa.string())}, schema=self.schema))
        self.rows = []

    def __exit__(self, *exc) -> None:
        if self.parquet is not None:
            if self.rows:
                self._flush()
            self.parquet.close()
        else:
            self.file.close()


# The job -------------------------------------------------------------------


def _load_tokenizer(tokenizer):
    """A tokenizer object as it is; a model folder, run, .gguf file or Hub id: its tokenizer."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from peftgen.model import tokenizer_of

    return tokenizer_of(tokenizer)


def prepare(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    format: str = "auto",
    text_field: str = "text",
    split: str | tuple[float, ...] = (0.7, 0.2, 0.1),
    seed: int = 0,
    overwrite: bool = False,
    tokenizer=None,
    max_tokens: int | None = None,
    long: str = "chunk",
    output_format: str = "txt",
) -> PrepareResult:
    """Read ``input_path``, write ``train.txt``/``valid.txt``/``test.txt`` into ``output_dir``.

    ``tokenizer`` (a path, model id or tokenizer object) adds token lengths to
    the report and is required by ``max_tokens``, the longest example in tokens
    including both markers, as ``peftgen train --max-length`` counts them.
    """
    source = Path(input_path)
    if not source.is_file():
        raise PeftgenError(f"Input file {str(source)!r} does not exist.")
    fractions = parse_split(split)
    if format not in ("auto", *FORMATS):
        raise PeftgenError(f"Unknown format {short(format)}. Choose one of: auto, {', '.join(FORMATS)}.")
    if long not in LONG_POLICIES:
        raise PeftgenError(f"Unknown --long {short(long)}. Choose one of: {', '.join(LONG_POLICIES)}.")
    if max_tokens is not None and tokenizer is None:
        raise PeftgenError("--max-tokens counts tokens, so it needs --tokenizer (a model folder, .gguf file or id).")
    if max_tokens is not None and max_tokens < 3:
        raise PeftgenError(f"--max-tokens {max_tokens} leaves no room between {BOS} and {EOS}; use at least 3.")
    out = Path(output_dir)
    if output_format not in OUTPUT_FORMATS:
        raise PeftgenError(f"Unknown output format {short(output_format)}. Choose one of: {', '.join(OUTPUT_FORMATS)}.")
    files = {name: out / f"{name}.{output_format}" for name in SPLITS}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not overwrite:
        raise PeftgenError(f"Output exists: {', '.join(existing)}. Pass --overwrite to replace it.")
    data.check_writable_folder(out, "--output-dir")
    counter = TokenCounter(_load_tokenizer(tokenizer)) if tokenizer is not None else None
    with plain_text(source) as text:
        return _prepare_text(text, source, out, files, format, text_field, fractions, seed, counter, max_tokens, long)


def _prepare_text(
    text: Path,
    source: Path,
    out: Path,
    files: dict[str, Path],
    format: str,
    text_field: str,
    fractions: tuple[float, float, float],
    seed: int,
    counter: TokenCounter | None,
    max_tokens: int | None,
    long: str,
) -> PrepareResult:
    """The two passes over ``text``, the plain-text content of ``source`` (named in messages)."""
    with open(text, "rb") as f:
        kind = data.not_text_reason(f.read(8192))
    if kind is not None:
        raise PeftgenError(f"{source} is not text: it is {kind}. {_TEXT_NEEDED}")
    fmt = detect_format(text) if format == "auto" else format

    # Pass 1: validate every line, keep the offsets of good, distinct ones.
    offsets: list[int] = []
    seen: dict[bytes, int] = {}
    skipped: list[BadRow] = []
    rows = not_text = 0
    for number, offset, raw in _lines(text):
        rows += 1
        try:
            line = parse_line(raw, fmt, text_field)
        except ValueError as e:
            skipped.append(BadRow(number, str(e)))
            not_text += str(e).startswith(("undecodable", "not text"))
            continue
        digest = hashlib.blake2b(line.encode(), digest_size=16).digest()
        if digest in seen:
            skipped.append(BadRow(number, f"duplicate of line {seen[digest]}"))
            continue
        seen[digest] = number
        offsets.append(offset)
    del seen
    if not_text > NOT_TEXT_SHARE * rows:
        first = next(row for row in skipped if row.reason.startswith(("undecodable", "not text")))
        raise PeftgenError(
            f"{source} is not text: {not_text} of its {rows} lines are not UTF-8 text (first: line {first.line}: {first.reason}). {_TEXT_NEEDED}"
        )
    if not offsets:
        raise PeftgenError(
            f"No usable example in {str(source)!r} as format {fmt!r} ({len(skipped)} lines skipped"
            + (f", first: line {skipped[0].line}: {skipped[0].reason}" if skipped else "")
            + "). Check --format and --text-field."
        )

    # Deal the shuffled rows into the splits.
    random.Random(seed).shuffle(offsets)
    sizes = split_sizes(len(offsets), fractions)
    bounds = [0, sizes[0], sizes[0] + sizes[1], len(offsets)]

    # Pass 2: write each split under a temporary name, seeking to its rows in
    # shuffled order; only when all three are complete are they renamed into
    # place, so a kill never leaves a folder of splits that looks finished.
    data.make_folder(out, "--output-dir")
    temporary = {name: files[name].with_name(f".{files[name].name}.tmp") for name in SPLITS}
    examples, sources = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    chars, words, tokens = [], [], []
    written: set[bytes] = set()
    long_rows = 0
    try:
        with open(text, "rb") as f:
            for k, name in enumerate(SPLITS):
                with SplitWriter(temporary[name], files[name].suffix) as w:
                    for offset in offsets[bounds[k] : bounds[k + 1]]:
                        f.seek(offset)
                        line = parse_line(f.readline().rstrip(b"\r\n"), fmt, text_field)
                        pieces = [line]
                        if max_tokens is not None and counter.example(line) > max_tokens:
                            long_rows += 1
                            pieces = [] if long == "skip" else chunk(line, counter, max_tokens)
                            pieces = pieces[:1] if long == "first" else pieces
                        if pieces:
                            sources[name] += 1
                        for piece in pieces:
                            digest = hashlib.blake2b(piece.encode(), digest_size=16).digest()
                            if digest in written:  # two summaries sharing an identical piece
                                continue
                            written.add(digest)
                            w.write(piece)
                            examples[name] += 1
                            chars.append(len(piece))
                            words.append(piece.count(" ") + 1)
                            if counter is not None:
                                tokens.append(counter.example(piece))
        for name in SPLITS:
            os.replace(temporary[name], files[name])
    except OSError as error:
        raise PeftgenError(f"Cannot write the splits into {out}: {error.strerror or error}.") from None
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)

    lengths = {"chars": LengthStats.of(chars), "words": LengthStats.of(words)} if chars else {}
    if tokens:
        lengths["tokens"] = LengthStats.of(tokens)
    return PrepareResult(out, fmt, files, examples, sources, skipped, lengths, long_rows, max_tokens, long)


def report(result: PrepareResult, max_listed: int = 20) -> str:
    """A human summary: skipped lines by reason, counts per split, length distribution."""
    lines = [f"Format: {result.format}"]
    if result.skipped:
        lines.append(f"Skipped {len(result.skipped)} bad line(s):")
        by_reason: dict[str, list[int]] = {}
        for row in result.skipped:
            key = "duplicate" if row.reason.startswith("duplicate") else row.reason
            by_reason.setdefault(key, []).append(row.line)
        for reason, numbers in by_reason.items():
            shown = ", ".join(map(str, numbers[:max_listed]))
            more = f" and {len(numbers) - max_listed} more" if len(numbers) > max_listed else ""
            lines.append(f"  {reason}: line(s) {shown}{more} ({len(numbers)})")
    if result.long_rows:
        done = {"chunk": "cut at sentence ends into pieces that fit", "first": "shortened to their opening sentences", "skip": "dropped"}[result.long]
        lines.append(f"{result.long_rows} row(s) longer than {result.max_tokens} tokens were {done} (--long {result.long})")
    lines.append("Examples per split:")
    for name in SPLITS:
        lines.append(f"  {name:<5} {result.examples[name]:>7}  (from {result.sources[name]} input rows)  {result.files[name]}")
    if result.lengths:
        lines.append("Length per example    min  median     p90     max")
        for unit, s in result.lengths.items():
            note = " (incl. <BOS>, <EOS>)" if unit == "tokens" else ""
            lines.append(f"  {unit:<8} {s.min:>12} {s.median:>7} {s.p90:>7} {s.max:>7}{note}")
        if "tokens" not in result.lengths:
            lines.append("  (pass --tokenizer to see token lengths, the unit of --max-length)")
    return "\n".join(lines)
