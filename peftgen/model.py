"""Loading models: Hub ids, local folders, GGUF files and peftgen runs of any mode.

    model, tokenizer = peftgen.model.load("runs/lora")      # ready for inference

Training uses ``prepare_for_training``: base model, the new special tokens,
then full / LoRA / 8-bit wrapping with only the new embedding rows trainable.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pickle
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
import yaml

from peftgen import efficiency, token_rows
from peftgen.errors import PeftgenError

# torch's recommended checkpointing: works whether or not the layer inputs need a gradient
CHECKPOINTING = {"use_reentrant": False}
RUN_CONFIG = "peftgen.yaml"  # marks a folder as a peftgen run
MIN_BITSANDBYTES = (0, 47)

# LoRA targets per architecture when --target-modules is not given: every
# projection in attention and MLP. Unlisted architectures get PEFT's
# "all-linear" (every linear layer but the output head).
TARGET_MODULES = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

# bitsandbytes logs the first on every 8-bit matmul whose inputs are not fp16,
# and the second at import on CPUs with AVX512-BF16 (it concerns 4-bit only).
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: "inputs will be cast" not in record.getMessage()
)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage()
)


# ---------------------------------------------------------------- sources


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


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all; cheap, so offline machines fail fast."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTGEN_CACHE", Path.home() / ".cache" / "peftgen"))


def gguf_folder(path: Path) -> Path:
    """A Hugging Face folder holding the dequantised GGUF model, made once and cached.

    transformers dequantises a GGUF file on every load (about 14 s for a 135M
    model on 2 cores); the cached safetensors load in well under a second.
    The cache key covers the file's name, size and modification time.
    """
    if importlib.util.find_spec("gguf") is None:
        raise PeftgenError(f"Loading {path.name} needs the gguf package: pip install 'peftgen[gguf]' (or pip install gguf).")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Dequantising {path.name} (once; cached in {folder})...", flush=True)
    try:
        from transformers import GgufConfig

        # dequantize=True: plain float32 layers that LoRA can train and
        # save_pretrained can write, whatever GGUF kernels are installed.
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as error:
        raise PeftgenError(f"Could not load the GGUF file {path}: {error}") from None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the saved folder is plain float32
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def resolve_source(source: str) -> tuple[str, dict]:
    """Map --model to something from_pretrained loads, plus the keyword arguments it needs."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise PeftgenError(f"--model {source} is a file but not a .gguf file. Pass a model folder, a .gguf file or a Hub id.")
        return str(gguf_folder(path)), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PeftgenError(
                f"--model {source} is a folder without config.json: neither a Hugging Face model "
                "(saved with save_pretrained) nor a peftgen run (with peftgen.yaml)."
            )
        read_json_object(path / "config.json")
        return str(path), {}
    if source.endswith(".gguf") or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise PeftgenError(f"Model not found: {source} does not exist. Check the path.")
    return _resolve_hub_id(source)


def _resolve_hub_id(source: str) -> tuple[str, dict]:
    from transformers import AutoConfig

    try:  # already in the local Hugging Face cache: no network needed
        AutoConfig.from_pretrained(source, local_files_only=True)
        return source, {"local_files_only": True}
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise PeftgenError(
            f"Model '{source}' is not a local folder or file and is not in the Hugging Face cache, "
            "and the Hugging Face Hub cannot be reached from this machine (offline). "
            "Pass a local model folder (config.json + weights, e.g. saved with save_pretrained), "
            "a .gguf file, or a peftgen run folder to --model."
        )
    try:
        AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise PeftgenError(
            f"Model '{source}' was not found on the Hugging Face Hub ({str(error).splitlines()[0]}). "
            "Check the id (e.g. openai-community/gpt2) or pass a local folder."
        ) from None
    return source, {}


def _require_bitsandbytes() -> None:
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise PeftgenError("--mode 8bit needs bitsandbytes>=0.47: pip install bitsandbytes") from None
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_BITSANDBYTES:
        raise PeftgenError(f"--mode 8bit needs bitsandbytes>=0.47, found {version}: pip install -U bitsandbytes")


