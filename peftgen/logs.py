"""Quieting the libraries under peftgen, so the terminal holds peftgen's own progress and results.

    peftgen.logs.quiet_libraries()   # the CLI calls it before every command

Nothing is quieted by importing a peftgen module: a program that uses peftgen
as a library keeps every log line and warning unless it calls this.
"""

from __future__ import annotations

import logging
import warnings


def _not_cast_notice(record: logging.LogRecord) -> bool:
    return "inputs will be cast" not in record.getMessage()


def _not_4bit_notice(record: logging.LogRecord) -> bool:
    return "gemm_4bit_forward" not in record.getMessage()


# bitsandbytes logs the first on every 8-bit matmul whose inputs are not fp16,
# and the second at import on CPUs with AVX512-BF16 (it concerns 4-bit only).
FILTERS = {
    "bitsandbytes.autograd._functions": _not_cast_notice,
    "bitsandbytes.backends.cpu.ops": _not_4bit_notice,
}


def quiet_libraries() -> None:
    """Drop bitsandbytes' per-matmul notices, transformers' per-file loading bars and FutureWarnings.

    Call it before bitsandbytes is imported (its CPU notice comes at import).
    Calling it again changes nothing.
    """
    from transformers.utils import logging as hf_logging

    for name, keep in FILTERS.items():
        logging.getLogger(name).addFilter(keep)  # addFilter skips a filter already there
    hf_logging.disable_progress_bar()  # per-file weight loading bars
    warnings.filterwarnings("ignore", category=FutureWarning)
