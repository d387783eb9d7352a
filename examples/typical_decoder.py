"""Locally typical sampling (Meister et al., 2022): a decoder plugin in one file.

    peftgen generate --model runs/lora --plugin examples/typical_decoder.py \
        --decoder typical -o tau=0.9
"""

import torch

from peftgen import DecodeContext, TokenDecoder, hookimpl


class Typical(TokenDecoder):
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, up to mass tau."""

    name = "typical"  # what --decoder takes

    def __init__(self, tau: float = 0.95, temperature: float = 1.0):
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.tau, self.temperature = tau, temperature

    def select(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        logp = torch.log_softmax(logits / self.temperature, dim=-1)  # (B, V)
        entropy = torch.special.entr(logp.exp()).sum(dim=-1, keepdim=True)  # (B, 1)
        order = (entropy + logp).abs().argsort(dim=-1)  # (B, V) most typical first: |-log p - H|
        probs = logp.exp().gather(-1, order)  # (B, V) in that order
        keep = probs.cumsum(dim=-1) - probs < self.tau  # until tau of the mass is kept
        choice = torch.multinomial(probs * keep, 1, generator=ctx.generator)  # (B, 1)
        return order.gather(-1, choice).squeeze(-1)  # (B,) token ids


@hookimpl
def register_decoders(register):
    register(Typical)
