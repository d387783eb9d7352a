"""The decoder contract: what a decoding strategy sees and what it returns.

Two kinds, both registered through the ``register_decoders`` hook:

- ``TokenDecoder``: picks one token per sequence per step from float32 logits
  ``(B, V)``. The engine owns everything else (KV cache, batching, padding,
  stop tokens, lengths), so greedy, top-k, top-p or min-p is only a selection
  rule of a few lines.
- ``SequenceDecoder``: drives the engine itself (``start``/``step``/``reorder``)
  for strategies that keep several hypotheses per prompt, such as beam search.

A decoder's options are the keyword arguments of its ``__init__``; their
annotations say how ``-o key=value`` strings are converted (see options.py).
This module imports nothing heavy so that ``import peftgen`` stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from peftgen.generation.engine import Engine


@dataclass
class DecodeContext:
    """What a TokenDecoder may look at besides the logits, for one step.

    generator:      seeded ``torch.Generator`` on the model's device; draw all randomness from it
                    so that ``--seed`` reproduces a run exactly.
    tokens:         ``(B, T)`` every token so far, prompt included (prompts are left-padded).
    attention_mask: ``(B, T)`` 1 for real tokens, 0 for the left padding in ``tokens``.
    step:           index of the token being chosen, 0 for the first new token.
    prompt_length:  padded prompt length: ``tokens[:, prompt_length:]`` are the generated tokens.
    """

    generator: torch.Generator
    tokens: torch.Tensor
    attention_mask: torch.Tensor
    step: int
    prompt_length: int


class TokenDecoder:
    """Base class of decoders that choose one token per sequence per step.

    Subclasses set ``name`` (what ``--decoder`` takes), take their options as
    typed keyword arguments of ``__init__`` (raise ValueError for bad values)
    and implement ``select``. The class docstring is what ``peftgen decoders``
    shows.
    """

    name: ClassVar[str] = ""

    def select(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """The next token id of each row.

        :param logits: ``(B, V)`` float32 scores of the next token, one row per sequence.
        :param ctx: the tokens so far, the step and the seeded generator.
        :return: ``(B,)`` int64 token ids.
        """
        raise NotImplementedError


class SequenceDecoder:
    """Base class of decoders that manage whole hypotheses (beam search and friends).

    ``decode`` gets the ``Engine`` for a batch of prompts and returns, for each
    prompt, its completions best first. The engine offers:

    - ``engine.start(expand)``: run the prompts, give each ``expand`` rows; returns logits ``(B*expand, V)``
      with rows ordered prompt by prompt.
    - ``engine.step(tokens)``: feed one token per row ``(N,)``; returns the next logits ``(N, V)``.
    - ``engine.reorder(rows)``: keep rows ``rows`` ``(N',)`` of the KV cache, in that order (repeats allowed).
    - ``engine.completion(token_ids, score)``: a finished ``Completion``, its finish reason worked out.
    - ``engine.batch_size``, ``engine.max_new_tokens``, ``engine.stop_tokens`` ``(S,)``, ``engine.generator``.
    """

    name: ClassVar[str] = ""

    def validate(self, num_return_sequences: int) -> None:
        """Raise ValueError if this decoder cannot return that many completions per prompt."""

    def decode(self, engine: Engine, num_return_sequences: int) -> list[list[Completion]]:
        """For each prompt, ``num_return_sequences`` completions, best first."""
        raise NotImplementedError


@dataclass
class Completion:
    """One generated sequence.

    token_ids:     the generated ids (prompt excluded), ending with the stop token when one was produced.
    finish_reason: ``"stop"`` (a stop token was produced) or ``"length"`` (max_new_tokens reached).
    score:         the decoder's score, if it has one (beam: length-penalised log-probability).
    """

    token_ids: list[int]
    finish_reason: str
    score: float | None = None
