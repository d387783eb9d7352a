"""Conformance checks for decoder plugins, to call from your own tests.

    from peftgen.testing import check_decoder
    from peftgen_minp import MinP

    def test_minp_conforms():
        check_decoder(MinP)               # defaults
        check_decoder(MinP, p_min=0.2)    # and any options worth covering

Each check raises AssertionError saying what is wrong. They run in a second
or two on a tiny random model built in memory (no downloads). A check that
cannot apply to a decoder says so with a ``ConformanceWarning`` (pytest lists
it in its warnings summary). The built-in decoders pass them; see
tests/test_decoders.py.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from peftgen.generation.decoder import DecodeContext, DecodingEngine, SequenceDecoder, TokenDecoder
from peftgen.generation.engine import Engine, generate
from peftgen.generation.options import build_decoder, convert, decoder_options

VOCAB = 96
PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]  # different lengths, so batches are left-padded
MAX_NEW = 12


class ConformanceWarning(UserWarning):
    """A check of the kit could not apply to the decoder; the message says which and why."""


def check_decoder(cls: type, **options: Any) -> None:
    """Every check that applies to ``cls`` (a TokenDecoder or SequenceDecoder), built with ``options``."""
    check_class(cls)
    decoder = build_decoder(cls, options)
    if isinstance(decoder, TokenDecoder):
        check_select_shape(decoder)
        check_select_batch_of_one(decoder)
    else:
        check_engine_contract(decoder)
    check_seeded_determinism(decoder)
    check_batch_of_one(decoder)
    check_stop_tokens(decoder)


def check_class(cls: type) -> None:
    """A name, a docstring, and options whose defaults survive the -o string conversion."""
    assert isinstance(cls, type) and issubclass(cls, (TokenDecoder, SequenceDecoder)), f"{cls!r} must subclass peftgen.TokenDecoder or peftgen.SequenceDecoder"
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


def check_engine_contract(decoder: SequenceDecoder) -> None:
    """decode() uses only the engine members ``DecodingEngine`` lists, and through them alone gives what generate gives."""
    n = _returns(decoder)
    expected = _run(decoder, seed=0, matmul_layout="standard")
    try:
        results = decode_with_contract_only(decoder, tiny_model(), PROMPTS, num_return_sequences=n, max_new_tokens=MAX_NEW)
    except ContractError as error:
        raise AssertionError(f"decode() {error}") from None
    results = [list(per_prompt)[:n] for per_prompt in results]
    assert _tokens(results) == _tokens(expected), (
        f"through an engine with only DecodingEngine's members decode() gave\n{results}\nbut generate gave\n{expected}"
    )


def check_batch_of_one(decoder) -> None:
    """Prompts of different lengths in one batch give what each gives alone.

    A deterministic decoder is compared as it runs. A sampling decoder draws all the rows of a
    batch from the one seeded generator, so a row's draws depend on the rows before it: the
    engine keeps each row's logits independent of the batch, not its draws. A sampling
    TokenDecoder is therefore compared with a generator per row: select() is called on each
    row alone with that row's own generator, in the batch and for the prompt alone, which must
    agree (this checks how select() reads ctx.tokens and ctx.attention_mask under left padding).
    A sampling SequenceDecoder draws through engine.generator itself; it is skipped with a
    ConformanceWarning saying so.
    """
    batch = _run(decoder, seed=0)
    if _tokens(batch) == _tokens(_run(decoder, seed=1)):
        _check_prompts_alone(batch, lambda i, prompt: _run(decoder, seed=0, prompts=[prompt])[0])
    elif isinstance(decoder, TokenDecoder):
        n = _returns(decoder)
        per_row = _run(RowByRow(decoder, seeds=range(len(PROMPTS) * n)), seed=0)
        _check_prompts_alone(
            per_row,
            lambda i, prompt: _run(RowByRow(decoder, seeds=range(i * n, (i + 1) * n)), seed=0, prompts=[prompt])[0],
            how="with a generator per row ",
            hint="; select() must read only its own row of ctx.tokens, and only where ctx.attention_mask is 1 "
            "(prompts in a batch are left-padded, so ctx.tokens.shape[1] and ctx.prompt_length include padding)",
        )
    else:
        warnings.warn(
            f"check_batch_of_one skipped for decoder '{decoder.name}': its completions change with the seed, and a "
            "sequence decoder draws every row of a batch from the one engine.generator, so a prompt's completions in "
            "a batch and alone are different draws that cannot be compared token for token.",
            ConformanceWarning,
            stacklevel=2,
        )


def _check_prompts_alone(batch, alone_of, how: str = "", hint: str = "") -> None:
    """Each prompt's completions in ``batch`` equal ``alone_of(i, prompt)``, its completions generated alone."""
    for i, prompt in enumerate(PROMPTS):
        alone = alone_of(i, prompt)
        assert _tokens([batch[i]]) == _tokens([alone]), f"prompt {i} {how}gives {batch[i]} in a batch but {alone} alone{hint}"
        for in_batch, single in zip(batch[i], alone):  # padding may move scores in the last float bits only
            if in_batch.score is not None:
                close = abs(in_batch.score - single.score) <= 1e-4 * max(1.0, abs(single.score))
                assert close, f"prompt {i}: score {in_batch.score} in a batch, {single.score} alone"


