"""``peftgen train``: its flags are TrainConfig's fields, built from them here.

    peftgen train -c configs/lora.yaml --lr 1e-4 --max-steps 100
    peftgen train -c runs/lora/peftgen.yaml --output-dir runs/lora-again   # a run, again

Every setting is a flag (``lora_r`` is ``--lora-r``, ``packing: false`` is
``--packing false``), with the help and default of its field. A flag left out
is None, "not given": the YAML file's value, else the default, stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.markup import escape

from peftgen import allocator
from peftgen import config as config_lib
from peftgen.generation.options import convert

# What the command line takes for each kind of field: booleans as a word
# (--packing false, as in the YAML), lists as one comma-separated word
# (config_lib splits them), mappings as repeated key=value.
_FLAG_TYPES = {str: str, int: int, float: float, bool: str, list: str, dict: list[str]}


def _boolean(text: str) -> bool:
    """true/false, yes/no, on/off or 1/0, read by the converter of decoder options."""
    try:
        return convert(text, bool)
    except ValueError as error:
        raise typer.BadParameter(f"{error}, got {text!r}") from None


def _flag(field: dataclasses.Field) -> inspect.Parameter:
    """The option of one setting: Optional[its type], default None (not given)."""
    hint = config_lib.HINTS[field.name]
    plain = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # Optional[X] -> X
    kind = typing.get_origin(plain) or plain
    default = config_lib.shown_default(field.name)
    text = f"{field.metadata.get('help', '')} " + ("[required]" if default == "required" else f"[default: {default}]")
    option = typer.Option(
        field.metadata.get("flag") or "--" + field.name.replace("_", "-"),
        help=escape(text),
        show_default=False,
        rich_help_panel=field.metadata.get("group"),
        **({"parser": _boolean, "metavar": "true|false"} if kind is bool else {}),
    )
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[_FLAG_TYPES[kind]], option])


def train(config: Optional[Path] = None, resume: bool = False, overwrite: bool = False, **flags) -> None:
    """Fine-tune a causal LM on line-by-line text, adding <BOS>/<EOS>/<PAD> as trainable tokens."""
    if flags.get("sample_options") is not None:
        from peftgen.generation import parse_pairs

        flags["sample_options"] = parse_pairs(flags["sample_options"])
    settings = config_lib.resolve(config, flags)
    from peftgen.cli import is_program

    if settings.leans_malloc and is_program():
        allocator.restart()  # before torch starts; the new process resolves the same settings and goes on

    from peftgen import training
    from peftgen.runs import main_process

    if main_process():  # under torchrun every process runs this command; one of them reports
        typer.echo("peftgen train, resolved config:")
        typer.echo(yaml.safe_dump(settings.to_dict(), sort_keys=False).rstrip())
    with contextlib.redirect_stdout(sys.stderr):  # Trainer's log lines and the samples are progress
        result = training.train(settings, resume=resume, overwrite=overwrite)
    if not result.main_process:
        return
    typer.echo("")
    typer.echo(f"Run folder:        {result.output_dir}")
    typer.echo(f"Trainable params:  {result.trainable_params:,} of {result.total_params:,}")
    typer.echo(f"Precision:         {result.precision}")
    if "eval_loss" in result.metrics:
        typer.echo(f"Validation loss:   {result.metrics['eval_loss']:.4f} (perplexity {result.metrics['eval_perplexity']:.2f})")
    if result.loss_plot:
        typer.echo(f"Loss curves:       {result.loss_plot}")


train.__signature__ = inspect.Signature(
    [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Optional[Path],
                typer.Option(
                    "--config", "-c", help=escape("YAML file of settings (e.g. configs/lora.yaml, or a run's peftgen.yaml); flags you type override it.")
                ),
            ],
        ),
        *(_flag(field) for field in dataclasses.fields(config_lib.TrainConfig)),
        inspect.Parameter(
            "resume",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --output-dir.")],
        ),
        inspect.Parameter(
            "overwrite",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --output-dir.")],
        ),
    ]
)
