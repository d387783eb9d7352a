"""Data of any size and format: read once, tokenized once, then memory-mapped from a cache.

    source = corpus.describe("train.jsonl", "training file")        # cheap checks, before a model loads
    tokens = corpus.tokenize(source, tokenizer, max_length=512)     # built once, reused after
    dataset = tokens.open()                                         # datasets.Dataset of {"input_ids": [...]}

Sources (``--train-file``, ``--valid-file``, ``peftgen eval --file``):

- ``.txt`` (and any extension not below): one example per non-blank line;
- ``.jsonl`` / ``.ndjson`` / ``.json``: JSON lines (or one JSON array) of objects;
- ``.csv`` / ``.tsv``: a header row naming the columns;
- ``.parquet``;
- a folder saved with ``Dataset.save_to_disk`` (of a ``DatasetDict``: one split);
- ``hub:owner/name``: a dataset on the Hugging Face Hub, where the Hub is reachable.

All but text files hold the example under a column, ``--text-field`` (``text``).
A row without it, or whose value is not a string or is empty, or that holds
the pad marker, is skipped and named by its row number in a warning (as
``peftgen prepare`` does). Every text becomes exactly the ids ``data.encode``
gives it: ``[<BOS>] + ids(" " + text) + [<EOS>]``, markers already present
stripped, cut to ``max_length``.

How: the rows are streamed once into an Arrow file of their texts, which
``Dataset.map(batched=True, num_proc=...)`` tokenizes (a batch of a thousand
texts at a time: the fast tokenizers' Rust code spreads a batch over every
core; Python tokenizers get a worker process per core) into Arrow files under
``PEFTGEN_CACHE/datasets`` (``~/.cache/peftgen/datasets``). Training then reads
examples memory-mapped from those files, so memory does not grow with the
corpus. The cache is keyed by the source (path, size, modification time and
its first and last 64 KiB; a saved folder's files; a Hub dataset's
fingerprint), the tokenizer (its whole vocabulary, merges and added tokens),
``max_length``, ``--text-field`` and the split: a changed file or tokenizer
never meets an old cache. A cache is built in a ``.NAME.partial-PID`` folder
and renamed into place when whole, so a failed or killed build leaves nothing
that looks finished (the next run removes its remains and builds again).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftgen import data, runs
from peftgen.cache import cache_dir
from peftgen.config import short
from peftgen.errors import PeftgenError, first_line

PIPELINE = 1  # bump when the ids of a text change: every cache is then rebuilt
HUB = "hub:"
CHUNK = 8 << 20  # bytes of a text file decoded at a time
BATCH_ROWS = 10_000  # texts per Arrow record batch while reading, at most
BATCH_CHARS = 4 << 20  # and at most about this much text: what reading holds in memory at once
PARALLEL_ROWS = 20_000  # fewer rows than this: starting worker processes costs more than it saves
SAMPLE = 64 << 10  # bytes from each end of a file that go into its fingerprint
MANIFEST = "manifest.json"  # written last: a cache folder holding it is complete
PART_BYTES = 16 << 20  # text per part: each part is tokenized and unmapped before the next, so the pages
# of the memory-mapped texts that tokenizing touches never add up to the whole corpus
SUFFIXES = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
# Which split a saved DatasetDict or Hub dataset gives when --split does not say.
PREFERRED = {
    "training file": ("train",),
    "validation file": ("validation", "valid", "dev", "test"),
    "evaluation file": ("test", "validation", "valid"),
}
_LEFTOVER = re.compile(r"^\.(.+)\.partial-(\d+)$")


@dataclass
class Source:
    """Where examples come from, checked enough to fail before a model loads."""

    spec: str  # as the user gave it
    kind: str  # text | json | csv | tsv | parquet | disk | hub
    what: str  # "training file", ... as messages name it
    text_field: str = "text"
    split: str | None = None  # for disk and hub: the split that is read
    _dataset: Any = field(default=None, repr=False)  # disk and hub: the datasets.Dataset, opened once

    @property
    def path(self) -> Path:
        return Path(self.spec)

    @property
    def unit(self) -> str:
        """What a bad-row report counts: lines where the format has them."""
        return "line" if self.kind in ("text", "json", "csv", "tsv") and not self._json_array() else "row"

    def _json_array(self) -> bool:
        return self.kind == "json" and _first_byte(self.path) == b"["


@dataclass(frozen=True)
class Tokenized:
    """A finished cache folder: Arrow files of token ids, opened memory-mapped."""

    folder: Path
    files: tuple[str, ...]
    examples: int
    tokens: int
    warnings: tuple[str, ...] = ()

    def open(self):
        """The examples as a datasets.Dataset, each item {"input_ids": [...]}, read from disk as needed."""
        from datasets import Dataset, concatenate_datasets

        parts = [Dataset.from_file(str(self.folder / name)) for name in self.files]
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)

    def size(self) -> int:
        return sum((self.folder / name).stat().st_size for name in self.files)

    @classmethod
    def read(cls, folder: Path) -> Tokenized | None:
        """The cache in folder, or None when there is none or it is damaged."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            found = cls(folder, tuple(manifest["files"]), manifest["examples"], manifest["tokens"], tuple(manifest["warnings"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return found if all((folder / name).is_file() for name in found.files) else None


