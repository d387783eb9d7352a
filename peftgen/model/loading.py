"""Loading weights and tokenizers: a base model for training, or any source ready for inference.

    model, tokenizer = peftgen.model.load("runs/lora")      # ready for inference

Missing or damaged files (weights, tokenizer, adapter) get one line naming
the file and what to do, not a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import pickle
from pathlib import Path

import torch

from peftgen import efficiency
from peftgen.errors import PeftgenError, first_line
from peftgen.model.sources import require_gguf, resolve_source
from peftgen.model.tokens import add_special_tokens, set_token_ids
from peftgen.run_files import read_json_object, read_run_config, run_folder

MIN_BITSANDBYTES = (0, 47)


def _require_bitsandbytes() -> None:
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise PeftgenError("--mode 8bit needs bitsandbytes>=0.47: pip install bitsandbytes") from None
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_BITSANDBYTES:
        raise PeftgenError(f"--mode 8bit needs bitsandbytes>=0.47, found {version}: pip install -U bitsandbytes")


def _tokenizer_kwargs(kwargs: dict) -> dict:
    """Of resolve_source's keyword arguments, those a tokenizer takes too."""
    return {k: v for k, v in kwargs.items() if k == "local_files_only"}


def load_pretrained(source: str, *, quantize_8bit: bool = False):
    """A base model (float32 weights, or LLM.int8 when quantize_8bit) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    location, kwargs = resolve_source(source)
    if quantize_8bit:
        _require_bitsandbytes()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if torch.cuda.is_available():  # int8 weights are made on the device that runs them
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    tokenizer = load_tokenizer(location, source, **_tokenizer_kwargs(kwargs))
    try:
        # 8-bit: quantising makes and drops a temporary per weight; give that memory back as it goes.
        with _lean_8bit_load() if quantize_8bit else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    except _damaged_file_errors() as error:
        raise PeftgenError(_damaged_weights(source, location, "model", error)) from None
    except (OSError, ValueError) as error:
        raise PeftgenError(f"Could not load model {source}: {first_line(error)}") from None
    return model, tokenizer


@contextlib.contextmanager
def _lean_8bit_load():
    """Quantising at load without holding the fp32 model in memory on the way.

    transformers quantises the fp32 weights one by one as it reads them from
    the mapped safetensors file, but every page it reads stays resident
    until the whole file is unmapped, and glibc keeps each freed temporary
    for reuse: for GPT-2 small the load peaked at 0.77 GB above the imports
    for a model that ends at 0.3 GB. transformers has no option for either,
    so its 8-bit quantise step is wrapped to hand each weight's pages back
    once quantised (a transformers without that step loads as before), and
    large temporaries go back to the system while loading.
    """
    try:
        from transformers.integrations import bitsandbytes as hf_bitsandbytes

        step = hf_bitsandbytes.Bnb8bitQuantize
        original = step.convert
    except (ImportError, AttributeError):
        step = original = None

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        result = original(self, input_dict, model=model, full_layer_name=full_layer_name, **kwargs)
        if model is not None:
            for values in input_dict.values():
                for value in values if isinstance(values, list) else [values]:
                    if isinstance(value, torch.Tensor):
                        efficiency.release_mapped(value, model)
        return result

    if step is not None:
        step.convert = convert
    try:
        with efficiency.returning_freed_memory():
            yield
    finally:
        if step is not None:
            step.convert = original


def load_tokenizer(location: str | Path, source: str | Path, **kwargs):
    """The tokenizer saved in a model or run folder; missing or damaged files get one line."""
    from transformers import AutoTokenizer

    advice = (
        "It needs its tokenizer files (tokenizer.json and tokenizer_config.json, or vocab.json and merges.txt): copy them from the model it was trained from."
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        raise PeftgenError(f"Could not load the tokenizer of {source}: {first_line(error, 200)}. {advice}") from None
    if len(tokenizer) < 2:  # transformers builds an empty one when every file is missing
        raise PeftgenError(f"{source} has no tokenizer (an empty vocabulary was all it held). {advice}")
    return tokenizer


def tokenizer_of(source: str | Path):
    """The tokenizer of any source ``load`` accepts, without loading the model's weights.

    A folder (a model, a run or one of its checkpoints, or tokenizer files
    alone): the tokenizer saved there, a run's with its marker tokens. A .gguf
    file: the tokenizer stored in the file, read directly; the model is not
    dequantised for it. A Hub id: as ``load_pretrained`` would find it.
    """
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return load_tokenizer(path, source)
    if path.is_file() and path.suffix == ".gguf":
        require_gguf(path)
        return load_tokenizer(path.parent, source, gguf_file=path.name)
    location, kwargs = resolve_source(str(source))
    return load_tokenizer(location, source, **_tokenizer_kwargs(kwargs))


def _damaged_file_errors() -> tuple[type[BaseException], ...]:
    """What reading a truncated or foreign weights file raises (safetensors, or pickle for .bin)."""
    from safetensors import SafetensorError

    return (SafetensorError, pickle.UnpicklingError, EOFError)


def _damaged_weights(source, folder, kind: str, error: BaseException) -> str:
    names = sorted(p.name for p in Path(folder).glob("*model*.safetensors")) + sorted(p.name for p in Path(folder).glob("*model*.bin"))
    return (
        f"The {kind} weights of {source} ({', '.join(names) or 'weights file'}) are damaged: {first_line(error, 160)}. "
        "The file is truncated or not a weights file; copy or save it again."
    )


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
            raise PeftgenError(
                f"{path} is a {settings['mode']} run without adapter_config.json: training did not finish. Use one of its checkpoint-N folders or --resume it."
            )
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
            f"Could not load the adapter in {folder}: {first_line(error, 200)}. Its adapter_config.json or weights are damaged or belong to another base model."
        ) from None
