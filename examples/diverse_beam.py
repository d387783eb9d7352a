"""Diverse beam search as a sequence decoder plugin.

    peftgen generate --model runs/lora --plugin examples/diverse_beam.py \
        --decoder diverse-beam -o num_groups=2 -o num_beams=4 --num-return-sequences 4
"""

import torch

from peftgen import Completion, DecodingEngine, SequenceDecoder, hookimpl


class DiverseBeam(SequenceDecoder):
    """Diverse beam search (Vijayakumar et al., 2018): the beams split into num_groups groups, and
    a group's scores drop by diversity_penalty for each beam of an earlier group that chose the same
    token at this step. Returns hypotheses by log-probability per token (penalties included), best first.
    """

    name = "diverse-beam"

    def __init__(self, num_beams: int = 6, num_groups: int = 3, diversity_penalty: float = 1.0):
        if num_groups < 1 or num_beams < 1 or num_beams % num_groups:
            raise ValueError(f"num_beams ({num_beams}) must be a positive multiple of num_groups ({num_groups})")
        if diversity_penalty < 0:
            raise ValueError(f"diversity_penalty must be >= 0, got {diversity_penalty}")
        self.num_beams, self.num_groups, self.diversity_penalty = num_beams, num_groups, diversity_penalty

    def validate(self, num_return_sequences: int) -> None:
        if num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({num_return_sequences}) is more than num_beams ({self.num_beams})")

    def decode(self, engine: DecodingEngine, num_return_sequences: int) -> list[list[Completion]]:
        B, K, G, new = engine.batch_size, self.num_beams, self.num_groups, engine.max_new_tokens
        k = K // G  # beams per group: prompt b's cache rows are b*K + g*k + i
        logits = engine.start(expand=K)  # (B*K, V)
        V = logits.shape[-1]
        scores = torch.full((B, G, k), float("-inf"))
        scores[:, :, 0] = 0.0  # a group's k rows start identical: expand one of them
        tokens = torch.empty((B, K, 0), dtype=torch.long)  # each row's generated tokens
        finished = [[] for _ in range(B)]  # (score per token, token ids) of ended hypotheses
        stops = set(engine.stop_tokens.tolist())
        for t in range(new):
            logp = torch.log_softmax(logits, dim=-1).cpu().view(B, G, k, V)
            taken = torch.zeros((B, V))  # how many beams of earlier groups chose each token this step
            parents = torch.zeros((B, K), dtype=torch.long)
            chosen = torch.zeros((B, K), dtype=torch.long)
            next_scores = torch.full((B, G, k), float("-inf"))
            for g in range(G):
                candidates = scores[:, g, :, None] + logp[:, g] - self.diversity_penalty * taken[:, None, :]
                top, index = candidates.view(B, k * V).topk(2 * k)  # (B, 2k), best first
                for b in range(B):
                    live = 0
                    for rank, (score, i) in enumerate(zip(top[b].tolist(), index[b].tolist())):
                        parent, token = g * k + i // V, i % V
                        if token in stops or t + 1 == new:  # it ends: keep it if it ranks among the best k
                            if rank < k:
                                finished[b].append((score / (t + 1), tokens[b, parent].tolist() + [token]))
                        elif live < k:  # it lives on as beam `live` of this group
                            row = g * k + live
                            parents[b, row], chosen[b, row], next_scores[b, g, live] = parent, token, score
                            taken[b, token] += 1
                            live += 1
            scores = next_scores
            if t + 1 == new or all(len(done) >= K for done in finished):
                break
            rows = parents + torch.arange(B)[:, None] * K  # (B, K) cache rows the new beams extend
            engine.reorder(rows.view(-1))
            tokens = torch.cat([tokens.gather(1, parents[:, :, None].expand(-1, -1, t)), chosen[:, :, None]], dim=2)
            logits = engine.step(chosen.view(-1).to(engine.device))
        return [[engine.completion(ids, score) for score, ids in sorted(done, key=lambda d: -d[0])[:num_return_sequences]] for done in finished]


@hookimpl
def register_decoders(register):
    register(DiverseBeam)
