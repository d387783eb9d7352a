"""Quieting library loggers is an explicit call (peftgen.logs.quiet_libraries), not a side effect of an import."""

import subprocess
import sys
import textwrap

# A fresh interpreter: in this one, another test may already have run the CLI and installed the filters.
SCRIPT = textwrap.dedent("""
    import logging
    import warnings

    def quieted(logger, message):
        record = logging.LogRecord(logger, logging.WARNING, "bitsandbytes", 1, message, None, None)
        return not logging.getLogger(logger).filter(record)

    CAST = ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from torch.float32 to float16")
    GEMM = ("bitsandbytes.backends.cpu.ops", "gemm_4bit_forward is not available on this CPU")
    OTHER = ("bitsandbytes.autograd._functions", "something else worth seeing")

    def future_warnings_ignored():
        return any(f[0] == "ignore" and f[2] is FutureWarning for f in warnings.filters)

    import peftgen.corpus, peftgen.efficiency, peftgen.model  # noqa: E401,F401
    from transformers.utils import logging as hf_logging
    print("after import:", quieted(*CAST), quieted(*GEMM), hf_logging.is_progress_bar_enabled(), future_warnings_ignored())

    from peftgen.logs import quiet_libraries
    quiet_libraries()
    quiet_libraries()  # a second call adds nothing
    print("after call:", quieted(*CAST), quieted(*GEMM), quieted(*OTHER), hf_logging.is_progress_bar_enabled(),
          future_warnings_ignored(), len(logging.getLogger(CAST[0]).filters))
""")


def test_importing_peftgen_quiets_nothing_and_quiet_libraries_does():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "after import: False False True False"
    assert lines[1] == "after call: True True False False True 1"  # only the two notices go; other lines stay


def test_the_cli_quiets_the_libraries_before_any_command():
    script = textwrap.dedent("""
        import logging
        from typer.testing import CliRunner
        from peftgen.cli import app

        logger = logging.getLogger("bitsandbytes.autograd._functions")
        before = len(logger.filters)
        result = CliRunner().invoke(app, ["decoders"])
        assert result.exit_code == 0, result.output
        print(before, len(logger.filters))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1"]
