"""``peftgen decoders``: every loaded decoder, its plugin and its options.

peftgen decoders --json
"""

from __future__ import annotations

import inspect
import json
from typing import Annotated

import typer

from peftgen.cli.plugins import PluginFlag, load_decoders


def decoders(
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list: name, plugin, source, kind, description, options.")] = False,
    plugin: PluginFlag = None,
) -> None:
    """List the decoders of every loaded plugin, with their options."""
    from peftgen.generation import SequenceDecoder, decoder_options

    listing = []
    for name, info in sorted(load_decoders(plugin).items()):
        options = [
            {"name": o.name, "type": o.type_label, "default": None if o.required else _jsonable(o.default), "required": o.required}
            for o in decoder_options(info.cls)
        ]
        kind = "sequence" if issubclass(info.cls, SequenceDecoder) else "token"
        listing.append(
            {
                "name": name,
                "plugin": info.plugin,
                "source": info.source,
                "kind": kind,
                "description": inspect.cleandoc(info.cls.__doc__ or ""),
                "options": options,
            }
        )
    if json_output:
        typer.echo(json.dumps(listing, indent=2, ensure_ascii=False))
        return
    for entry in listing:
        typer.echo(f"{entry['name']}  (plugin {entry['plugin']}, {entry['source']})")
        for line in entry["description"].splitlines():
            typer.echo(f"    {line}".rstrip())
        for o in entry["options"]:
            default = "required" if o["required"] else f"default {o['default']!r}"
            typer.echo(f"    -o {o['name']}=<{o['type']}>  {default}")
        typer.echo("")


def _jsonable(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
