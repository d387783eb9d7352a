"""Generation: the decoder contract, the KV-cached engine and decoder options.

    from peftgen.generation import generate, build_decoder

Names are imported on first use, so ``import peftgen`` does not import torch.
"""

import importlib

_EXPORTS = {
    "Completion": "decoder",
    "DecodeContext": "decoder",
    "DecodingEngine": "decoder",
    "SequenceDecoder": "decoder",
    "TokenDecoder": "decoder",
    "Engine": "engine",
    "check_request": "engine",
    "generate": "engine",
    "build_decoder": "options",
    "decoder_options": "options",
    "parse_pairs": "options",
    "resolved_options": "options",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peftgen.generation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"peftgen.generation.{_EXPORTS[name]}"), name)
