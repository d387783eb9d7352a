"""Models: where they come from, their marker tokens, wrapping for training, loading for inference.

    model, tokenizer = peftgen.model.load("runs/lora")      # ready for inference

One module per job:

- ``sources``: what ``--model`` names (Hub id, folder, .gguf file) turned into
  something ``from_pretrained`` loads; GGUF files are dequantised once into
  the cache folder.
- ``loading``: base models and tokenizers, adapters, and ``load`` for inference.
- ``tokens``: adding <BOS>/<EOS>/<PAD> with well-placed new embedding rows.
- ``training``: ``prepare_for_training``, full / LoRA / 8-bit wrapping.
- ``sizes``: context length, hidden width, parameter counts.
"""

from peftgen.cache import cache_dir
from peftgen.model.loading import MIN_BITSANDBYTES, load, load_adapter, load_pretrained, load_tokenizer, tokenizer_of
from peftgen.model.sizes import context_length, count_parameters, hidden_width
from peftgen.model.sources import gguf_folder, hub_reachable, resolve_source
from peftgen.model.tokens import add_special_tokens, embedding_names, set_token_ids
from peftgen.model.training import CHECKPOINTING, TARGET_MODULES, check_fit, check_target_modules, prepare_for_training

__all__ = [
    "CHECKPOINTING",
    "MIN_BITSANDBYTES",
    "TARGET_MODULES",
    "add_special_tokens",
    "cache_dir",
    "check_fit",
    "check_target_modules",
    "context_length",
    "count_parameters",
    "embedding_names",
    "gguf_folder",
    "hidden_width",
    "hub_reachable",
    "load",
    "load_adapter",
    "load_pretrained",
    "load_tokenizer",
    "prepare_for_training",
    "resolve_source",
    "set_token_ids",
    "tokenizer_of",
]
