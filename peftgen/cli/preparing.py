"""``peftgen prepare``: raw text in, ``train.txt``/``valid.txt``/``test.txt`` out."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from peftgen import prepare as preparing


def prepare(
    input_file: Annotated[Path, typer.Argument(
        help="booksummaries.txt (CMU Book Summary Dataset), a text file with one example a line, or JSONL.",
        show_default=False)],
    output_dir: Annotated[Path, typer.Option(help="Folder for train.txt, valid.txt and test.txt.")] = Path("data/prepared"),
    format: Annotated[str, typer.Option(help="Input format: auto, cmu, text or jsonl.")] = "auto",
    text_field: Annotated[str, typer.Option(help="JSONL key holding the text.")] = "text",
    split: Annotated[str, typer.Option(help="Fractions for train,valid,test.")] = "0.7,0.2,0.1",
    seed: Annotated[int, typer.Option(help="Shuffle seed; the same input and seed give identical files.")] = 0,
    tokenizer: Annotated[Optional[str], typer.Option(
        help="Model folder, .gguf file or Hub id whose tokenizer measures token lengths. "
             "Without it lengths are reported in characters and words.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        help="Longest example in tokens, <BOS> and <EOS> included (match train's --max-length). Needs --tokenizer.")] = None,
    long: Annotated[str, typer.Option(
        help="What to do with a longer example: chunk (cut at sentence ends into several), "
             "first (keep its opening sentences) or skip.")] = "chunk",
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
) -> None:
    """Split a dataset into <BOS> text <EOS> lines for training, validation and test."""
    result = preparing.prepare(
        input_file, output_dir, format=format, text_field=text_field, split=split, seed=seed,
        overwrite=overwrite, tokenizer=tokenizer, max_tokens=max_tokens, long=long,
    )
    typer.echo(preparing.report(result))
