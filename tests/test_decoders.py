"""The built-in decoders: each passes the conformance kit, samples only from its allowed set,
repeats under a seed, and draws with the probabilities it promises (chi-square). And the kit
fails decoders that break the rules, sampling ones included."""

from __future__ import annotations

import math

import pytest
import torch

from peftgen import Completion, SequenceDecoder, TokenDecoder
from peftgen.decoders.beam import BeamSearch
from peftgen.decoders.greedy import Greedy
from peftgen.decoders.topk import TopK
from peftgen.decoders.topp import TopP
from peftgen.errors import PeftgenError
from peftgen.generation import build_decoder, generate
from peftgen.generation.decoder import DecodeContext
from peftgen.testing import ConformanceWarning, check_decoder, check_stop_tokens, tiny_model


@pytest.mark.parametrize(
    "cls, options",
    [
        (Greedy, {}),
        (TopK, {}),
        (TopK, {"k": 3, "temperature": 0.5}),
        (TopK, {"k": 50, "p": 0.9}),
        (TopP, {}),
        (TopP, {"p": 0.3, "temperature": 2.0}),
        (BeamSearch, {}),
        (BeamSearch, {"num_beams": 3, "length_penalty": -1.0, "early_stopping": "never"}),
        (BeamSearch, {"num_beams": 2, "early_stopping": True}),
        (BeamSearch, {"num_beams": 3, "no_repeat_ngram_size": 2}),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else value.name,
)
def test_builtins_pass_the_conformance_kit(cls, options):
    check_decoder(cls, **options)


# ---------------------------------------------------------------- the kit fails broken decoders


class ContextTempered(TokenDecoder):
    """Samples with a temperature that grows with the context, which it measures wrongly:
    ctx.tokens.shape[1] counts the left padding of a batch too."""

    name = "context-tempered"

    def temperature(self, ctx: DecodeContext):
        return 0.5 + 0.1 * ctx.tokens.shape[1]

    def select(self, logits, ctx):
        probs = torch.softmax(logits / self.temperature(ctx), dim=-1)  # (B, V)
        return torch.multinomial(probs, 1, generator=ctx.generator).squeeze(-1)  # (B,)


class ContextTemperedFixed(ContextTempered):
    """The same, with each row's context measured by its attention mask."""

    name = "context-tempered-fixed"

    def temperature(self, ctx: DecodeContext):
        return 0.5 + 0.1 * ctx.attention_mask.sum(dim=-1, keepdim=True)  # (B, 1), padding excluded


def test_a_sampling_decoder_that_reads_the_padding_fails_the_kit():
    """Each step treats rows alike and draws only from ctx.generator, so the step-level checks
    pass; only generating a batch row by row, each row with its own generator, shows that a
    prompt's samples depend on the other prompts of its batch."""
    with pytest.raises(
        AssertionError,
        match=r"prompt 1 with a generator per row gives .* in a batch but .* alone; "
        r"select\(\) must read only its own row",
    ):
        check_decoder(ContextTempered)
    check_decoder(ContextTemperedFixed)


class SampleEach(SequenceDecoder):
    """Plain sampling written as a sequence decoder: every row draws from engine.generator."""

    name = "sample-each"

    def decode(self, engine, num_return_sequences):
        n, new = num_return_sequences, engine.max_new_tokens
        logits = engine.start(expand=n)  # (B*n, V)
        steps = []
        for t in range(new):
            steps.append(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=engine.generator).squeeze(-1))
            if t + 1 < new:
                logits = engine.step(steps[-1])
        rows = torch.stack(steps, dim=1).tolist()  # (B*n, new); completion() cuts each after its stop token
        return [[engine.completion(row) for row in rows[b * n : (b + 1) * n]] for b in range(engine.batch_size)]


def test_a_sampling_sequence_decoder_is_told_why_the_batch_check_skips_it():
    with pytest.warns(
        ConformanceWarning,
        match=r"^check_batch_of_one skipped for decoder 'sample-each': its completions "
        r"change with the seed, and a sequence decoder draws every row",
    ):
        check_decoder(SampleEach)


class Repeats(SequenceDecoder):
    """Always token 5, and blind to stop tokens."""

    name = "repeats"

    def decode(self, engine, num_return_sequences):
        engine.start()
        return [[Completion([5] * engine.max_new_tokens, "length")] for _ in range(engine.batch_size)]


def test_a_constant_decoder_is_still_checked_for_stop_tokens():
    with pytest.raises(AssertionError, match=r"prompt 0: generation went on past the stop token 5"):
        check_stop_tokens(Repeats())


# ---------------------------------------------------------------- allowed sets


