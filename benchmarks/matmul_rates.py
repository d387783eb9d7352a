"""What this machine's matrix products reach, the ceiling of a training step.

A step of full fine-tuning costs about 6 FLOPs per parameter per token
(forward 2, backward 4), nearly all of them in matrix products. At the rate
this machine's products reach at a GPT-2 layer's shape, that gives the
fastest a step could be if nothing else took time; the benchmark reports
each row against it, so that a run on another CPU (AMX, or AVX512-BF16 at
another width) reads the same way.
"""

from __future__ import annotations

import statistics
import time


def product_rate(dtype_name: str, device: str = "cpu", shape: tuple[int, int, int] = (1024, 768, 3072), repeats: int = 7) -> float:
    """TFLOP/s of an (m, k) @ (k, n) product in ``dtype_name`` ("bfloat16", "float32"): the median of ``repeats`` timings."""
    import torch

    dtype = getattr(torch, dtype_name)
    m, k, n = shape
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    per_timing = 10 if device == "cuda" else 1  # a GPU product is too short to time alone
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(per_timing):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first two warm the library's kernels and caches
            times.append((time.perf_counter() - start) / per_timing)
    return 2 * m * k * n / statistics.median(times) / 1e12


def bound_tokens_per_second(parameters: int, tflops: float) -> float:
    """Tokens/s of full fine-tuning if its 6 FLOPs per parameter per token ran at ``tflops`` and nothing else took time."""
    return tflops * 1e12 / (6 * parameters)
