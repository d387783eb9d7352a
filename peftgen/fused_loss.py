"""The training loss computed from hidden states, without ever holding the full logits.

A 50k-token vocabulary makes the logits of one batch of 2 x 512 tokens a
(1024, 50260) matrix: 206 MB in fp32, and the usual path keeps several such
copies (bf16 logits, their fp32 upcast, the softmax, its gradient), more than
all twelve layers of GPT-2 small hold. Here the output layer and the
cross-entropy run together, one chunk of label positions at a time, and the
gradients with respect to the hidden states and the head's weight are made
in the same pass (softmax minus one-hot, times the weight), so nothing of
size (tokens, vocabulary) outlives its chunk. Positions without a label
(padding, the first token of each packed example) are dropped before the
head runs.

Written by hand because neither torch nor transformers offers a fused
linear + cross-entropy on CPU (Liger's and Apple's cut-cross-entropy are
Triton kernels for GPUs); the math is the textbook one, checked against
``F.cross_entropy(F.linear(h, W), y)`` value for value and gradient for
gradient in tests/test_fused_loss.py.

With PEFT's trainable token rows (LoRA and 8-bit runs), the head's weight is
the frozen base matrix except rows ``index``, which come from a small
trainable ``delta``: only ``delta`` gets a gradient, never the 50k x C base.

A trained head tied to an input embedding that hands autograd its gradient
as rows (efficiency.embedding_row_grads, full mode) gets its gradient written
straight into ``weight.grad`` (``into_grad``). Returned through autograd, it
would meet the embedding's rows in autograd's buffer, which cannot add into a
tensor a Python function returned and so copies all V x C of it to add about
a thousand rows (139 ms in a profiled GPT-2 small step on 2 cores); the lookup's rows,
arriving afterwards at the weight, are added in place into ``.grad``. The
lookup's gradient always follows (it feeds every hidden state), so hooks that
wait for the weight's gradient (DistributedDataParallel's) still see the sum.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from peftgen import efficiency
from peftgen.data import IGNORE_INDEX, padded_length

CHUNK = 256  # label positions per pass of head + softmax: 256 x 50k in fp32 is 51 MB
# Label positions whose softmax gradients are kept (in the compute dtype) before
# the head's weight gradient is formed from them in one matmul: 2048 x 50k in
# bf16 is 206 MB. One (V, n) x (n, C) product per chunk of 256 ran the loss
# of a full-mode step 1.3x slower than transformers' (small inner dimension,
# and a (V, C) fp32 sum per chunk); one per block is faster than transformers'.
WEIGHT_BLOCK = 512

# Architectures whose logits are exactly lm_head(last hidden state): no
# softcapping, logit scale or bias after the head. Others keep transformers'
# own loss.
PLAIN_HEAD_MODELS = {
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "smollm3",
    "olmo",
    "olmo2",
    "gpt_neox",
    "gptj",
    "opt",
}


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of -log softmax(h W^T)[y], with its gradients made during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, delta, index, labels, compute_dtype, chunk, into_grad=False, row_multiple=0):
        # hidden (N, C), weight (V, C), delta (K, C) or None, index (K,) or None, labels (N,)
        valid = hidden.shape[0]
        extra = padded_length(valid, row_multiple) - valid
        if extra:  # rows of zeros up to the multiple (see linear_cross_entropy): no loss, no gradient
            hidden = torch.cat([hidden, hidden.new_zeros((extra, hidden.shape[1]))])
            labels = torch.cat([labels, labels.new_zeros(extra)])
        want_weight = weight.requires_grad
        want_delta = delta is not None and delta.requires_grad
        w = weight.detach().to(compute_dtype)  # (V, C): one cast per step, shared by every chunk
        d = delta.detach().to(compute_dtype) if delta is not None else None  # (K, C)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = None  # (V, C) fp32, from the first block on
        block = max(chunk, WEIGHT_BLOCK // chunk * chunk)  # a whole number of chunks
        rows = min(hidden.shape[0], chunk)
        pending = torch.empty((min(hidden.shape[0], block), weight.shape[0]), dtype=compute_dtype, device=hidden.device) if want_weight else None
        # Two (chunk, V) buffers serve every chunk: fp32 scores for the softmax
        # and, under bf16/fp16, the products in the compute dtype (rows of
        # `pending` when the weight gradient is wanted). Fresh ones per chunk
        # would be mapped and faulted in anew each time, and the old chunk's
        # would still be alive when the next one's were made.
        scores = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=hidden.device)
        narrow = compute_dtype != torch.float32
        spare = torch.empty((rows, weight.shape[0]), dtype=compute_dtype, device=hidden.device) if narrow and not want_weight else None
        grad_delta = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device) if want_delta else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        logits = low = grad = None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].detach().to(compute_dtype)  # (n, C)
            y = labels[start : start + chunk]  # (n,)
            n, at = len(y), start % block
            logits = scores[:n]  # (n, V) fp32
            low = pending[at : at + n] if want_weight else (spare[:n] if narrow else logits)  # (n, V) compute dtype
            torch.matmul(h, w.T, out=low)
            if low is not logits:
                logits.copy_(low)
            if d is not None:  # the trainable rows replace the base rows at index
                logits[:, index] = (h @ d.T).float()
            # The softmax in place over the logits: log_softmax would allocate
            # a second (n, V) buffer, logsumexp two more as temporaries.
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            picked = logits.gather(1, y[:, None])  # (n, 1)
            sums = logits.exp_().sum(dim=-1, keepdim=True)  # (n, 1)
            live = max(0, min(n, valid - start))  # rows before the padding
            total -= (picked - sums.log())[:live].sum()
            # d(sum of losses)/d(logits) = softmax - one_hot(y)
            logits.div_(sums)
            logits[torch.arange(n, device=y.device), y] -= 1.0
            if live < n:
                logits[live:] = 0
            if low is not logits:
                low.copy_(logits)
            grad = low  # (n, V) compute dtype
            gh = grad @ w  # (n, C)
            if d is not None:  # columns at index were made by delta, not by the base rows
                g_rows = grad[:, index]  # (n, K)
                gh += g_rows @ d - g_rows @ w[index]
                if want_delta:
                    grad_delta += (g_rows.T @ h).float()
                if want_weight:
                    grad[:, index] = 0
            grad_hidden[start : start + chunk] = gh
            if want_weight:  # grad sits in `pending`; the head's weight gradient is formed once per block of chunks
                end = start + n
                if end % block == 0 and end < hidden.shape[0]:
                    grad_weight = _add_weight_grad(grad_weight, pending, hidden[end - block : end], compute_dtype)
        del w, d, scores, spare, logits, low, grad  # the last block's product below is the peak of the loss: nothing else (V, C) alive
        if want_weight:
            end = hidden.shape[0]
            filled = end % block or min(block, end)
            grad_weight = _add_weight_grad(grad_weight, pending[:filled], hidden[end - filled : end], compute_dtype)
        ctx.grads = (grad_hidden[:valid], grad_weight, grad_delta)
        ctx.weight = weight if into_grad and want_weight else None
        ctx.weight_dtype = weight.dtype
        ctx.delta_dtype = delta.dtype if delta is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_delta = ctx.grads
        ctx.grads = None
        scale = grad_output.float()
        grad_hidden.mul_(scale.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale).to(ctx.weight_dtype)
            weight, ctx.weight = ctx.weight, None
            if weight is not None:
                if weight.grad is None:
                    weight.grad = grad_weight
                else:
                    weight.grad.add_(grad_weight)
                grad_weight = None
        if grad_delta is not None:
            grad_delta = grad_delta.mul_(scale).to(ctx.delta_dtype)
        return grad_hidden, grad_weight, grad_delta, None, None, None, None, None, None


def _add_weight_grad(grad_weight, grads, hidden, compute_dtype, rows: int = 8192):
    """grad_weight (V, C) fp32 plus grads^T @ hidden, for grads (n, V) and hidden (n, C); grad_weight None means zero.

    A slice of vocabulary rows at a time, so that the product never exists
    whole in the compute dtype next to its fp32 sum.
    """
    hidden = hidden.detach().to(compute_dtype)
    first = grad_weight is None
    if first:
        grad_weight = torch.empty((grads.shape[1], hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    for v in range(0, grads.shape[1], rows):
        part = grads[:, v : v + rows].T @ hidden  # (rows, C)
        if first:
            grad_weight[v : v + rows].copy_(part)
        else:
            # Cast first: an fp32 += bf16 add_ takes torch's mixed-dtype path,
            # 6.0 ms for (8192, 768) on 2 cores against 1.1 + 0.7 ms for the
            # cast and an fp32 add; the sum is the same bit for bit.
            grad_weight[v : v + rows].add_(part.float())
    return grad_weight


def linear_cross_entropy(hidden, weight, labels, *, delta=None, index=None, chunk: int = CHUNK, dtype=None, into_grad: bool = False, row_multiple: int = 0):
    """Summed cross-entropy of ``hidden @ weight.T`` (rows ``index`` from ``delta``) against ``labels``.

    hidden: (N, C) for the N positions that have a label; labels: (N,).
    The matmuls run in ``dtype``; without one, in autocast's dtype where
    autocast is on, else in the weight's. The softmax always runs in fp32.
    into_grad: the weight's gradient is added to ``weight.grad`` by the
    backward pass itself rather than returned to autograd; only for a weight
    that another path of the same graph also reaches (see the module's notes).
    row_multiple: the rows are padded with zero rows (no loss, no gradient) to a
    multiple of this (of less for few rows: peftgen.data.padded_length; 0, the
    default, pads none, as the collators' multiple does), so that the last chunk's products have one of a few sizes,
    whose CPU kernels oneDNN has built already (peftgen.batching.pad_packed says
    why); the head's products are the largest of a step, each new size about 50
    ms of kernel building for GPT-2's 50k vocabulary.
    """
    device = hidden.device.type
    compute_dtype = dtype or (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype)
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        compute_dtype = torch.float32
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, delta, index, labels, compute_dtype, chunk, into_grad, row_multiple)


@dataclass
class _Head:
    module: torch.nn.Module  # what the model calls as its output layer
    weight: torch.Tensor  # (V, C)
    delta: torch.Tensor | None  # (K, C) trainable rows, or None
    index: torch.Tensor | None  # (K,) their token ids
    into_grad: bool = False  # the weight's gradient written into .grad (tied to a lookup giving rows)


def _find_head(model) -> _Head | None:
    """The output layer and the tensors that make its weight; None where the loss cannot be fused."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    head = base.get_output_embeddings()
    if head is None:
        return None
    adapter = getattr(head, "token_adapter", None)  # PEFT's TrainableTokensWrapper
    layer = adapter.base_layer if adapter is not None else head
    if not isinstance(layer, torch.nn.Linear) or layer.bias is not None:
        return None
    if adapter is None:
        lookup = base.get_input_embeddings()
        into_grad = getattr(lookup, "weight", None) is layer.weight and efficiency.gives_row_grads(lookup)
        return _Head(head, layer.weight, None, None, into_grad)
    names = list(adapter.active_adapters)
    if len(names) != 1 or adapter.merged:
        return None
    delta = adapter.trainable_tokens_delta[names[0]]
    index = torch.tensor(adapter.token_indices[names[0]], device=delta.device)
    return _Head(head, layer.weight, delta, index)


class FusedHeadLoss:
    """Trainer's ``compute_loss_func`` for a model whose output layer is bypassed.

    ``with loss.bypass(): outputs = model(**inputs)`` makes the output layer
    return its input, so ``outputs.logits`` holds the last hidden states
    (B, T, C); calling the object with those outputs and the labels gives the
    loss. The model is still called as a whole (through DDP and Trainer's
    hooks), only its last matmul moves here.
    """

    def __init__(self, model, dtype: torch.dtype | None = None, row_multiple: int = 0):
        head = _find_head(model)
        if head is None:
            raise ValueError("this model's output layer cannot be fused with the loss")
        self.head = head
        # The run's matmul dtype, given rather than read from autocast: Trainer
        # (through accelerate) autocasts only the model's forward, and this
        # loss runs after it, so it would otherwise multiply an fp32 head at
        # fp32 speed (a quarter of bf16's on AVX512-BF16 CPUs).
        self.dtype = dtype
        self.row_multiple = row_multiple  # label rows padded to a multiple of this (linear_cross_entropy)

    @classmethod
    def supports(cls, model) -> bool:
        return _find_head(model) is not None

    @contextlib.contextmanager
    def bypass(self):
        module = self.head.module
        module.forward = _identity  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            del module.forward

    def __call__(self, outputs, labels, num_items_in_batch=None):
        hidden = outputs["logits"] if isinstance(outputs, dict) else outputs[0]  # (B, T, C)
        targets = labels[..., 1:]  # position t predicts token t + 1
        keep = targets != IGNORE_INDEX  # (B, T - 1)
        rows = hidden[..., :-1, :][keep]  # (N, C)
        head = self.head
        total = linear_cross_entropy(
            rows, head.weight, targets[keep], delta=head.delta, index=head.index, dtype=self.dtype, into_grad=head.into_grad, row_multiple=self.row_multiple
        )
        count = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
        return total / count


def _identity(hidden, *args, **kwargs):
    return hidden
