"""``peftgen merge``: a LoRA or 8-bit run as a plain Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def merge(
    run: Annotated[Path, typer.Argument(help="A lora or 8bit run folder from 'peftgen train'.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged Hugging Face model.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --output if it exists.")] = False,
) -> None:
    """Merge a run's adapter into its base model and save a plain Hugging Face folder."""
    from peftgen import merging

    folder = merging.merge(run, output, overwrite=overwrite)
    typer.echo(f"Merged model written to {folder} (loads with AutoModelForCausalLM, no peft needed).")
