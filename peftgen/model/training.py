"""A model ready to train: base model, the new marker tokens, then full / LoRA / 8-bit wrapping.

    model, tokenizer, new_ids = prepare_for_training(config, precision)

Settings that depend on the model (max_length against its context, LoRA
targets against its layers) are checked here, once it is loaded.
"""

from __future__ import annotations

import sys

import torch

from peftgen import efficiency, fused_lora, token_rows
from peftgen.errors import PeftgenError
from peftgen.fast_dropout import use_fast_dropout
from peftgen.lean_layers import use_lean_layers
from peftgen.model.loading import load_pretrained
from peftgen.model.sizes import context_length
from peftgen.model.tokens import add_special_tokens, embedding_names
from peftgen.weight_casts import recast_weights

# torch's recommended checkpointing: works whether or not the layer inputs need a gradient
CHECKPOINTING = {"use_reentrant": False}

# LoRA targets per architecture when --target-modules is not given: every
# projection in attention and MLP. Unlisted architectures get PEFT's
# "all-linear" (every linear layer but the output head).
TARGET_MODULES = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def check_fit(model, config) -> None:
    """The settings that depend on the model, checked once it is loaded and before anything is built.

    A max_length beyond the model's context would index past its position
    embeddings: it is capped to the context, with a note on stderr, and
    ``config.max_length`` is updated so that the data and the saved
    peftgen.yaml use the cap. LoRA target modules the model does not have are
    refused with the names it does have.
    """
    limit = context_length(model)
    if limit is not None and config.max_length > limit:
        print(
            f"note: max_length {config.max_length} is longer than the context of {config.model} ({limit} tokens); examples are cut to {limit} tokens.",
            file=sys.stderr,
        )
        config.max_length = limit
    if config.mode != "full" and config.target_modules:
        check_target_modules(model, config.target_modules)


def check_target_modules(model, targets: list[str]) -> None:
    """Every LoRA target must name (or end the name of) a layer LoRA can adapt, as PEFT matches them."""
    from transformers.pytorch_utils import Conv1D

    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    names = [name for name, module in model.named_modules() if isinstance(module, adaptable)]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        have = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise PeftgenError(
            f"target_modules {', '.join(repr(t[:40]) for t in missing[:5])} not in this {model.config.model_type} model. "
            f"Its layers LoRA can adapt: {', '.join(have)}. Pass some of those to --target-modules, or leave it out."
        )


def _has_conv1d(model, targets) -> bool:
    """GPT-2 keeps its weights as Conv1D (in, out); LoRA must then be told fan_in_fan_out."""
    from transformers.pytorch_utils import Conv1D

    wanted = set(targets) if isinstance(targets, list) else None
    return any(isinstance(module, Conv1D) and (wanted is None or name.rsplit(".", 1)[-1] in wanted) for name, module in model.named_modules())


def prepare_for_training(config, precision: str = "fp32"):
    """Base model + special tokens, wrapped for config.mode. Returns (model, tokenizer, new_ids).

    full: every weight trains, the new rows included.
    lora / 8bit: LoRA on the attention and MLP projections, and PEFT's
    trainable_token_indices on the new token ids only, so every pre-existing
    embedding row stays bit-identical. With tied input/output embeddings
    (GPT-2) PEFT trains one set of new rows used by both; with untied ones
    (most Llamas) the output head's new rows train as well, or the model
    could never learn to predict <EOS>.
    """
    model, tokenizer = load_pretrained(config.model, quantize_8bit=config.mode == "8bit")
    check_fit(model, config)
    new_ids = add_special_tokens(model, tokenizer, config.bos_token, config.eos_token, config.pad_token)
    if config.attention_dropout is not None:
        efficiency.set_attention_dropout(model, config.attention_dropout)
    if config.fused_activations:
        efficiency.fuse_activations(model)
    if config.leans_layers:
        use_lean_layers(model)
    if config.fast_dropout:
        use_fast_dropout(model)
    if config.mode == "full":
        if config.recast_weights and precision in ("bf16", "fp16"):
            recast_weights(model)
        if config.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
            efficiency.checkpoint_only(model, config.checkpointed_share)
        if config.embedding_row_grads:
            efficiency.embedding_row_grads(model)
        return model, tokenizer, new_ids

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.mode == "8bit":
        efficiency.lean_int8_matmul()
        # Casts the remaining float weights to fp32 and freezes the int8 ones.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.checkpointing, gradient_checkpointing_kwargs=CHECKPOINTING)
    elif config.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        model.enable_input_require_grads()
    if config.checkpointing:
        efficiency.checkpoint_only(model, config.checkpointed_share)
    targets = config.target_modules or TARGET_MODULES.get(model.config.model_type, "all-linear")
    in_name, out_name, tied = embedding_names(model)
    token_indices = None
    if new_ids:
        token_indices = new_ids if tied or out_name is None else {in_name: new_ids, out_name: new_ids}
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=_has_conv1d(model, targets),
        trainable_token_indices=token_indices,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if config.fast_dropout:
        use_fast_dropout(model)  # lora_dropout's modules
    if config.fast_token_rows:
        token_rows.speed_up(model)
    if config.fused_lora:
        fused_lora.speed_up(model)
    if config.frozen_bf16 and precision == "bf16":
        efficiency.store_frozen_in_bf16(model)
    if config.frozen_embeddings_bf16 and precision == "bf16":
        efficiency.store_embeddings_in_bf16(model)
    return model, tokenizer, new_ids