def cache_root() -> Path:
    return cache_dir() / "datasets"


def lengths(dataset):
    """The number of ids of each example, as a numpy array, read from the Arrow column without decoding rows."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False)


# ------------------------------------------------------------------ describing


def describe(spec: str | os.PathLike, what: str, text_field: str = "text", split: str | None = None) -> Source:
    """Name the kind of source, refusing what cannot work (missing, not text, no such column) at once."""
    spec = str(spec)
    if not text_field or not text_field.strip():
        raise PeftgenError("--text-field is empty. Name the column holding the text (default: text).")
    if spec.startswith(HUB):
        return _describe_hub(spec, what, text_field, split)
    path = Path(spec)
    if not path.exists():
        raise PeftgenError(f"The {what} {path} does not exist. Check the path.")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            source = Source(spec, "disk", what, text_field)
            _open_dataset(source, split)
            return source
        raise PeftgenError(
            f"The {what} {path} is a folder; pass a text file with one example per line, a .jsonl, .csv, .tsv "
            "or .parquet file, or a folder saved with Dataset.save_to_disk."
        )
    source = Source(spec, SUFFIXES.get(path.suffix.lower(), "text"), what, text_field)
    if source.kind == "parquet":
        _parquet(source)
        return source
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as error:
        raise PeftgenError(f"Cannot read the {what} {path}: {error.strerror or error}.") from None
    kind = data.not_text_reason(head)
    if kind is not None:
        nul = head.find(b"\0")
        raise data.not_text_error(path, what, kind, head[:nul].count(b"\n") + 1 if nul >= 0 and "NUL" in kind else None)
    if not head.strip() and path.stat().st_size <= len(head):
        raise data.empty_error(path, what)
    if source.kind in ("csv", "tsv"):
        _csv_header(source)
    return source


def _describe_hub(spec: str, what: str, text_field: str, split: str | None) -> Source:
    from peftgen.model.sources import hub_reachable

    name = spec[len(HUB) :]
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise PeftgenError(f"{short(spec)} is not a Hub dataset id. Write hub:owner/name, e.g. hub:stanfordnlp/imdb.")
    if not hub_reachable():
        raise PeftgenError(
            f"The {what} {spec} is a Hugging Face Hub dataset, and the Hub cannot be reached from this machine "
            "(offline). Pass a local file (.txt, .jsonl, .csv, .tsv, .parquet) or a folder saved with "
            "Dataset.save_to_disk."
        )
    source = Source(spec, "hub", what, text_field)
    _open_dataset(source, split)
    return source


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[:1]
    return b""


def _choose_split(splits: list[str], wanted: str | None, source: Source) -> str:
    if wanted is not None:
        if wanted not in splits:
            raise PeftgenError(f"The {source.what} {source.spec} has no split {short(wanted)}. Its splits: {', '.join(splits)}.")
        return wanted
    for name in PREFERRED.get(source.what, ("train",)):
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise PeftgenError(f"The {source.what} {source.spec} has the splits {', '.join(splits)}: pick one with --split.")


def _open_dataset(source: Source, split: str | None) -> None:
    """Open a saved folder or Hub dataset, choose its split and check its text column."""
    import datasets

    try:
        if source.kind == "disk":
            loaded = datasets.load_from_disk(source.spec)
        else:
            loaded = datasets.load_dataset(source.spec[len(HUB) :])
    except (OSError, ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise PeftgenError(f"Cannot load the {source.what} {source.spec}: {first_line(error, 300)}.") from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        source.split = _choose_split(list(loaded), split, source)
        loaded = loaded[source.split]
    columns = dict(loaded.features)
    _check_column(source, list(columns), str(getattr(columns.get(source.text_field), "dtype", "")))
    source._dataset = loaded


def _check_column(source: Source, columns: list[str], dtype: str) -> None:
    if source.text_field not in columns:
        raise PeftgenError(
            f"The {source.what} {source.spec} has no column {short(source.text_field)} (its columns: "
            f"{_cut(', '.join(columns))}). Pick the text column with --text-field."
        )
    if dtype not in ("string", "large_string", "str"):
        raise PeftgenError(
            f"The {source.what} {source.spec}: column {short(source.text_field)} holds {dtype or 'not text'}, not text. Pick the text column with --text-field."
        )


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------- reading rows


class _Bad(str):
    """Why a row has no usable text."""


def _rows(source: Source) -> Iterator[tuple[int, Any]]:
    """(row number, value of the text field or a _Bad reason) for each row, streaming."""
    reader = {"text": _text_rows, "json": _json_rows, "csv": _csv_rows, "tsv": _csv_rows, "parquet": _parquet_rows}
    if source.kind in reader:
        return reader[source.kind](source)
    return _dataset_rows(source)


def _text_rows(source: Source) -> Iterator[tuple[int, Any]]:
    """Non-blank lines with their line numbers, as data.read_lines numbers them, decoded a chunk at a time."""
    path, what = source.path, source.what
    number = newlines = offset = 0
    carry = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            block = carry + chunk
            cut = block.rfind(b"\n") + 1 if chunk else len(block)
            if cut == 0 and chunk:  # one line longer than a chunk: read on
                carry = block
                continue
            block, carry = block[:cut], block[cut:]
            nul = block.find(b"\0")
            if nul >= 0:
                raise data.not_text_error(path, what, data.not_text_reason(b"\0"), newlines + block[:nul].count(b"\n") + 1)
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as error:
                line = newlines + block[: error.start].count(b"\n") + 1
                raise data.not_utf8_error(path, what, offset + error.start, line) from None
            # The block ends at a newline, so its lines are those the whole file's splitlines() gives.
            for line in text.splitlines():
                number += 1
                if line.strip():
                    yield number, line
            newlines += block.count(b"\n")
            offset += len(block)
            if not chunk:
                return


def _field(obj: Any, name: str) -> Any:
    if not isinstance(obj, dict):
        return _Bad("not a JSON object")
    if name not in obj:
        return _Bad(f"no {name!r} field (pick the text field with --text-field)")
    return obj[name]


def _json_rows(source: Source) -> Iterator[tuple[int, Any]]:
    path, name = source.path, source.text_field
    if source._json_array():  # one JSON document: it has to be read whole
        try:
            items = json.loads(path.read_bytes())
        except ValueError as error:
            raise PeftgenError(
                f"The {source.what} {path} is not valid JSON ({first_line(error, 300)}). Give JSON lines (one object a line) or one array of objects."
            ) from None
        for number, item in enumerate(items if isinstance(items, list) else [items], start=1):
            yield number, _field(item, name)
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as error:
                yield number, _Bad(f"undecodable bytes (not UTF-8) at byte {error.start}")
                continue
            except ValueError:
                yield number, _Bad("not valid JSON")
                continue
            yield number, _field(obj, name)


def _csv_reader(f, source: Source):
    csv.field_size_limit(2**31 - 1)  # a book summary is longer than the default 128 KiB cap allows
    return csv.reader(f, delimiter="\t" if source.kind == "tsv" else ",")


def _csv_header(source: Source) -> list[str]:
    try:
        with open(source.path, encoding="utf-8", newline="") as f:
            header = next(_csv_reader(f, source), None)
    except (UnicodeDecodeError, csv.Error) as error:
        raise PeftgenError(f"Cannot read the header row of the {source.what} {source.path}: {first_line(error, 300)}.") from None
    if not header:
        raise data.empty_error(source.path, source.what)
    if source.text_field not in header:
        raise PeftgenError(
            f"The {source.what} {source.path} has no column {short(source.text_field)} in its header row (its columns: "
            f"{_cut(', '.join(header))}). Pick the text column with --text-field; a file without a header row "
            "(such as booksummaries.txt) goes through 'peftgen prepare' first."
        )
    return header


def _csv_rows(source: Source) -> Iterator[tuple[int, Any]]:
    index = _csv_header(source).index(source.text_field)
    with open(source.path, encoding="utf-8", newline="") as f:
        reader = _csv_reader(f, source)
        next(reader)
        try:
            for row in reader:
                if not row:
                    continue
                # line_num is the line the row ends on, which is where an editor finds it.
                yield reader.line_num, row[index] if index < len(row) else _Bad(f"no {source.text_field!r} value (the row has {len(row)} columns)")
        except UnicodeDecodeError as error:
            raise PeftgenError(
                f"The {source.what} {source.path} is not UTF-8 text (after line {reader.line_num}: byte {error.start} "
                "of the block read there). Convert it to UTF-8."
            ) from None
        except csv.Error as error:
            raise PeftgenError(f"The {source.what} {source.path} is not valid CSV at line {reader.line_num}: {error}.") from None


def _parquet(source: Source):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as error:
        raise PeftgenError(
            f"Cannot read the {source.what} {source.path} as parquet: {first_line(error, 300)}. "
            "Is the file complete? Write it again, or pass the data as .jsonl or .csv."
        ) from None
    schema = table.schema_arrow
    dtype = str(schema.field(source.text_field).type) if source.text_field in schema.names else ""
    _check_column(source, schema.names, dtype)
    return table


def _parquet_rows(source: Source) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa

    table = _parquet(source)
    number = 0
    try:
        for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=[source.text_field]):
            for value in batch.column(0).to_pylist():
                number += 1
                yield number, value
    except (pa.ArrowException, OSError) as error:
        raise PeftgenError(
            f"Cannot read the {source.what} {source.path} as parquet (after row {number}): {first_line(error, 300)}. Is the file complete? Write it again."
        ) from None


def _dataset_rows(source: Source) -> Iterator[tuple[int, Any]]:
    number = 0
    column = source._dataset.select_columns([source.text_field])
    for batch in column.iter(batch_size=BATCH_ROWS):
        for value in batch[source.text_field]:
            number += 1
            yield number, value


# ---------------------------------------------------------------- tokenizing


class _Encoder:
    """data.encode for a batch of texts, in one tokenizer call (the fast tokenizers spread it over cores)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        tok = self.tokenizer
        texts = [data.strip_markers(text, tok.bos_token, tok.eos_token) for text in batch["text"]]
        spaced = [" " + text for text in texts if text]
        bodies = iter(self._ids(spaced) if spaced else [])
        examples = []
        for text in texts:
            ids = ([tok.bos_token_id] + (next(bodies) if text else []) + [tok.eos_token_id])[: self.max_length]
            if len(ids) > 2:  # a line of markers alone teaches nothing
                examples.append(ids)
        return {"input_ids": examples}

    def _ids(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # The Rust tokenizer itself, without offsets or Python dicts of masks: the same ids, a third less time.
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


def tokenizer_identity(tokenizer) -> str:
    """A hash of everything that decides a tokenizer's ids: vocabulary, merges, normalizer, added tokens, markers."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    markers = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token_id, tokenizer.eos_token_id]
    digest.update(json.dumps(markers).encode())
    return digest.hexdigest()


def _content_version(source: Source) -> list:
    """What changes when the source's content does (without reading a big file whole)."""
    if source.kind == "hub":
        return [source._dataset._fingerprint]
    path = source.path
    if source.kind == "disk":
        return [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()]
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE))
        if stat.st_size > SAMPLE:
            f.seek(max(SAMPLE, stat.st_size - SAMPLE))
            digest.update(f.read(SAMPLE))
    return [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def _names(source: Source, tokenizer, max_length: int) -> tuple[str, str]:
    """(family, folder name): the family is this source read with this tokenizer and these settings; the
    name adds the source's content. Older folders of a family hold content that is gone."""
    where = source.spec if source.kind == "hub" else str(source.path.resolve())
    settings = [PIPELINE, source.kind, where, source.text_field, source.split, max_length, tokenizer_identity(tokenizer)]
    family = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(where).name if source.kind != "hub" else where[len(HUB) :])[:40]
    version = hashlib.sha256(json.dumps([family, _content_version(source)]).encode()).hexdigest()[:12]
    return f"{stem}-{family}", f"{stem}-{family}-{version}"


