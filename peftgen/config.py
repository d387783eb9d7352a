"""Training settings: each defined once, on ``TrainConfig``, with its default, type and help.

    cfg = resolve("configs/lora.yaml", flags={"lr": 1e-4})

Values flow one way: the dataclass defaults, then a YAML file, then the flags
the user typed (None means not typed). YAML keys are the field names below
(``train_file``, ``lora_r``...), the CLI flags the same words with dashes
(``--train-file``); the ``train`` command's flags and docs/settings.md are
built from these fields. Unknown keys and values of the wrong type fail with
the key, the file and the expected type. A run folder keeps its settings in
``peftgen.yaml``, which ``peftgen train -c`` accepts as it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from peftgen import markers
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
MAX_TOKEN_MULTIPLE = 65536  # more padding than any batch needs; larger values only waste work
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


GROUPS = ("Settings", "Speed and memory", "Samples during training")  # as help and docs list the settings


def setting(default: Any = None, help: str = "", *, factory=None, shown: str | None = None, flag: str | None = None, group: str = GROUPS[0]):
    """A TrainConfig field with its one-line help.

    shown: the default as help and docs show it, where the value alone does not
    say it (None meaning "chosen per mode"); flag: the option's name where it is
    not the key's (``--sample-option``, given once per key=value).
    """
    metadata = {"help": help, "shown": shown, "flag": flag, "group": group}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


speed_setting = functools.partial(setting, group=GROUPS[1])
sample_setting = functools.partial(setting, group=GROUPS[2])


@dataclass
class TrainConfig:
    model: str = setting("gpt2", "Hub id, local model folder or .gguf file.")
    mode: str = setting("lora", "full, lora or 8bit (LLM.int8 + LoRA).")
    train_file: Optional[str] = setting(
        None,
        "Training data: .txt (one example a line), .jsonl, .json, .csv, .tsv, .parquet, a Dataset.save_to_disk folder or hub:owner/name.",
        shown="required",
    )
    valid_file: Optional[str] = setting(None, "Validation data, evaluated every eval_steps updates and at the end.", shown="none")
    text_field: str = setting("text", "Column holding the text in .jsonl, .csv, .tsv, .parquet and dataset sources.")
    split: Optional[str] = setting(None, "Split of a hub:owner/name dataset or saved DatasetDict to train on.", shown="train")
    output_dir: str = setting("runs/peftgen", "Run folder: checkpoints, model or adapter, settings, curves.")
    epochs: float = setting(5.0, "Passes over the training data.")
    batch_size: int = setting(2, "Examples per device per step.")
    grad_accum: int = setting(1, "Steps to accumulate before each optimizer update.")
    lr: Optional[float] = setting(None, "Peak learning rate.", shown="5e-5 full, 2e-4 lora/8bit")
    max_steps: int = setting(-1, "Stop after this many updates; overrides epochs when > 0.")
    max_length: int = setting(512, "Tokens per example, markers included; longer examples are cut.")
    eval_steps: int = setting(500, "Evaluate on valid_file every N updates.")
    save_steps: int = setting(500, "Write a checkpoint every N updates.")
    logging_steps: int = setting(10, "Log the training loss every N updates.")
    warmup_steps: int = setting(0, "Updates over which the learning rate rises from 0 to lr.")
    weight_decay: float = setting(0.0, "Weight decay of the optimizer.")
    seed: int = setting(42, "Seed for initialisation, shuffling and dropout.")
    precision: str = setting("auto", "auto, fp32, bf16 or fp16; auto picks bf16 where it is fast.")
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = setting(0.0, "Dropout on the LoRA path; > 0 keeps a copy of every adapted layer's input.")
    target_modules: Optional[list[str]] = setting(None, "Module names LoRA adapts (comma-separated on the command line).", shown="per architecture")
    bos_token: str = setting(markers.BOS, "Marker added before every example.")
    eos_token: str = setting(markers.EOS, "Marker added after every example; generation stops at it.")
    pad_token: str = setting(markers.PAD, "Padding marker.")
    report_to: list[str] = setting(help="Trackers for Trainer, e.g. tensorboard,wandb (comma-separated on the command line).", factory=list, shown="none")
    # Speed and memory techniques (benchmarks/README.md measures each one):
    gradient_checkpointing: Optional[bool] = speed_setting(
        None, "Recompute activations in the backward pass instead of keeping them.", shown="on for 8bit, off for full/lora"
    )
    checkpoint_layers: Optional[float] = speed_setting(
        None,
        "Share of the layers gradient checkpointing recomputes, from the first; the rest keep their activations.",
        shown="0.25 for lora, 1 otherwise",
    )
    packing: bool = speed_setting(True, "Padding-free batches: examples end to end in one row, attention kept within each.")
    token_multiple: Optional[int] = speed_setting(
        None,
        "Each batch padded (an ignored example of padding) to a multiple of this many tokens per row (less for short batches), and the loss's label rows too, "
        "so that CPU matrix kernels built for one batch serve the next; 0: off.",
        shown="64 on CPUs, 0 on GPUs",
    )
    attention_per_example: bool = speed_setting(True, "Packed batches: causal attention per example, not one masked (N, N) matrix.")
    block_attention: bool = speed_setting(
        True, "CPU, attention per example: causal attention by batched products in blocks of 128 queries, not PyTorch's flash kernel."
    )
    keep_attention_probs: Optional[bool] = speed_setting(
        None,
        "block_attention: the backward pass reuses the forward pass's attention probabilities instead of recomputing them "
        "(about 4 MB per example and layer of GPT-2 small at 512 tokens).",
        shown="on for full, off for lora/8bit",
    )
    fused_loss: Optional[bool] = speed_setting(None, "Output layer and cross-entropy in chunks, without the full logits.", shown="on")
    optim: str = speed_setting("adamw_torch_fused", "Optimizer: any name transformers' TrainingArguments takes.")
    attention_dropout: Optional[float] = speed_setting(
        0.0, "Attention dropout; null (YAML) keeps the model's own (GPT-2: 0.1, which forces unfused attention)."
    )
    frozen_bf16: bool = speed_setting(True, "lora/8bit under bf16: frozen weights stored in bf16 (what autocast would cast them to).")
    frozen_embeddings_bf16: bool = speed_setting(
        True,
        "lora/8bit under bf16: frozen embedding matrices (and a head tied to them) stored in bf16 too; their lookups return fp32. "
        "Rounds the input embeddings to bf16.",
    )
    fast_dropout: bool = speed_setting(True, "CPU training: dropout masks from 16-bit random integers (p rounded to 1/65536), not torch's Bernoulli sampler.")
    fused_lora: bool = speed_setting(
        True, "lora: each adapted layer casts its input once and adds its scaled adapter product into the base output in one addmm."
    )
    fused_activations: bool = speed_setting(True, "GPT-2's gelu_new as one kernel (gelu_pytorch_tanh): less memory, same function.")
    embedding_row_grads: bool = speed_setting(
        True, "full, tied embeddings: the input embedding's gradient added as its looked-up rows, not as a zeroed vocabulary-sized matrix."
    )
    fast_token_rows: bool = speed_setting(True, "lora/8bit: new-token rows applied directly, not via a copy of the whole matrix.")
    reuse_memory: Optional[bool] = speed_setting(
        None,
        "glibc keeps large freed blocks for the next step instead of unmapping them and faulting fresh pages in again.",
        shown="on for full/lora, off for 8bit",
    )
    lean_malloc: Optional[bool] = speed_setting(
        None,
        "The peftgen program on glibc trains in a process started with malloc's per-thread cache and fast bins off, "
        "so that freed tensor blocks are reused instead of the heap growing (peftgen.allocator).",
        shown="on for 8bit, off for full/lora",
    )
    recast_weights: bool = speed_setting(
        False, "full under autocast: linear layers cast their fp32 weights again for the backward pass instead of keeping autocast's copies."
    )
    lean_layers: Optional[bool] = speed_setting(
        None,
        "Llama-family RMSNorms and gated MLPs keep fewer tensors for the backward pass (peftgen.lean_layers); same forward.",
        shown="on for full/lora, off for 8bit",
    )
    # Samples during training (peftgen.sampling):
    sample_every: int = sample_setting(0, "Generate samples at every Nth evaluation (samples.jsonl, <EOS> rate in loss.png); 0: never.")
    sample_decoder: str = sample_setting("topk", "Decoder of those samples; 'peftgen decoders' lists them.")
    sample_options: dict = sample_setting(
        help="Options of sample_decoder, e.g. {k: 50}; on the command line --sample-option k=50, repeatable.",
        factory=dict,
        shown="the decoder's own",
        flag="--sample-option",
    )
    sample_count: int = sample_setting(2, "Samples per round.")
    sample_max_new_tokens: int = sample_setting(64, "Most tokens per sample.")
    sample_prompt: Optional[str] = sample_setting(None, "Text the samples continue.", shown="the bos_token")

    @property
    def fuses_loss(self) -> bool:
        """Whether the loss is computed with the output layer, in chunks (peftgen.fused_loss).

        On by default in every mode: it never holds the (tokens x vocabulary)
        logits, and where the head is frozen (lora, 8bit) it never forms the
        head's weight gradient. A GPT-2 full-mode epoch ran faster with it too,
        once its products ran in the run's bf16 (benchmarks/README.md).
        """
        return self.fused_loss if self.fused_loss is not None else True

    @property
    def reuses_memory(self) -> bool:
        """Whether glibc keeps large freed blocks during training (efficiency.reusing_freed_memory): in full
        and lora mode, where it took a third of the page faults away at the same peak; not in 8bit, where it
        raised the peak (benchmarks/README.md)."""
        return self.reuse_memory if self.reuse_memory is not None else self.mode in ("full", "lora")

    @property
    def keeps_attention_probs(self) -> bool:
        """Whether block attention keeps its probabilities for the backward pass (peftgen.causal_attention): in full
        mode, where it was faster; lora and 8bit, where memory is the point, recompute them as the flash kernel does."""
        return self.keep_attention_probs if self.keep_attention_probs is not None else self.mode == "full"

    def token_multiple_on(self, gpu: bool) -> int:
        """What batches are padded to a multiple of (peftgen.batching.pad_packed): 64 tokens on a CPU, where oneDNN
        builds kernels for every new product size and a GPT-2 epoch ran faster so (benchmarks/README.md); none on
        a GPU, whose matrix libraries build nothing per size, so padding would only add work."""
        if self.token_multiple is not None:
            return self.token_multiple
        return 0 if gpu else 64

    @property
    def leans_malloc(self) -> bool:
        """Whether the peftgen program trains in a process with glibc's tcache and fast bins off (peftgen.allocator):
        in 8bit, where it measured faster and lighter; not in full/lora, where small allocations slowed without them."""
        return self.lean_malloc if self.lean_malloc is not None else self.mode == "8bit"

    @property
    def leans_layers(self) -> bool:
        """Whether Llama-family layers keep fewer tensors (peftgen.lean_layers): not in 8bit, where
        bitsandbytes' int8 layers given bf16 inputs measured 0.37 GB more at the peak (benchmarks/README.md)."""
        return self.lean_layers if self.lean_layers is not None else self.mode != "8bit"

    @property
    def checkpointing(self) -> bool:
        """Whether activations are recomputed in the backward pass instead of kept: by default in 8bit
        only. LoRA without it ran 1.13x faster on GPT-2 within half of full's memory (benchmarks/README.md)."""
        return self.gradient_checkpointing if self.gradient_checkpointing is not None else self.mode == "8bit"

    @property
    def checkpointed_share(self) -> float:
        """Share of the layers recomputed when checkpointing: a quarter for LoRA (where checkpointing is
        off unless asked for), which ran 1.17x faster than all of them (benchmarks/README.md); all of them otherwise."""
        if self.checkpoint_layers is not None:
            return self.checkpoint_layers
        return 0.25 if self.mode == "lora" else 1.0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def validate(self) -> TrainConfig:
        """Refuse, before any model is loaded, every value a library would reject later or that makes a useless run."""
        _check_finite_and_clean(self)
        if self.mode not in MODES:
            raise PeftgenError(f"Unknown mode {short(self.mode)}. Choose one of: {', '.join(MODES)}.")
        if self.precision not in PRECISIONS:
            raise PeftgenError(f"Unknown precision {short(self.precision)}. Choose one of: {', '.join(PRECISIONS)}.")
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
                    f"{name} must be a non-empty marker without surrounding whitespace or line breaks, got {short(token)}. Default: {FIELDS[name].default}."
                )
        if len({self.bos_token, self.eos_token, self.pad_token}) != 3:
            raise PeftgenError("bos_token, eos_token and pad_token must be three different strings.")
        if self.target_modules is not None and not all(name.strip() for name in self.target_modules):
            raise PeftgenError(f"target_modules holds an empty name: {short(self.target_modules)}.")
        _check_report_to(self.report_to)
        _check_sampling(self)
        _check_speed(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every setting, the learning rate resolved: what a run saves and ``train -c`` reads back."""
        data = dataclasses.asdict(self)
        data["lr"] = self.learning_rate
        return data


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)
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
    if config.checkpoint_layers is not None and not 0 < config.checkpoint_layers <= 1:
        raise PeftgenError(
            f"checkpoint_layers is the share of layers recomputed, in (0, 1], got {config.checkpoint_layers:g}; for none, set gradient_checkpointing: false."
        )
    if config.token_multiple is not None and not 0 <= config.token_multiple <= MAX_TOKEN_MULTIPLE:
        raise PeftgenError(
            f"token_multiple is a number of tokens from 0 (off) to {MAX_TOKEN_MULTIPLE}, got {config.token_multiple}; 64 suits CPUs, or null for the default."
        )
    if config.attention_dropout is not None and not 0 <= config.attention_dropout < 1:
        raise PeftgenError(f"attention_dropout is a probability in [0, 1), got {config.attention_dropout:g}; or null to keep the model's own.")
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
            raise PeftgenError(f"Unknown report_to {short(name)}. Choose from: {', '.join(sorted(INTEGRATION_TO_CALLBACK))} (or none).")
    available = get_available_reporting_integrations()
    for name in wanted:
        if name not in available:
            raise PeftgenError(f"report_to {name} needs its package, which is not installed: pip install {_REPORT_TO_PACKAGES.get(name, name)}")


def type_name(hint) -> str:
    """A field's type in words: 'int', 'float or null', 'list of str'."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return type_name(args[0]) + " or null"
    if typing.get_origin(hint) is list:
        return f"list of {type_name(args[0])}"
    if hint is dict:
        return "mapping"
    return hint.__name__


def shown_default(name: str) -> str:
    """A field's default as help and docs show it: 'lora', '5e-5 full, 2e-4 lora/8bit', 'true'."""
    f = FIELDS[name]
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    return yaml.safe_dump(f.default, default_flow_style=True).removesuffix("\n...\n").strip()


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
    raise PeftgenError(f"{where}: '{key}' must be {type_name(hint)}, got {short(value)} ({type(value).__name__}).")


def apply(config: TrainConfig, values: Mapping[str, Any], where: str) -> TrainConfig:
    """A copy of config with values set, after checking each key and type."""
    updates = {}
    for key, value in values.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1) if isinstance(name, str) else []
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise PeftgenError(f"{where}: unknown key {short(key, 60)}.{hint} Valid keys: {', '.join(FIELDS)}.")
        updates[name] = _check_type(name, value, HINTS[name], where)
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


