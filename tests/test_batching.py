"""Packed (padding-free) batches give each example the loss it gets padded, and the training the same steps."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from peftgen import attention, batching
from peftgen import config as config_lib
from peftgen import training as train_lib
from peftgen.data import padded_length
from peftgen.errors import PeftgenError

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


@pytest.mark.parametrize("per_example, blocks", [(False, False), (True, False), (True, True)], ids=["one-mask", "per-example", "block-attention"])
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_padding_to_a_token_multiple_changes_no_loss_and_no_gradient(fixture, per_example, blocks, request):
    """The padding is an example of its own without labels: every real example keeps its loss, every weight its gradient."""
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture)).eval()  # eval: no dropout masks to differ
    model.resize_token_embeddings(50260)
    if per_example:
        assert attention.use_per_example_attention(model, blocks=blocks)
    features = [{"input_ids": ids} for ids in EXAMPLES * 5]  # 75 tokens
    results = {}
    for multiple in (0, 8, 24):
        batch = batching.collator(True, 50259, per_example=per_example, multiple=multiple)(features)
        model.zero_grad()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        losses = _per_example_losses(logits, batch["labels"])[0]
        losses.sum().backward()
        results[multiple] = batch["input_ids"].shape[1], losses[:74].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert [results[m][0] for m in (0, 8, 24)] == [75, 80, 84]  # 24 is more than a quarter of 75: 12
    for multiple in (8, 24):
        assert torch.allclose(results[multiple][1], results[0][1], atol=1e-5)
        for name, grad in results[0][2].items():
            assert (results[multiple][2][name] - grad).norm() <= 1e-5 * grad.norm() + 1e-6, name  # fp32 sums in another order


@pytest.mark.parametrize("seed", range(20))
def test_a_padded_packed_batch_is_a_multiple_with_one_ignored_example_more(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 200, (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator).tolist()
    multiple = int(torch.randint(1, 130, (1,), generator=generator))
    features = [{"input_ids": list(range(3, 3 + n))} for n in lengths]
    plain = batching.collator(True, 7, per_example=True)(features)
    batch = batching.collator(True, 7, per_example=True, multiple=multiple)(features)
    total, padded = sum(lengths), batch["input_ids"].shape[1]
    extra = padded - total
    assert padded == padded_length(total, multiple) and 0 <= extra < multiple
    assert extra == 0 or 4 * extra < total  # never more than a quarter
    if total >= 4 * multiple:
        assert padded % multiple == 0
    assert torch.equal(batch["input_ids"][:, :total], plain["input_ids"]) and torch.equal(batch["labels"][:, :total], plain["labels"])
    assert (batch["input_ids"][0, total:] == 7).all() and (batch["labels"][0, total:] == -100).all()
    assert batch["position_ids"][0, total:].tolist() == list(range(extra))
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        expected = plain[key].tolist() + ([padded] if extra else [])
        assert batch[key].tolist() == expected
    assert batch["max_length_q"] == max(max(lengths), extra)


def test_padded_batches_round_their_width_up_to_the_multiple():
    batch = batching.collator(False, 7, multiple=16)([{"input_ids": [1] * 70}, {"input_ids": [2] * 5}])
    assert batch["input_ids"].shape == (2, 80)
    assert batch["attention_mask"].sum(dim=1).tolist() == [70, 5]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_batches_are_padded_to_64_tokens_on_a_cpu_and_not_on_a_gpu_unless_asked():
    config = config_lib.resolve(None, {"train_file": "x"})
    assert (config.token_multiple_on(gpu=False), config.token_multiple_on(gpu=True)) == (64, 0)
    assert config_lib.resolve(None, {"train_file": "x", "token_multiple": 0}).token_multiple_on(gpu=False) == 0
    assert config_lib.resolve(None, {"train_file": "x", "token_multiple": 128}).token_multiple_on(gpu=True) == 128
    for bad in (-1, 10**6):
        with pytest.raises(PeftgenError, match="token_multiple"):
            config_lib.resolve(None, {"train_file": "x", "token_multiple": bad}).validate()


@pytest.mark.parametrize(
    "length, multiple, padded",
    [(1010, 64, 1024), (1024, 64, 1024), (344, 64, 384), (256, 64, 256), (255, 64, 256), (30, 64, 32), (3, 64, 3), (0, 64, 0), (75, 24, 84), (9, 0, 9)],
)
def test_short_batches_take_a_smaller_multiple_so_that_padding_stays_under_a_quarter(length, multiple, padded):
    assert padded_length(length, multiple) == padded
