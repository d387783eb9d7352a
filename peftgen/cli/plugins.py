"""What the commands that use decoders share: the --plugin flag, and loading the plugins it names."""

from __future__ import annotations

import warnings
from typing import Annotated, Optional

import typer

PluginFlag = Annotated[
    Optional[list[str]],
    typer.Option("--plugin", help="A plugin module name or .py file to load as well; repeatable. Also: PEFTGEN_PLUGINS."),
]


def load_decoders(extra: list[str] | None) -> dict:
    """Load plugins (built-ins, installed, PEFTGEN_PLUGINS, --plugin); plugin warnings go to stderr."""
    from peftgen import plugins

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", plugins.PluginWarning)
        plugins.load_plugins(extra or [])
        found = plugins.get_decoders()
    for warning in caught:
        if issubclass(warning.category, plugins.PluginWarning):
            typer.echo(f"Warning: {warning.message}", err=True)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return found
