"""Sample n times and rank: a sequence decoder that drives the engine itself.

    peftgen generate --model runs/lora --plugin examples/sample_and_rank.py \
        --decoder sample-and-rank --num-return-sequences 3
"""

import torch

from peftgen import Completion, DecodingEngine, SequenceDecoder, hookimpl


class SampleAndRank(SequenceDecoder):
    """Draw num_return_sequences samples per prompt; return them by total log-probability, best first."""

    name = "sample-and-rank"

    def decode(self, engine: DecodingEngine, num_return_sequences: int) -> list[list[Completion]]:
        n = num_return_sequences
        logits = engine.start(expand=n)  # (B*n, V)
        live = torch.arange(logits.shape[0], device=engine.device)  # original row of each live row
        tokens = [[] for _ in range(logits.shape[0])]
        scores = torch.zeros(logits.shape[0], device=engine.device)
        for t in range(engine.max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)  # (live, V)
            chosen = torch.multinomial(logp.exp(), 1, generator=engine.generator).squeeze(-1)  # (live,)
            scores[live] += logp.gather(1, chosen[:, None]).squeeze(-1)
            for row, token in zip(live.tolist(), chosen.tolist()):
                tokens[row].append(token)
            going = ~torch.isin(chosen, engine.stop_tokens)
            if t + 1 == engine.max_new_tokens or not going.any():
                break
            if not going.all():  # drop the rows that just ended from the cache
                engine.reorder(going.nonzero().squeeze(-1))
                live, chosen = live[going], chosen[going]
            logits = engine.step(chosen)
        ranked = []
        for b in range(engine.batch_size):
            rows = sorted(range(b * n, (b + 1) * n), key=lambda r: -scores[r].item())
            ranked.append([engine.completion(tokens[r], scores[r].item()) for r in rows])
        return ranked


@hookimpl
def register_decoders(register):
    register(SampleAndRank)
