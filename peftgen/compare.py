"""Every decoder on the same prompts and seeds, measured side by side: ``peftgen compare --model RUN``.

    from peftgen.compare import compare, table
    rows = compare("runs/lora", num_samples=20, options={"beam": {"num_beams": 3}})
    print(table(rows))

Per decoder: speed (new tokens per second), the share of samples that ended
at the stop token, their mean and longest length, distinct-1/distinct-2 and
the share of repeated 4-grams (diversity), the mean log-probability per token
of the samples under the model itself, and, given a judge model, their
perplexity under it. A decoder that fails gets a row with its error; the
others still run. The same seed gives the same table, speed aside.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peftgen.errors import PeftgenError
from peftgen.text_generation import DEFAULT_NEW_TOKENS  # as 'peftgen generate'


@dataclass
class Row:
    """One decoder's measurements over its samples; error is set (and the numbers None) if it failed."""

    decoder: str
    options: dict = field(default_factory=dict)  # every option it ran with, defaults included
    samples: int = 0
    tokens_per_second: float | None = None  # new tokens (stop tokens included) per second of generation
    eos_rate: float | None = None  # share of samples that ended at a stop token
    mean_length: float | None = None  # tokens per sample, stop token excluded
    max_length: int | None = None
    distinct_1: float | None = None  # unique / all n-grams over the decoder's samples
    distinct_2: float | None = None
    repeated_4grams: float | None = None  # 4-grams that repeat an earlier one of the same sample / all 4-grams
    mean_logprob: float | None = None  # log p per token under the model itself, stop tokens included
    judge_perplexity: float | None = None  # perplexity of the texts under --judge
    error: str | None = None
    texts: list[str] = field(default_factory=list, repr=False)  # the samples themselves

    def to_dict(self) -> dict:
        """The JSON object ``--json`` prints: every measurement and the options, not the texts."""
        data = asdict(self)
        del data["texts"]
        return data


# ---------------------------------------------------------------- metrics on token lists


