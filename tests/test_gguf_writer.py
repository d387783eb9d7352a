"""The tiny GGUF that tests use in place of SmolLM2 loads through transformers like the real one."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

import torch  # noqa: E402
from gguf_writer import ENDOFTEXT, gpt2_bpe_prefix, tiny_llama, write_tiny_llama_gguf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


@pytest.mark.parametrize("tied", [False, True])
def test_model_read_back_equals_the_one_written(tmp_path, tied):
    tokens, _ = gpt2_bpe_prefix(400)
    source = tiny_llama(len(tokens), tie_word_embeddings=tied)
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", source)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.config.tie_word_embeddings is tied and loaded.config.num_hidden_layers == 2
    ids = torch.arange(3, 60)[None]  # (1, T): long enough for the rotary q/k layout to matter
    with torch.no_grad():
        assert torch.allclose(source(ids).logits, loaded(ids).logits, atol=1e-5)


def test_tokenizer_is_a_cut_down_gpt2(tmp_path, gpt2_tokenizer_dir):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert len(tok) == 657 and tok.bos_token == tok.eos_token == ENDOFTEXT and tok.eos_token_id == 656
    text = " Old Major, the old boar, calls the animals. café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < 656
    # Fewer merges than GPT-2, so more pieces, but the same byte-level alphabet.
    full = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)(text)["input_ids"]
    assert len(full) < len(ids) < len(text.encode())
    assert tok(f"a{ENDOFTEXT}", add_special_tokens=False)["input_ids"][-1] == 656


def test_quantized_file_loads_through_the_gguf_quantizer(tmp_path):
    # Like the real SmolLM2 file (Q8_0/Q4_1 blocks), unlike an F32 one, this goes through
    # transformers' GgufHfQuantizer: weights come back dequantised, close to the originals.
    tokens, _ = gpt2_bpe_prefix(400)
    source = tiny_llama(len(tokens))
    path = write_tiny_llama_gguf(tmp_path / "q8.gguf", source, quantization="Q8_0")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert getattr(loaded, "hf_quantizer", None) is not None
    assert isinstance(loaded.model.layers[0].mlp.up_proj, torch.nn.Linear)
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        expected, got = source(ids).logits, loaded(ids).logits
    error = (expected - got).abs().max() / expected.abs().max()
    assert 0 < error < 0.02  # Q8_0 is lossy, but only just
