"""Write a tiny Llama-architecture GGUF, offline, for tests of the GGUF loading path.

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

The file has the layout of the real SmolLM2-135M-Instruct GGUF the demo uses
(``general.architecture = llama``, tensors ``token_embd``, ``blk.N.attn_q`` ...,
a byte-level BPE tokenizer under ``tokenizer.ggml.*`` with ``model = gpt2``),
shrunk to 2 layers of width 64, stored as F32 so nothing is lost.

The tokenizer is GPT-2's own, cut down: its 256 byte tokens plus its first
``n_merges`` merges (each merge only joins bytes or earlier merges, so any
prefix of the list is a complete BPE), plus ``<|endoftext|>`` as bos and eos.
It comes from ``tests/assets/gpt2-tokenizer`` (MIT).

llama.cpp stores the rows of q and k permuted for its rotary layout, and
transformers undoes that when loading, so they are permuted here the same way:
the model read back from the file equals the one written, logits included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GPT2_TOKENIZER = Path(__file__).parent / "assets" / "gpt2-tokenizer"
ENDOFTEXT = "<|endoftext|>"


def gpt2_bpe_prefix(n_merges: int = 400) -> tuple[list[str], list[str]]:
    """(tokens, merges): GPT-2's byte tokens and first n merges, then <|endoftext|>."""
    vocab = json.loads((GPT2_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    lines = (GPT2_TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [m for m in lines if m and not m.startswith("#version")][:n_merges]
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id[i] for i in range(256 + n_merges)]
    # GPT-2 numbers merge k's result 256 + k; the cut is a consistent vocabulary only if so.
    assert all(tokens[256 + k] == m.replace(" ", "") for k, m in enumerate(merges))
    return tokens + [ENDOFTEXT], merges


def tiny_llama(vocab_size: int, *, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, context_length=256, tie_word_embeddings=False, seed=0):
    """A random LlamaForCausalLM of the given vocabulary size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context_length,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1; make them differ so the mapping is checked
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: (heads, 2, d/2) -> (heads, d/2, 2), the inverse of transformers' reversal."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_llama_gguf(
    path, model=None, *, n_merges: int = 400, tie_word_embeddings: bool = False, quantization: str = "F32", name: str = "tiny-llama"
) -> Path:
    """Write ``model`` (default: a fresh ``tiny_llama``) with the cut GPT-2 tokenizer to ``path``.

    The model's vocabulary must have ``256 + n_merges + 1`` rows; the default
    model is built to fit. ``quantization`` "Q8_0" or "Q4_1" stores every
    weight matrix in those blocks (norms stay F32), as the real SmolLM2 file
    does; transformers then loads through its GGUF quantizer, which an F32 file
    skips. Returns ``path``.
    """
    import gguf
    from gguf.quants import quantize

    tokens, merges = gpt2_bpe_prefix(n_merges)
    if model is None:
        model = tiny_llama(len(tokens), tie_word_embeddings=tie_word_embeddings)
    cfg = model.config
    if cfg.vocab_size != len(tokens):
        raise ValueError(f"model vocab_size {cfg.vocab_size} != tokenizer size {len(tokens)} (n_merges={n_merges})")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    eot = len(tokens) - 1

    qtype = gguf.GGMLQuantizationType[quantization]
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[quantization]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * eot + [gguf.TokenType.CONTROL])
    w.add_token_merges(merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(False)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def add(name: str, weights: np.ndarray) -> None:
        if weights.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, quantize(weights, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, weights)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _permute(state[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", _permute(state[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:  # no output.weight tells the loader the embeddings are tied
        add("output.weight", state["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
