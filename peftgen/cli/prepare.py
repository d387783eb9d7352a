"""``peftgen prepare``: raw text in, ``train``/``valid``/``test`` splits out (.txt, .jsonl or .parquet)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def prepare(
    input_file: Annotated[
        Path, typer.Argument(help="booksummaries.txt (CMU Book Summary Dataset), a text file with one example a line, or JSONL.", show_default=False)
    ],
    output_dir: Annotated[Path, typer.Option(help="Folder for the train, valid and test splits.")] = Path("data/prepared"),
    format: Annotated[str, typer.Option(help="Input format: auto, cmu, text or jsonl.")] = "auto",
    text_field: Annotated[str, typer.Option(help="JSONL key holding the text.")] = "text",
    split: Annotated[str, typer.Option(help="Fractions for train,valid,test.")] = "0.7,0.2,0.1",
    seed: Annotated[int, typer.Option(help="Shuffle seed; the same input and seed give identical files.")] = 0,
    tokenizer: Annotated[
        Optional[str],
        typer.Option(
            help="Model folder, .gguf file or Hub id whose tokenizer measures token lengths. Without it lengths are reported in characters and words."
        ),
    ] = None,
    max_tokens: Annotated[
        Optional[int], typer.Option(help="Longest example in tokens, <BOS> and <EOS> included (match train's --max-length). Needs --tokenizer.")
    ] = None,
    long: Annotated[
        str, typer.Option(help="What to do with a longer example: chunk (cut at sentence ends into several), first (keep its opening sentences) or skip.")
    ] = "chunk",
    output_format: Annotated[str, typer.Option(help='Format of the splits: txt (<BOS> text <EOS> lines), jsonl ({"text": ...} lines) or parquet.')] = "txt",
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
) -> None:
    """Split a dataset into <BOS> text <EOS> lines for training, validation and test."""
    from peftgen import preparation

    result = preparation.prepare(
        input_file,
        output_dir,
        format=format,
        text_field=text_field,
        split=split,
        seed=seed,
        overwrite=overwrite,
        tokenizer=tokenizer,
        max_tokens=max_tokens,
        long=long,
        output_format=output_format,
    )
    typer.echo(preparation.report(result))
