"""Which numeric precision a run uses: ``--precision auto|fp32|bf16|fp16``."""

from __future__ import annotations

import torch

from peftgen.errors import PeftgenError


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 matmuls run several times faster than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(getattr(cpu, name)() for name in checks if hasattr(cpu, name))
    except RuntimeError:
        return False


def resolve(precision: str) -> str:
    """Turn 'auto' into bf16, fp16 or fp32 for this machine; check the explicit choices."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise PeftgenError("--precision fp16 needs a CUDA GPU. On CPU use bf16 (fast on AMX/AVX512-BF16) or fp32.")
    if precision not in ("fp32", "bf16", "fp16"):
        raise PeftgenError(f"Unknown precision {precision!r}. Choose one of: auto, fp32, bf16, fp16.")
    return precision


def autocast(precision: str):
    """An autocast context for inference in the resolved precision (a no-op for fp32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = autocast_dtype(precision)
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast runs a resolved precision's matmuls in; None for fp32 (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
