"""What a model's config says about its size: context length, hidden width, parameter counts."""

from __future__ import annotations


def context_length(model) -> int | None:
    """The longest sequence the model's position embeddings cover, if its config says."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hidden_width(model) -> int | None:
    """The width of the model's hidden states (GPT-2's n_embd, Llama's hidden_size), if its config says."""
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; a PeftModel counts its own, as PEFT does."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