def topk_allowed(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) bool: the k highest logits of each row (ties at the k-th value included)."""
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits >= kth


def topp_allowed(logits: torch.Tensor, p: float, temperature: float = 1.0) -> torch.Tensor:
    """(B, V) bool: the smallest most-probable set whose probability reaches p, computed in float64."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    allowed = torch.zeros_like(probs, dtype=torch.bool)
    for row in range(probs.shape[0]):
        order = probs[row].argsort(descending=True)
        mass = 0.0
        for token in order.tolist():
            allowed[row, token] = True
            mass += probs[row, token].item()
            if mass >= p:
                break
    return allowed


class Recording:
    """Mixin for a decoder class: keeps each step's logits and choices in self.steps."""

    def select(self, logits, ctx):
        chosen = super().select(logits, ctx)
        self.__dict__.setdefault("steps", []).append((logits.clone(), chosen.clone()))
        return chosen


class RecordingTopK(Recording, TopK):
    pass


class RecordingTopP(Recording, TopP):
    pass


@pytest.mark.parametrize(
    "decoder, allowed",
    [
        (RecordingTopK(k=5), lambda logits: topk_allowed(logits, 5)),
        (RecordingTopK(k=2, temperature=3.0), lambda logits: topk_allowed(logits, 2)),
        (RecordingTopP(p=0.5), lambda logits: topp_allowed(logits, 0.5)),
        (RecordingTopP(p=0.9, temperature=0.7), lambda logits: topp_allowed(logits, 0.9, 0.7)),
    ],
    ids=["topk-5", "topk-2-hot", "topp-0.5", "topp-0.9-cold"],
)
def test_every_sampled_token_lies_in_the_allowed_set_of_its_step(decoder, allowed):
    generate(tiny_model(), [[1, 2, 3], [4], [5, 6]], decoder, max_new_tokens=20, num_return_sequences=3, seed=0)
    assert len(decoder.steps) == 20
    sizes = []
    for logits, chosen in decoder.steps:
        mask = allowed(logits)  # (B, V)
        assert mask.gather(1, chosen[:, None]).all(), "a token outside the allowed set was sampled"
        sizes.append(mask.sum(-1))
    assert torch.cat(sizes).max() > 1  # the sets were not trivial


def test_topp_is_pure_nucleus_without_a_hidden_top_k():
    # A flat distribution over 1000 tokens: the 0.9 nucleus is 900 tokens, not 50.
    logits = torch.zeros(5000, 1000)
    chosen = TopP(p=0.9).select(logits, _ctx(5000, seed=0))
    assert len(set(chosen.tolist())) > 500


def test_topp_nucleus_stops_where_p_is_reached():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, -1)
    seen_075 = set(TopP(p=0.75).select(logits, _ctx(4000, seed=0)).tolist())
    seen_085 = set(TopP(p=0.85).select(logits, _ctx(4000, seed=0)).tolist())
    assert seen_075 == {0, 1} and seen_085 == {0, 1, 2}


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("decoder", [TopK(), TopP()], ids=["topk", "topp"])
def test_seeded_runs_repeat_exactly_and_seeds_differ(decoder):
    def run(seed):
        results = generate(tiny_model(), [[1, 2], [3]], decoder, max_new_tokens=15, num_return_sequences=2, seed=seed)
        return [c.token_ids for completions in results for c in completions]

    assert run(7) == run(7)
    assert run(7) != run(8)


# ---------------------------------------------------------------- distributions


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square (Wilson-Hilferty); z=3.719 is alpha = 1e-4."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_draws_match(chosen: torch.Tensor, expected: torch.Tensor) -> None:
    """chosen: (N,) draws; expected: (V,) probabilities (zero outside the allowed set)."""
    counts = torch.bincount(chosen, minlength=expected.numel()).double()
    assert counts[expected == 0].sum() == 0, "draws outside the allowed set"
    support = expected > 0
    expected_counts = expected[support] * chosen.numel()
    statistic = ((counts[support] - expected_counts) ** 2 / expected_counts).sum().item()
    df = int(support.sum()) - 1
    assert statistic < chi_square_critical(df), f"chi-square {statistic:.1f} with {df} degrees of freedom"


LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.1, 0.0, -0.3, -0.8, -1.0, -1.5])  # (V,) fixed
DRAWS = 40_000


@pytest.mark.parametrize("k, temperature", [(4, 1.0), (7, 0.6), (12, 1.5)])
def test_topk_draws_follow_the_renormalised_top_k_distribution(k, temperature):
    chosen = TopK(k=k, temperature=temperature).select(LOGITS.expand(DRAWS, -1), _ctx(DRAWS, seed=1))
    scaled = LOGITS / temperature
    expected = torch.softmax(scaled.masked_fill(~topk_allowed(LOGITS[None], k)[0], -math.inf).double(), dim=-1)
    assert_draws_match(chosen, expected)


