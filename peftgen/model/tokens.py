"""The marker tokens in a model: adding them with well-placed new embedding rows, and where those rows live."""

from __future__ import annotations

import torch


def add_special_tokens(model, tokenizer, bos: str, eos: str, pad: str) -> list[int]:
    """Make bos/eos/pad the tokenizer's and model's, resizing embeddings; returns the new ids.

    New rows start at the mean of the existing embeddings plus small noise
    (transformers' mean_resizing), so an untrained new token is an average
    token rather than an outlier with huge logits. The new eos is the
    exception: when the base model has an end token of its own (GPT-2's
    <|endoftext|>, an instruct model's <|im_end|>), the new eos starts as a
    copy of it, input and output rows. From the first step the model then
    gives <EOS> the probability it gave its own end token, and training only
    has to move it ahead. From an average row instead, the model learns
    <EOS> slowly and, under greedy or beam search, keeps ending its text
    with the old token, which it still ranks first.
    """
    before = len(tokenizer)
    old_eos = tokenizer.eos_token_id if tokenizer.eos_token not in (None, eos) else None
    tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos, "pad_token": pad})
    new_ids = list(range(before, len(tokenizer)))
    if model.get_input_embeddings().weight.shape[0] != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if old_eos is not None and tokenizer.eos_token_id in new_ids:
        _copy_token_rows(model, old_eos, tokenizer.eos_token_id)
    set_token_ids(model, tokenizer)
    return new_ids


def _copy_token_rows(model, source: int, target: int) -> None:
    """Row ``target`` of the input embeddings (and of an untied output head) becomes row ``source``."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        inputs.weight[target] = inputs.weight[source]
        if outputs is not None and outputs.weight.data_ptr() != inputs.weight.data_ptr():
            outputs.weight[target] = outputs.weight[source]
            if getattr(outputs, "bias", None) is not None:
                outputs.bias[target] = outputs.bias[source]


def set_token_ids(model, tokenizer) -> None:
    """The tokenizer's bos/eos/pad ids written into the model's config and generation config."""
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id


def embedding_names(model) -> tuple[str, str | None, bool]:
    """Module names of the input and output embeddings, and whether their weights are tied."""
    names = {id(module): name for name, module in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outputs is not None and outputs.weight.data_ptr() == inputs.weight.data_ptr()
    return names[id(inputs)], (names[id(outputs)] if outputs is not None else None), tied
