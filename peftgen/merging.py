"""Merge a LoRA or 8-bit run into a plain Hugging Face model folder: ``peftgen merge RUN --output DIR``, or::

    peftgen.merge("runs/lora", "models/merged")

The folder loads with ``AutoModelForCausalLM.from_pretrained(DIR)``, no peft
needed, and its logits match the unmerged run's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from peftgen import data, run_files
from peftgen import model as model_lib
from peftgen.errors import PeftgenError


def _restore_conv1d(model) -> None:
    """Put back the Conv1D layers that 8-bit loading turned into Linear ones.

    bitsandbytes stores GPT-2's Conv1D weights (in, out) as Linear (out, in),
    and transformers' dequantize() leaves them as nn.Linear. Saved like that,
    GPT-2 would load the (out, in) matrices into (in, out) slots: a shape error
    for c_attn and c_fc, and a silent transpose for the square c_proj. So each
    such layer goes back to the Conv1D the architecture declares, transposed.
    """
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    conv_names = [name for name, module in skeleton.named_modules() if isinstance(module, Conv1D)]
    for name in conv_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if isinstance(linear, Conv1D):
            continue
        conv = Conv1D(nf=linear.out_features, nx=linear.in_features)
        conv.weight.data = linear.weight.data.t().contiguous()  # (in, out)
        conv.bias.data = linear.bias.data.clone() if linear.bias is not None else torch.zeros(linear.out_features)
        setattr(parent, child, conv)


def merge(run: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write run's base model with its adapter merged in, plus the tokenizer, to output."""
    run, output = Path(run), Path(output)
    if not run_files.is_run(run):
        raise PeftgenError(f"{run} is not a peftgen run folder (no {run_files.RUN_CONFIG}). Pass the --output-dir of 'peftgen train'.")
    settings = run_files.read_run_config(run)
    if settings["mode"] == "full":
        raise PeftgenError(f"{run} is a full fine-tuning run: it already is a plain model folder, load it directly.")
    _refuse_overlap(output, run, "the run folder")
    base_model = Path(settings["model"]).expanduser()
    if base_model.exists():
        _refuse_overlap(output, base_model, "the run's base model")
    occupied = output.is_file() or (output.is_dir() and any(output.iterdir()))
    if occupied and not overwrite:
        raise PeftgenError(f"{output} already exists and is not empty. Pass --overwrite to replace it, or choose another --output.")
    data.check_writable_folder(output.parent, "The folder of --output")

    tokenizer = model_lib.load_tokenizer(run, run)
    base, _ = model_lib.load_pretrained(settings["model"], quantize_8bit=settings["mode"] == "8bit")
    if settings["mode"] == "8bit":
        # The adapter was trained against the int8-rounded weights: dequantise
        # those (not the original float ones) so the merge reproduces the run.
        base = base.dequantize()
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    merged = model_lib.load_adapter(base, run).merge_and_unload()
    if settings["mode"] == "8bit":
        _restore_conv1d(merged)
    model_lib.set_token_ids(merged, tokenizer)
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config

    # Written beside the destination and swapped in when complete: a kill
    # or a full disk never leaves a folder that looks like a merged model.
    partial = output.with_name(f".{output.name}.partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        merged.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        partial.rename(output)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise PeftgenError(f"Cannot write the merged model to {output}: {error.strerror or error}.") from None
    return output


def _refuse_overlap(output: Path, folder: Path, what: str) -> None:
    """--output may not be, contain or lie inside ``folder``: --overwrite would delete it, or write into it."""
    out, other = output.expanduser().resolve(), folder.resolve()
    if out == other:
        raise PeftgenError(f"--output {output} is {what}; merging in place would destroy it. Choose another --output.")
    if out in other.parents:
        raise PeftgenError(f"--output {output} contains {what} ({folder}); replacing it would delete that. Choose another --output.")
    if other in out.parents:
        raise PeftgenError(f"--output {output} lies inside {what} ({folder}). Choose a folder outside it.")
