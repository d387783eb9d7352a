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
import math
import re
import reprlib
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

# Bounds that catch a typo before a library fails on it mid-run: no device
# holds a per-device batch above MAX_BATCH (use grad_accum for larger
# effective batches), counts must fit the C ints of torch and the
# tokenizers, and transformers' set_seed also seeds numpy, whose seeds are
# 0 .. 2**32 - 1.
MAX_BATCH = 65536
MAX_COUNT = 2**31 - 1
MAX_EPOCHS = 1e6
SEED_LIMIT = 2**32
# pip names of report_to integrations whose package is not named like the integration.
_REPORT_TO_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "flyte": "flytekit"}

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to ``limit`` characters: an error echoes a value, never a 39 MB alias bomb."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class TrainConfig:
    model: str = "gpt2"  # Hub id, local folder, .gguf file
    mode: str = "lora"  # full | lora | 8bit
    train_file: Optional[str] = None  # one example per non-blank line
    valid_file: Optional[str] = None  # evaluated every eval_steps and at the end
    text_field: str = "text"  # column holding the text in .jsonl/.csv/.tsv/.parquet files, saved and Hub datasets
    split: Optional[str] = None  # split of a Hub dataset or saved DatasetDict for train_file; None: train
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
    lora_dropout: float = 0.0  # PEFT's default; > 0 keeps a dropped-out copy of every adapted layer's input
    target_modules: Optional[list[str]] = None  # None: chosen per architecture
    bos_token: str = "<BOS>"
    eos_token: str = "<EOS>"
    pad_token: str = "<PAD>"
    gradient_checkpointing: Optional[bool] = None  # None: on for lora/8bit (memory is their point), off for full
    # Speed and memory techniques (benchmarks/README.md measures each one):
    packing: bool = True  # padding-free batches: examples end to end in one row, attention kept within each
    attention_per_example: bool = True  # packed batches: causal attention per example, not one masked (N, N) matrix
    fused_loss: Optional[bool] = None  # output layer + cross-entropy in chunks, no full logits; None: on for lora/8bit
    optim: str = "adamw_torch_fused"  # any optimizer name transformers' TrainingArguments takes
    attention_dropout: Optional[float] = 0.0  # None: the model's own (GPT-2: 0.1, which forces unfused attention)
    frozen_bf16: bool = True  # lora/8bit under bf16: frozen weights stored in bf16 (what autocast would cast them to)
    fused_activations: bool = True  # GPT-2's gelu_new as one kernel (gelu_pytorch_tanh): less memory, same function
    fast_token_rows: bool = True  # lora/8bit: new-token rows applied directly, not via a copy of the whole matrix
    report_to: list[str] = field(default_factory=list)  # e.g. [tensorboard], [wandb]
    resume: bool = False
    overwrite: bool = False
    sample_every: int = 0  # evaluations between sample rounds; 0: no samples
    sample_decoder: str = "topk"  # any installed decoder, plugins included ('peftgen decoders')
    sample_options: dict = field(default_factory=dict)  # the decoder's -o options, e.g. {k: 50, p: 0.9}
    sample_count: int = 2  # samples per round
    sample_max_new_tokens: int = 64  # most tokens per sample
    sample_prompt: Optional[str] = None  # None: the <BOS> token

    @property
    def fuses_loss(self) -> bool:
        """Whether the loss is computed with the output layer, in chunks (peftgen.fused_loss).

        By default only where the head's weight is frozen (lora, 8bit): there it
        saves the (tokens x vocabulary) logits and never forms the head's weight
        gradient. In full mode that gradient is needed anyway, and measured no
        faster than transformers' loss, so full keeps transformers' loss.
        """
        return self.fused_loss if self.fused_loss is not None else self.mode != "full"

    @property
    def checkpointing(self) -> bool:
        """Whether activations are recomputed in the backward pass instead of kept."""
        return self.gradient_checkpointing if self.gradient_checkpointing is not None else self.mode != "full"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def validate(self) -> "TrainConfig":
        """Refuse, before any model is loaded, every value a library would reject later or that makes a useless run."""
        _check_finite_and_clean(self)
        if self.mode not in MODES:
            raise PeftgenError(f"Unknown mode {short(self.mode)}. Choose one of: {', '.join(MODES)}.")
        if self.precision not in PRECISIONS:
            raise PeftgenError(
                f"Unknown precision {short(self.precision)}. Choose one of: {', '.join(PRECISIONS)}."
            )
        if not self.train_file:
            raise PeftgenError("No training data: pass --train-file FILE (or train_file: in the YAML).")
        if not self.text_field.strip():
            raise PeftgenError("text_field is empty: name the column holding the text (default: text).")
        if self.split is not None and not self.split.strip():
            raise PeftgenError("split is empty: name a split of the dataset (e.g. train), or leave it out.")
        if not self.output_dir.strip():
            raise PeftgenError("output_dir is empty: pass --output-dir FOLDER (or output_dir: in the YAML).")
        if not self.model.strip():
            raise PeftgenError("model is empty: pass --model with a Hub id, a model folder or a .gguf file.")
        counts = ("batch_size", "grad_accum", "max_length", "eval_steps", "save_steps", "logging_steps", "lora_r", "lora_alpha")
        for name in counts:
            if getattr(self, name) < 1:
                raise PeftgenError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in (*counts, "max_steps", "warmup_steps"):
            if getattr(self, name) > MAX_COUNT:
                raise PeftgenError(f"{name} must be at most {MAX_COUNT}, got {getattr(self, name)}.")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) > MAX_BATCH:
                raise PeftgenError(
                    f"{name} {getattr(self, name)} is larger than any device holds (at most {MAX_BATCH}). "
                    "Use a smaller batch_size; grad_accum multiplies it into a larger effective batch."
                )
        if self.max_length < 3:
            raise PeftgenError(f"max_length must leave room for <BOS>, text and <EOS>; got {self.max_length}.")
        if self.warmup_steps < 0:
            raise PeftgenError(f"warmup_steps must be 0 or more, got {self.warmup_steps}.")
        if self.max_steps < -1:
            raise PeftgenError(f"max_steps must be -1 (train for epochs) or a number of updates, got {self.max_steps}.")
        if self.epochs < 0 or self.epochs > MAX_EPOCHS or (self.epochs == 0 and self.max_steps <= 0):
            raise PeftgenError(f"epochs must be above 0 and at most {MAX_EPOCHS:g}, got {self.epochs:g}. Try 3 to 5.")
        if self.lr is not None and self.lr <= 0:
            raise PeftgenError(f"lr must be above 0, got {self.lr:g}. Typical: 5e-5 for full, 2e-4 for lora and 8bit.")
        if self.weight_decay < 0:
            raise PeftgenError(f"weight_decay must be 0 or more, got {self.weight_decay:g}. Typical: 0 or 0.01.")
        if not 0 <= self.lora_dropout < 1:
            raise PeftgenError(f"lora_dropout is a probability in [0, 1), got {self.lora_dropout:g}. Typical: 0 to 0.1.")
        if not 0 <= self.seed < SEED_LIMIT:
            raise PeftgenError(f"seed must be between 0 and {SEED_LIMIT - 1}, got {self.seed}.")
        for name in ("bos_token", "eos_token", "pad_token"):
            token = getattr(self, name)
            if not token or token != token.strip() or "\n" in token or "\r" in token:
                raise PeftgenError(
                    f"{name} must be a non-empty marker without surrounding whitespace or line breaks, "
                    f"got {short(token)}. Default: {FIELDS[name].default}."
                )
        if len({self.bos_token, self.eos_token, self.pad_token}) != 3:
            raise PeftgenError("bos_token, eos_token and pad_token must be three different strings.")
        if self.target_modules is not None and not all(name.strip() for name in self.target_modules):
            raise PeftgenError(f"target_modules holds an empty name: {short(self.target_modules)}.")
        _check_report_to(self.report_to)
        _check_sampling(self)
        _check_speed(self)
        if self.resume and self.overwrite:
            raise PeftgenError("--resume continues the run in the output folder; --overwrite deletes it. Pick one.")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lr"] = self.learning_rate
        return data


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_finite_and_clean(config: TrainConfig) -> None:
    """Whatever the field: numbers finite and within 64 bits, text free of NUL bytes."""
    for name in FIELDS:
        value = getattr(config, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or item is None:
                continue
            if isinstance(item, float) and not math.isfinite(item):
                raise PeftgenError(f"{name} must be a finite number, got {item}.")
            if isinstance(item, int) and abs(item) >= 2**63:
                raise PeftgenError(f"{name} {short(item)} is far too large.")
            if isinstance(item, str) and "\0" in item:
                raise PeftgenError(f"{name} contains a NUL byte: {short(item)}.")


def _check_speed(config: TrainConfig) -> None:
    if config.attention_dropout is not None and not 0 <= config.attention_dropout < 1:
        raise PeftgenError(
            f"attention_dropout is a probability in [0, 1), got {config.attention_dropout:g}; "
            "or null to keep the model's own."
        )
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if config.optim not in names:
        close = difflib.get_close_matches(config.optim, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PeftgenError(
            f"Unknown optim {short(config.optim)}.{hint} Common: adamw_torch_fused (default), adamw_torch, "
            "adamw_8bit, sgd; transformers' OptimizerNames lists them all."
        )


def _check_sampling(config: TrainConfig) -> None:
    for name in ("sample_count", "sample_max_new_tokens"):
        if getattr(config, name) < 1:
            raise PeftgenError(f"{name} must be at least 1, got {getattr(config, name)}.")
    if config.sample_every < 0:
        raise PeftgenError(f"sample_every must be 0 (no samples) or a number of evaluations, got {config.sample_every}.")
    if config.sample_prompt == "":
        raise PeftgenError("sample_prompt is empty. Leave it out to start from <BOS>, or give some text.")
    if config.sample_every:
        if not config.valid_file:
            raise PeftgenError("sample_every counts evaluations, and there are none without --valid-file. Pass --valid-file FILE or drop --sample-every.")
        from peftgen import sampling  # loads torch and the decoder plugins, so only when sampling is on

        sampling.build_decoder(config)  # an unknown decoder or a bad option fails before any model loads


def _check_report_to(names: list[str]) -> None:
    """Each tracker must be one transformers integrates, and installed."""
    wanted = [name for name in names if name not in ("none", "all")]
    if not wanted:
        return
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    for name in wanted:
        if name not in INTEGRATION_TO_CALLBACK:
            raise PeftgenError(
                f"Unknown report_to {short(name)}. Choose from: {', '.join(sorted(INTEGRATION_TO_CALLBACK))} (or none)."
            )
    available = get_available_reporting_integrations()
    for name in wanted:
        if name not in available:
            raise PeftgenError(
                f"report_to {name} needs its package, which is not installed: pip install {_REPORT_TO_PACKAGES.get(name, name)}"
            )


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
    elif hint is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    elif isinstance(value, hint):
        return value
    raise PeftgenError(
        f"{where}: '{key}' must be {_type_name(hint)}, got {short(value)} ({type(value).__name__})."
    )


def apply(config: TrainConfig, values: dict[str, Any], where: str) -> TrainConfig:
    """A copy of config with values set, after checking each key and type."""
    updates = {}
    for key, value in values.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1) if isinstance(name, str) else []
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise PeftgenError(f"{where}: unknown key {short(key, 60)}.{hint} Valid keys: {', '.join(FIELDS)}.")
        updates[name] = _check_type(name, value, _HINTS[name], where)
    return dataclasses.replace(config, **updates)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PeftgenError(f"Config file not found: {path}. Check the path given to --config.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PeftgenError(f"Config file {path} is not UTF-8 text (byte {error.start}). Save it as UTF-8.") from None
    except OSError as error:
        raise PeftgenError(f"Cannot read config file {path}: {error.strerror or error}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PeftgenError(f"{path} is not valid YAML: {yaml_problem(error)}.") from None
    except RecursionError:
        raise PeftgenError(f"{path} is nested too deeply to be a config: keys map to plain values.") from None
    except (ValueError, OverflowError) as error:  # e.g. a date like 2020-13-01, a 5000-digit number
        raise PeftgenError(f"{path} holds a value YAML cannot read: {str(error)[:200]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PeftgenError(f"{path} must be a mapping of keys to values, got {type(data).__name__}.")
    return data


def yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and on which line, without the snippet PyYAML quotes."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    return (f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem)[:200]


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
