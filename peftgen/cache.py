"""peftgen's cache folder: ``$PEFTGEN_CACHE``, default ``~/.cache/peftgen``.

It holds what is made once and reused: dequantised GGUF models (``gguf/``),
tokenized training data (``datasets/``) and fetched model files.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder, read from the environment at each call so tests can point it elsewhere."""
    return Path(os.environ.get("PEFTGEN_CACHE", Path.home() / ".cache" / "peftgen"))
