"""glibc's allocator for a training process: ``lean_malloc: true``.

PyTorch allocates every CPU tensor with ``posix_memalign(64, n)``. glibc
serves that from a free chunk of ``n`` plus the alignment plus a minimum
chunk, and hands the spare bytes at the end back as a tiny free chunk. Tiny
free chunks go to the per-thread cache (tcache) or a fast bin, where they
count as in use: when the tensor is freed its block cannot merge with its
neighbour, and on its own it is a few bytes short of the next request of
the same size. So the next step's tensors of the same sizes do not fit
where the last step's were; the heap grows instead, and every fresh block
costs the kernel's page faults. Training SmolLM2-135M's shape in 8-bit at
2 x 512 tokens peaked at 1.34 GB that way, against 1.07 GB with the cache
and fast bins off (benchmarks/README.md has the rows). Without the cache
every small allocation takes glibc's slower path, which LoRA, with many
small operations, felt more than the faults saved (GPT-2 small: 440
against 462 tokens/s): on for ``8bit`` only, unless set.

Neither can be switched off from a running process (``mallopt`` has no
tcache setting), only by ``GLIBC_TUNABLES`` at its start. So the ``peftgen``
program, asked to train with them, starts itself once more with them set
(``restart``), before torch is imported; a training run records whether it
had them (``malloc_tunables`` in run.json). Code that calls ``peftgen.train``
from its own Python process can set the same variable before starting it:
``environment()`` gives it. Elsewhere than Linux with glibc nothing changes.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = ("glibc.malloc.tcache_count=0", "glibc.malloc.mxfast=0")
MARK = "PEFTGEN_LEAN_MALLOC"  # set in the restarted process, so that it never restarts again


def available() -> bool:
    """Whether this process runs on glibc, whose allocator these tunables configure."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def active() -> bool:
    """Whether this process was started with the tunables (by ``restart`` or by ``environment``)."""
    return os.environ.get(MARK) == "1" and all(t in os.environ.get("GLIBC_TUNABLES", "").split(":") for t in TUNABLES)


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: this process's environment) for a process started with the tunables.

    Tunables the user already set are kept; ours come after them.
    """
    env = dict(os.environ if base is None else base)
    present = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    env["GLIBC_TUNABLES"] = ":".join(present + [t for t in TUNABLES if t not in present])
    env[MARK] = "1"
    return env


def restart() -> None:
    """Start this program again, same command line, with the tunables set; returns only where that is not done.

    Returns at once if they are set already, if this is not glibc, or if a
    restart was tried before (``MARK`` present, whatever glibc made of it).
    """
    if not available() or MARK in os.environ:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), environment())
