"""Between text and token ids: prompts, stop tokens, completion text and streaming."""

from __future__ import annotations

from peftgen.errors import PeftgenError
from peftgen.generation.decoder import Completion


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's own special tokens (a Llama bos) but never two bos."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos and text.startswith(tokenizer.bos_token or "\0"):
        ids = ids[1:]  # "<s>..." typed by the user and <s> added by the tokenizer
    return ids


def default_prompt(tokenizer) -> str:
    if not tokenizer.bos_token:
        raise PeftgenError("The tokenizer has no bos token to start from. Pass --prompt TEXT or --prompt-file FILE.")
    return tokenizer.bos_token


def stop_token_ids(tokenizer, stop_tokens: list[str] | None) -> list[int]:
    """Ids of the stop tokens (default: the tokenizer's eos). Each must be a single token."""
    if not stop_tokens:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = []
    for text in stop_tokens:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise PeftgenError(
                f"--stop-token {text!r} is {len(encoded)} tokens {pieces}, not one. "
                "A stop token must be a single token of the vocabulary, such as the eos token "
                f"{tokenizer.eos_token!r}."
            )
        ids.append(encoded[0])
    return ids


def text_ids(completion: Completion) -> list[int]:
    """The ids of what a completion says: its token_ids without the stop token that ended it."""
    return completion.token_ids[:-1] if completion.finish_reason == "stop" else list(completion.token_ids)


def completion_text(tokenizer, completion: Completion) -> str:
    """The generated text: prompt and stop token excluded, other special tokens kept visible.

    An instruct model may close a text with its own end-of-turn token (``<|im_end|>``)
    rather than the stop token; keeping special tokens shows that.
    """
    return tokenizer.decode(text_ids(completion), skip_special_tokens=False)


class Streamer:
    """Turns one sequence's tokens into text as they come, holding back split UTF-8 characters."""

    def __init__(self, tokenizer, stop_ids: list[int]):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.ids: list[int] = []
        self.shown = 0  # characters already printed
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The new text this token completes ('' while a character is incomplete, or after the stop)."""
        if self.stopped or token_id in self.stop_ids:
            self.stopped = True
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return ""
        new, self.shown = text[self.shown :], len(text)
        return new
