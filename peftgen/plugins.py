"""Plugin loading: built-in decoders, installed distributions and local files, one path for all.

    PEFTGEN_PLUGINS=./my_decoder.py peftgen decoders        # or --plugin ./my_decoder.py
    PEFTGEN_DISABLE_PLUGINS=minp peftgen decoders           # block a plugin by name

Built-ins are modules registered by the same call that loads the entry-point
group ``peftgen`` of installed distributions. A plugin that fails to import
is skipped with a warning naming it; the others still work.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pluggy

from peftgen import hookspecs
from peftgen.errors import PeftgenError

DEFAULT_PLUGINS = (
    "peftgen.decoders.greedy",
    "peftgen.decoders.topk",
    "peftgen.decoders.topp",
    "peftgen.decoders.beam",
)
ENTRY_POINT_GROUP = "peftgen"


class PluginWarning(UserWarning):
    """A plugin could not be loaded (or its hook failed) and was skipped."""


@dataclass(frozen=True)
class DecoderInfo:
    name: str
    cls: type
    plugin: str  # the plugin's name: module, entry point name, or --plugin value
    source: str  # where it came from: "built-in", "<distribution> <version>", "local" (--plugin, PEFTGEN_PLUGINS)


def _new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("peftgen")
    manager.add_hookspecs(hookspecs)
    return manager


pm = _new_manager()
_loaded = False
_sources: dict[str, str] = {}  # plugin name -> where it came from


def load_plugins(extra: list[str] | tuple[str, ...] = ()) -> None:
    """Register built-ins, installed plugins and PEFTGEN_PLUGINS once; ``extra`` (--plugin) each call.

    Blocks the names in PEFTGEN_DISABLE_PLUGINS first (comma separated).
    """
    global _loaded
    for name in _split(os.environ.get("PEFTGEN_DISABLE_PLUGINS", "")):
        pm.set_blocked(name)
    if not _loaded:
        _loaded = True
        for module in DEFAULT_PLUGINS:
            _register(module, lambda module=module: importlib.import_module(module), "built-in")
        _load_entry_points()
        extra = (*_split(os.environ.get("PEFTGEN_PLUGINS", "")), *extra)
    for spec in extra:
        _register(spec, lambda spec=spec: _import_local(spec), "local")
    check_pending()


def check_pending() -> None:
    """A hook implementation with no matching hookspec (a typo) is an error naming the plugin."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        known = ", ".join(name for name, caller in vars(pm.hook).items() if caller.has_spec())
        raise PeftgenError(f"Plugin '{pm.get_name(error.plugin)}' has a hook peftgen does not define: {error}. peftgen's hooks: {known}.") from None


def get_decoders() -> dict[str, DecoderInfo]:
    """Every registered decoder by name. Two decoders with one name are an error naming both plugins."""
    load_plugins()
    from peftgen.generation.decoder import SequenceDecoder, TokenDecoder

    decoders: dict[str, DecoderInfo] = {}
    # One implementation at a time (in registration order, built-ins first) rather than
    # pm.hook.register_decoders(...), so every decoder is attributed to its plugin.
    for impl in pm.hook.register_decoders.get_hookimpls():
        plugin = impl.plugin_name

        def register(cls, plugin=plugin):
            if not (isinstance(cls, type) and issubclass(cls, (TokenDecoder, SequenceDecoder))):
                raise PeftgenError(f"Plugin '{plugin}' registered {cls!r}, which is not a TokenDecoder or SequenceDecoder subclass.")
            name = getattr(cls, "name", "")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise PeftgenError(f"Plugin '{plugin}' registered {cls.__name__} with name {name!r}; set name to a word such as 'minp'.")
            if name in decoders:
                first = decoders[name].plugin
                raise PeftgenError(
                    f"Decoder name '{name}' is registered twice: by plugin '{first}' and by plugin '{plugin}'. "
                    f"Uninstall one, or block one with PEFTGEN_DISABLE_PLUGINS={plugin}."
                )
            decoders[name] = DecoderInfo(name, cls, plugin, _sources.get(plugin, "registered in code"))

        try:
            impl.function(register=register)
        except PeftgenError:
            raise
        except (Exception, SystemExit) as error:  # a plugin's sys.exit() must not end peftgen silently
            warnings.warn(f"Plugin '{plugin}' failed in register_decoders and is skipped: {type(error).__name__}: {error}", PluginWarning, stacklevel=2)
    return decoders


def get_decoder(name: str, decoders: dict[str, DecoderInfo] | None = None) -> DecoderInfo:
    """The decoder called ``name`` (from ``decoders``, default all registered), or an error listing them."""
    decoders = get_decoders() if decoders is None else decoders
    if name not in decoders:
        raise PeftgenError(f"Unknown decoder '{name}'. Available: {', '.join(sorted(decoders))} (installed plugins add more; see 'peftgen decoders').")
    return decoders[name]


def _register(name: str, load, source: str) -> None:
    if pm.has_plugin(name) or pm.is_blocked(name):
        return
    try:
        module = load()
    except PeftgenError:
        raise
    except (Exception, SystemExit) as error:  # a plugin's sys.exit() must not end peftgen silently
        warnings.warn(f"Plugin '{name}' failed to load and is skipped: {type(error).__name__}: {error}", PluginWarning, stacklevel=3)
        return
    pm.register(module, name=name)
    _sources[name] = source


def _load_entry_points() -> None:
    for dist in importlib.metadata.distributions():
        for entry_point in dist.entry_points:
            if entry_point.group == ENTRY_POINT_GROUP:
                source = f"{dist.metadata['Name']} {dist.version}"
                _register(entry_point.name, entry_point.load, source)


def _import_local(spec: str):
    """A module name (importable) or the path of a .py file."""
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise PeftgenError(f"Plugin file not found: {spec}. Pass an existing .py file or an importable module name.")
        module_name = f"peftgen_local_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
        file_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[module_name] = module
        try:
            file_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return module
    try:
        found = importlib.util.find_spec(spec)
    except ModuleNotFoundError:
        found = None
    if found is None:
        raise PeftgenError(f"Plugin module '{spec}' is not importable. Pass an installed module name or a .py file path.")
    return importlib.import_module(spec)


def _split(value: str) -> list[str]:
    """Comma-separated names; a colon separates too, except in a Windows drive letter."""
    parts = re.split(r",|:(?![\\/])", value)
    return [part.strip() for part in parts if part.strip()]
