"""Training configuration: dataclass defaults, then a YAML file, then typed flags.

    cfg = resolve(yaml_path="configs/lora.yaml", flags={"lr": 1e-4})

YAML keys are the field names below (``train_file``, ``lora_r``...), the same
words as the CLI flags with dashes turned into underscores. Unknown keys and
values of the wrong type fail with the key, the file and the expected type.
The resolved config is written next to a run's outputs (``peftgen.yaml``), so
the folder alone says how to reproduce the run.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from peftgen.errors import PeftgenError

MODES = ("full", "lora", "8bit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Learning rates when none is given: the article's 5e-5 for full fine-tuning;
# LoRA adapters and brand-new embedding rows start from zero or noise and need
# a larger step to move in a few epochs.
DEFAULT_LR = {"full": 5e-5, "lora": 2e-4, "8bit": 2e-4}


@dataclass
class TrainConfig:
    model: str = "gpt2"  # Hub id, local folder, .gguf file
    mode: str = "lora"  # full | lora | 8bit
    train_file: Optional[str] = None  # one example per non-blank line
    valid_file: Optional[str] = None  # evaluated every eval_steps and at the end
    output_dir: str = "runs/peftgen"
    epochs: float = 5.0
    batch_size: int = 2
    grad_accum: int = 1
    lr: Optional[float] = None  # None: DEFAULT_LR[mode]
    max_steps: int = -1  # > 0 overrides epochs
    max_length: int = 512  # tokens per example, markers included
    eval_steps: int = 500
    save_steps: int = 500
    logging_steps: int = 10
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 42
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # None: chosen per architecture
    bos_token: str = "<BOS>"
    eos_token: str = "<EOS>"
    pad_token: str = "<PAD>"
    gradient_checkpointing: bool = False
    report_to: list[str] = field(default_factory=list)  # e.g. [tensorboard], [wandb]
    resume: bool = False
    overwrite: bool = False

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def validate(self) -> "TrainConfig":
        if self.mode not in MODES:
            raise PeftgenError(f"Unknown mode {self.mode!r}. Choose one of: {', '.join(MODES)}.")
        if self.precision not in PRECISIONS:
            raise PeftgenError(
                f"Unknown precision {self.precision!r}. Choose one of: {', '.join(PRECISIONS)}."
            )
        if not self.train_file:
            raise PeftgenError("No training data: pass --train-file FILE (or train_file: in the YAML).")
        for name in ("batch_size", "grad_accum", "max_length", "eval_steps", "save_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise PeftgenError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_length < 3:
            raise PeftgenError(f"max_length must leave room for <BOS>, text and <EOS>; got {self.max_length}.")
        if len({self.bos_token, self.eos_token, self.pad_token}) != 3:
            raise PeftgenError("bos_token, eos_token and pad_token must be three different strings.")
        if self.resume and self.overwrite:
            raise PeftgenError("--resume continues the run in the output folder; --overwrite deletes it. Pick one.")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lr"] = self.learning_rate
        return data


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _type_name(args[0]) + " or null"
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(args[0])}"
    return hint.__name__


def _check_type(key: str, value: Any, hint, where: str) -> Any:
    """Return value if it fits the field's type (ints are accepted as floats), else raise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _check_type(key, value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        if isinstance(value, str):  # "c_attn,c_proj" is a fine way to write a list on a flag
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [_check_type(key, v, args[0], where) for v in value]
    elif isinstance(value, bool):  # a bool is an int to Python, never to a user
        if hint is bool:
            return value
    elif hint is float and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(value, hint):
        return value
    raise PeftgenError(
        f"{where}: '{key}' must be {_type_name(hint)}, got {value!r} ({type(value).__name__})."
    )


def apply(config: TrainConfig, values: dict[str, Any], where: str) -> TrainConfig:
    """A copy of config with values set, after checking each key and type."""
    updates = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise PeftgenError(f"{where}: unknown key '{key}'.{hint} Valid keys: {', '.join(FIELDS)}.")
        updates[name] = _check_type(name, value, _HINTS[name], where)
    return dataclasses.replace(config, **updates)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PeftgenError(f"Config file not found: {path}. Check the path given to --config.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise PeftgenError(f"{path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PeftgenError(f"{path} must be a mapping of keys to values, got {type(data).__name__}.")
    return data


def resolve(yaml_path: str | Path | None = None, flags: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then the flags that were given (None means not given)."""
    config = TrainConfig()
    if yaml_path is not None:
        config = apply(config, read_yaml(yaml_path), str(yaml_path))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    return apply(config, given, "command line").validate()


def save(config: TrainConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config (plus run facts such as the new token ids) as YAML."""
    data = config.to_dict()
    data.update(extra or {})
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
