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
from tiny_runs import run_settings

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
        vocab_size=50257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), config)


SENTENCES = [
    "The old boar calls the animals of the farm to a meeting in the barn.",
    "Two young pigs take command and turn his dream into a philosophy.",
    "A boy finds a map and sails with pirates to an island of treasure.",
    "<BOS> The detective reads the letter twice and then burns it. <EOS>",
    "A family of rabbits leaves the warren before the fields are destroyed.",
    "The captain hunts the white whale across three oceans.",
    "<BOS> Years later the sisters meet again in the house by the sea. <EOS>",
    "The king divides his land between the daughters who flatter him.",
]


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    """train.txt (16 lines, some already wrapped in markers), valid.txt and test.txt (4 lines each)."""
    folder = tmp_path_factory.mktemp("text")
    files = {
        "train": folder / "train.txt",
        "valid": folder / "valid.txt",
        "test": folder / "test.txt",
    }
    files["train"].write_text("\n".join(SENTENCES * 2) + "\n", encoding="utf-8")
    files["valid"].write_text("\n".join(SENTENCES[:4]) + "\n\n", encoding="utf-8")
    files["test"].write_text("\n".join(SENTENCES[4:]) + "\n", encoding="utf-8")
    return files


@pytest.fixture(scope="session")
def make_run(tmp_path_factory, text_files):
    """Train (once per distinct settings) a short run and return its folder.

    make_run("lora", base_folder, max_steps=6) -> Path of a finished run.
    """
    from peftgen import config as config_lib
    from peftgen import training as train_lib

    done: dict[tuple, Path] = {}

    def run(mode: str, base: Path, **overrides) -> Path:
        key = (mode, str(base), tuple(sorted(overrides.items())))
        if key not in done:
            settings = run_settings(base, text_files, tmp_path_factory.mktemp(f"run-{mode}"), mode, **overrides)
            train_lib.train(config_lib.resolve(None, settings), overwrite=True, progress=False)
            done[key] = Path(settings["output_dir"])
        return done[key]

    return run


@pytest.fixture(scope="session")
def learnt_run(make_run, tiny_gpt2) -> Path:
    """A full fine-tune of tiny_gpt2 long enough to have learnt its lines: it ends them with <EOS>.

    150 updates bring the validation loss under 1 whatever the seed (42, 1, 2 tried); at 90 it was
    still about 2, and whether greedy decoding stopped hung on the dropout masks drawn.
    """
    return make_run("full", tiny_gpt2, max_steps=150, lr=2e-2, eval_steps=50, save_steps=150, logging_steps=10)
