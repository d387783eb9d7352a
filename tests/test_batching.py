"""Packed (padding-free) batches give each example the loss it gets padded, and the training the same steps."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from peftgen import attention, batching
from peftgen import config as config_lib
from peftgen import training as train_lib

EXAMPLES = [[50257, 464, 1468, 1110, 50258], [50257, 318, 50258], [50257, 1332, 257, 2068, 3290, 318, 50258]]


def _per_example_losses(logits, labels):
    """(sum of token losses, token count) of each example: labels mark the example by position."""
    token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="none", ignore_index=-100)
    return token_loss.view(labels.shape[0], -1)


@pytest.mark.parametrize("per_example", [False, True], ids=["one-mask", "per-example-attention"])
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_packed_loss_equals_padded_loss_per_example(fixture, per_example, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture)).eval()
    model.resize_token_embeddings(50260)
    if per_example:
        assert attention.use_per_example_attention(model)
    features = [{"input_ids": ids} for ids in EXAMPLES]
    packed = batching.collator(True, 50259, per_example=per_example)(features)
    assert ("cu_seq_lens_q" in packed) == per_example
    padded = batching.collator(False, 50259)(features)
    assert packed["input_ids"].shape == (1, sum(map(len, EXAMPLES)))  # no padding at all
    with torch.no_grad():
        packed_loss = _per_example_losses(model(**{k: v for k, v in packed.items() if k != "labels"}).logits, packed["labels"])[0]
        padded_loss = _per_example_losses(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["labels"])
    # Walk the packed row example by example: each predicts len - 1 tokens, none across the boundary.
    start = 0
    for row, ids in enumerate(EXAMPLES):
        mine = packed_loss[start : start + len(ids) - 1]
        assert torch.allclose(mine, padded_loss[row, : len(ids) - 1], atol=1e-5)
        start += len(ids)
    assert packed["labels"][0, len(EXAMPLES[0])] == -100  # the next example's first token is not a target


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_packing_check_passes_block_attention_against_padded_sdpa(fixture, precision, request):
    """Packed rows go to block attention, padded ones to SDPA: two kernels, each rounding its own way under bf16."""
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture))
    assert attention.use_per_example_attention(model, blocks=True)
    assert batching.packing_works(model, 50257, 0, precision, per_example=True)


def test_packing_check_notices_a_model_that_mixes_packed_examples(tiny_gpt2, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    assert batching.packing_works(model, 50257, 0)
    # A model that ignores position_ids attends across the packed examples.
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda position_ids=None, **kw: forward(**kw))
    assert not batching.packing_works(model, 50257, 0)


def test_training_packed_or_padded_takes_the_same_steps(tiny_gpt2, text_files, tmp_path):
    """Dropout off (it draws different masks for different shapes): then the logged losses agree."""
    from transformers import AutoTokenizer

    base = tmp_path / "no-dropout"
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(base)
    losses = {}
    for packing in (True, False):
        settings = dict(
            model=str(base),
            mode="full",
            train_file=str(text_files["train"]),
            valid_file=str(text_files["valid"]),
            output_dir=str(tmp_path / f"run-{packing}"),
            max_steps=4,
            eval_steps=4,
            save_steps=4,
            logging_steps=1,
            batch_size=4,
            lr=1e-2,
            precision="fp32",
            packing=packing,
            max_length=64,
        )
        result = train_lib.train(config_lib.resolve(None, settings), progress=False)
        losses[packing] = [e["loss"] for e in result.log_history if "loss" in e] + [result.metrics["eval_loss"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_each_batch_takes_the_cheaper_layout():
    gpt2_pair = [{"input_ids": [1] * 300}, {"input_ids": [1] * 500}]
    assert batching.packing_pays(gpt2_pair, 768)  # 800 tokens packed beat 2 x 500 padded
    demo_batch = [{"input_ids": [1] * n} for n in (128, 120, 126, 128, 110, 128, 127, 125)]
    assert not batching.packing_pays(demo_batch, 576)  # little padding to save, 8x the attention
    packed = batching.collator(True, 0, 768)(gpt2_pair)
    assert batching.collator(True, 0, 576, per_example=True)(demo_batch)["input_ids"].shape == (1, 992)  # always packs
    padded = batching.collator(True, 0, 576)(demo_batch)
    assert packed["input_ids"].shape == (1, 800) and "position_ids" in packed
    assert padded["input_ids"].shape == (8, 128) and "attention_mask" in padded