def check_stop_tokens(decoder) -> None:
    """A stop token ends a completion right after it; the rest of the completion is what it was without it."""
    free = _run(decoder, seed=0)
    first = free[0][0].token_ids
    # A stop token that first appears mid-way through the first completion (its first token if it never changes).
    position = next((i for i in range(1, len(first)) if first[i] not in first[:i]), 0)
    stop = first[position]
    stopped = _run(decoder, seed=0, stop_tokens=[stop])
    for p, completions in enumerate(stopped):
        for completion in completions:
            ids = completion.token_ids
            if completion.finish_reason == "stop":
                ends_at_stop = ids and ids[-1] == stop and stop not in ids[:-1]
                assert ends_at_stop, f"prompt {p}: finish 'stop' but token_ids {ids} do not end at the first stop token {stop}"
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

        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2, initializer_range=0.3, bos_token_id=0, eos_token_id=0)
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
    config = GPT2Config(
        vocab_size=V, n_embd=D, n_layer=1, n_head=1, n_positions=P or 256, tie_word_embeddings=False, layer_norm_epsilon=0.0, bos_token_id=0, eos_token_id=0
    )
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


class ContractError(AttributeError):
    """A decoder used a member of the engine that ``DecodingEngine`` does not list."""


ENGINE_MEMBERS = frozenset(
    [*DecodingEngine.__annotations__, *(name for name, value in vars(DecodingEngine).items() if callable(value) and not name.startswith("_"))]
)


class ContractEngine:
    """A read-only view of an engine offering only the members ``DecodingEngine`` lists."""

    def __init__(self, engine):
        object.__setattr__(self, "_engine", engine)

    def __getattr__(self, name):
        if name not in ENGINE_MEMBERS:
            raise ContractError(
                f"used engine.{name}, which is not part of the decoder contract; a SequenceDecoder may use only "
                f"what peftgen.generation.DecodingEngine lists: {', '.join(sorted(ENGINE_MEMBERS))}"
            )
        return getattr(self._engine, name)

    def __setattr__(self, name, value):
        raise ContractError(f"set engine.{name}; a SequenceDecoder only reads the engine's attributes")


def decode_with_contract_only(decoder: SequenceDecoder, model, prompts, *, num_return_sequences: int = 1, **engine_options):
    """``decoder.decode`` on an engine that offers only ``DecodingEngine``'s members (``ContractError`` otherwise).

    The engine is the one ``generate(..., matmul_layout="standard")`` builds; ``engine_options``
    are its keyword arguments (``max_new_tokens``, ``stop_tokens``, ``pad_token_id``, ``seed``).
    """
    with torch.inference_mode():
        engine = Engine(model, prompts, **engine_options)
        return decoder.decode(ContractEngine(engine), num_return_sequences)


class RowByRow(TokenDecoder):
    """Runs a TokenDecoder's select() on one row at a time, each row with its own seeded generator.

    Row ``i`` of every step is selected alone (a ``(1, V)`` slice of the logits and of ``ctx``)
    with the generator seeded ``seeds[i]``: what row ``i`` draws no longer depends on the rows
    before it, so a row of a batch and the same prompt alone can be compared token for token.
    """

    def __init__(self, decoder: TokenDecoder, seeds):
        self.decoder, self.seeds, self.generators = decoder, list(seeds), None
        self.name = decoder.name  # errors name the decoder under test

    def select(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=logits.device).manual_seed(seed) for seed in self.seeds]
        assert logits.shape[0] == len(self.generators), f"{logits.shape[0]} rows, {len(self.generators)} seeds"
        rows = []
        for i, generator in enumerate(self.generators):
            row = DecodeContext(generator, ctx.tokens[i : i + 1], ctx.attention_mask[i : i + 1], ctx.step, ctx.prompt_length)
            rows.append(self.decoder.select(logits[i : i + 1], row))  # (1,)
        return torch.cat(rows)  # (N,)


def _returns(decoder) -> int:
    """Completions per prompt the kit asks for: 2, or 1 where a sequence decoder refuses 2."""
    if isinstance(decoder, SequenceDecoder):
        try:
            decoder.validate(2)
        except ValueError:
            return 1
    return 2


def _run(decoder, *, seed: int, prompts=PROMPTS, stop_tokens=(), matmul_layout="skinny"):
    return generate(
        tiny_model(),
        prompts,
        decoder,
        max_new_tokens=MAX_NEW,
        num_return_sequences=_returns(decoder),
        stop_tokens=stop_tokens,
        seed=seed,
        matmul_layout=matmul_layout,
    )


def _tokens(results) -> list:
    return [[(c.token_ids, c.finish_reason) for c in completions] for completions in results]


def _logits(batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, VOCAB, generator=generator) * 3  # (B, V) float32


def _context(batch: int, seed: int):
    tokens = torch.arange(batch * 3).view(batch, 3) % VOCAB
    return DecodeContext(torch.Generator().manual_seed(seed), tokens, torch.ones_like(tokens), step=0, prompt_length=3)
