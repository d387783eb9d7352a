"""``peftgen train``, ``peftgen eval`` and ``peftgen merge``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from peftgen.errors import PeftgenError

Opt = typer.Option


def train(
    config: Annotated[Optional[Path], Opt("--config", "-c", help="YAML file of settings; flags you type override it.")] = None,
    model: Annotated[Optional[str], Opt(help="Hub id, local model folder or .gguf file. [default: gpt2]")] = None,
    mode: Annotated[Optional[str], Opt(help="full, lora or 8bit (LLM.int8 + LoRA). [default: lora]")] = None,
    train_file: Annotated[Optional[Path], Opt(help="Training data: .txt (one example a line), .jsonl, .json, .csv, .tsv, .parquet, a Dataset.save_to_disk folder or hub:owner/name.")] = None,
    valid_file: Annotated[Optional[Path], Opt(help="Validation data, evaluated every --eval-steps and at the end.")] = None,
    text_field: Annotated[Optional[str], Opt(help="Column holding the text in .jsonl, .csv, .tsv, .parquet and dataset sources. [default: text]")] = None,
    split: Annotated[Optional[str], Opt(help="Split of a hub:owner/name dataset or saved DatasetDict to train on. [default: train]")] = None,
    output_dir: Annotated[Optional[Path], Opt(help="Run folder for checkpoints, model/adapter, config, curves. [default: runs/peftgen]")] = None,
    epochs: Annotated[Optional[float], Opt(help="Passes over the training data. [default: 5]")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Examples per device per step. [default: 2]")] = None,
    grad_accum: Annotated[Optional[int], Opt(help="Steps to accumulate before each optimizer update. [default: 1]")] = None,
    lr: Annotated[Optional[float], Opt(help="Peak learning rate. [default: 5e-5 full, 2e-4 lora/8bit]")] = None,
    max_steps: Annotated[Optional[int], Opt(help="Stop after this many updates; overrides --epochs when > 0.")] = None,
    max_length: Annotated[Optional[int], Opt(help="Tokens per example, markers included; longer lines are cut. [default: 512]")] = None,
    eval_steps: Annotated[Optional[int], Opt(help="Evaluate on --valid-file every N updates. [default: 500]")] = None,
    save_steps: Annotated[Optional[int], Opt(help="Write a checkpoint every N updates. [default: 500]")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed for initialisation, shuffling and dropout. [default: 42]")] = None,
    precision: Annotated[Optional[str], Opt(help="auto, fp32, bf16 or fp16; auto picks bf16 where it is fast. [default: auto]")] = None,
    lora_r: Annotated[Optional[int], Opt(help="LoRA rank. [default: 8]")] = None,
    lora_alpha: Annotated[Optional[int], Opt(help="LoRA scaling numerator (scale = alpha / r). [default: 16]")] = None,
    lora_dropout: Annotated[Optional[float], Opt(help="Dropout on the LoRA path. [default: 0]")] = None,
    target_modules: Annotated[Optional[str], Opt(help="Comma-separated module names for LoRA. [default: per architecture]")] = None,
    report_to: Annotated[Optional[str], Opt(help="Comma-separated trackers for Trainer, e.g. tensorboard,wandb. [default: none]")] = None,
    resume: Annotated[Optional[bool], Opt("--resume", help="Continue from the last checkpoint in --output-dir.")] = None,
    overwrite: Annotated[Optional[bool], Opt("--overwrite", help="Replace a run already in --output-dir.")] = None,
    sample_every: Annotated[Optional[int], Opt(help="Generate samples at every Nth evaluation (samples.jsonl, <EOS> rate in loss.png); 0: never. [default: 0]")] = None,
    sample_decoder: Annotated[Optional[str], Opt(help="Decoder of those samples; 'peftgen decoders' lists them. [default: topk]")] = None,
    sample_options: Annotated[Optional[list[str]], Opt("--sample-option", help="Option of --sample-decoder as key=value, e.g. k=50; repeatable.")] = None,
    sample_count: Annotated[Optional[int], Opt(help="Samples per round. [default: 2]")] = None,
    sample_max_new_tokens: Annotated[Optional[int], Opt(help="Most tokens per sample. [default: 64]")] = None,
    sample_prompt: Annotated[Optional[str], Opt(help="Text the samples continue. [default: <BOS>]")] = None,
) -> None:
    """Fine-tune a causal LM on line-by-line text, adding <BOS>/<EOS>/<PAD> as trainable tokens."""
    flags = {k: v for k, v in locals().items() if k != "config"}  # first line: locals() are the flags
    from peftgen import config as config_lib, train as train_lib

    flags = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}
    if sample_options is not None:
        from peftgen.generation import parse_pairs

        flags["sample_options"] = parse_pairs(sample_options)
    settings = config_lib.resolve(config, flags)
    from peftgen.runs import main_process

    if main_process():  # under torchrun every process runs this command; one of them reports
        typer.echo("peftgen train, resolved config:")
        typer.echo(yaml.safe_dump(settings.to_dict(), sort_keys=False).rstrip())
    result = train_lib.train(settings)
    if not result.main_process:
        return
    typer.echo("")
    typer.echo(f"Run folder:        {result.output_dir}")
    typer.echo(f"Trainable params:  {result.trainable_params:,} of {result.total_params:,}")
    typer.echo(f"Precision:         {result.precision}")
    if "eval_loss" in result.metrics:
        typer.echo(f"Validation loss:   {result.metrics['eval_loss']:.4f} (perplexity {result.metrics['eval_perplexity']:.2f})")
    if result.loss_plot:
        typer.echo(f"Loss curves:       {result.loss_plot}")


def evaluate(
    model: Annotated[str, Opt(help="Run folder, model folder, .gguf file or Hub id.")],
    file: Annotated[Path, Opt(help="Data to score: .txt (one example a line, e.g. test.txt), .jsonl, .json, .csv, .tsv, .parquet, a Dataset.save_to_disk folder or hub:owner/name.")],
    batch_size: Annotated[int, Opt(help="Examples per forward pass.")] = 4,
    max_length: Annotated[Optional[int], Opt(help="Tokens per example. [default: the run's --max-length, else the model's context]")] = None,
    precision: Annotated[str, Opt(help="fp32, bf16 or auto. fp32 gives the reference numbers.")] = "fp32",
    json_output: Annotated[bool, Opt("--json", help="Print {loss, perplexity, tokens} as JSON.")] = False,
    text_field: Annotated[str, Opt(help="Column holding the text in .jsonl, .csv, .tsv, .parquet and dataset sources.")] = "text",
    split: Annotated[Optional[str], Opt(help="Split of a hub:owner/name dataset or saved DatasetDict. [default: test, else validation]")] = None,
) -> None:
    """Token-weighted loss and perplexity of a model on a text file."""
    from peftgen import corpus, evaluate as evaluate_lib, model as model_lib, precision as precision_lib
    from peftgen.config import MAX_BATCH, MAX_COUNT, TrainConfig

    if not 1 <= batch_size <= MAX_BATCH:
        raise PeftgenError(f"--batch-size must be between 1 and {MAX_BATCH}, got {batch_size}.")
    if max_length is not None and not 3 <= max_length <= MAX_COUNT:
        raise PeftgenError(f"--max-length must leave room for <BOS>, text and <EOS> (at least 3), got {max_length}.")
    resolved = precision_lib.resolve(precision)
    source = corpus.describe(file, "evaluation file", text_field, split)  # a bad file fails before the model loads
    run = model_lib.run_folder(Path(model)) if Path(model).is_dir() else None
    special = None
    if run is not None:
        saved = model_lib.read_run_config(run).get("max_length")
        max_length = max_length or (saved if isinstance(saved, int) and saved >= 3 else None)
    else:
        defaults = TrainConfig()
        special = (defaults.bos_token, defaults.eos_token, defaults.pad_token)
        if not json_output:
            typer.echo(f"note: {model} is not a peftgen run; scoring it with {'/'.join(special)} as its bos/eos/pad (added untrained where missing).", err=True)
    loaded, tokenizer = model_lib.load(model, special_tokens=special)
    result = evaluate_lib.evaluate(loaded, tokenizer, source, batch_size=batch_size, max_length=max_length, precision=resolved, progress=not json_output)
    if json_output:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  tokens {result.tokens:,}")


def merge(
    run: Annotated[Path, typer.Argument(help="A lora or 8bit run folder from 'peftgen train'.")],
    output: Annotated[Path, Opt("--output", "-o", help="Folder for the merged Hugging Face model.")],
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace --output if it exists.")] = False,
) -> None:
    """Merge a run's adapter into its base model and save a plain Hugging Face folder."""
    from peftgen import merge as merge_lib

    folder = merge_lib.merge(run, output, overwrite=overwrite)
    typer.echo(f"Merged model written to {folder} (loads with AutoModelForCausalLM, no peft needed).")
