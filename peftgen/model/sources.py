"""Where a model comes from: what ``--model`` names, turned into something ``from_pretrained`` loads.

A local folder is used as it is; a .gguf file is dequantised once into the
cache folder; a Hub id is taken from the local Hugging Face cache when it is
there, and otherwise only after a quick check that the Hub answers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

from peftgen.cache import cache_dir
from peftgen.errors import PeftgenError, first_line
from peftgen.run_files import read_json_object


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all; cheap, so offline machines fail fast."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_gguf(path: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise PeftgenError(f"Loading {path.name} needs the gguf package: pip install 'peftgen[gguf]' (or pip install gguf).")


def gguf_folder(path: Path) -> Path:
    """A Hugging Face folder holding the dequantised GGUF model, made once and cached.

    transformers dequantises a GGUF file on every load (about 14 s for a 135M
    model on 2 cores); the cached safetensors load in well under a second.
    The cache key covers the file's name, size and modification time.
    """
    require_gguf(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"Dequantising {path.name} (once; cached in {folder})...", file=sys.stderr, flush=True)
    try:
        # dequantize=True: plain float32 layers that LoRA can train and
        # save_pretrained can write, whatever GGUF kernels are installed.
        model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=torch.float32,
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
    if not hub_reachable():
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
            f"Model '{source}' was not found on the Hugging Face Hub ({first_line(error)}). Check the id (e.g. openai-community/gpt2) or pass a local folder."
        ) from None
    return source, {}
