"""How examples become batches: padded to the longest, or packed end to end without padding.

Packed (``packing: true``, the default) uses transformers' own
``DataCollatorWithFlattening``: the batch's examples are laid end to end in
one row, ``position_ids`` restart at 0 for each, and the first token of each
example gets no label, so no example predicts across its neighbour. From
the restarting ``position_ids`` transformers builds a block-diagonal causal
mask (SDPA and eager on CPU; FlashAttention's variable-length kernels on
GPUs), so each example attends only to itself: the same loss as padding,
without computing the padding (tests/test_batching.py checks both).

Not every architecture reads packed positions that way, so ``packing_works``
tries it on the model itself before training and peftgen falls back to
padding where the two disagree.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorWithFlattening

from peftgen.data import IGNORE_INDEX, PadCollator, padded_length


class PackedCollator(DataCollatorWithFlattening):
    """transformers' flattening collator, plus ``use_cache=False``, packing where it is cheaper.

    transformers builds the block-diagonal mask from ``position_ids`` only
    when the forward pass has no KV cache, and models open one by default
    (``config.use_cache``), in training too.

    Attention over a packed row is computed densely, the masked-out blocks
    included: N packed tokens cost N x N, where padding costs B x T x T. Per
    token and layer the projections cost about 24 C^2 multiply-adds and
    attention 4 C per token attended, so a batch of B examples padded to T
    costs B T (1 + T / 6C) and packed N (1 + N / 6C). With ``width`` (the
    model's C) each batch takes the cheaper layout: two GPT-2 examples of
    300 and 500 tokens pack, eight of 128 tokens in a width-576 model pad.
    """

    def __init__(self, pad_token_id: int, width: int | None = None, per_example: bool = False, multiple: int = 0):
        # per_example: attention runs example by example (peftgen.attention), which needs the
        # examples' bounds (cu_seq_lens_q) and never costs more than padding, so every batch packs.
        super().__init__(return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=per_example)
        self.padded = PadCollator(pad_token_id, multiple)
        self.width = None if per_example else width

    def __call__(self, features, return_tensors=None, separator_id=None):
        if self.width and not packing_pays(features, self.width):
            return self.padded(features)
        batch = super().__call__(features, return_tensors, separator_id)
        batch["use_cache"] = False
        pad_packed(batch, self.padded.multiple, self.padded.pad_token_id)
        return batch


def pad_packed(batch: dict, multiple: int, pad_token_id: int) -> None:
    """A packed batch (1, N) given, in place, one more example of padding up to a multiple of ``multiple`` tokens (of less, for short batches).

    Why (``token_multiple``): on a CPU, oneDNN builds (JIT-compiles) a new
    kernel for every matrix product of a size it has not run yet, and a packed
    batch's token count is every product's row count, so a batch of a new
    length paid about 0.2 s of kernel building in a GPT-2 small step of 2.3 s
    (benchmarks/README.md), and its cache of 1,024 kernels cannot hold the
    ~40 products of every length a long run meets. Rounded up to a multiple
    of 64, batches of 256 to 1,024 tokens have 13 lengths; shorter ones take
    a smaller multiple, so that padding stays under a quarter of a batch
    (``peftgen.data.padded_length``).

    The padding is an example of its own: ``position_ids`` restart at 0, no
    labels, and its own bounds in ``cu_seq_lens``, so attention keeps it
    apart as it keeps any two examples apart, and no loss or gradient reaches
    the others (tests/test_batching.py).
    """
    length = batch["input_ids"].shape[1]
    extra = padded_length(length, multiple) - length
    if not extra:
        return

    def extend(tensor, values):
        return torch.cat([tensor, values.to(tensor.dtype).reshape(1, extra)], dim=1)

    batch["input_ids"] = extend(batch["input_ids"], torch.full((extra,), pad_token_id))
    batch["labels"] = extend(batch["labels"], torch.full((extra,), IGNORE_INDEX))
    batch["position_ids"] = extend(batch["position_ids"], torch.arange(extra))
    if "seq_idx" in batch:
        batch["seq_idx"] = extend(batch["seq_idx"], torch.full((extra,), int(batch["seq_idx"].max()) + 1))
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if key in batch:
            batch[key] = torch.cat([batch[key], torch.tensor([length + extra], dtype=batch[key].dtype)])
    for key in ("max_length_q", "max_length_k"):
        if key in batch:
            batch[key] = max(batch[key], extra)


def packing_pays(features, width: int) -> bool:
    lengths = [len(f["input_ids"]) for f in features]
    packed, longest = sum(lengths), max(lengths)
    return packed * (1 + packed / (6 * width)) < len(lengths) * longest * (1 + longest / (6 * width))


def collator(packing: bool, pad_token_id: int, width: int | None = None, per_example: bool = False, multiple: int = 0):
    """The data collator for Trainer: packed batches (where cheaper, given the model's width), or padded ones;
    with ``multiple``, each batch's tokens per row a multiple of it."""
    return PackedCollator(pad_token_id, width, per_example, multiple) if packing else PadCollator(pad_token_id, multiple)


@torch.no_grad()
def packing_works(model, vocab: int, pad_token_id: int, precision: str = "fp32", per_example: bool = False) -> bool:
    """Whether two short examples packed in one row give the logits they give padded in two rows.

    A model that ignores packed positions lets the second example attend to
    the first: its logits then move by a good fraction of their size (38% of
    their norm for SmolLM2-135M-Instruct), far beyond the rounding of bf16 that
    the tolerance allows for. Packed and padded rows may go to different
    attention kernels (block attention, SDPA), each rounding in its own way:
    under bf16 autocast each moved that model's logits by 2-3% of their norm
    from fp32's.
    """
    from peftgen.precision import autocast

    examples = [{"input_ids": [(11 + i) % vocab for i in range(5)]}, {"input_ids": [(101 + i) % vocab for i in range(3)]}]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        packed = collator(True, pad_token_id, per_example=per_example)(examples)
        padded = collator(False, pad_token_id)(examples)
        with autocast(precision):
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed.items() if k != "labels"}
            packed_logits = model(**inputs).logits[0]
            padded_logits = model(input_ids=padded["input_ids"].to(device), attention_mask=padded["attention_mask"].to(device)).logits
        expected = padded_logits[padded["attention_mask"].bool().to(device)].float()  # (8, V)
        error = (packed_logits.float() - expected).norm()
        tolerance = (1e-1 if precision != "fp32" else 1e-4) * expected.norm() + 1e-5
        return bool(error <= tolerance)
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
