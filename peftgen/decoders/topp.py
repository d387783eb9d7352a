"""Top-p (nucleus) sampling: sample from the smallest set of tokens holding probability p (Holtzman et al., 2019)."""

import torch

from peftgen import DecodeContext, TokenDecoder, hookimpl


class TopP(TokenDecoder):
    """Sample from the smallest set of most probable tokens whose probabilities sum to at least p.

    Pure nucleus sampling: no top-k is applied as well. temperature divides the logits first.
    """

    name = "topp"

    def __init__(self, p: float = 0.9, temperature: float = 1.0):
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.p, self.temperature = p, temperature

    def select(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        probs = torch.softmax(logits / self.temperature, dim=-1)  # (B, V)
        if self.p >= 1.0:  # the whole distribution; skips the sort and cumsum rounding
            return torch.multinomial(probs, 1, generator=ctx.generator).squeeze(-1)
        sorted_probs, ids = probs.sort(dim=-1, descending=True)  # (B, V) each
        # A token is in the nucleus if the tokens ranked above it hold less than p:
        # the most probable token always is, and the set stops once p is reached.
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V)
        kept = sorted_probs.masked_fill(mass_above >= self.p, 0.0)
        choice = torch.multinomial(kept, 1, generator=ctx.generator)  # (B, 1) rank, renormalised implicitly
        return ids.gather(-1, choice).squeeze(-1)  # (B,)


@hookimpl
def register_decoders(register):
    register(TopP)
