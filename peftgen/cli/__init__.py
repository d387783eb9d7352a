"""The ``peftgen`` command line: one module per command, each a thin call into the library.

    peftgen train --mode lora --train-file train.txt --valid-file valid.txt
    peftgen eval --model runs/lora --file test.txt
    peftgen generate --model runs/lora --decoder topk

Each command turns its flags into one library call and prints the result.
Bad input, wherever it is found (a flag's value, a file, the library's
checks), becomes one line ``Error: <message>`` on stderr and exit code 1.
"""

from __future__ import annotations

import contextlib

import typer
from typer.core import TyperGroup

from peftgen.errors import PeftgenError

# Click's UsageError (a missing, unknown or unparsable flag), whichever click typer uses (some versions vendor it).
_UsageError = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")


@contextlib.contextmanager
def one_error_line():
    """A PeftgenError, or a flag that does not parse, becomes ``Error: ...`` on stderr and exit code 1."""
    try:
        yield
    except PeftgenError as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(1) from None
    except _UsageError as error:
        message = " ".join(error.format_message().split())
        where = error.ctx.command_path if error.ctx is not None else "peftgen"
        ending = "" if message.endswith((".", "?", "!")) else "."
        typer.echo(f"Error: {message}{ending} See '{where} --help'.", err=True)
        raise typer.Exit(1) from None


class _OneErrorLine(TyperGroup):
    """Every command of the group, and the group's own flags, under one_error_line()."""

    def make_context(self, *args, **kwargs):
        with one_error_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with one_error_line():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_OneErrorLine,
    name="peftgen",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Fine-tune causal language models (full, LoRA, 8-bit) and generate with plugin decoders.",
)

# Registration, one line per command; each module is named after its command.
from peftgen.cli import compare, decoders, demo, eval, fetch, generate, merge, prepare, train  # noqa: E402

app.command("train")(train.train)
app.command("eval")(eval.evaluate)
app.command("merge")(merge.merge)
app.command("generate")(generate.generate)
app.command("decoders")(decoders.decoders)
app.command("compare")(compare.compare)
app.command("prepare")(prepare.prepare)
app.command("demo")(demo.demo)
app.command("fetch")(fetch.fetch)


@app.callback()
def _quiet_libraries(ctx: typer.Context) -> None:
    """Keep the terminal for peftgen's own progress bars and results."""
    if ctx.invoked_subcommand == "demo":
        demo.spare_idle_threads()  # before torch starts its threads
    from peftgen.logs import quiet_libraries

    quiet_libraries()


_program = False


def is_program() -> bool:
    """Whether this is the peftgen program itself (main), which may restart its process, not the app called in-process."""
    return _program


def main(args: list[str] | None = None) -> None:
    global _program
    _program = True
    app(args=args, prog_name="peftgen")
