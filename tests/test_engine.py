"""The engine: greedy and beam equal transformers' generate token for token (GPT-2 and a
Llama-architecture model, batched prompts of different lengths), stop tokens stop it,
its step/reorder API is enough to write a sequence decoder from outside, and beam search
uses no more of it than the DecodingEngine contract lists."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftgen import DecodingEngine, SequenceDecoder, TokenDecoder
from peftgen.decoders.beam import BeamSearch
from peftgen.decoders.greedy import Greedy
from peftgen.errors import PeftgenError
from peftgen.generation import generate
from peftgen.generation.engine import Engine
from peftgen.testing import ENGINE_MEMBERS, ContractError, bigram_model, check_decoder, decode_with_contract_only

PROMPTS = [[50256, 464, 3290, 318], [50256, 40], [50256, 1212, 318]]  # lengths 4, 2, 3: left padding
PAD = 50256
NEW = 20


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama", "tiny_gpt2-peaked", "tiny_llama-peaked"])
def model(request):
    """The random fixtures as they are (near-uniform predictions), and "peaked": the output head
    scaled 30x, so that predictions are confident and stop tokens win beams, as in a trained model."""
    fixture, _, peaked = request.param.partition("-")
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture)).eval()
    if peaked:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(30)
    model.peaked = bool(peaked)
    return model


def _stop_sets(model, **beam) -> list[list[int]]:
    """Stop-token sets these prompts do produce: tokens from the beams of a run without stops."""
    free = _reference(model, num_return_sequences=beam["num_beams"], eos_token_id=None, **beam)
    per_prompt = len(free) // len(PROMPTS)
    best = free[::per_prompt]
    worst = free[per_prompt - 1 :: per_prompt]
    return [sorted({row[2] for row in best}), [best[1][5]], sorted({row[0] for row in worst} | {best[0][9]})]


def _padded(prompts, pad=PAD):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _reference(model, **kwargs) -> list[list[int]]:
    """model.generate's new tokens per returned row, cut after the first stop token."""
    ids, mask = _padded(PROMPTS)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=PAD, **kwargs)
    return [_cut(row, kwargs.get("eos_token_id") or []) for row in out[:, ids.shape[1] :].tolist()]


def _cut(row: list[int], stop) -> list[int]:
    """A row of generate's output up to and including its first stop token (the rest is padding)."""
    end = next((i + 1 for i, token in enumerate(row) if token in stop), len(row))
    return row[:end]


def test_greedy_equals_generate_token_for_token(model):
    reasons = set()
    for stop in [[], *_stop_sets(model, num_beams=1)]:
        ours = generate(model, PROMPTS, Greedy(), max_new_tokens=NEW, stop_tokens=stop, pad_token_id=PAD)
        assert [c[0].token_ids for c in ours] == _reference(model, eos_token_id=stop or None)
        reasons |= {c[0].finish_reason for c in ours}
    assert reasons == {"stop", "length"}


BEAM_SETTINGS = [  # num_beams, length_penalty, early_stopping, num_return_sequences, no_repeat_ngram_size
    (2, 1.0, False, 1, 0),
    (4, 1.0, False, 4, 0),
    (3, 2.0, True, 2, 0),
    (4, -1.0, True, 3, 0),
    (3, 0.0, "never", 3, 0),
    (4, 1.5, "never", 2, 0),
    (1, 1.0, False, 1, 0),
    (3, 1.0, False, 3, 2),
    (4, 1.0, "never", 2, 3),
    (1, 1.0, False, 1, 2),
]


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, n, ngram", BEAM_SETTINGS)
def test_beam_equals_generate_token_for_token_and_in_order(model, num_beams, length_penalty, early_stopping, n, ngram):
    settings = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, no_repeat_ngram_size=ngram)
    free = generate(model, PROMPTS, BeamSearch(**settings), max_new_tokens=NEW, num_return_sequences=n)
    changed = False
    for stop in _stop_sets(model, **settings):
        ours = generate(model, PROMPTS, BeamSearch(**settings), max_new_tokens=NEW, num_return_sequences=n, stop_tokens=stop, pad_token_id=PAD)
        expected = _reference(model, num_return_sequences=n, eos_token_id=stop, **settings)
        assert [c.token_ids for completions in ours for c in completions] == expected
        assert all(len(completions) == n for completions in ours)
        changed |= ours != free
    assert changed  # the stop tokens mattered: the finished-hypotheses bookkeeping was exercised
    if ngram:
        for prompt, completions in zip(PROMPTS, free):
            for completion in completions:
                assert not _repeated_ngrams(prompt + completion.token_ids, ngram)


