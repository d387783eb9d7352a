"""Training-time changes to a model that make a step cheaper without changing what it learns.

Each one has a switch in TrainConfig and a row in benchmarks/README.md:

- ``attention_dropout``: GPT-2 ships with dropout 0.1 on its attention
  probabilities. PyTorch's fused (flash) attention on CPU has no dropout, so
  with it SDPA falls back to the unfused path that materialises every
  (T, T) attention matrix and draws a random mask over it: a quarter of
  GPT-2 small's step on 2 cores. Newer models (Llama, SmolLM2, Qwen) train
  with 0; so does peftgen unless told otherwise.
- ``frozen_bf16``: under bf16 autocast every matmul casts its fp32 weight to
  bf16 on every call, forward and backward. A frozen weight can be stored in
  bf16 once: the products are bit for bit what autocast computes, at half
  the memory and without the casts. Embeddings (and a head tied to them)
  stay fp32 here, since the residual stream starts there.
- ``frozen_embeddings_bf16``: the frozen embedding matrices in bf16 too, their
  lookups cast back to fp32 so the residual stream stays fp32. Not bit for
  bit: each input embedding is rounded to bf16 (the output head's products
  are unchanged, autocast casts it to bf16 anyway). It halves the largest
  frozen matrix (GPT-2: 154 -> 77 MB) and spares the fused loss a bf16 copy
  of it every step (77 MB more at the loss, the peak of a LoRA step).
- ``fused_activations``: GPT-2's ``gelu_new`` is written as seven tensor
  operations in Python, each keeping its output for the backward pass (five
  (T, 4C) tensors per layer); transformers' ``gelu_pytorch_tanh`` is the same
  function as one kernel that keeps only its input. Equal up to rounding.
- ``embedding_row_grads``: in full mode the input embedding and a tied output
  head share one matrix. torch's embedding backward writes its gradient into
  a zeroed vocabulary-sized matrix (GPT-2: 50260 x 768, 154 MB, zeroed and
  then added to the head's gradient every step) though only the looked-up
  rows (about 1,000 of 50,260) are not zero. Here the lookup hands autograd
  its rows instead (torch's sparse embedding gradient); the fused loss writes
  the head's dense gradient straight into ``.grad`` (``peftgen.fused_loss``,
  ``into_grad``) and autograd adds the rows into it in place: the same sum,
  without the zeroed matrix or a third one for the sum. Only where the head's
  dense gradient is sure to be there (tied and trained), so no parameter
  ever ends a step with a sparse gradient the optimizer would refuse.
- the new tokens' rows (``peftgen.token_rows``): exact.
- ``own_weights``: transformers maps the safetensors file into memory and
  hands out tensors that point into it. After the casts and the resize above
  only a few small tensors (position embeddings, norms) still do, but they
  keep the whole file mapped and resident (470 MB for GPT-2 small). Copying
  those few into ordinary memory lets the mapping go.
- releasing pages as they are read (``release_mapped``): the bf16 casts read
  every fp32 linear weight out of that mapping, and each page read stays
  resident until the mapping goes, so converting GPT-2 small peaked 0.5 GB
  above where it ended. Each weight's pages are handed back as soon as its
  bf16 copy exists.
- ``returning_freed_memory``: loading in 8-bit quantises every fp32 weight
  through temporaries that glibc keeps for reuse after they are freed
  (0.25 GB for GPT-2 small, the peak of an 8-bit run). While loading, large
  blocks come straight from the kernel and go straight back.
- ``lean_int8_matmul``: bitsandbytes' CPU path for LLM.int8 layers in
  training keeps every layer's input on its autograd context, where
  activation checkpointing cannot free it, though the input is read only for
  a weight gradient that a frozen int8 weight never has (0.2 GB of an 8-bit
  step of GPT-2 small at 2 x 512 tokens). The reference is dropped when the
  weight is frozen; the arithmetic is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys

import torch

ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")


def set_attention_dropout(model, p: float) -> None:
    """Attention-probability dropout p in the config and in every attention module already built."""
    for key in ATTENTION_DROPOUT_KEYS:
        if isinstance(getattr(model.config, key, None), (int, float)):
            setattr(model.config, key, p)
    for module in model.modules():
        if "Attention" not in type(module).__name__:
            continue
        if isinstance(getattr(module, "attention_dropout", None), (int, float)):
            module.attention_dropout = p  # Llama family: a float read at every forward
        for name in ("attn_dropout", "attention_dropout", "dropout"):
            child = getattr(module, name, None)
            if isinstance(child, torch.nn.Dropout):
                child.p = p  # GPT-2 family: a Dropout module whose p SDPA reads


def store_frozen_in_bf16(model) -> int:
    """Frozen float weights and biases of linear layers to bf16, embeddings excepted; returns bytes saved."""
    from transformers.pytorch_utils import Conv1D

    # By storage, not by module: a tied output head is a Linear over the embedding's own matrix.
    keep = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    saved = 0
    for module in model.modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        for param in list(module.parameters(recurse=False)):
            if param.requires_grad or param.dtype != torch.float32 or param.data_ptr() in keep:
                continue
            saved += param.numel() * 2
            old = param.data
            param.data = old.to(torch.bfloat16)
            release_mapped(old, model)
    return saved


def store_embeddings_in_bf16(model) -> int:
    """Frozen float embedding matrices to bf16, each lookup's output back to fp32; returns bytes saved."""
    saved = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Embedding) or weight.requires_grad or weight.dtype != torch.float32:
            continue
        saved += weight.numel() * 2
        old = weight.data
        weight.data = old.to(torch.bfloat16)  # a tied head shares the Parameter, so it follows
        release_mapped(old, model)
        module.register_forward_hook(_output_to_fp32)
    outer = model.get_input_embeddings()  # PEFT's wrapper of the new rows may look up the matrix itself
    if saved and not isinstance(outer, torch.nn.Embedding):
        outer.register_forward_hook(_output_to_fp32)
    return saved