def _workers(rows: int, tokenizer) -> int | None:
    """Worker processes for Dataset.map: None (this process) for a fast tokenizer, whose Rust batch
    encoding already runs on every core (worker processes on top only compete for them: a 10 MB file
    took 4.4 s in one process and 7.0 s in two on 2 cores); one a core for a Python tokenizer."""
    if rows < PARALLEL_ROWS or getattr(tokenizer, "backend_tokenizer", None) is not None:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8) if cores > 1 else None


def tokenize(source: Source, tokenizer, max_length: int) -> Tokenized:
    """The tokenized examples of source: from the cache when they are there, else built into it once."""
    family, name = _names(source, tokenizer, max_length)
    root = cache_root()
    folder = root / name
    found = Tokenized.read(folder)
    if found is not None:
        for warning in found.warnings:
            _warn(warning)
        runs.note(
            f"the {source.what} {source.spec} is tokenized already: {found.examples:,} examples, "
            f"{found.tokens:,} tokens, read from {folder} ({_megabytes(found.size())})."
        )
        return found
    data.make_folder(root, "The data cache folder (PEFTGEN_CACHE)")
    _clear_leftovers(root)
    if folder.exists():  # damaged: a file of it deleted, or its manifest unreadable
        shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    partial = root / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        built = _build(source, tokenizer, max_length, partial, folder)
        try:
            os.rename(partial, folder)
        except OSError:  # another process finished the same cache first: use that one
            found = Tokenized.read(folder)
            if found is None:
                raise
            shutil.rmtree(partial, ignore_errors=True)
            built = found
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    built = Tokenized(folder, built.files, built.examples, built.tokens, built.warnings)
    for old in root.glob(f"{family}-*"):  # the same source before it changed
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    runs.note(
        f"tokenized the {source.what} {source.spec}: {built.examples:,} examples, {built.tokens:,} tokens in "
        f"{time.perf_counter() - started:.1f} s; cached in {folder} ({_megabytes(built.size())}), reused by later runs."
    )
    return built


