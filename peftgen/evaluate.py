"""Perplexity of a model on a file of examples: ``peftgen eval --model RUN --file test.txt``.

The loss here is token-weighted: the sum of the cross-entropy of every label
token in the file divided by the number of label tokens (padding excluded),
and perplexity = exp(loss). ``Trainer``'s ``eval_loss`` is instead the mean
of per-batch means, which gives the tokens of short batches more weight; the
two agree only when every batch holds the same number of label tokens. The
token-weighted number is the one comparable across batch sizes and papers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from peftgen import corpus, data, precision as precision_lib


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per label token, nats
    perplexity: float  # exp(loss)
    tokens: int  # label tokens scored

    def to_dict(self) -> dict:
        return asdict(self)


def context_length(model, default: int = 1024) -> int:
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return default


@torch.inference_mode()
def evaluate(
    model,
    tokenizer,
    file: str | Path | corpus.Source,
    *,
    batch_size: int = 4,
    max_length: int | None = None,
    precision: str = "fp32",
    progress: bool = True,
    text_field: str = "text",
    split: str | None = None,
) -> EvalResult:
    """Token-weighted loss and perplexity of model on file (any format corpus reads), tokenised as in training."""
    max_length = min(max_length or context_length(model), context_length(model))
    source = file if isinstance(file, corpus.Source) else corpus.describe(file, "evaluation file", text_field, split)
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
        total_loss += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=data.IGNORE_INDEX, reduction="sum"
        ).item()
        total_tokens += int((labels != data.IGNORE_INDEX).sum())
    loss = total_loss / total_tokens
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=total_tokens)
