"""What a run folder holds besides weights, and reading it back.

    peftgen.yaml   the run's settings, every one: ``peftgen train -c RUN/peftgen.yaml``
                   accepts it as it is (and its presence marks a folder as a run)
    run.json       facts of the run: new token ids, the precision used, example
                   counts, parameter counts, library versions
    metrics.json, log_history.json, loss.png, checkpoint-N/ ...

Runs saved before run.json existed kept their facts (and ``resume`` /
``overwrite``) in peftgen.yaml; they load as before, and ``read_run_facts``
finds their facts there.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from peftgen.errors import PeftgenError

RUN_CONFIG = "peftgen.yaml"  # marks a folder as a peftgen run
RUN_FACTS = "run.json"
_SWITCHES = ("resume", "overwrite")  # kept in peftgen.yaml by older runs, never settings


def is_run(path: str | Path) -> bool:
    return (Path(path) / RUN_CONFIG).is_file()


def run_folder(path: Path) -> Path | None:
    """The run a folder belongs to: itself, or its parent for a checkpoint-N folder."""
    if is_run(path):
        return path
    if path.name.startswith("checkpoint-") and is_run(path.parent):
        return path.parent
    return None


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
        raise PeftgenError(f"{file} is incomplete: it has no {' or '.join(missing)}. Restore it from a copy, or train the run again.")
    if settings["mode"] not in ("full", "lora", "8bit"):
        raise PeftgenError(f"{file} names an unknown mode {settings['mode'][:40]!r}: the file is damaged.")
    return settings


def read_run_facts(path: str | Path) -> dict:
    """What a run recorded about itself (run.json; for an older run, the facts in its peftgen.yaml)."""
    folder = Path(path)
    if (folder / RUN_FACTS).is_file():
        return read_json_object(folder / RUN_FACTS)
    from peftgen.config import FIELDS

    return {key: value for key, value in read_run_config(folder).items() if key not in FIELDS and key not in _SWITCHES}


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