def resolve(yaml_path: str | Path | None = None, flags: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then the flags that were given (None means not given)."""
    config = TrainConfig()
    if yaml_path is not None:
        config = apply(config, read_yaml(yaml_path), str(yaml_path))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    return apply(config, given, "command line").validate()


def load(config: TrainConfig | str | Path | Mapping[str, Any]) -> TrainConfig:
    """A checked TrainConfig from a TrainConfig, a YAML file or a mapping of settings (as a notebook passes them)."""
    if isinstance(config, TrainConfig):
        return config.validate()
    if isinstance(config, (str, Path)):
        return resolve(config)
    return apply(TrainConfig(), config, "settings").validate()


def save(config: TrainConfig, path: Path) -> None:
    """Write the settings as a YAML file that ``peftgen train -c`` reads back as it is."""
    header = f"# The settings of a peftgen run, every one. Train it again with:\n#   peftgen train -c {path.name} --output-dir NEW_FOLDER\n"
    path.write_text(header + yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def settings_table() -> str:
    """docs/settings.md: one row per setting, from the fields above."""
    lines = [
        "# Training settings",
        "",
        "<!-- Generated from peftgen/config.py; regenerate with: python -m peftgen.config > docs/settings.md -->",
        "",
        "Every key of a `peftgen train -c` YAML file, and every flag of `peftgen train`",
        "(`--key-with-dashes`, or the flag named in the help). Flags override the file,",
        "the file overrides the defaults. A run folder's `peftgen.yaml` holds all of them.",
    ]
    for group in GROUPS:
        lines += ["", f"## {group}", "", "| key | type | default | help |", "| --- | --- | --- | --- |"]
        for name, f in FIELDS.items():
            if f.metadata.get("group", GROUPS[0]) != group:
                continue
            default = f.metadata.get("shown") or f"`{shown_default(name)}`"  # words as they are, values as code
            cells = [f"`{name}`", type_name(HINTS[name]), default, f.metadata.get("help", "")]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
