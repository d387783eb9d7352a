"""Greedy decoding: always the most likely token. Equals model.generate(do_sample=False)."""

import torch

from peftgen import DecodeContext, TokenDecoder, hookimpl


class Greedy(TokenDecoder):
    """Always the most probable next token (deterministic; the seed does not matter)."""

    name = "greedy"

    def select(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        return logits.argmax(dim=-1)  # (B, V) -> (B,); ties go to the lowest id, as in generate


@hookimpl
def register_decoders(register):
    register(Greedy)
