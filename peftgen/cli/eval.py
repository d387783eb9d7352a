"""``peftgen eval``: token-weighted loss and perplexity of a model on a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

Opt = typer.Option


def evaluate(
    model: Annotated[str, Opt(help="Run folder, model folder, .gguf file or Hub id.")],
    file: Annotated[
        Path,
        Opt(
            help="Data to score: .txt (one example a line, e.g. test.txt), .jsonl, .json, .csv, .tsv, "
            ".parquet, a Dataset.save_to_disk folder or hub:owner/name."
        ),
    ],
    batch_size: Annotated[int, Opt(help="Examples per forward pass.")] = 4,
    max_length: Annotated[Optional[int], Opt(help="Tokens per example. Default: the run's --max-length, else the model's context.")] = None,
    precision: Annotated[str, Opt(help="fp32, bf16 or auto. fp32 gives the reference numbers.")] = "fp32",
    json_output: Annotated[bool, Opt("--json", help="Print {loss, perplexity, tokens} as JSON.")] = False,
    text_field: Annotated[str, Opt(help="Column holding the text in .jsonl, .csv, .tsv, .parquet and dataset sources.")] = "text",
    split: Annotated[Optional[str], Opt(help="Split of a hub:owner/name dataset or saved DatasetDict. Default: test, else validation.")] = None,
) -> None:
    """Token-weighted loss and perplexity of a model on a text file."""
    from peftgen import evaluation

    result = evaluation.evaluate(
        model,
        file,
        batch_size=batch_size,
        max_length=max_length,
        precision=precision,
        text_field=text_field,
        split=split,
        progress=not json_output,
    )
    if json_output:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  tokens {result.tokens:,}")