def _repeated_ngrams(tokens: list[int], n: int) -> set[tuple[int, ...]]:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return {gram for gram in grams if grams.count(gram) > 1}


def test_no_repeat_ngram_size_changes_what_beam_search_repeats():
    """The check above can fail: a bigram model's beams repeat n-grams unless told not to."""
    generator = torch.Generator().manual_seed(0)
    model = bigram_model(torch.randn(12, 12, generator=generator) * 3)
    plain, banned = (generate(model, [[1]], BeamSearch(num_beams=2, no_repeat_ngram_size=size), max_new_tokens=12)[0][0] for size in (0, 2))
    assert _repeated_ngrams([1] + plain.token_ids, 2)
    assert not _repeated_ngrams([1] + banned.token_ids, 2)


@pytest.mark.parametrize("table_seed", [0, 1, 2])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("ngram", [0, 2])
def test_beam_equals_generate_on_a_bigram_model_where_lengths_compete(table_seed, early_stopping, ngram):
    """Random models rarely let a short finished hypothesis lose to a longer one; a peaked
    bigram table over 12 tokens does, exercising every branch of the finished-beam bookkeeping.
    The small position bias breaks exact ties between reorderings of the same transitions;
    boosting the stop tokens makes more candidates end at once than the live beams can spare."""
    generator = torch.Generator().manual_seed(table_seed)
    table, position_bias = torch.randn(12, 12, generator=generator) * 2.5, torch.randn(12, 16, generator=generator) * 0.3
    prompts = [[1, 2], [3], [4, 5, 6]]
    ids, mask = _padded(prompts, pad=0)
    for boost in (0.0, 4.0):
        model = bigram_model(table + boost * (torch.arange(12) % 7 == 0)[:, None], position_bias)  # tokens 0 and 7
        for num_beams, length_penalty, stop in itertools.product((2, 3), (-1.0, 0.0, 1.0, 2.0), ([0], [0, 7])):
            settings = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, no_repeat_ngram_size=ngram)
            ours = generate(model, prompts, BeamSearch(**settings), max_new_tokens=10, num_return_sequences=num_beams, stop_tokens=stop, pad_token_id=0)
            out = model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=stop, num_return_sequences=num_beams, **settings
            )
            expected = [_cut(row, stop) for row in out[:, ids.shape[1] :].tolist()]
            assert [c.token_ids for completions in ours for c in completions] == expected, (boost, settings, stop)


def test_the_bigram_model_predicts_its_table():
    generator = torch.Generator().manual_seed(0)
    table, position_bias = torch.randn(12, 12, generator=generator), torch.randn(12, 16, generator=generator)
    logits = bigram_model(table, position_bias)(torch.tensor([[3, 5, 7]])).logits[0]  # (3, V)
    torch.testing.assert_close(logits, (table[:, [3, 5, 7]] + position_bias[:, :3]).T, atol=1e-4, rtol=0)
    torch.testing.assert_close(bigram_model(table)(torch.tensor([[3, 5]])).logits[0], table[:, [3, 5]].T, atol=1e-4, rtol=0)


def test_beam_returns_best_first(model):
    ours = generate(model, PROMPTS, BeamSearch(num_beams=4), max_new_tokens=8, num_return_sequences=4)
    for completions in ours:
        scores = [c.score for c in completions]
        assert scores == sorted(scores, reverse=True)


def test_generation_stops_at_the_stop_token(model):
    free = generate(model, PROMPTS, Greedy(), max_new_tokens=50)
    stop = sorted({completions[0].token_ids[1] for completions in free})  # every row's second token
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        stopped = generate(model, PROMPTS, Greedy(), max_new_tokens=50, stop_tokens=stop)
    finally:
        hook.remove()
    for completions, before in zip(stopped, free):
        completion = completions[0]
        assert completion.finish_reason == "stop"
        assert completion.token_ids[-1] in stop and len(completion.token_ids) <= 2
        assert completion.token_ids == before[0].token_ids[: len(completion.token_ids)]
    assert len(calls) <= 2  # prefill and one step, not 50


