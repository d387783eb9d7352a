"""Conformance checks for decoder plugins, to call from your own tests.

    from peftgen.testing import check_decoder
    from peftgen_minp import MinP

    def test_minp_conforms():
        check_decoder(MinP)               # defaults
        check_decoder(MinP, p_min=0.2)    # and any options worth covering

Each check raises AssertionError saying what is wrong. They run in a second
or two on a tiny random model built in memory (no downloads). The built-in
decoders pass them; see tests/test_decoders.py.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from peftgen.generation.decoder import SequenceDecoder, TokenDecoder
from peftgen.generation.engine import generate
from peftgen.generation.options import build_decoder, convert, decoder_options

VOCAB = 96
PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]  # different lengths, so batches are left-padded
MAX_NEW = 12


def check_decoder(cls: type, **options: Any) -> None:
    """Every check that applies to ``cls`` (a TokenDecoder or SequenceDecoder), built with ``options``."""
    check_class(cls)
    decoder = build_decoder(cls, options)
    if isinstance(decoder, TokenDecoder):
        check_select_shape(decoder)
        check_select_batch_of_one(decoder)
    check_seeded_determinism(decoder)
    check_batch_of_one(decoder)
    check_stop_tokens(decoder)


def check_class(cls: type) -> None:
    """A name, a docstring, and options whose defaults survive the -o string conversion."""
    assert isinstance(cls, type) and issubclass(cls, (TokenDecoder, SequenceDecoder)), (
        f"{cls!r} must subclass peftgen.TokenDecoder or peftgen.SequenceDecoder"
    )
    assert isinstance(cls.name, str) and cls.name, f"{cls.__name__} needs a class attribute name = '...' (what --decoder takes)"
    assert cls.__doc__ and cls.__doc__.strip() and cls.__doc__ not in (TokenDecoder.__doc__, SequenceDecoder.__doc__), (
        f"{cls.__name__} needs a docstring: 'peftgen decoders' shows it"
    )
    for option in decoder_options(cls):
        if option.required:
            continue
        text = str(option.default).lower() if isinstance(option.default, bool) else str(option.default)
        try:
            value = convert(text, option.annotation)
        except ValueError as error:
            raise AssertionError(
                f"{cls.__name__} option {option.name}: -o {option.name}={text} (its default) does not convert "
                f"as {option.type_label}: {error}. Annotate it with the type of its default."
            ) from None
        assert value == option.default, f"{cls.__name__} option {option.name}: '{text}' converts to {value!r}, not the default {option.default!r}"


def check_select_shape(decoder: TokenDecoder) -> None:
    """select() returns (B,) int64 ids in range, never a token whose logit is -inf."""
    logits = _logits(batch=4)
    logits[:, ::2] = float("-inf")  # e.g. tokens masked by an earlier rule
    chosen = decoder.select(logits.clone(), _context(batch=4, seed=0))
    assert isinstance(chosen, torch.Tensor), f"select() returned {type(chosen).__name__}, expected a torch.Tensor"
    assert chosen.shape == (4,), f"select() returned shape {tuple(chosen.shape)} for logits (4, {VOCAB}); expected (4,)"
    assert chosen.dtype == torch.int64, f"select() returned {chosen.dtype}; expected torch.int64 token ids"
    assert 0 <= int(chosen.min()) and int(chosen.max()) < VOCAB, f"select() returned ids outside [0, {VOCAB}): {chosen.tolist()}"
    picked = logits.gather(1, chosen[:, None]).squeeze(1)
    assert torch.isfinite(picked).all(), f"select() picked tokens whose logit is -inf: {chosen.tolist()}"


def check_select_batch_of_one(decoder: TokenDecoder) -> None:
    """Row 0 of a batch equals a batch of that row alone, however different the other rows are."""
    logits = _logits(batch=4)
    logits[1:] *= torch.tensor([[0.1], [10.0], [3.0]])  # other rows on other scales
    logits[2, 5] = 50.0  # and one very confident row
    for seed in range(5):
        batch = decoder.select(logits.clone(), _context(batch=4, seed=seed))
        alone = decoder.select(logits[:1].clone(), _context(batch=1, seed=seed))
        assert int(batch[0]) == int(alone[0]), (
            f"seed {seed}: row 0 of a batch chose {int(batch[0])}, the same row alone chose {int(alone[0])}; "
            "select() must treat rows independently (reduce over dim=-1, keepdim=True) and draw from ctx.generator"
        )


def check_seeded_determinism(decoder) -> None:
    """The same seed gives the same completions (all randomness comes from ctx.generator)."""
    first, again = _run(decoder, seed=3), _run(decoder, seed=3)
    assert _tokens(first) == _tokens(again), f"two runs with seed 3 differ:\n{first}\n{again}\nDraw randomness only from ctx.generator."


def check_batch_of_one(decoder) -> None:
    """Prompts of different lengths in one batch give what each gives alone (for deterministic decoders)."""
    batch = _run(decoder, seed=0)
    if _tokens(batch) != _tokens(_run(decoder, seed=1)):
        return  # a sampling decoder: the batch's rows share the random stream, see check_select_batch_of_one
    for i, prompt in enumerate(PROMPTS):
        alone = _run(decoder, seed=0, prompts=[prompt])[0]
        assert _tokens([batch[i]]) == _tokens([alone]), f"prompt {i} gives {batch[i]} in a batch but {alone} alone"
        for in_batch, single in zip(batch[i], alone):  # padding may move scores in the last float bits only
            if in_batch.score is not None:
                assert abs(in_batch.score - single.score) <= 1e-4 * max(1.0, abs(single.score)), f"prompt {i}: score {in_batch.score} in a batch, {single.score} alone"


def check_stop_tokens(decoder) -> None:
    """A stop token ends a completion right after it; the rest of the completion is what it was without it."""
    free = _run(decoder, seed=0)
    first = free[0][0].token_ids
    # A stop token that first appears mid-way through the first completion.
    position = next((i for i in range(1, len(first)) if first[i] not in first[:i]), None)
    if position is None:
        return  # a constant completion: nothing to stop mid-way
    stop = first[position]
    stopped = _run(decoder, seed=0, stop_tokens=[stop])
    for p, completions in enumerate(stopped):
        for completion in completions:
            ids = completion.token_ids
            if completion.finish_reason == "stop":
                assert ids and ids[-1] == stop and stop not in ids[:-1], f"prompt {p}: finish 'stop' but token_ids {ids} do not end at the first stop token {stop}"
            else:
                assert completion.finish_reason == "length", f"prompt {p}: finish_reason {completion.finish_reason!r}, expected 'stop' or 'length'"
                assert stop not in ids, f"prompt {p}: generation went on past the stop token {stop}: {ids}"
                assert len(ids) == MAX_NEW, f"prompt {p}: finish 'length' after {len(ids)} tokens, max_new_tokens is {MAX_NEW}"
    if isinstance(decoder, TokenDecoder):
        expected = first[: position + 1]
        assert stopped[0][0].token_ids == expected, f"with stop token {stop}: {stopped[0][0].token_ids}, expected {expected}"
        assert stopped[0][0].finish_reason == "stop"


@contextlib.contextmanager
def isolated_plugins():
    """A fresh plugin manager for the duration; whatever is registered inside is forgotten after.

        with isolated_plugins() as pm:
            pm.register(MyPlugin(), name="mine")
            ...  # get_decoders() and the CLI see built-ins, installed plugins and "mine"
    """
    from peftgen import plugins

    saved = plugins.pm, plugins._loaded, plugins._sources
    plugins.pm, plugins._loaded, plugins._sources = plugins._new_manager(), False, {}
    try:
        plugins.load_plugins()
        yield plugins.pm
    finally:
        plugins.pm, plugins._loaded, plugins._sources = saved


def tiny_model():
    """A 1-layer GPT-2 with a 96-token vocabulary and peaked (large-init) weights, built in memory."""
    global _MODEL
    if _MODEL is None:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2, initializer_range=0.3,
            bos_token_id=0, eos_token_id=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _MODEL = GPT2LMHeadModel(config).eval()
    return _MODEL


_MODEL = None


def bigram_model(table: torch.Tensor, position_bias: torch.Tensor | None = None):
    """A GPT-2 whose next-token logits are ``table[:, last_token] + position_bias[:, position]``.

    ``table`` is ``(V, V)``: ``table[j, i]`` is the logit of token j after token i;
    ``position_bias`` is ``(V, P)`` (optional; the model's context is then P positions). A model with the distributions
    you choose, for sequence decoders, whose bookkeeping only shows when hypotheses of different
    lengths compete. (A pure bigram scores two orderings of the same transitions equally, an exact
    tie; a position bias breaks such ties.)

    How: one-hot token and position embeddings in D = V + P + 1 dimensions and blocks that add
    zero, so the final layer norm sees ``x = e_i + e_(V+p)``: ``h = (x - mu) / sigma + beta * e_(D-1)``
    with ``mu = 2/D`` (``x = e_i`` and ``mu = 1/D`` without a position bias). Head columns ``sigma * table`` and ``sigma * position_bias`` give
    ``table[j, i] + position_bias[j, p] - mu * (row sums)``; the last column, times
    ``beta - mu/sigma``, adds the row sums back.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    V = table.shape[0]
    P = 0 if position_bias is None else position_bias.shape[1]
    D = V + P + 1
    config = GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=1, n_positions=P or 256, tie_word_embeddings=False,
                        layer_norm_epsilon=0.0, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        model = GPT2LMHeadModel(config).eval()
    ones = 2 if P else 1  # ones in x: the token's, and the position's if there is a bias
    mu, beta = ones / D, 1.0
    sigma = (ones / D - mu**2) ** 0.5
    position_bias = torch.zeros(V, 0) if position_bias is None else position_bias
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.transformer.wte.weight[:, :V] = torch.eye(V)
        model.transformer.wpe.weight[:P, V : V + P] = torch.eye(P)
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias[D - 1] = beta
        head = model.lm_head.weight  # (V, D)
        head[:, :V] = sigma * table
        head[:, V : V + P] = sigma * position_bias
        head[:, D - 1] = mu * (table.sum(dim=1) + position_bias.sum(dim=1)) / (beta - mu / sigma)
    return model


def _run(decoder, *, seed: int, prompts=PROMPTS, stop_tokens=()):
    n = 2
    if isinstance(decoder, SequenceDecoder):
        try:
            decoder.validate(n)
        except ValueError:
            n = 1
    return generate(tiny_model(), prompts, decoder, max_new_tokens=MAX_NEW, num_return_sequences=n, stop_tokens=stop_tokens, seed=seed)


def _tokens(results) -> list:
    return [[(c.token_ids, c.finish_reason) for c in completions] for completions in results]


def _logits(batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, VOCAB, generator=generator) * 3  # (B, V) float32


def _context(batch: int, seed: int):
    from peftgen.generation.decoder import DecodeContext

    tokens = torch.arange(batch * 3).view(batch, 3) % VOCAB
    return DecodeContext(torch.Generator().manual_seed(seed), tokens, torch.ones_like(tokens), step=0, prompt_length=3)