def _build(source: Source, tokenizer, max_length: int, partial: Path, folder: Path) -> Tokenized:
    import pyarrow.compute as pc
    from datasets import Dataset, Features, List, Value

    parts, warnings = _write_texts(source, tokenizer.pad_token, partial)
    for warning in warnings:
        _warn(warning)
    files, examples, tokens = [], 0, 0
    for number, (path, rows) in enumerate(parts):
        texts = Dataset.from_file(str(path))
        encoded = texts.map(
            _Encoder(tokenizer, max_length),
            batched=True,
            num_proc=_workers(rows, tokenizer),
            remove_columns=["text"],
            features=Features({"input_ids": List(Value("int32"))}),
            cache_file_name=str(partial / f"tokens-{number:05d}.arrow"),
            load_from_cache_file=False,
            new_fingerprint=f"{folder.name}-{number}",
            desc=f"Tokenizing the {source.what}" + (f" ({number + 1}/{len(parts)})" if len(parts) > 1 else ""),
        )
        files += [Path(entry["filename"]).name for entry in encoded.cache_files]
        examples += len(encoded)
        tokens += int(pc.sum(pc.list_value_length(encoded.data.column("input_ids"))).as_py() or 0) if len(encoded) else 0
        del texts, encoded  # unmapped before the next part
        path.unlink()
    if not examples:
        raise PeftgenError(
            f"The {source.what} {source.spec} has no usable {source.unit}: every {source.unit} is only markers"
            + (", empty, or was skipped" if warnings else "")
            + ". Each needs some text besides <BOS>/<EOS>."
        )
    manifest = {
        "files": list(files),
        "examples": examples,
        "tokens": tokens,
        "warnings": warnings,
        "source": source.spec,
        "max_length": max_length,
        "text_field": source.text_field,
        "split": source.split,
    }
    runs.write_text(partial / MANIFEST, json.dumps(manifest, indent=2))
    return Tokenized(partial, tuple(files), examples, tokens, tuple(warnings))


