"""Beam search, with the bookkeeping of transformers' generate(num_beams=...), which it equals token for token."""

from typing import Literal

import torch

from peftgen import Completion, DecodingEngine, SequenceDecoder, hookimpl

NEG = -1.0e9  # "impossible" score; added rather than masked so the arithmetic matches transformers


class BeamSearch(SequenceDecoder):
    """Beam search: keep the num_beams most probable hypotheses; return up to num_beams, best first.

    A finished hypothesis scores sum(log p) / length**length_penalty (length = new tokens), so
    length_penalty > 0 favours longer ones. early_stopping: True stops once num_beams hypotheses
    have finished; False stops when the best live beam, scored at its current length, cannot beat
    the worst kept hypothesis; "never" only when no live beam can, even at the maximum length.
    no_repeat_ngram_size > 0 forbids any n-gram of that many tokens to occur twice in a
    hypothesis (prompt included), the usual cure for beam search repeating itself.
    """

    name = "beam"

    def __init__(
        self,
        num_beams: int = 5,
        length_penalty: float = 1.0,
        early_stopping: bool | Literal["never"] = False,
        no_repeat_ngram_size: int = 0,
    ):
        if num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {num_beams}")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or never, got {early_stopping!r}")
        if no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be 0 (off) or more, got {no_repeat_ngram_size}")
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.no_repeat_ngram_size = no_repeat_ngram_size

    def validate(self, num_return_sequences: int) -> None:
        if num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({num_return_sequences}) is more than num_beams ({self.num_beams}); "
                "beam search returns at most num_beams sequences per prompt. "
                f"Lower --num-return-sequences or pass -o num_beams={num_return_sequences}"
            )

    def decode(self, engine: DecodingEngine, num_return_sequences: int) -> list[list[Completion]]:
        if self.num_beams == 1:
            return self._greedy(engine)
        B, K, new = engine.batch_size, self.num_beams, engine.max_new_tokens
        device, stop, lp = engine.device, engine.stop_tokens, self.length_penalty
        # Keep C candidates per prompt, not K: even if the best K all just ended, K live ones remain.
        C = max(2, 1 + len(stop)) * K
        may_finish = torch.arange(C, device=device) < K  # (C,) only the best K candidates may finish
        row_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1) first cache row of each prompt

        # Live beams: tokens (B, K, new) and summed log-probs (B, K). All K rows of a prompt start
        # identical, so only row 0 may expand at the first step (the others start at NEG).
        running = torch.full((B, K, new), engine.pad_token_id, dtype=torch.long, device=device)
        running_scores = torch.zeros((B, K), device=device)
        running_scores[:, 1:] = NEG
        # Finished hypotheses, the best K per prompt: tokens, length-penalised scores, lengths.
        done_tokens = running.clone()
        done_scores = torch.full((B, K), NEG, device=device)
        done_lengths = torch.zeros((B, K), dtype=torch.long, device=device)
        is_done = torch.zeros((B, K), dtype=torch.bool, device=device)
        improvable = torch.ones((B, 1), dtype=torch.bool, device=device)  # can a live beam still enter the top K?

        logits = engine.start(expand=K)  # (B*K, V)
        V = logits.shape[-1]
        ban = self._ngram_ban(engine, K)
        for t in range(new):
            if t > 0:
                logits = engine.step(running[:, :, t - 1].reshape(-1))
            logp = ban(running.reshape(B * K, new)[:, :t], torch.log_softmax(logits, dim=-1))  # (B*K, V)
            scores = logp.view(B, K, V) + running_scores[:, :, None]  # (B, K, V)
            cand_scores, flat = scores.view(B, K * V).topk(C)  # (B, C) best first
            parent, token = flat // V, flat % V  # the beam each candidate extends, and with which token
            cand = _gather(running, parent)  # (B, C, new)
            cand[:, :, t] = token
            ended = torch.isin(token, stop) | (t + 1 == new)  # (B, C) stop token, or out of room

            # Next live beams: the best K candidates that did not just end.
            alive = cand_scores + ended.to(torch.float32) * NEG
            keep = alive.topk(K).indices  # (B, K)
            running, running_scores = _gather(cand, keep), alive.gather(1, keep)
            engine.reorder((parent.gather(1, keep) + row_offset).view(-1))  # cache rows follow their beams

            # Finished: merge the candidates that just ended (among the best K) into the kept K.
            final = cand_scores / ((t + 1) ** lp)
            final += (is_done.all(-1, keepdim=True) & (self.early_stopping is True)).to(torch.float32) * NEG
            final += (~improvable).to(torch.float32) * NEG
            just_done = ended & may_finish
            final += (~just_done) * NEG
            best = torch.cat([done_scores, final], dim=1).topk(K).indices  # (B, K) of K + C
            done_tokens = _gather(torch.cat([done_tokens, cand], dim=1), best)
            done_scores = torch.cat([done_scores, final], dim=1).gather(1, best)
            done_lengths = torch.cat([done_lengths, torch.full_like(cand_scores, t + 1, dtype=torch.long)], 1).gather(1, best)
            is_done = torch.cat([is_done, just_done], dim=1).gather(1, best)

            # Could the best live beam still beat the worst kept hypothesis? With "never" and a
            # positive penalty assume it grows to the maximum length; otherwise score it as it is.
            length = new if (self.early_stopping == "never" and lp > 0) else t + 1
            best_live = running_scores[:, :1] / (length**lp)  # (B, 1)
            worst_done = torch.where(is_done, done_scores.min(dim=1, keepdim=True).values, NEG)  # (B, K)
            improvable = improvable & (best_live > worst_done).any(dim=-1, keepdim=True)
            all_full = bool(is_done.all()) and self.early_stopping is True
            if not bool(improvable.any()) or all_full or bool(ended.all()):
                break

        return [
            [engine.completion(done_tokens[b, i, : done_lengths[b, i]].tolist(), float(done_scores[b, i])) for i in range(num_return_sequences)]
            for b in range(B)
        ]

    def _greedy(self, engine: DecodingEngine) -> list[list[Completion]]:
        """One beam is greedy decoding (as in transformers, where the beam options then do nothing)."""
        B, new = engine.batch_size, engine.max_new_tokens
        tokens = torch.full((B, new), engine.pad_token_id, dtype=torch.long, device=engine.device)
        finished = torch.zeros(B, dtype=torch.bool, device=engine.device)
        logits = engine.start()
        ban = self._ngram_ban(engine, 1)
        for t in range(new):
            tokens[:, t] = ban(tokens[:, :t], logits).argmax(dim=-1).masked_fill(finished, engine.pad_token_id)
            finished |= torch.isin(tokens[:, t], engine.stop_tokens)
            if bool(finished.all()):
                break
            if t + 1 < new:
                logits = engine.step(tokens[:, t])
        return [[engine.completion(row)] for row in tokens[:, : t + 1].tolist()]

    def _ngram_ban(self, engine: DecodingEngine, rows_per_prompt: int):
        """``ban(generated (N, t), scores (N, V))``: scores with repeated n-grams set to -inf.

        transformers' own NoRepeatNGramLogitsProcessor, applied as generate applies it: to each
        row's prompt (left padding included) followed by its generated tokens.
        """
        if not self.no_repeat_ngram_size:
            return lambda generated, scores: scores
        from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

        processor = NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size)
        prompts = engine.prompt_ids.repeat_interleave(rows_per_prompt, dim=0)  # (N, T0)
        return lambda generated, scores: processor(torch.cat([prompts, generated], dim=1), scores)


def _gather(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, X, L), index (B, Y) -> (B, Y, L): the rows of each prompt's beams picked by index."""
    return tokens.gather(1, index[:, :, None].expand(-1, -1, tokens.shape[-1]))


@hookimpl
def register_decoders(register):
    register(BeamSearch)