def _ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[Hashable]], n: int) -> float | None:
    """Unique n-grams over all samples / all n-grams of the samples (Li et al., 2016); None if none."""
    grams = [gram for sample in samples for gram in _ngrams(sample, n)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngrams(samples: Sequence[Sequence[Hashable]], n: int = 4) -> float | None:
    """Share of n-grams that repeat an earlier n-gram of the same sample: the loops greedy and beam fall into."""
    repeats = total = 0
    for sample in samples:
        grams = _ngrams(sample, n)
        repeats += len(grams) - len(set(grams))
        total += len(grams)
    return repeats / total if total else None


def eos_rate(finish_reasons: Sequence[str]) -> float | None:
    return sum(reason == "stop" for reason in finish_reasons) / len(finish_reasons) if finish_reasons else None


def token_logprobs(model, context: Sequence[int], tokens: Sequence[int]) -> list[float]:
    """log p(tokens[i] | context + tokens[:i]) under model, one float per token."""
    import torch

    if not tokens:
        return []
    ids = torch.tensor([list(context) + list(tokens)], device=next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()  # (T, V): position t predicts t+1
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, ids[0, len(context) :, None]).squeeze(1).tolist()


def mean_logprob(model, context: Sequence[int], samples: Sequence[Sequence[int]]) -> float | None:
    """Token-weighted mean log-probability of the samples (each continuing context) under model."""
    scores = [score for sample in samples for score in token_logprobs(model, context, sample)]
    return sum(scores) / len(scores) if scores else None


def judge_perplexity(model, tokenizer, texts: Sequence[str]) -> float | None:
    """exp(mean negative log-likelihood per token) of the texts, retokenised for the judge model.

    Each text is scored after the judge's own bos (or eos, as GPT-2 has only that) so that its
    first token is predicted too; without either, from its second token on.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    limit = _context_length(model)
    scores = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        context, ids = ([start], ids) if start is not None else (ids[:1], ids[1:])
        scores += token_logprobs(model, context, ids[: limit - len(context)])
    return math.exp(-sum(scores) / len(scores)) if scores else None


def _context_length(model) -> int:
    """The model's context, or no limit where its config does not say."""
    from peftgen.model import context_length

    return context_length(model) or 10**9


# ---------------------------------------------------------------- running the decoders


def decoder_options(given: dict[str, str], names: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{"beam.num_beams": "3"}`` (from ``-o beam.num_beams=3``) into ``{"beam": {"num_beams": "3"}}``."""
    options: dict[str, dict[str, str]] = {}
    for key, value in given.items():
        name, dot, option = key.partition(".")
        if not dot or not name or not option:
            raise PeftgenError(f"-o {key}={value}: name the decoder, as in -o beam.num_beams=3 or -o topk.k=40.")
        if name not in names:
            raise PeftgenError(f"-o {key}={value} is for decoder '{name}', which is not compared. Compared: {', '.join(names)}.")
        options.setdefault(name, {})[option] = value
    return options


def select_decoders(decoders: str | Sequence[str], available: dict) -> list[str]:
    """'all', 'a,b' or a list of names into the names to compare, each checked."""
    from peftgen.plugins import get_decoder

    if isinstance(decoders, str):
        decoders = sorted(available) if decoders.strip() == "all" else [n.strip() for n in decoders.split(",") if n.strip()]
    if not decoders:
        raise PeftgenError("--decoders is empty. Pass 'all' or names such as greedy,topk.")
    for name in decoders:
        get_decoder(name, available)
    return list(dict.fromkeys(decoders))


def compare(
    model,
    tokenizer=None,
    *,
    decoders: str | Sequence[str] = "all",
    options: dict[str, dict] | None = None,
    prompts: Sequence[str] | None = None,
    num_samples: int = 20,
    max_new_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    judge=None,
    plugins: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """One Row per decoder, each from ``num_samples`` samples of the same prompts with the same seeds.

    :param model: a model, with its ``tokenizer``; or a path or Hub id that ``peftgen.model.load`` opens.
    :param decoders: "all" (every registered decoder), "greedy,topk", or a list of names.
    :param options: per decoder, its options: ``{"beam": {"num_beams": 3}}`` (strings are converted).
    :param prompts: texts the samples continue, used in turn; default the tokenizer's bos (<BOS> for a run).
    :param max_new_tokens: default 300, or fewer if the model's context is shorter.
    :param judge: a path or Hub id, or a ``(model, tokenizer)`` pair, to score the texts' perplexity with.
    :param plugins: plugin modules or .py files to load as well (``--plugin``).
    :param progress: called with a line before each decoder runs.
    """
    from peftgen import model as model_lib
    from peftgen import plugins as plugins_lib
    from peftgen.generation import build_decoder, check_request, resolved_options
    from peftgen.generation.text import default_prompt, encode_prompt, stop_token_ids

    if num_samples < 1:
        raise PeftgenError(f"--num-samples must be at least 1, got {num_samples}.")
    if batch_size < 1:
        raise PeftgenError(f"--batch-size must be at least 1, got {batch_size}.")
    plugins_lib.load_plugins(list(plugins))
    available = plugins_lib.get_decoders()
    names = select_decoders(decoders, available)
    options = {name: dict(given) for name, given in (options or {}).items()}
    for name in options:
        if name not in names:
            raise PeftgenError(f"Options are given for decoder '{name}', which is not compared. Compared: {', '.join(names)}.")
    # Options the user gave must be right: fail now, before any decoder has run.
    built, failed = {}, {}
    for name in names:
        try:
            built[name] = build_decoder(available[name].cls, options.get(name))
            check_request(built[name], 1, max_new_tokens or 1)
        except PeftgenError as error:
            if name in options:
                raise
            failed[name] = str(error)  # e.g. a plugin decoder with a required option: its row says so

    if tokenizer is None:
        model, tokenizer = model_lib.load(str(model))
    if judge is not None and not isinstance(judge, tuple):
        judge = model_lib.load(str(judge))
    texts = list(prompts or [default_prompt(tokenizer)])
    encoded = [encode_prompt(tokenizer, text) for text in texts]
    stops = stop_token_ids(tokenizer, None)
    pad = tokenizer.pad_token_id  # None: the engine pads with the first stop token
    if max_new_tokens is None:
        room = _context_length(model) - max(map(len, encoded))
        max_new_tokens = max(1, min(DEFAULT_NEW_TOKENS, room))
    # Sample i continues prompt i mod P: every decoder sees the same prompts in the same batches.
    order = [i % len(texts) for i in range(num_samples)]

    rows = []
    for name in names:
        if name in failed:
            rows.append(Row(name, error=failed[name]))
            continue
        if progress:
            progress(f"{name}: {num_samples} samples of at most {max_new_tokens} tokens")
        decoder = built[name]
        row = Row(name, resolved_options(decoder))
        try:
            _measure(row, model, tokenizer, decoder, encoded, order, stops, pad, max_new_tokens, seed, batch_size, judge)
        except Exception as error:  # a broken decoder is a row, not the end of the comparison
            rows.append(Row(name, row.options, error=str(error) if isinstance(error, PeftgenError) else f"{type(error).__name__}: {error}"))
            continue
        rows.append(row)
    return rows


def _measure(row, model, tokenizer, decoder, encoded, order, stops, pad, max_new_tokens, seed, batch_size, judge) -> None:
    from peftgen.generation import generate
    from peftgen.generation.text import completion_text, text_ids

    completions, seconds = [], 0.0
    for start in range(0, len(order), batch_size):
        prompts = [encoded[i] for i in order[start : start + batch_size]]
        tick = time.perf_counter()
        results = generate(model, prompts, decoder, max_new_tokens=max_new_tokens, stop_tokens=stops, pad_token_id=pad, seed=seed + start)
        seconds += time.perf_counter() - tick
        completions += [per_prompt[0] for per_prompt in results]
    # Text tokens: what the sample says, without the stop token that ended it.
    bodies = [text_ids(c) for c in completions]
    row.samples = len(completions)
    row.tokens_per_second = sum(len(c.token_ids) for c in completions) / seconds if seconds > 0 else None
    row.eos_rate = eos_rate([c.finish_reason for c in completions])
    row.mean_length = sum(map(len, bodies)) / len(bodies)
    row.max_length = max(map(len, bodies))
    row.distinct_1, row.distinct_2 = distinct_n(bodies, 1), distinct_n(bodies, 2)
    row.repeated_4grams = repeated_ngrams(bodies, 4)
    scores = [s for i, c in zip(order, completions) for s in token_logprobs(model, encoded[i], c.token_ids)]
    row.mean_logprob = sum(scores) / len(scores) if scores else None
    row.texts = [completion_text(tokenizer, c) for c in completions]
    if judge is not None:
        row.judge_perplexity = judge_perplexity(*judge, row.texts)


# ---------------------------------------------------------------- output

COLUMNS = [  # (heading, field, format)
    ("tokens/s", "tokens_per_second", "{:.1f}"),
    ("<EOS>", "eos_rate", "{:.0%}"),
    ("mean len", "mean_length", "{:.1f}"),
    ("max len", "max_length", "{}"),
    ("distinct-1", "distinct_1", "{:.3f}"),
    ("distinct-2", "distinct_2", "{:.3f}"),
    ("rep. 4-grams", "repeated_4grams", "{:.1%}"),
    ("log p/token", "mean_logprob", "{:.3f}"),
    ("judge ppl", "judge_perplexity", "{:.2f}"),
]


def table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The rows as an aligned text table (or a Markdown one); the judge column only if a row has it."""
    columns = [c for c in COLUMNS if c[1] != "judge_perplexity" or any(r.judge_perplexity is not None for r in rows)]
    header = ["decoder", *(c[0] for c in columns)]
    lines = []
    for row in rows:
        if row.error:
            lines.append([row.decoder, f"error: {row.error}"])
            continue
        cells = [row.decoder]
        for _, name, fmt in columns:
            value = getattr(row, name)
            cells.append("-" if value is None else fmt.format(value))
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
        for cells in lines:
            cells = cells + [""] * (len(header) - len(cells))
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        return "\n".join(out)
    widths = [max([len(header[i])] + [len(cells[i]) for cells in lines if len(cells) > 2]) for i in range(len(header))]
    widths[0] = max(len(cells[0]) for cells in [header, *lines])
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for cells in lines:
        if len(cells) == 2:
            out.append(f"{cells[0].ljust(widths[0])}  {cells[1]}")
        else:
            out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    return "\n".join(line.rstrip() for line in out)


def plot(rows: Sequence[Row], path: str | Path) -> Path:
    """One bar chart per measurement, decoders side by side, in one PNG."""
    from peftgen.plot import decoder_bars

    return decoder_bars(
        [r.decoder for r in rows if not r.error], {heading: [getattr(r, name) for r in rows if not r.error] for heading, name, _ in COLUMNS}, Path(path)
    )