def load_pretrained(source: str, *, quantize_8bit: bool = False):
    """A base model (float32 weights, or LLM.int8 when quantize_8bit) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, kwargs = resolve_source(source)
    if quantize_8bit:
        _require_bitsandbytes()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if torch.cuda.is_available():  # int8 weights are made on the device that runs them
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    tokenizer = load_tokenizer(location, source, **{k: v for k, v in kwargs.items() if k == "local_files_only"})
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    except _damaged_file_errors() as error:
        raise PeftgenError(_damaged_weights(source, location, "model", error)) from None
    except (OSError, ValueError) as error:
        raise PeftgenError(f"Could not load model {source}: {_first_line(error)}") from None
    return model, tokenizer


def load_tokenizer(location: str | Path, source: str | Path, **kwargs):
    """The tokenizer saved in a model or run folder; missing or damaged files get one line."""
    from transformers import AutoTokenizer

    advice = ("It needs its tokenizer files (tokenizer.json and tokenizer_config.json, or vocab.json and "
              "merges.txt): copy them from the model it was trained from.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        raise PeftgenError(f"Could not load the tokenizer of {source}: {_first_line(error)[:200]}. {advice}") from None
    if len(tokenizer) < 2:  # transformers builds an empty one when every file is missing
        raise PeftgenError(f"{source} has no tokenizer (an empty vocabulary was all it held). {advice}")
    return tokenizer


def _damaged_file_errors() -> tuple[type[BaseException], ...]:
    """What reading a truncated or foreign weights file raises (safetensors, or pickle for .bin)."""
    from safetensors import SafetensorError

    return (SafetensorError, pickle.UnpicklingError, EOFError)


def _damaged_weights(source, folder, kind: str, error: BaseException) -> str:
    names = sorted(p.name for p in Path(folder).glob("*model*.safetensors")) + sorted(p.name for p in Path(folder).glob("*model*.bin"))
    return (
        f"The {kind} weights of {source} ({', '.join(names) or 'weights file'}) are damaged: {_first_line(error)[:160]}. "
        "The file is truncated or not a weights file; copy or save it again."
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------- special tokens


def add_special_tokens(model, tokenizer, bos: str, eos: str, pad: str) -> list[int]:
    """Make bos/eos/pad the tokenizer's and model's, resizing embeddings; returns the new ids.

    New rows start at the mean of the existing embeddings plus small noise
    (transformers' mean_resizing), so an untrained new token is an average
    token rather than an outlier with huge logits. The new eos is the
    exception: when the base model has an end token of its own (GPT-2's
    <|endoftext|>, an instruct model's <|im_end|>), the new eos starts as a
    copy of it, input and output rows. From the first step the model then
    gives <EOS> the probability it gave its own end token, and training only
    has to move it ahead. From an average row instead, the model learns
    <EOS> slowly and, under greedy or beam search, keeps ending its text
    with the old token, which it still ranks first.
    """
    before = len(tokenizer)
    old_eos = tokenizer.eos_token_id if tokenizer.eos_token not in (None, eos) else None
    tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos, "pad_token": pad})
    new_ids = list(range(before, len(tokenizer)))
    if model.get_input_embeddings().weight.shape[0] != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if old_eos is not None and tokenizer.eos_token_id in new_ids:
        _copy_token_rows(model, old_eos, tokenizer.eos_token_id)
    set_token_ids(model, tokenizer)
    return new_ids


def _copy_token_rows(model, source: int, target: int) -> None:
    """Row ``target`` of the input embeddings (and of an untied output head) becomes row ``source``."""
    import torch

    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        inputs.weight[target] = inputs.weight[source]
        if outputs is not None and outputs.weight.data_ptr() != inputs.weight.data_ptr():
            outputs.weight[target] = outputs.weight[source]
            if getattr(outputs, "bias", None) is not None:
                outputs.bias[target] = outputs.bias[source]


def set_token_ids(model, tokenizer) -> None:
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id


def embedding_names(model) -> tuple[str, str | None, bool]:
    """Module names of the input and output embeddings, and whether their weights are tied."""
    names = {id(module): name for name, module in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outputs is not None and outputs.weight.data_ptr() == inputs.weight.data_ptr()
    return names[id(inputs)], (names[id(outputs)] if outputs is not None else None), tied


def _has_conv1d(model, targets) -> bool:
    """GPT-2 keeps its weights as Conv1D (in, out); LoRA must then be told fan_in_fan_out."""
    from transformers.pytorch_utils import Conv1D

    wanted = set(targets) if isinstance(targets, list) else None
    return any(
        isinstance(module, Conv1D) and (wanted is None or name.rsplit(".", 1)[-1] in wanted)
        for name, module in model.named_modules()
    )


# ---------------------------------------------------------------- training


def check_fit(model, config) -> None:
    """The settings that depend on the model, checked once it is loaded and before anything is built.

    A max_length beyond the model's context would index past its position
    embeddings: it is capped to the context, with a note on stderr, and
    ``config.max_length`` is updated so that the data and the saved
    peftgen.yaml use the cap. LoRA target modules the model does not have are
    refused with the names it does have.
    """
    from peftgen.generation.engine import context_length

    limit = context_length(model)
    if limit is not None and config.max_length > limit:
        print(
            f"note: max_length {config.max_length} is longer than the context of {config.model} "
            f"({limit} tokens); examples are cut to {limit} tokens.",
            file=sys.stderr,
        )
        config.max_length = limit
    if config.mode != "full" and config.target_modules:
        check_target_modules(model, config.target_modules)


def check_target_modules(model, targets: list[str]) -> None:
    """Every LoRA target must name (or end the name of) a layer LoRA can adapt, as PEFT matches them."""
    from transformers.pytorch_utils import Conv1D

    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    names = [name for name, module in model.named_modules() if isinstance(module, adaptable)]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        have = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise PeftgenError(
            f"target_modules {', '.join(repr(t[:40]) for t in missing[:5])} not in this {model.config.model_type} model. "
            f"Its layers LoRA can adapt: {', '.join(have)}. Pass some of those to --target-modules, or leave it out."
        )


def prepare_for_training(config, precision: str = "fp32"):
    """Base model + special tokens, wrapped for config.mode. Returns (model, tokenizer, new_ids).

    full: every weight trains, the new rows included.
    lora / 8bit: LoRA on the attention and MLP projections, and PEFT's
    trainable_token_indices on the new token ids only, so every pre-existing
    embedding row stays bit-identical. With tied input/output embeddings
    (GPT-2) PEFT trains one set of new rows used by both; with untied ones
    (most Llamas) the output head's new rows train as well, or the model
    could never learn to predict <EOS>.
    """
    model, tokenizer = load_pretrained(config.model, quantize_8bit=config.mode == "8bit")
    check_fit(model, config)
    new_ids = add_special_tokens(model, tokenizer, config.bos_token, config.eos_token, config.pad_token)
    if config.attention_dropout is not None:
        efficiency.set_attention_dropout(model, config.attention_dropout)
    if config.fused_activations:
        efficiency.fuse_activations(model)
    if config.mode == "full":
        if config.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        return model, tokenizer, new_ids

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.mode == "8bit":
        # Casts the remaining float weights to fp32 and freezes the int8 ones.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.checkpointing, gradient_checkpointing_kwargs=CHECKPOINTING
        )
    elif config.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        model.enable_input_require_grads()
    targets = config.target_modules or TARGET_MODULES.get(model.config.model_type, "all-linear")
    in_name, out_name, tied = embedding_names(model)
    token_indices = None
    if new_ids:
        token_indices = new_ids if tied or out_name is None else {in_name: new_ids, out_name: new_ids}
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=_has_conv1d(model, targets),
        trainable_token_indices=token_indices,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if config.fast_token_rows:
        token_rows.speed_up(model)
    if config.frozen_bf16 and precision == "bf16":
        efficiency.store_frozen_in_bf16(model)
    return model, tokenizer, new_ids


def hidden_width(model) -> int | None:
    """The width of the model's hidden states (GPT-2's n_embd, Llama's hidden_size), if its config says."""
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------- inference


def run_folder(path: Path) -> Path | None:
    """The run a folder belongs to: itself, or its parent for a checkpoint-N folder."""
    if is_run(path):
        return path
    if path.name.startswith("checkpoint-") and is_run(path.parent):
        return path.parent
    return None


def load(source: str | Path, special_tokens: tuple[str, str, str] | None = None, *, merge: bool = True):
    """Model and tokenizer ready for inference, from any source peftgen accepts.

    source: a Hub id, a model folder, a .gguf file, a peftgen run folder (full,
    lora or 8bit) or one of its checkpoint-N folders. A run's adapter is applied
    to its base model resized to the run's tokenizer; LoRA runs are merged into
    the weights (merge=False keeps the PeftModel). special_tokens=(bos, eos,
    pad) adds those tokens to a plain model, untrained: the baseline a trained
    run is compared against.
    """
    path = Path(str(source)).expanduser()
    run = run_folder(path) if path.is_dir() else None
    if run is None:
        model, tokenizer = load_pretrained(str(source))
        if special_tokens:
            add_special_tokens(model, tokenizer, *special_tokens)
        return model.eval(), tokenizer

    settings = read_run_config(run)
    if settings["mode"] == "full":
        model, tokenizer = load_pretrained(str(path))
    else:
        if not (path / "adapter_config.json").is_file():
            raise PeftgenError(f"{path} is a {settings['mode']} run without adapter_config.json: training did not finish. Use one of its checkpoint-N folders or --resume it.")
        tokenizer = load_tokenizer(path, path)
        base, _ = load_pretrained(settings["model"], quantize_8bit=settings["mode"] == "8bit")
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = load_adapter(base, path)
        if merge and settings["mode"] == "lora":
            model = model.merge_and_unload()
    set_token_ids(model, tokenizer)
    return model.eval(), tokenizer


def load_adapter(base, folder: Path):
    """``base`` with the adapter saved in ``folder``; a missing or damaged adapter gets one line naming its file."""
    from peft import PeftModel

    folder = Path(folder)
    settings = read_json_object(folder / "adapter_config.json")
    if not isinstance(settings.get("peft_type"), str):
        raise PeftgenError(f"{folder / 'adapter_config.json'} is incomplete (no peft_type): the file is damaged. Restore it from a copy.")
    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise PeftgenError(
            f"{folder} has adapter_config.json but no adapter weights (adapter_model.safetensors): "
            "training did not finish or the file was lost. Use one of the run's checkpoint-N folders."
        )
    try:
        return PeftModel.from_pretrained(base, folder)
    except _damaged_file_errors() as error:
        raise PeftgenError(_damaged_weights(folder, folder, "adapter", error)) from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise PeftgenError(
            f"Could not load the adapter in {folder}: {_first_line(error)[:200]}. "
            "Its adapter_config.json or weights are damaged or belong to another base model."
        ) from None
