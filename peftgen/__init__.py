"""peftgen: fine-tune causal LMs (full, LoRA, 8-bit) and generate with plugin decoders.

The names a decoder plugin needs live here; importing them does not import torch.
"""
from peftgen.errors import PeftgenError
from peftgen.generation.decoder import Completion, DecodeContext, SequenceDecoder, TokenDecoder
from peftgen.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["Completion", "DecodeContext", "PeftgenError", "SequenceDecoder", "TokenDecoder", "hookimpl", "__version__"]
