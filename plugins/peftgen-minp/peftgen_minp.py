"""Min-p sampling (Nguyen et al., 2024) as a peftgen decoder plugin.

pip install -e plugins/peftgen-minp
peftgen generate --model runs/lora --decoder minp -o p_min=0.1
"""

import torch

from peftgen import DecodeContext, TokenDecoder, hookimpl


class MinP(TokenDecoder):
    """Sample from tokens whose probability is at least p_min times the top token's.

    The cut-off scales with the model's confidence: a peaked distribution keeps few
    tokens, a flat one many. temperature divides the logits first.
    """

    name = "minp"  # what --decoder takes

    def __init__(self, p_min: float = 0.05, temperature: float = 1.0):
        if not 0 < p_min <= 1:
            raise ValueError(f"p_min must be in (0, 1], got {p_min}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.p_min, self.temperature = p_min, temperature

    def select(self, logits: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        probs = torch.softmax(logits / self.temperature, dim=-1)  # (B, V)
        threshold = self.p_min * probs.amax(dim=-1, keepdim=True)  # (B, 1), per row
        probs = probs.masked_fill(probs < threshold, 0)  # multinomial renormalises what is left
        return torch.multinomial(probs, 1, generator=ctx.generator).squeeze(-1)  # (B,)


@hookimpl
def register_decoders(register):
    register(MinP)
