"""Perplexity of a model on a file of examples: ``peftgen eval --model RUN --file test.txt``, or::

    result = peftgen.evaluate("runs/lora", "data/test.txt")      # result.loss, .perplexity, .tokens
    result = peftgen.evaluate(model, "data/test.txt", tokenizer=tokenizer)   # a model already loaded

The loss here is token-weighted: the sum of the cross-entropy of every label
token in the file divided by the number of label tokens (padding excluded),
and perplexity = exp(loss). ``Trainer``'s ``eval_loss`` is instead the mean
of per-batch means, which gives the tokens of short batches more weight; the
two agree only when every batch holds the same number of label tokens. The
token-weighted number is the one comparable across batch sizes and papers.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from peftgen import corpus, data
from peftgen import precision as precision_lib
from peftgen.config import MAX_BATCH, MAX_COUNT
from peftgen.errors import PeftgenError

DEFAULT_CONTEXT = 1024  # examples are cut here when the model's config does not say its context


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per label token, nats
    perplexity: float  # exp(loss)
    tokens: int  # label tokens scored

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model,
    file: str | Path | corpus.Source,
    *,
    tokenizer=None,
    batch_size: int = 4,
    max_length: int | None = None,
    precision: str = "fp32",
    progress: bool = True,
    text_field: str = "text",
    split: str | None = None,
) -> EvalResult:
    """Token-weighted loss and perplexity of a model on file (any format corpus reads), tokenised as in training.

    model: a run folder, model folder, .gguf file or Hub id, loaded here; or a
    model already loaded, with its tokenizer. A run is scored at the run's own
    max_length unless one is given. A model that is not a peftgen run gets the
    default <BOS>/<EOS>/<PAD> markers, untrained (said on stderr when progress
    is on): the baseline a trained run is compared against.
    precision: fp32 (the reference numbers), bf16 or auto.
    """
    if not 1 <= batch_size <= MAX_BATCH:
        raise PeftgenError(f"--batch-size must be between 1 and {MAX_BATCH}, got {batch_size}.")
    if max_length is not None and not 3 <= max_length <= MAX_COUNT:
        raise PeftgenError(f"--max-length must leave room for <BOS>, text and <EOS> (at least 3), got {max_length}.")
    precision = precision_lib.resolve(precision)
    source = file if isinstance(file, corpus.Source) else corpus.describe(file, "evaluation file", text_field, split)
    if isinstance(model, (str, os.PathLike)):  # a bad file has failed above, before the model loads
        model, tokenizer, max_length = _load(model, max_length, progress)
    elif tokenizer is None:
        raise TypeError("evaluate(): a loaded model needs its tokenizer= (or pass a model folder, run or Hub id).")
    return _score(model, tokenizer, source, batch_size, max_length, precision, progress)


def _load(source: str | os.PathLike, max_length: int | None, progress: bool):
    """The model and tokenizer to score, and the max_length: the run's own where none is given."""
    from peftgen import model as model_lib
    from peftgen import runs
    from peftgen.markers import MARKERS
    from peftgen.run_files import read_run_config, run_folder

    path = Path(source).expanduser()
    run = run_folder(path) if path.is_dir() else None
    special = None
    if run is not None:
        saved = read_run_config(run).get("max_length")
        max_length = max_length or (saved if isinstance(saved, int) and saved >= 3 else None)
    else:
        special = MARKERS
        if progress:
            runs.note(f"{source} is not a peftgen run; scoring it with {'/'.join(special)} as its bos/eos/pad (added untrained where missing).")
    model, tokenizer = model_lib.load(source, special_tokens=special)
    return model, tokenizer, max_length


@torch.inference_mode()
def _score(model, tokenizer, source: corpus.Source, batch_size: int, max_length: int | None, precision: str, progress: bool) -> EvalResult:
    from peftgen.model import context_length

    limit = context_length(model) or DEFAULT_CONTEXT
    max_length = min(max_length or limit, limit)
    examples = corpus.tokenize(source, tokenizer, max_length).open()  # memory-mapped from the cache
    # Longest first: similar lengths share a batch (less padding), and an
    # out-of-memory error, if any, comes at once rather than at the end.
    # A stable sort of the negated lengths keeps equal lengths in file order.
    order = np.argsort(-corpus.lengths(examples), kind="stable").tolist()
    collate = data.PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        batch = collate([{"input_ids": ids} for ids in examples[order[start : start + batch_size]]["input_ids"]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with precision_lib.autocast(precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # position t predicts token t+1
        logits = logits[:, :-1].float()  # (B, T-1, V)
        labels = batch["labels"][:, 1:]  # (B, T-1)
        total_loss += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=data.IGNORE_INDEX, reduction="sum").item()
        total_tokens += int((labels != data.IGNORE_INDEX).sum())
    loss = total_loss / total_tokens
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=total_tokens)
