"""The decoding engine: a KV-cached, batched loop over any causal LM.

    from peftgen.generation import generate
    from peftgen.decoders.topk import TopK
    completions = generate(model, [[50256]], TopK(k=50), max_new_tokens=300, num_return_sequences=5)

Prompts of different lengths are left-padded; the attention mask and the
position ids are built the way ``model.generate`` builds them, so greedy and
beam results equal transformers' token for token. Per step the engine does
one forward of one token per row (``logits_to_keep=1``), hands float32
logits ``(N, V)`` to the decoder, writes the chosen tokens into a
preallocated buffer and checks stop tokens on the device.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from peftgen.errors import PeftgenError
from peftgen.generation import fast
from peftgen.generation.decoder import Completion, DecodeContext, SequenceDecoder, TokenDecoder
from peftgen.model.sizes import context_length

MATMUL_LAYOUTS = ("skinny", "standard")  # generate(matmul_layout=...): how CPU float32 weights are multiplied


class Engine:
    """One batch of prompts on one model: prefill, then a token per row per ``step``.

    Rows are what the model sees: ``start(expand)`` gives every prompt
    ``expand`` rows (prompt 0's rows first), ``reorder`` picks, repeats or
    permutes rows of the KV cache. Token decoders never see the engine;
    sequence decoders drive it through the members ``DecodingEngine`` lists.
    """

    def __init__(
        self,
        model,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_tokens: Sequence[int] = (),
        pad_token_id: int | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.device = _device(model)
        self.batch_size = len(prompts)
        self.max_new_tokens = max_new_tokens
        self.prompt_length = max(len(prompt) for prompt in prompts)
        self.stop_tokens = torch.tensor(list(stop_tokens), dtype=torch.long, device=self.device)  # (S,)
        self.pad_token_id = pad_token_id if pad_token_id is not None else (list(stop_tokens) or [0])[0]
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

        # Left padding: (B, T0) ids and mask, 1 for real tokens.
        B, T0 = self.batch_size, self.prompt_length
        self.prompt_ids = torch.full((B, T0), self.pad_token_id, dtype=torch.long)
        self.prompt_mask = torch.zeros((B, T0), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            self.prompt_ids[row, T0 - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            self.prompt_mask[row, T0 - len(prompt) :] = 1
        self.prompt_ids, self.prompt_mask = self.prompt_ids.to(self.device), self.prompt_mask.to(self.device)
        # Without padding the mask is all ones and is not passed at all, as model.generate does.
        self.padded = bool((self.prompt_mask == 0).any())

        forward = inspect.signature(_base_model(model).forward).parameters
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"
        self._takes_positions = "position_ids" in forward
        self._takes_logits_to_keep = "logits_to_keep" in forward
        self._cache = None
        self._fed = 0  # tokens fed after the prompt

    @property
    def attention_mask(self) -> torch.Tensor:
        """``(N, T0 + max_new_tokens)`` per row: 0 on left padding, 1 on the prompt and every new position."""
        return self._mask

    def start(self, expand: int = 1) -> torch.Tensor:
        """Run the prompts; every prompt gets ``expand`` rows. Returns logits ``(B*expand, V)``."""
        B, T0, new = self.batch_size, self.prompt_length, self.max_new_tokens
        self._cache = fast.make_cache(self.model, T0 + new)
        # Position ids from the mask, like generate: real tokens count 0, 1, 2... after the padding.
        positions = (self.prompt_mask.cumsum(-1) - 1).masked_fill(self.prompt_mask == 0, 0)  # (B, T0)
        logits = self._forward(self.prompt_ids, self.prompt_mask if self.padded else None, positions)
        # Everything a step needs, preallocated: the mask grows by slicing, positions by column.
        ones = torch.ones((B, new), dtype=torch.long, device=self.device)
        self._mask = torch.cat([self.prompt_mask, ones], dim=1)  # (B, T0 + new)
        next_position = self.prompt_mask.sum(-1, keepdim=True)  # (B, 1)
        self._positions = next_position + torch.arange(new, device=self.device)  # (B, new)
        if expand > 1:
            self.reorder(torch.arange(B, device=self.device).repeat_interleave(expand))
            logits = logits.repeat_interleave(expand, dim=0)
        self._fed = 0
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``(N,)``; returns the logits of the next one ``(N, V)``."""
        t = self._fed
        if t >= self.max_new_tokens:
            raise RuntimeError(f"step() called more than max_new_tokens={self.max_new_tokens} times")
        mask = self._mask[:, : self.prompt_length + t + 1] if self.padded else None
        logits = self._forward(tokens.view(-1, 1), mask, self._positions[:, t : t + 1])
        self._fed = t + 1
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` ``(N',)`` of the cache, in that order; repeats expand, omissions drop."""
        rows = rows.to(self.device)
        self._cache.reorder_cache(rows)
        self._mask = self._mask.index_select(0, rows)
        self._positions = self._positions.index_select(0, rows)

    def completion(self, token_ids: Sequence[int], score: float | None = None) -> Completion:
        """A Completion cut after its first stop token, with its finish reason."""
        token_ids = list(token_ids)
        stops = set(self.stop_tokens.tolist())
        for i, token in enumerate(token_ids):
            if token in stops:
                return Completion(token_ids[: i + 1], "stop", score)
        return Completion(token_ids, "length", score)

    def _forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, self._cache_argument: self._cache, "use_cache": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if self._takes_positions:
            kwargs["position_ids"] = position_ids
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        if self._cache is None:  # a model that builds its own cache object
            self._cache = getattr(out, self._cache_argument, None) or out.past_key_values
        return out.logits[:, -1].float()  # (N, V), float32 for the decoders


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    decoder: TokenDecoder | SequenceDecoder,
    *,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    stop_tokens: Sequence[int] = (),
    pad_token_id: int | None = None,
    seed: int = 0,
    on_token: Callable[[int, torch.Tensor], None] | None = None,
    matmul_layout: Literal["skinny", "standard"] = "skinny",
) -> list[list[Completion]]:
    """For each prompt (a list of token ids), ``num_return_sequences`` completions.

    Generation of a row stops at the first of ``stop_tokens`` (kept in its
    ``token_ids``) or after ``max_new_tokens``. ``on_token(step, tokens)`` is
    called with each step's ``(N,)`` tokens (token decoders only), for streaming.
    ``matmul_layout`` is how float32 weights on CPU are multiplied while decoding:
    ``"skinny"`` as ``(W @ x.T).T``, faster for a few rows (see fast.py), or
    ``"standard"``, the model's own modules; other weights are never swapped.
    """
    check_request(decoder, num_return_sequences, max_new_tokens)
    if matmul_layout not in MATMUL_LAYOUTS:
        raise PeftgenError(f"matmul_layout must be one of {', '.join(map(repr, MATMUL_LAYOUTS))}, got {matmul_layout!r}.")
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise PeftgenError("Every prompt needs at least one token. Pass a non-empty prompt (or a tokenizer with a bos token).")
    check_context(model, max(len(prompt) for prompt in prompts), max_new_tokens)
    swap = fast.skinny_matmuls(model) if matmul_layout == "skinny" else contextlib.nullcontext()
    with torch.inference_mode(), swap:
        engine = Engine(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            stop_tokens=stop_tokens,
            pad_token_id=pad_token_id,
            seed=seed,
        )
        if isinstance(decoder, TokenDecoder):
            return _token_loop(engine, decoder, num_return_sequences, on_token)
        try:
            results = decoder.decode(engine, num_return_sequences)
        except PeftgenError:
            raise
        except Exception as error:
            raise _decoder_error(decoder, "decode()", error) from error
        return _check_results(decoder, results, engine.batch_size, num_return_sequences)


def check_request(decoder, num_return_sequences: int, max_new_tokens: int) -> None:
    """Errors a request can be refused with before any model is loaded."""
    if not isinstance(decoder, (TokenDecoder, SequenceDecoder)):
        raise TypeError(f"{decoder!r} is neither a TokenDecoder nor a SequenceDecoder")
    if max_new_tokens < 1:
        raise PeftgenError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    if num_return_sequences < 1:
        raise PeftgenError(f"--num-return-sequences must be at least 1, got {num_return_sequences}.")
    if isinstance(decoder, SequenceDecoder):
        try:
            decoder.validate(num_return_sequences)
        except (ValueError, TypeError) as error:
            raise PeftgenError(f"Decoder '{decoder.name}': {error}") from None
        except PeftgenError:
            raise
        except Exception as error:
            raise _decoder_error(decoder, "validate()", error) from error


def check_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = context_length(model)
    if limit is None:
        return
    if prompt_tokens >= limit:
        raise PeftgenError(
            f"The prompt is {_tokens(prompt_tokens)}, but the model's context is {limit} tokens and generation needs room for new ones. Shorten the prompt."
        )
    if prompt_tokens + max_new_tokens > limit:
        raise PeftgenError(
            f"The prompt ({_tokens(prompt_tokens)}) plus --max-new-tokens {max_new_tokens} is "
            f"{prompt_tokens + max_new_tokens} tokens, more than the model's context of {limit}. "
            f"Use --max-new-tokens {limit - prompt_tokens} or less."
        )


def _tokens(count: int) -> str:
    return f"{count} token" if count == 1 else f"{count} tokens"


def _token_loop(engine: Engine, decoder: TokenDecoder, n: int, on_token) -> list[list[Completion]]:
    B, T0, new = engine.batch_size, engine.prompt_length, engine.max_new_tokens
    logits = engine.start(expand=n)  # (N, V), N = B * n
    N = logits.shape[0]
    tokens = torch.empty((N, T0 + new), dtype=torch.long, device=engine.device)  # prompt + generated
    tokens[:, :T0] = engine.prompt_ids.repeat_interleave(n, dim=0)
    mask = engine.attention_mask  # (N, T0 + new): padding zeros, then ones
    stop = engine.stop_tokens
    finished = torch.zeros(N, dtype=torch.bool, device=engine.device)
    # Asking "all finished?" is free on CPU but a sync on an accelerator: there, ask every 8 steps.
    check_every = 1 if engine.device.type == "cpu" else 8
    V = logits.shape[-1]
    # Step at which select() first returned an id outside [0, V), -1 while none did. On an
    # accelerator it stays on the device and is read with the finished check (no extra sync),
    # the bad ids replaced by padding meanwhile so the model never indexes past its
    # vocabulary; on CPU one aminmax per step says it at once.
    first_bad = torch.full((), -1, dtype=torch.long, device=engine.device)
    steps = new
    for t in range(new):
        ctx = DecodeContext(engine.generator, tokens[:, : T0 + t], mask[:, : T0 + t], t, T0)
        try:
            chosen = decoder.select(logits, ctx)
        except PeftgenError:
            raise
        except Exception as error:
            raise _decoder_error(decoder, f"select() at step {t}", error) from error
        _check_selection(decoder, chosen, logits, t)
        if chosen.dtype != torch.long:
            chosen = chosen.long()
        if check_every == 1:
            low, high = torch.aminmax(chosen)
            if int(low) < 0 or int(high) >= V:
                _check_range(decoder, torch.tensor(t), V)
        else:
            outside = (chosen < 0) | (chosen >= V)  # (N,)
            first_bad = torch.where((first_bad < 0) & outside.any(), t, first_bad)
            chosen = chosen.masked_fill(outside, engine.pad_token_id)
            if t % check_every == check_every - 1:
                _check_range(decoder, first_bad, V)
        if len(stop):
            chosen = chosen.masked_fill(finished, engine.pad_token_id)  # finished rows idle on padding
        tokens[:, T0 + t] = chosen
        if on_token is not None:
            on_token(t, chosen)
        if len(stop):
            finished |= torch.isin(chosen, stop)
            if t % check_every == check_every - 1 and bool(finished.all()):
                steps = t + 1
                break
        if t + 1 < new:
            logits = engine.step(chosen)
    _check_range(decoder, first_bad, V)
    generated = tokens[:, T0 : T0 + steps].tolist()
    completions = [engine.completion(row) for row in generated]
    return [completions[b * n : (b + 1) * n] for b in range(B)]


def _check_selection(decoder: TokenDecoder, chosen, logits: torch.Tensor, step: int) -> None:
    """A plugin's select() must return (N,) integer token ids, at every step; say so clearly if it does not.

    Only the type, shape and dtype are looked at here (no device sync); the range is _check_range's.
    """
    N = logits.shape[0]
    if not isinstance(chosen, torch.Tensor):
        problem = f"a {type(chosen).__name__}"
    elif chosen.shape != (N,):
        problem = f"a tensor of shape {tuple(chosen.shape)}"
    elif chosen.dtype.is_floating_point or chosen.dtype.is_complex or chosen.dtype == torch.bool:
        problem = f"a {chosen.dtype} tensor"
    else:
        return
    raise PeftgenError(f"Decoder '{decoder.name}' returned {problem} from select(){_at(step)}; it must return a ({N},) int64 tensor of token ids.")


def _check_range(decoder: TokenDecoder, first_bad: torch.Tensor, V: int) -> None:
    step = int(first_bad)
    if step >= 0:
        raise PeftgenError(
            f"Decoder '{decoder.name}' returned token ids outside [0, {V}) from select(){_at(step)}; it must return ids of the model's vocabulary."
        )


def _at(step: int) -> str:
    return "" if step == 0 else f" at step {step}"


def _check_results(decoder: SequenceDecoder, results, batch_size: int, n: int) -> list[list[Completion]]:
    """A sequence decoder's answer must be, for each prompt, a non-empty list of Completions."""
    name = decoder.name
    if not isinstance(results, (list, tuple)):
        raise PeftgenError(f"Decoder '{name}' returned a {type(results).__name__} from decode(); it must return one list of Completions per prompt.")
    if len(results) != batch_size:
        raise PeftgenError(f"Decoder '{name}' returned results for {len(results)} prompts, expected {batch_size}.")
    checked = []
    for index, per_prompt in enumerate(results):
        if not isinstance(per_prompt, (list, tuple)) or not per_prompt:
            what = "an empty list" if isinstance(per_prompt, (list, tuple)) else f"a {type(per_prompt).__name__}"
            raise PeftgenError(f"Decoder '{name}' returned {what} for prompt {index}; it must return a list of at least one Completion.")
        for completion in per_prompt:
            if not isinstance(completion, Completion):
                raise PeftgenError(
                    f"Decoder '{name}' returned a {type(completion).__name__} for prompt {index}; "
                    "each result must be a Completion (engine.completion(token_ids, score) makes one)."
                )
            ids = completion.token_ids
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise PeftgenError(f"Decoder '{name}' returned a Completion for prompt {index} whose token_ids are not a list of ints.")
            if completion.finish_reason not in ("stop", "length"):
                raise PeftgenError(
                    f"Decoder '{name}' returned a Completion for prompt {index} with finish_reason "
                    f"{str(completion.finish_reason)[:40]!r}; it must be 'stop' or 'length'."
                )
        checked.append(list(per_prompt)[:n])
    return checked


def _decoder_error(decoder, where: str, error: Exception) -> PeftgenError:
    return PeftgenError(f"Decoder '{decoder.name}' failed in {where}: {type(error).__name__}: {error}")


def _base_model(model):
    """The transformers model under a PEFT wrapper, whose forward names the real arguments."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
