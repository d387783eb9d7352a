"""Text from prompts: ``peftgen generate --model RUN``, or from Python::

    for out in peftgen.generate_text("runs/lora", ["Once upon a time"], decoder="topk", options={"k": 40}, seed=0):
        print(out.text, out.finish_reason)

Prompts are text; each result holds the generated text (prompt and stop token
left out), its token ids, why it ended ("stop" at a stop token, "length" at
max_new_tokens), and the decoder, options and seed that made it. A model
trained by peftgen starts from ``<BOS>`` and stops at ``<EOS>`` by default.
The token-level engine underneath is ``peftgen.generation.generate``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from peftgen.config import MAX_BATCH, SEED_LIMIT
from peftgen.errors import PeftgenError

DEFAULT_NEW_TOKENS = 300  # the article's --length


@dataclass
class GeneratedText:
    """One generated sequence, as ``peftgen generate --json`` prints it."""

    prompt: str
    text: str  # the new text, stop token excluded
    token_ids: list[int]  # the new tokens, a final stop token included
    finish_reason: str  # "stop" or "length"
    decoder: str
    options: dict  # every option the decoder ran with, defaults included
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def generate_text(
    model,
    prompts: Sequence[str] | None = None,
    *,
    tokenizer=None,
    decoder: str | type | Any = "topk",
    options: Mapping[str, Any] | None = None,
    stop_tokens: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    num_return_sequences: int = 1,
    seed: int | None = None,
    batch_size: int = 8,
    on_text: Callable[[str], None] | None = None,
) -> list[GeneratedText]:
    """Generate ``num_return_sequences`` texts per prompt; every result, prompt by prompt.

    model: a run folder, model folder, .gguf file or Hub id, loaded here; or a
    model already loaded, with its tokenizer.
    prompts: texts to continue; default the tokenizer's bos token (<BOS> for a run).
    decoder: a decoder's name ('peftgen decoders' lists them), its class, or an instance.
    options: the decoder's options; strings ("50") are converted by the option's type.
    stop_tokens: tokens that end a sequence, each a single token; default the tokenizer's eos.
    max_new_tokens: default 300, fewer if the model's context leaves less room.
    seed: seed of the decoder's random draws; None draws one (each result says which).
    on_text: with one prompt, one sequence and a token-by-token decoder, called
        with the new text after every token ('' while a character is incomplete).
    """
    from peftgen.generation import check_request, generate, resolved_options
    from peftgen.generation.decoder import TokenDecoder
    from peftgen.generation.engine import context_length
    from peftgen.generation.text import Streamer, completion_text, default_prompt, encode_prompt, stop_token_ids

    strategy = _decoder(decoder, options)
    check_request(strategy, num_return_sequences, DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens)
    for flag, value in (("--batch-size", batch_size), ("--num-return-sequences", num_return_sequences)):
        if not 1 <= value <= MAX_BATCH:
            raise PeftgenError(f"{flag} must be between 1 and {MAX_BATCH}, got {value}.")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise PeftgenError(f"--seed must be between 0 and {SEED_LIMIT - 1}, got {seed}.")
    if isinstance(model, (str, os.PathLike)):
        from peftgen import model as model_lib

        model, tokenizer = model_lib.load(model)
    elif tokenizer is None:
        raise TypeError("generate_text(): a loaded model needs its tokenizer= (or pass a model folder, run or Hub id).")

    texts = list(prompts or [default_prompt(tokenizer)])
    encoded = [encode_prompt(tokenizer, text) for text in texts]
    stops = stop_token_ids(tokenizer, list(stop_tokens) if stop_tokens else None)
    if max_new_tokens is None:  # not given: the article's 300, or what the context leaves room for
        room = (context_length(model) or 10**9) - max(map(len, encoded))
        max_new_tokens = max(1, min(DEFAULT_NEW_TOKENS, room))
    seed = seed if seed is not None else random.randrange(2**31)
    name, used = type(strategy).name, resolved_options(strategy)
    pad = tokenizer.pad_token_id  # None: the engine pads with the first stop token
    on_token = None
    if on_text is not None and len(texts) * num_return_sequences == 1 and isinstance(strategy, TokenDecoder):
        streamer = Streamer(tokenizer, stops)
        on_token = lambda step, tokens: on_text(streamer.push(int(tokens[0])))  # noqa: E731

    results = []
    for start in range(0, len(texts), batch_size):
        completions = generate(
            model,
            encoded[start : start + batch_size],
            strategy,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences,
            stop_tokens=stops,
            pad_token_id=pad,
            seed=seed + start,
            on_token=on_token,
        )
        for text, sequences in zip(texts[start : start + batch_size], completions):
            for completion in sequences:
                results.append(
                    GeneratedText(
                        text,
                        completion_text(tokenizer, completion),
                        completion.token_ids,
                        completion.finish_reason,
                        name,
                        used,
                        seed,
                    )
                )
    return results


def _decoder(decoder, options: Mapping[str, Any] | None):
    """A decoder instance from a name, a class (built with options) or an instance (used as it is)."""
    from peftgen.generation import build_decoder

    if isinstance(decoder, str):
        from peftgen.plugins import get_decoder

        decoder = get_decoder(decoder).cls
    if isinstance(decoder, type):
        return build_decoder(decoder, options)
    if options:
        raise TypeError("generate_text(): options go with a decoder's name or class, not with a decoder instance.")
    return decoder
