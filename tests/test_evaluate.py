"""Perplexity: token-weighted over every label token, padding excluded."""

import math

import pytest
import torch
import torch.nn.functional as F

from peftgen import data
from peftgen import model as model_lib
from peftgen.evaluation import evaluate


@pytest.fixture(scope="module")
def loaded(tiny_gpt2):
    return model_lib.load(tiny_gpt2, special_tokens=("<BOS>", "<EOS>", "<PAD>"))


def per_example_sums(model, tokenizer, file):
    """(sum of cross-entropy, label count) for each line, one line at a time: no padding anywhere."""
    out = []
    for ids in data.load_examples(file, tokenizer, 1024):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0, :-1]
        out.append((F.cross_entropy(logits, x[0, 1:], reduction="sum").item(), len(ids) - 1))
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_loss_is_token_weighted_and_independent_of_batching(loaded, text_files, batch_size):
    model, tokenizer = loaded
    sums = per_example_sums(model, tokenizer, text_files["train"])
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    result = evaluate(model, text_files["train"], tokenizer=tokenizer, batch_size=batch_size, progress=False)
    assert result.tokens == sum(n for _, n in sums)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_evaluate_reports_the_token_weighted_loss_not_the_mean_of_batch_means(make_run, tiny_gpt2, text_files):
    """Why peftgen does not report Trainer's eval_loss as the perplexity: once a model has
    learnt something, short and long lines have different mean losses. With batches of one
    line, Trainer's mean of batch means is the mean of the per-line means; evaluate() must
    report the token-weighted loss instead."""
    # Part way through learning its lines, short and long ones still differ (a run that has
    # learnt them all scores them alike).
    run = make_run("full", tiny_gpt2, max_steps=30, lr=2e-2, save_steps=30, logging_steps=10)
    model, tokenizer = model_lib.load(run)
    sums = per_example_sums(model, tokenizer, text_files["train"])
    token_weighted = sum(s for s, _ in sums) / sum(n for _, n in sums)
    mean_of_means = sum(s / n for s, n in sums) / len(sums)
    assert abs(token_weighted - mean_of_means) > 1e-3  # the two differ on this model and file
    result = evaluate(model, text_files["train"], tokenizer=tokenizer, batch_size=1, progress=False)
    assert result.loss == pytest.approx(token_weighted, rel=1e-5)
    assert abs(result.loss - mean_of_means) > 1e-3
    assert result.perplexity == pytest.approx(math.exp(token_weighted), rel=1e-5)
