"""``peftgen demo``: the whole job on SmolLM2-135M-Instruct from PyPI, offline, in minutes on a CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer


def spare_idle_threads() -> None:
    """Let OpenMP threads that find no free core sleep instead of spinning; before torch is imported.

    On a 2-core machine with one other busy process, a training step took
    12-20 s spinning and 6.5-8 s sleeping (3.3 s vs 3.9 s on an idle machine).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def demo(
    output_dir: Annotated[Path, typer.Option(help="Folder for the prepared data, the LoRA run and results.md.")] = Path("runs/demo"),
    model: Annotated[
        Optional[str], typer.Option(help="Model to fine-tune instead of SmolLM2 from PyPI: a folder, a .gguf file, or a Hub id such as gpt2 (needs the Hub).")
    ] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop training after this many updates (a quick look).")] = None,
) -> None:
    """Fine-tune a real pretrained model on book summaries and compare perplexity before and after."""
    spare_idle_threads()
    from peftgen import demo as demo_lib

    demo_lib.run(model, output_dir, overrides={"max_steps": max_steps} if max_steps is not None else None)
