"""Training data at scale: time to the first step and peak memory, before and after the datasets cache.

    python benchmarks/data_scale.py                      # 10 MB, 100 MB and 1 GB corpora
    python benchmarks/data_scale.py --sizes 10,100       # skip the 1 GB corpus
    python benchmarks/data_scale.py --sizes 1 --quick    # a 1 MB corpus: keeps the script working

For each size a corpus is generated from the shipped book-summary sample into
a temporary folder (deleted afterwards, never committed): its 32 summaries,
each line one of them with its words rotated by a random offset, so no two
lines are alike. A tiny GPT-2 (2 layers, width 64, the GPT-2 tokenizer plus
<BOS>/<EOS>/<PAD>) trains on it with ``--max-steps 1 --max-length 256``.

Every run is a fresh process; each is measured from the moment peftgen's
imports are done (they take the same few seconds in every row, printed once)
to the end of the first training step:

- before: today's loop before the cache, kept below as it was (the whole
  file read into memory, one tokenizer call per line into Python lists, on
  every run);
- after: ``peftgen.corpus`` (rows streamed into Arrow, ``Dataset.map`` with
  one worker per core, examples memory-mapped from ``PEFTGEN_CACHE``); the
  first run starts from an empty cache, the second finds it.

"data s" is the time spent turning the file into examples; "to step 1 s"
adds loading the model and the first step. Peak memory is the largest
resident set of the run's process or any of its workers (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "assets" / "gpt2-tokenizer"
SAMPLE = ROOT / "data" / "cmu-booksummaries-sample.tsv"
MAX_LENGTH = 256


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write about ``megabytes`` MB of summary lines; returns the number of lines."""
    summaries = [line.split("\t")[-1].split() for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    target, size, lines = megabytes * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            words = rng.choice(summaries)
            k = rng.randrange(len(words))
            line = " ".join(words[k:] + words[:k]) + "\n"
            f.write(line)
            size += len(line.encode())
            lines += 1
    return lines


def make_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=1024)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- before: today's loop, kept as it was


def before_read_lines(path, what):
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def before_load_examples(path, tokenizer, max_length, what):
    from peftgen import data

    pad = tokenizer.pad_token
    lines = [line for line in before_read_lines(path, what) if not (pad and pad in line)]
    return [ids for ids in (data.encode(line, tokenizer, max_length) for line in lines) if len(ids) > 2]


class InMemory:
    """What train() expects back from the data step, holding Python lists as before."""

    def __init__(self, examples):
        self.examples = examples

    def open(self):
        from peftgen.data import LineDataset

        return LineDataset(self.examples)


def before_check_inputs(config):
    from peftgen import runs

    before_read_lines(config.train_file, "training file")
    return runs.plan(config)


def before_examples(config, tokenizer):
    return InMemory(before_load_examples(config.train_file, tokenizer, config.max_length, "training file")), None


# ---------------------------------------------------------------- one run, in its own process


def child(args) -> None:
    started = time.perf_counter()
    from peftgen import config as config_lib
    from peftgen import training as train_lib

    imports = time.perf_counter() - started
    if args.child == "before":
        train_lib._check_inputs, train_lib._examples = before_check_inputs, before_examples
    timings = {"imports_s": imports}
    examples = train_lib._examples

    def timed_examples(config, tokenizer):
        t = time.perf_counter()
        out = examples(config, tokenizer)
        timings["data_s"] = time.perf_counter() - t
        return out

    train_lib._examples = timed_examples
    step = train_lib.PeftgenTrainer.training_step

    def first_step(self, *a, **k):
        step(self, *a, **k)
        timings["to_step_1_s"] = time.perf_counter() - t0
        Path(args.result).write_text(json.dumps(timings))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # what follows (saving the run) is the same in every row

    train_lib.PeftgenTrainer.training_step = first_step
    config = config_lib.resolve(
        None,
        dict(
            model=args.model,
            mode="full",
            train_file=args.train_file,
            output_dir=args.output_dir,
            max_steps=1,
            max_length=MAX_LENGTH,
            batch_size=2,
            precision="fp32",
            logging_steps=1,
        ),
    )
    t0 = time.perf_counter()
    train_lib.train(config, overwrite=True, progress=False)


def run_process(path: str, model: Path, corpus: Path, cache: Path, scratch: Path) -> dict:
    """One run in a fresh process; its peak memory comes from wait4, which reports the child's own
    ru_maxrss together with that of the workers it waited for (Popen.wait would reap it unreported)."""
    result = scratch / "result.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, PEFTGEN_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    command = [
        sys.executable,
        __file__,
        "--child",
        path,
        "--model",
        str(model),
        "--train-file",
        str(corpus),
        "--output-dir",
        str(scratch / "run"),
        "--result",
        str(result),
    ]
    log = scratch / "stderr.txt"
    with open(log, "w") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if not result.is_file():
        raise SystemExit(f"{path} run failed (exit {process.returncode}):\n{log.read_text()[-3000:]}")
    out = json.loads(result.read_text())
    out["peak_mb"] = usage.ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB, comma-separated")
    parser.add_argument(
        "--before-up-to", type=float, default=float("inf"), help="skip the 'before' rows above this size in MB (they need about 7 GB of memory per GB)"
    )
    parser.add_argument("--quick", action="store_true", help="same as --sizes 1")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    for name in ("--model", "--train-file", "--output-dir", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    sizes = [1.0] if args.quick else [float(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="peftgen-data-scale-") as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "tiny-gpt2")
        for megabytes in sizes:
            corpus = tmp / f"corpus-{megabytes:g}mb.txt"
            t = time.perf_counter()
            lines = make_corpus(corpus, megabytes)
            print(
                f"{megabytes:g} MB: {lines:,} lines, {corpus.stat().st_size / 1e6:.1f} MB written in {time.perf_counter() - t:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            cache = tmp / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            paths = ["before", "after"] if megabytes <= args.before_up_to else ["after"]
            for path in paths:
                for run in ("first", "second"):
                    out = run_process(path, model, corpus, cache, tmp)
                    row = dict(size_mb=megabytes, lines=lines, path=path, run=run, **out)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            corpus.unlink()
            shutil.rmtree(cache, ignore_errors=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def table(rows: list[dict]) -> str:
    out = ["| corpus | lines | path | run | data s | to step 1 s | peak memory MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['size_mb']:g} MB | {r['lines']:,} | {r['path']} | {r['run']} | {r['data_s']:.1f} | {r['to_step_1_s']:.1f} | {r['peak_mb']:,.0f} |")
    imports = sorted(r["imports_s"] for r in rows)[len(rows) // 2]
    out.append(f"\n(imports before the clock starts: {imports:.1f} s, the median over the rows)")
    return "\n".join(out)


if __name__ == "__main__":
    main()