def _output_to_fp32(module, args, output):
    return output.float() if output.dtype in (torch.bfloat16, torch.float16) else output


def fuse_activations(model) -> int:
    """GPT-2's Python gelu_new modules swapped for transformers' one-kernel tanh GELU; returns how many."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def embedding_row_grads(model) -> bool:
    """The input embedding's gradient as its looked-up rows, where a trained output head shares its matrix; True if set."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or head is None or "forward" in embedding.__dict__:
        return False
    weight = embedding.weight
    if getattr(head, "weight", None) is not weight or not weight.requires_grad or embedding.max_norm is not None:
        return False
    # Not module.sparse = True: DistributedDataParallel reads that flag and would
    # then expect a sparse gradient where autograd hands it the dense sum.
    embedding.forward = functools.partial(_row_grad_lookup, embedding)
    return True


def gives_row_grads(embedding) -> bool:
    """Whether embedding_row_grads set this embedding's lookup."""
    forward = embedding.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _row_grad_lookup


def _row_grad_lookup(module, ids):
    return torch.nn.functional.embedding(ids, module.weight, module.padding_idx, None, 2.0, module.scale_grad_by_freq, True)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed memory mappings (Linux; empty elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].startswith("/") and fields[5].endswith(".safetensors"):
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return ranges


def own_weights(model) -> int:
    """Copy every parameter and buffer that points into a mapped weights file to ordinary memory; returns how many."""
    ranges = _file_mappings()
    if not ranges:
        return 0
    copied = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "cpu":
            continue
        address = tensor.untyped_storage().data_ptr()
        if any(start <= address < end for start, end in ranges):
            tensor.data = tensor.data.clone()
            copied += 1
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # what loading and preparing freed goes back to the system before training
    return copied


