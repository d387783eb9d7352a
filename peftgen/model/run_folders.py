"""Recognising and reading a peftgen run folder: its peftgen.yaml, and JSON files that must hold an object."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from peftgen.errors import PeftgenError

RUN_CONFIG = "peftgen.yaml"  # marks a folder as a peftgen run


def is_run(path: str | Path) -> bool:
    return (Path(path) / RUN_CONFIG).is_file()


def read_run_config(path: str | Path) -> dict:
    """A run's settings from its peftgen.yaml; a damaged file gets one line naming it."""
    file = Path(path) / RUN_CONFIG
    try:
        settings = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as error:
        from peftgen.config import yaml_problem

        reason = yaml_problem(error) if isinstance(error, yaml.YAMLError) else " ".join(str(error).split())[:160]
        raise PeftgenError(f"{file} is damaged ({reason}). Restore it from a copy, or train the run again.") from None
    missing = [key for key in ("model", "mode") if not isinstance(settings, dict) or not isinstance(settings.get(key), str)]
    if missing:
        raise PeftgenError(
            f"{file} is incomplete: it has no {' or '.join(missing)}. "
            "Restore it from a copy, or train the run again."
        )
    if settings["mode"] not in ("full", "lora", "8bit"):
        raise PeftgenError(f"{file} names an unknown mode {settings['mode'][:40]!r}: the file is damaged.")
    return settings


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold an object (config.json, adapter_config.json), or one line naming it."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        reason = " ".join(str(error).split())[:160]
        raise PeftgenError(f"{file} is not valid JSON ({reason}): the file is damaged. Restore or re-save it.") from None
    if not isinstance(value, dict):
        raise PeftgenError(f"{file} must hold a JSON object, not a {type(value).__name__}: the file is damaged. Restore or re-save it.")
    return value


def run_folder(path: Path) -> Path | None:
    """The run a folder belongs to: itself, or its parent for a checkpoint-N folder."""
    if is_run(path):
        return path
    if path.name.startswith("checkpoint-") and is_run(path.parent):
        return path.parent
    return None
