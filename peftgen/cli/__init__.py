"""The ``peftgen`` command line: one thin module per command group.

    peftgen train --mode lora --train-file train.txt --valid-file valid.txt
    peftgen eval --model runs/lora --file test.txt
    peftgen generate --model runs/lora --decoder topk

Each command only turns flags into calls of the library; a ``PeftgenError``
raised anywhere below becomes ``Error: <message>`` on stderr and exit code 1.
"""
from __future__ import annotations

import typer
from typer.core import TyperGroup

from peftgen.errors import PeftgenError


class _FriendlyErrors(TyperGroup):
    """Turns a PeftgenError from any command into a one-line error, exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PeftgenError as error:
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_FriendlyErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Fine-tune causal language models (full, LoRA, 8-bit) and generate with plugin decoders.",
)

# Registration, one line per command. Each module holds plain functions whose
# Annotated parameters are the flags.
from peftgen.cli import training, generating, preparing, comparing  # noqa: E402

app.command("train")(training.train)
app.command("eval")(training.evaluate)
app.command("merge")(training.merge)
app.command("generate")(generating.generate)
app.command("decoders")(generating.decoders)
app.command("compare")(comparing.compare)
app.command("prepare")(preparing.prepare)


@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal for peftgen's own progress bars and results."""
    import warnings

    from transformers.utils import logging as hf_logging

    import peftgen.model  # noqa: F401  installs its log filters before bitsandbytes loads

    hf_logging.disable_progress_bar()  # per-file weight loading bars
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    app()
