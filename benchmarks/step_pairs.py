"""Paired timings of one training step under two or more sets of settings, in one process.

    python benchmarks/step_pairs.py --shape gpt2 --mode lora \\
        --variant 'recomputed={}' --variant 'kept={"keep_attention_probs": true}'

training_speed.py is the measure of the targets: each row in a fresh process,
whole epochs. But on the machines this project is measured on, runs of the
same code differ by about 5% from one process to the next, more than many
single changes are worth. This script builds one model per variant through
``peftgen.train`` itself (everything it sets up, up to the trainer's loop),
takes the epoch's largest batch, and times forward + loss + backward of each
variant in turn, round after round, so that the machine's drift falls on all
of them alike. It prints each variant's median step and its ratio to the
first variant's. The optimizer step is left out: it is the same for every
variant of one mode.

Settings that change the process rather than the model (``lean_malloc``,
``reuse_memory``) cannot differ between variants here: compare those with
training_speed.py. The steps are timed with glibc keeping freed blocks
(``reuse_memory``) where the mode's training does so by default (full,
lora), for every variant alike; ``lean_malloc`` is never in effect.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import training_speed  # noqa: E402  (its model shapes and data)

PROCESS_SETTINGS = ("lean_malloc", "reuse_memory")


class _Built(Exception):
    """Raised from the trainer's loop once the model and the trainer are built: the step is timed here instead."""

    def __init__(self, trainer):
        self.trainer = trainer


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, settings = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--variant takes NAME=JSON, e.g. 'kept={{\"keep_attention_probs\": true}}'; got {text!r}")
    try:
        overrides = json.loads(settings or "{}")
    except json.JSONDecodeError as error:
        raise SystemExit(f'--variant {name}: the settings are not JSON ({error}); e.g. {{"fused_lora": false}}') from None
    if not isinstance(overrides, dict):
        raise SystemExit(f"--variant {name}: the settings must be a JSON object, got {settings!r}")
    shared = sorted(set(overrides) & set(PROCESS_SETTINGS))
    if shared:
        raise SystemExit(f"--variant {name}: {', '.join(shared)} change the process, not the model; compare them with training_speed.py")
    return name.strip(), overrides


def build(model_dir: Path, files: dict, mode: str, overrides: dict, output: Path):
    """The trainer peftgen.train builds for these settings, its loop never started."""
    from peftgen import training

    config = training_speed.peftgen_config(model_dir, files["train"], mode, overrides, output)
    original = training.PeftgenTrainer.train

    def stop(self, *args, **kwargs):
        raise _Built(self)

    training.PeftgenTrainer.train = stop
    try:
        training.train(config, overwrite=True, progress=False)
    except _Built as built:
        return built.trainer
    finally:
        training.PeftgenTrainer.train = original
    raise RuntimeError("peftgen.train returned without starting its trainer")


def label_count(batch) -> int:
    from peftgen.data import IGNORE_INDEX

    return int((batch["labels"] != IGNORE_INDEX).sum())


def largest_batch(trainer) -> dict:
    return max(trainer.get_train_dataloader(), key=label_count)


def step_function(trainer, batch):
    """Forward + loss + backward of batch, as the trainer's training_step computes them."""
    import torch

    model = trainer.model
    model.train()
    batch = trainer._prepare_inputs(batch)
    count = torch.tensor(label_count(batch))

    def step() -> None:
        with trainer.accelerator.autocast():
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def time_pairs(steps: dict, rounds: int, per_round: int, reuse_memory: bool = False) -> dict[str, list[float]]:
    import contextlib

    from peftgen import efficiency

    seconds = {name: [] for name in steps}
    with efficiency.reusing_freed_memory() if reuse_memory else contextlib.nullcontext():
        _time_rounds(steps, rounds, per_round, seconds)
    return seconds


def _time_rounds(steps: dict, rounds: int, per_round: int, seconds: dict[str, list[float]]) -> None:
    for _ in range(rounds):
        for name, step in steps.items():
            step()  # warm: the first step after another variant's pays for its memory
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            seconds[name].append((time.perf_counter() - start) / per_round)


def report(seconds: dict[str, list[float]]) -> str:
    first = statistics.median(next(iter(seconds.values())))
    lines = [f"{'variant':24} {'median ms':>10} {'vs first':>9}  every round (ms)"]
    for name, times in seconds.items():
        median = statistics.median(times)
        lines.append(f"{name:24} {median * 1e3:10.1f} {first / median:8.3f}x  {' '.join(f'{t * 1e3:.0f}' for t in times)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="gpt2", choices=sorted(training_speed.SHAPES))
    parser.add_argument("--mode", default="lora", choices=("full", "lora", "8bit"))
    parser.add_argument("--variant", action="append", default=[], help="NAME=JSON settings; two or more; the first is the reference")
    parser.add_argument("--rounds", type=int, default=8, help="rounds; each times every variant in turn (default 8)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps of each variant per round (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 6 training pieces: a smoke test of this script")
    args = parser.parse_args(argv)
    variants = dict(parse_variant(text) for text in args.variant)
    if len(variants) < 2:
        parser.error("give two or more --variant NAME=JSON (the first is the reference)")
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps are at least 1")
    with tempfile.TemporaryDirectory(prefix="peftgen-pairs-") as scratch:
        work = Path(scratch)
        shape = "tiny" if args.quick else args.shape
        model_dir = training_speed.build_model(shape, work / "model")
        files = training_speed.build_data(work, 6 if args.quick else 24, 2 if args.quick else 8)
        steps = {}
        for index, (name, overrides) in enumerate(variants.items()):
            trainer = build(model_dir, files, args.mode, overrides, work / f"run-{index}")
            batch = largest_batch(trainer)
            steps[name] = step_function(trainer, batch)
        tokens = label_count(batch)
        print(f"{training_speed.machine()}")
        print(f"{shape} {args.mode}: one step of the epoch's largest batch ({tokens} label tokens), forward + loss + backward")
        print(report(time_pairs(steps, args.rounds, args.steps, reuse_memory=args.mode in ("full", "lora"))))


if __name__ == "__main__":
    main()
