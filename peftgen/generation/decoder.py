"""The decoder contract: what a decoding strategy sees and what it returns.

Two kinds, both registered through the ``register_decoders`` hook:

- ``TokenDecoder``: picks one token per sequence per step from float32 logits
  ``(B, V)``. The engine owns everything else (KV cache, batching, padding,
  stop tokens, lengths), so greedy, top-k, top-p or min-p is only a selection
  rule of a few lines.
- ``SequenceDecoder``: drives the engine itself (``start``/``step``/``reorder``)
  for strategies that keep several hypotheses per prompt, such as beam search.
  ``DecodingEngine`` lists everything of the engine it may use.

A decoder's options are the keyword arguments of its ``__init__``; their
annotations say how ``-o key=value`` strings are converted (see options.py).
This module imports nothing heavy so that ``import peftgen`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


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


@runtime_checkable
class DecodingEngine(Protocol):
    """What a ``SequenceDecoder`` may use of the engine: these members and no others.

    One engine serves one batch of ``B`` prompts. Rows are what the model sees:
    ``start(expand)`` gives every prompt ``expand`` rows (prompt 0's rows first),
    ``reorder`` picks, repeats or drops rows of the KV cache, and ``step`` feeds
    one token to every row there is. ``N`` below is the current number of rows.
    """

    batch_size: int
    """``B``, the number of prompts; ``decode`` returns one list of completions for each."""

    max_new_tokens: int
    """The most tokens a completion may have; ``step`` may be called at most this many times."""

    prompt_ids: torch.Tensor
    """``(B, T0)`` int64 the prompts, left-padded with ``pad_token_id`` to the longest one's length ``T0``."""

    prompt_mask: torch.Tensor
    """``(B, T0)`` int64, 1 on the prompts' tokens and 0 on their left padding."""

    stop_tokens: torch.Tensor
    """``(S,)`` int64 ids that end a sequence (``S`` may be 0): a completion ends with the first one it produces."""

    pad_token_id: int
    """The id of the padding, in ``prompt_ids`` and for rows that have finished."""

    generator: torch.Generator
    """Seeded ``torch.Generator`` on ``device``: draw all randomness from it so that ``--seed`` repeats a run."""

    device: torch.device
    """The model's device, where the logits are and where tensors passed back should be."""

    def start(self, expand: int = 1) -> torch.Tensor:
        """Run the prompts, giving each ``expand`` rows; call once, first.

        :param expand: rows per prompt; rows ``b * expand`` to ``(b + 1) * expand - 1`` belong to prompt ``b``.
        :return: ``(B * expand, V)`` float32 logits of each row's first new token.
        """
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to every row.

        :param tokens: ``(N,)`` int64, the token each row chose.
        :return: ``(N, V)`` float32 logits of each row's next token.
        """
        ...

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the KV cache rows ``rows``, in that order: repeat a row to fork a hypothesis, leave it out to drop it.

        :param rows: ``(N',)`` int64 indices into the current ``N`` rows; ``N'`` rows follow.
        """
        ...

    def completion(self, token_ids: Sequence[int], score: float | None = None) -> Completion:
        """A finished ``Completion``: ``token_ids`` cut after the first stop token, with its finish reason.

        :param token_ids: the generated ids (prompt excluded).
        :param score: the decoder's score of the sequence, if it has one.
        """
        ...


class SequenceDecoder:
    """Base class of decoders that manage whole hypotheses (beam search and friends).

    ``decode`` gets the engine of a batch of prompts and returns, for each
    prompt, its completions best first. Of the engine it may use only what
    ``DecodingEngine`` lists (``peftgen.testing.check_decoder`` checks that).
    """

    name: ClassVar[str] = ""

    def validate(self, num_return_sequences: int) -> None:
        """Raise ValueError if this decoder cannot return that many completions per prompt."""

    def decode(self, engine: DecodingEngine, num_return_sequences: int) -> list[list[Completion]]:
        """For each prompt, ``num_return_sequences`` completions, best first.

        :param engine: the batch's prompts on the model, driven with ``start``, ``step`` and ``reorder``.
        :param num_return_sequences: completions wanted per prompt (``validate`` has accepted it).
        :return: ``engine.batch_size`` lists, each of at least one ``Completion`` (``engine.completion`` makes them).
        """
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
