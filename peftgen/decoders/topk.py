"""Top-k sampling: sample among the k most likely tokens (Fan et al., 2018)."""

import torch

from peftgen import DecodeContext, TokenDecoder, hookimpl


class TopK(TokenDecoder):
    """Sample from the k most probable tokens, renormalised, after dividing the logits by temperature.

    p < 1 then also keeps only the nucleus of those k (the fewest whose probability reaches p),
    as transformers' top_k + top_p do: -o k=50 -o p=0.9 is what run_generation.py --k 50 did.
    """

    name = "topk"

    def __init__(self, k: int = 50, temperature: float = 1.0, p: float = 1.0):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        self.k, self.temperature, self.p = k, temperature, p

    def select(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        # Work on the k survivors only: softmax and multinomial over (B, k), not (B, V).
        k = min(self.k, logits.shape[-1])
        values, ids = logits.topk(k, dim=-1)  # (B, k) each, values descending
        probs = torch.softmax(values / self.temperature, dim=-1)  # (B, k), the renormalised top-k
        if self.p < 1.0:  # nucleus of the k: keep a token while the ones above it hold less than p
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= self.p, 0.0)
        choice = torch.multinomial(probs, 1, generator=ctx.generator)  # (B, 1) index into the k
        return ids.gather(-1, choice).squeeze(-1)  # (B,) token ids


@hookimpl
def register_decoders(register):
    register(TopK)