def release_mapped(tensor: torch.Tensor, model) -> bool:
    """Hand back the pages of a mapped weights file that only ``tensor`` used; True if any were.

    Call it once no parameter or buffer of ``model`` points into ``tensor``
    any longer. The mapping is private and read-only in use, so the kernel
    can drop its clean pages at any time and read them again from the file
    if they are touched; only whole pages inside the tensor's own bytes are
    released, so a neighbour sharing a page is never affected.
    """
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in _file_mappings()):
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return False
    for other in [*model.parameters(), *model.buffers()]:  # still in use by someone: keep it
        begin = other.data_ptr()
        if begin < last and first < begin + other.numel() * other.element_size():
            return False
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0


@contextlib.contextmanager
def _malloc_thresholds(size: int):
    """Inside: glibc maps blocks above ``size`` bytes and trims its heap above ``size`` free; then its defaults and a trim."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, size)
    libc.mallopt(_M_TRIM_THRESHOLD, size)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def returning_freed_memory(threshold: int = 1 << 20):
    """Inside: blocks of ``threshold`` bytes or more are mapped and unmapped one by one (glibc).

    glibc otherwise keeps large freed blocks for reuse, so a phase that makes
    and drops many temporaries (quantising at load) leaves the process that
    much larger for the rest of the run. On exit the thresholds go to glibc's
    usual ceiling (32 MiB mapped, twice that kept) and free memory is trimmed.
    Elsewhere than glibc this does nothing.
    """
    return _malloc_thresholds(threshold)


def reusing_freed_memory(limit: int = 1 << 30):
    """Inside: glibc serves blocks of up to ``limit`` bytes from its heap and keeps them when freed.

    By default glibc maps every block above 32 MiB (and, until its threshold
    has adapted, above 128 KiB) straight from the kernel and unmaps it when
    freed. A training step makes and frees the same large temporaries every
    time (logits, the loss's buffers, gradients, the optimizer's
    temporaries), so each step the kernel hands over, and zeroes, fresh
    pages for all of them again: in GPT-2 small's full fine-tuning on 2 CPU
    cores, 12% of the step (benchmarks/README.md). Kept in the heap, freed
    blocks are reused by the next step, as jemalloc or tcmalloc would (what
    PyTorch's CPU performance guides suggest preloading). On exit glibc's
    defaults return and what is free goes back to the system. Elsewhere than
    glibc this does nothing.
    """
    return _malloc_thresholds(limit)


def checkpoint_only(model, share: float) -> int:
    """Gradient checkpointing kept on the first ``share`` of the layers only; returns how many stay checkpointed.

    Checkpointing every layer recomputes the whole forward pass in the
    backward pass (a third more arithmetic); checkpointing none keeps every
    layer's activations. Between the two, each layer let go trades its
    activations' memory for its share of that recompute.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    keep = round(len(layers) * share)
    for layer in layers[keep:]:
        layer.gradient_checkpointing = False
    return min(keep, len(layers))


def lean_int8_matmul() -> bool:
    """bitsandbytes' CPU int8 matmul stops keeping inputs it will never read; True if it applies.

    Idempotent. Its backward reads the saved input only for the gradient of
    the int8 weight, which is frozen under LoRA; a bitsandbytes without that
    function (or one that has changed it) is left alone.
    """
    try:
        from bitsandbytes.autograd import _functions as functions
    except ImportError:
        return False
    matmul = getattr(functions, "MatMul8bitFp", None)
    if matmul is None:
        return False
    forward = matmul.forward
    if getattr(forward, "_peftgen_lean", False):
        return True

    def lean_forward(ctx, A, B, out=None, bias=None, state=functions.MatmulLtState):
        output = forward(ctx, A, B, out, bias, state)
        if not ctx.needs_input_grad[1] and getattr(ctx, "A", None) is A:
            ctx.A = None  # read in backward only for grad_B, which a frozen weight does not have
        return output

    lean_forward._peftgen_lean = True
    lean_forward._peftgen_original = forward
    matmul.forward = staticmethod(lean_forward)
    return True


_MADV_DONTNEED, _M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = 4, -1, -3


@functools.cache
def _libc():
    """The C library with madvise, on Linux; None elsewhere (looked up once: find_library runs ldconfig)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "madvise") else None