def _write_texts(source: Source, pad: str | None, folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """Stream the usable texts of source into Arrow files of about PART_BYTES each:
    ([(file, texts in it)], warnings naming the skipped rows)."""
    import pyarrow as pa

    schema = pa.schema([("text", pa.string())])
    skipped: dict[str, list[int]] = {}  # reason -> the first row numbers (all are counted)
    counts: dict[str, int] = {}
    parts: list[tuple[Path, int]] = []
    seen = written = batch_chars = 0
    batch: list[str] = []
    writer = sink = None
    part_bytes = 0

    def flush() -> None:
        nonlocal writer, sink, part_bytes, written, batch
        if writer is None:
            parts.append((folder / f"texts-{len(parts):05d}.arrow", 0))
            sink = pa.OSFile(str(parts[-1][0]), "wb")
            writer = pa.ipc.new_stream(sink, schema)
        array = pa.array(batch, pa.string())
        writer.write_batch(pa.record_batch([array], schema=schema))
        parts[-1] = (parts[-1][0], parts[-1][1] + len(batch))
        written += len(batch)
        part_bytes += array.nbytes
        batch = []
        if part_bytes >= PART_BYTES:
            close()

    def close() -> None:
        nonlocal writer, sink, part_bytes
        if writer is not None:
            writer.close()
            sink.close()
        writer = sink = None
        part_bytes = 0

    try:
        for number, value in _rows(source):
            seen += 1
            reason = _problem(value, source.text_field, pad)
            if reason is not None:
                counts[reason] = counts.get(reason, 0) + 1
                numbers = skipped.setdefault(reason, [])
                if len(numbers) < data.MAX_LISTED:
                    numbers.append(number)
                continue
            batch.append(value.strip())
            batch_chars += len(batch[-1])
            if len(batch) >= BATCH_ROWS or batch_chars >= BATCH_CHARS:
                flush()
                batch_chars = 0
        if batch:
            flush()
    finally:
        close()
    if not seen:
        raise (
            data.empty_error(source.spec, source.what)
            if source.kind == "text"
            else PeftgenError(f"The {source.what} {source.spec} holds no rows. It needs one example per row.")
        )
    warnings = [_skip_warning(source, reason, numbers, counts[reason]) for reason, numbers in skipped.items()]
    if not written:
        first = next(iter(skipped))
        raise PeftgenError(
            f"The {source.what} {source.spec} has no usable {source.unit}: all {seen} were skipped "
            f"(first: {source.unit} {skipped[first][0]}: {first}). Check --text-field and the file."
        )
    return parts, warnings


def _problem(value: Any, name: str, pad: str | None) -> str | None:
    if isinstance(value, _Bad):
        return str(value)
    if value is None:
        return f"{name!r} is null"
    if not isinstance(value, str):
        return f"{name!r} is not a string but {type(value).__name__}"
    if not value.strip():
        return "empty text"
    if pad and pad in value:
        return f"holds the pad marker {pad} (it would be learnt as text)"
    return None


def _skip_warning(source: Source, reason: str, numbers: list[int], count: int) -> str:
    listed = data.line_list(numbers) + (f" and {count - len(numbers)} more" if count > len(numbers) else "")
    return f"skipped {count} {source.unit}(s) of the {source.what} {source.spec}: {reason}: {source.unit}(s) {listed}."


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _warn(text: str) -> None:
    print(f"Warning: {text}", file=sys.stderr, flush=True)


def _clear_leftovers(root: Path) -> None:
    """Remove what builds that were killed left behind."""
    for path in root.iterdir():
        match = _LEFTOVER.match(path.name)
        if match and int(match.group(2)) != os.getpid() and not runs._alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