def test_topk_with_p_draws_from_the_nucleus_of_the_top_k_like_transformers():
    # run_generation.py --k 50 also applied top_p=0.9: top-k first, then the nucleus of what is left.
    k, p = 8, 0.7
    chosen = TopK(k=k, p=p).select(LOGITS.expand(DRAWS, -1), _ctx(DRAWS, seed=3))
    top = LOGITS.masked_fill(~topk_allowed(LOGITS[None], k)[0], -math.inf)
    allowed = topp_allowed(top[None], p)[0]
    expected = torch.softmax(LOGITS.masked_fill(~allowed, -math.inf).double(), dim=-1)
    assert_draws_match(chosen, expected)
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    warped = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, LOGITS[None].clone()))[0]
    assert torch.equal(torch.isfinite(warped), allowed)  # the same allowed set as generate(top_k=8, top_p=0.7)


@pytest.mark.parametrize("p, temperature", [(0.5, 1.0), (0.8, 0.8), (0.95, 2.0)])
def test_topp_draws_follow_the_renormalised_nucleus_distribution(p, temperature):
    chosen = TopP(p=p, temperature=temperature).select(LOGITS.expand(DRAWS, -1), _ctx(DRAWS, seed=2))
    allowed = topp_allowed(LOGITS[None], p, temperature)[0]
    expected = torch.softmax((LOGITS / temperature).masked_fill(~allowed, -math.inf).double(), dim=-1)
    assert_draws_match(chosen, expected)


def test_the_chi_square_check_can_fail():
    # Draws from the top-4 distribution without temperature do not pass as temperature 0.6.
    chosen = TopK(k=4).select(LOGITS.expand(DRAWS, -1), _ctx(DRAWS, seed=1))
    wrong = torch.softmax((LOGITS / 0.6).masked_fill(~topk_allowed(LOGITS[None], 4)[0], -math.inf).double(), dim=-1)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_draws_match(chosen, wrong)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "cls, options, message",
    [
        (
            TopK,
            {"k": "0"},
            "Decoder 'topk' rejected its options: k must be at least 1, got 0. "
            "Its options: k (int, default 50), temperature (float, default 1.0), p (float, default 1.0).",
        ),
        (TopK, {"temperature": "0"}, "Decoder 'topk' rejected its options: temperature must be > 0, got 0.0."),
        (TopP, {"p": "0"}, "Decoder 'topp' rejected its options: p must be in (0, 1], got 0.0."),
        (TopP, {"p": "1.5"}, "Decoder 'topp' rejected its options: p must be in (0, 1], got 1.5."),
        (BeamSearch, {"num_beams": "0"}, "Decoder 'beam' rejected its options: num_beams must be at least 1, got 0."),
        (BeamSearch, {"no_repeat_ngram_size": "-1"}, "Decoder 'beam' rejected its options: no_repeat_ngram_size must be 0 (off) or more, got -1."),
        (BeamSearch, {"early_stopping": "sometimes"}, "Option early_stopping='sometimes' of decoder 'beam': expected bool | 'never'."),
        (TopK, {"k": "many"}, "Option k='many' of decoder 'topk': expected an int."),
        (TopK, {"kk": "5"}, "Decoder 'topk' has no option 'kk'. Its options: k (int, default 50), temperature (float, default 1.0), p (float, default 1.0)."),
        (Greedy, {"k": "5"}, "Decoder 'greedy' has no option 'k'. 'greedy' takes no options."),
    ],
)
def test_bad_options_are_clear_errors(cls, options, message):
    with pytest.raises(PeftgenError) as error:
        build_decoder(cls, options)
    assert str(error.value).startswith(message)


def test_options_are_converted_by_their_annotations():
    beam = build_decoder(BeamSearch, {"num_beams": "3", "length_penalty": "0.5", "early_stopping": "never"})
    assert (beam.num_beams, beam.length_penalty, beam.early_stopping) == (3, 0.5, "never")
    assert build_decoder(BeamSearch, {"early_stopping": "True"}).early_stopping is True
    assert build_decoder(TopK, {"k": "7", "temperature": "0.7"}).k == 7


def test_num_return_sequences_above_num_beams_is_a_clear_error():
    with pytest.raises(PeftgenError, match=r"Decoder 'beam': num_return_sequences \(6\) is more than num_beams \(5\)"):
        generate(tiny_model(), [[1]], BeamSearch(), max_new_tokens=3, num_return_sequences=6)


def _ctx(batch: int, seed: int) -> DecodeContext:
    tokens = torch.zeros((batch, 1), dtype=torch.long)
    return DecodeContext(torch.Generator().manual_seed(seed), tokens, torch.ones_like(tokens), 0, 1)