def test_prompt_longer_than_the_context_is_a_clear_error(model):
    with pytest.raises(PeftgenError) as error:
        generate(model, [[1] * 300], Greedy(), max_new_tokens=5)
    assert str(error.value) == ("The prompt is 300 tokens, but the model's context is 256 tokens and generation needs room for new ones. Shorten the prompt.")
    with pytest.raises(PeftgenError) as error:
        generate(model, [[1] * 200], Greedy(), max_new_tokens=100)
    assert str(error.value) == (
        "The prompt (200 tokens) plus --max-new-tokens 100 is 300 tokens, more than the model's context of 256. Use --max-new-tokens 56 or less."
    )


class Boom(TokenDecoder):
    """Fails on purpose."""

    name = "boom"

    def select(self, logits, ctx):
        raise RuntimeError("kaput")


class Wrong(TokenDecoder):
    """Returns probabilities instead of ids."""

    name = "wrong"

    def select(self, logits, ctx):
        return torch.softmax(logits, dim=-1)


def test_a_decoder_that_raises_is_named(model):
    with pytest.raises(PeftgenError, match=r"^Decoder 'boom' failed in select\(\) at step 0: RuntimeError: kaput$"):
        generate(model, PROMPTS, Boom(), max_new_tokens=3)


def test_a_decoder_returning_the_wrong_thing_is_named(model):
    with pytest.raises(PeftgenError, match=r"^Decoder 'wrong' returned a tensor of shape \(3, 50257\) from select\(\); it must return a \(3,\) int64"):
        generate(model, PROMPTS, Wrong(), max_new_tokens=3)


