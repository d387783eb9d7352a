"""Tokens per second of peftgen's engine against transformers' model.generate.

    python benchmarks/generation_speed.py                      # tiny and small shapes, topk and beam
    python benchmarks/generation_speed.py --shapes tiny --repeats 5

Same process, same model object, same dtype, same decoder: 5 sequences of 300
new tokens from <BOS> (one prompt, num_return_sequences=5; beam: num_beams=5,
5 returned), seeded, after a warm-up. No stop token on either side, so both
produce exactly 300 tokens per sequence (checked). Models are GPT-2 shapes
with random weights and the GPT-2 vocabulary (50257): nothing is downloaded.
Each repeat times generate and the engine back to back; the median of the
repeats is reported. Other processes on the machine skew results: the "cpu
share" column is the lowest share of the machine's threads any timed run
got; trust rows near 100%.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from peftgen.decoders.beam import BeamSearch
from peftgen.decoders.topk import TopK
from peftgen.generation import generate

SHAPES = {
    "tiny": dict(n_layer=4, n_embd=256, n_head=4),  # ~16M parameters, 13M of them the embedding
    "small": dict(n_layer=12, n_embd=768, n_head=12),  # GPT-2 small, 124M
}
BOS, SEQUENCES, NEW = 50256, 5, 300


def build(shape: str, dtype: torch.dtype):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=1024, **SHAPES[shape])
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.generation_config.eos_token_id = None  # no stop token: every sequence gets NEW tokens
    model.generation_config.pad_token_id = BOS
    return model


def with_transformers(model, decoder: str, new: int) -> torch.Tensor:
    torch.manual_seed(0)
    prompt = torch.tensor([[BOS]])
    if decoder == "topk":
        kwargs = dict(do_sample=True, top_k=50, top_p=1.0, temperature=1.0, num_return_sequences=SEQUENCES)
    else:
        kwargs = dict(do_sample=False, num_beams=SEQUENCES, num_return_sequences=SEQUENCES)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, **kwargs)
    return out[:, 1:]


def with_peftgen(model, decoder: str, new: int, matmul_layout: str = "skinny") -> list[list[int]]:
    strategy = TopK(k=50) if decoder == "topk" else BeamSearch(num_beams=SEQUENCES)
    completions = generate(model, [[BOS]], strategy, max_new_tokens=new, num_return_sequences=SEQUENCES, seed=0, matmul_layout=matmul_layout)[0]
    return [c.token_ids for c in completions]


SHARES: list[float] = []  # CPU time / (wall time x threads) of every timed run


def seconds(fn) -> float:
    """Wall time of fn(); also records the share of the machine's threads this process got."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    wall = time.perf_counter() - start
    SHARES.append((time.process_time() - cpu) / (wall * torch.get_num_threads()))
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--decoders", nargs="+", default=["topk", "beam"], choices=["topk", "beam"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ablation", action="store_true", help="Also time the engine with matmul_layout='standard' (no skinny-matmul swap).")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.dtype}; {SEQUENCES} sequences x {NEW} new tokens from <BOS>; median of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.2f} (other processes skew timings); "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    header = f"{'model':<8}{'decoder':<9}{'model.generate':>16}{'peftgen':>12}{'ratio':>8}{'cpu share':>11}"
    print(header + ("   no matmul swap" if args.ablation else ""))
    for shape in args.shapes:
        model = build(shape, dtype)
        for decoder in args.decoders:
            # Warm-up, and proof that both sides make NEW tokens per sequence.
            assert with_transformers(model, decoder, NEW).shape == (SEQUENCES, NEW)
            assert all(len(ids) == NEW for ids in with_peftgen(model, decoder, NEW))
            hf, ours, plain = [], [], []
            SHARES.clear()
            for _ in range(args.repeats):
                hf.append(seconds(lambda: with_transformers(model, decoder, NEW)))  # noqa: B023 (called at once)
                ours.append(seconds(lambda: with_peftgen(model, decoder, NEW)))  # noqa: B023 (called at once)
                if args.ablation:
                    plain.append(seconds(lambda: with_peftgen(model, decoder, NEW, matmul_layout="standard")))  # noqa: B023 (called at once)
            tokens = SEQUENCES * NEW
            hf_rate, our_rate = tokens / statistics.median(hf), tokens / statistics.median(ours)
            # The lowest share of any timed run: well under 100% means other processes took CPU time.
            line = f"{shape:<8}{decoder:<9}{hf_rate:>12.0f} t/s{our_rate:>8.0f} t/s{our_rate / hf_rate:>7.2f}x{min(SHARES):>10.0%}"
            if args.ablation:
                line += f"{tokens / statistics.median(plain):>10.0f} t/s"
            print(line, flush=True)


if __name__ == "__main__":
    main()
