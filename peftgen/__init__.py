"""peftgen: fine-tune causal LMs (full, LoRA, 8-bit) and generate with plugin decoders.

The library under the command line, one call per command::

    import peftgen
    peftgen.prepare("booksummaries.txt", "data", seed=0)                # peftgen prepare
    result = peftgen.train("configs/lora.yaml")                        # peftgen train -c ...
    peftgen.evaluate(result.output_dir, "data/test.txt")               # peftgen eval
    peftgen.generate_text(result.output_dir, decoder="topk", seed=0)   # peftgen generate
    peftgen.merge(result.output_dir, "models/merged")                  # peftgen merge

The names a decoder plugin needs are imported here; the rest on first use,
so importing peftgen does not import torch.
"""

import importlib

from peftgen.errors import PeftgenError
from peftgen.generation.decoder import Completion, DecodeContext, DecodingEngine, SequenceDecoder, TokenDecoder
from peftgen.hookspecs import hookimpl

__version__ = "0.1.0"

# Loaded on first use: name -> module that defines it.
_LIBRARY = {
    "TrainConfig": "peftgen.config",
    "train": "peftgen.training",
    "evaluate": "peftgen.evaluation",
    "generate_text": "peftgen.text_generation",
    "prepare": "peftgen.preparation",
    "merge": "peftgen.merging",
    "load": "peftgen.model",
}
__all__ = [*_LIBRARY, "Completion", "DecodeContext", "DecodingEngine", "PeftgenError", "SequenceDecoder", "TokenDecoder", "hookimpl", "__version__"]


def __getattr__(name: str):
    if name not in _LIBRARY:
        raise AttributeError(f"module 'peftgen' has no attribute {name!r}")
    return getattr(importlib.import_module(_LIBRARY[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LIBRARY})
