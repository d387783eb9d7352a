"""Shared fixtures: tiny, offline, randomly initialised causal LMs.

Every model here is built from a config plus the real GPT-2 tokenizer in
``tests/assets/gpt2-tokenizer`` (MIT, see its LICENSE), so nothing touches the
Hugging Face Hub. The models are saved once per session as plain Hugging Face
folders, exactly what a user would pass as ``--model``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ASSETS = Path(__file__).parent / "assets"
GPT2_TOKENIZER = ASSETS / "gpt2-tokenizer"


def _save_tiny(folder: Path, config) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(GPT2_TOKENIZER).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    return GPT2_TOKENIZER


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide GPT-2 (tied embeddings) with the real GPT-2 tokenizer."""
    from transformers import GPT2Config

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=256, vocab_size=50257)
    return _save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), config)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama-architecture model (untied embeddings) with the GPT-2 tokenizer."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), config)