def test_matmuls_are_swapped_only_during_generation_and_compute_the_same_logits(model):
    from peftgen.generation.fast import skinny_matmuls

    before = dict(model.named_modules())
    ids, mask = _padded(PROMPTS)
    with torch.inference_mode():
        plain = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
        with skinny_matmuls(model):
            swapped_names = {name for name, module in model.named_modules() if type(module).__name__ == "_Skinny"}
            swapped = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
    assert "lm_head" in swapped_names and len(swapped_names) >= 5  # the head and the block projections
    assert dict(model.named_modules()) == before
    torch.testing.assert_close(swapped, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(PeftgenError):
        generate(model, PROMPTS, Boom(), max_new_tokens=3)
    assert dict(model.named_modules()) == before  # restored after an error too


def test_the_layout_of_cpu_matmuls_is_a_parameter_and_both_layouts_give_the_same_tokens(model):
    heads = {}  # the output layer's class while each layout decodes
    for layout in ("skinny", "standard"):
        seen = set()
        results = generate(
            model,
            PROMPTS,
            Greedy(),
            max_new_tokens=NEW,
            pad_token_id=PAD,
            matmul_layout=layout,
            on_token=lambda step, tokens, seen=seen: seen.add(type(model.get_output_embeddings()).__name__),
        )
        heads[layout] = (seen, [c[0].token_ids for c in results])
    assert heads["skinny"][0] == {"_Skinny"} and heads["standard"][0] == {"Linear"}
    assert heads["skinny"][1] == heads["standard"][1] == _reference(model, eos_token_id=None)
    with pytest.raises(PeftgenError, match=r"^matmul_layout must be one of 'skinny', 'standard', got 'wide'\.$"):
        generate(model, PROMPTS, Greedy(), max_new_tokens=2, matmul_layout="wide")


# ---------------------------------------------------------------- the decoder contract


def test_the_engine_has_every_member_the_contract_lists(model):
    with torch.inference_mode():
        engine = Engine(model, PROMPTS, max_new_tokens=3, stop_tokens=[PAD])
    assert isinstance(engine, DecodingEngine)
    assert ENGINE_MEMBERS == {
        "batch_size",
        "max_new_tokens",
        "prompt_ids",
        "prompt_mask",
        "stop_tokens",
        "pad_token_id",
        "generator",
        "device",
        "start",
        "step",
        "reorder",
        "completion",
    }


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, n, ngram", BEAM_SETTINGS)
def test_beam_search_uses_only_what_the_contract_lists(model, num_beams, length_penalty, early_stopping, n, ngram):
    """Through an engine that has nothing but DecodingEngine's members, beam search runs and
    returns what generate returns (a use of anything else is a ContractError)."""
    beam = BeamSearch(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, no_repeat_ngram_size=ngram)
    free = generate(model, PROMPTS, beam, max_new_tokens=NEW, num_return_sequences=n, pad_token_id=PAD, matmul_layout="standard")
    produced = sorted({completions[-1].token_ids[2] for completions in free})  # stop tokens the hypotheses meet
    for stop in ([], produced):
        expected = (
            free
            if not stop
            else generate(model, PROMPTS, beam, max_new_tokens=NEW, num_return_sequences=n, stop_tokens=stop, pad_token_id=PAD, matmul_layout="standard")
        )
        through = decode_with_contract_only(beam, model, PROMPTS, num_return_sequences=n, max_new_tokens=NEW, stop_tokens=stop, pad_token_id=PAD)
        assert through == expected
    assert expected != free  # the stop tokens mattered


class PeeksAtTheEngine(SequenceDecoder):
    """Greedy, but reads engine.prompt_length, which the contract does not list."""

    name = "peeks"

    def decode(self, engine, num_return_sequences):
        first = engine.start().argmax(dim=-1).tolist()  # (B,) each prompt's most probable token
        return [[engine.completion([token] * min(engine.prompt_length, engine.max_new_tokens))] for token in first]


def test_a_sequence_decoder_using_more_than_the_contract_fails_the_kit():
    with pytest.raises(ContractError, match=r"used engine\.prompt_length, which is not part of the decoder contract"):
        decode_with_contract_only(PeeksAtTheEngine(), bigram_model(torch.eye(12)), [[1, 2], [3]], max_new_tokens=2)
    with pytest.raises(AssertionError, match=r"^decode\(\) used engine\.prompt_length, which is not part of"):
        check_decoder(PeeksAtTheEngine)
    assert generate(bigram_model(torch.eye(12)), [[1, 2], [3]], PeeksAtTheEngine(), max_new_tokens=2)  # the real engine has it


class SampleAndRank(SequenceDecoder):
    """Draws n samples per prompt and returns them by total log-probability, best first.

    Written only against the public engine API, as a plugin would be: rows that end are
    dropped from the batch with engine.reorder.
    """

    name = "sample-and-rank"

    def decode(self, engine, num_return_sequences):
        n, new = num_return_sequences, engine.max_new_tokens
        logits = engine.start(expand=n)  # (B*n, V)
        live = torch.arange(logits.shape[0])  # which original row each live row is
        tokens = [[] for _ in range(logits.shape[0])]
        scores = torch.zeros(logits.shape[0])
        for t in range(new):
            logp = torch.log_softmax(logits, dim=-1)
            chosen = torch.multinomial(logp.exp(), 1, generator=engine.generator).squeeze(-1)  # (live,)
            scores[live] += logp.gather(1, chosen[:, None]).squeeze(-1)
            for row, token in zip(live.tolist(), chosen.tolist()):
                tokens[row].append(token)
            going = ~torch.isin(chosen, engine.stop_tokens)
            if t + 1 == new or not going.any():
                break
            if not going.all():
                engine.reorder(going.nonzero().squeeze(-1))  # drop finished rows from the cache
                live, chosen = live[going], chosen[going]
            logits = engine.step(chosen)
        results = []
        for b in range(engine.batch_size):
            rows = sorted(range(b * n, (b + 1) * n), key=lambda r: -scores[r].item())
            results.append([engine.completion(tokens[r], scores[r].item()) for r in rows])
        return results


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama"])
def sampled_model(request):
    """The fixtures as they are: their samples vary, so some rows stop early and others do not."""
    return AutoModelForCausalLM.from_pretrained(request.getfixturevalue(request.param)).eval()


def test_a_sequence_decoder_can_drive_the_engine_and_drop_rows(sampled_model):
    model = sampled_model
    free = generate(model, PROMPTS, SampleAndRank(), max_new_tokens=12, num_return_sequences=3, seed=0)
    stop = [free[0][0].token_ids[3], free[1][1].token_ids[2]]
    ranked = generate(model, PROMPTS, SampleAndRank(), max_new_tokens=12, num_return_sequences=3, stop_tokens=stop, seed=0)
    finished = [c.finish_reason for completions in ranked for c in completions]
    assert "stop" in finished and "length" in finished  # rows were dropped mid-way
    for prompt, completions in zip(PROMPTS, ranked):
        assert [c.score for c in completions] == sorted((c.score for c in completions), reverse=True)
        for completion in completions:
            # The score the engine's logits gave equals a fresh full forward of prompt + completion.
            ids = torch.tensor([prompt + completion.token_ids])
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
            total = logp.gather(1, ids[0, len(prompt) :, None]).sum().item()
            assert completion.score == pytest.approx(total, abs=1e-3)
