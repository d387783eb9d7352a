"""Fine-tuning on transformers.Trainer: ``peftgen train -c configs/lora.yaml``.

Trainer (through accelerate) owns the loop, mixed precision, checkpoints and
distribution, so ``accelerate launch -m peftgen train ...`` or ``torchrun -m
peftgen train ...`` run data-parallel, FSDP or DeepSpeed; the main process
alone reads the data and keeps the run folder (``peftgen.runs``). peftgen adds what the article's script did by hand: the special tokens, the
line-by-line data, perplexity next to every eval loss, a run folder that
reproduces itself, and a PNG of the loss curves.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed

from peftgen import config as config_lib, data, model as model_lib, plot, precision as precision_lib, runs
from peftgen.errors import PeftgenError

LOSS_PLOT = "loss.png"


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict  # final eval_loss / eval_perplexity (if a valid file), train_loss, runtime
    trainable_params: int
    total_params: int
    precision: str
    loss_plot: Path | None
    log_history: list[dict] = field(default_factory=list)


class PeftgenTrainer(Trainer):
    """Trainer with perplexity in its logs and adapter checkpoints that hold only the new rows."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer saves a PeftModel with PEFT's save_embedding_layers="auto",
        # which stores the whole resized embedding matrix (and asks the Hub
        # whether the vocabulary changed) at every checkpoint. The adapter's
        # trainable-token rows already hold everything that was trained.
        from peft import PeftModel

        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False)
            self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, Path(output_dir) / "training_args.bin")


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)


def prepare_output_dir(config: config_lib.TrainConfig) -> Path:
    """Create the run folder, refusing to clobber an existing run or unrelated files."""
    folder = Path(config.output_dir)
    if folder.is_file():
        raise PeftgenError(f"--output-dir {folder} is a file. Pick a folder path.")
    existing = [p for p in folder.iterdir()] if folder.is_dir() else []
    holds_run = model_lib.is_run(folder) or bool(_checkpoints(folder))
    if config.resume:
        if not _checkpoints(folder):
            raise PeftgenError(f"Nothing to resume in {folder}: it holds no checkpoint-N folder. Drop --resume to start a new run.")
        return folder
    if holds_run and not config.overwrite:
        raise PeftgenError(
            f"{folder} already holds a peftgen run. Pass --overwrite to replace it, "
            "--resume to continue it, or choose another --output-dir."
        )
    if existing and not holds_run:
        raise PeftgenError(
            f"{folder} is not empty and is not a peftgen run ({len(existing)} entries, e.g. {existing[0].name}). "
            "Choose an empty or new --output-dir; peftgen will not mix its files with yours."
        )
    if holds_run:  # --overwrite on a run folder: start clean
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _final_evaluation(trainer) -> dict:
    """The validation metrics of the final weights: those of the last step's scheduled
    evaluation when there was one (no best-model reloading happens here), else a new one."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == step:
                return {key: value for key, value in entry.items() if key.startswith("eval_")}
            break
    return trainer.evaluate()


def training_arguments(config: config_lib.TrainConfig, output: Path, precision: str, has_valid: bool, progress: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        eval_strategy="steps" if has_valid else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        report_to=config.report_to or "none",
        remove_unused_columns=False,  # our dataset yields exactly what the model takes
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def train(config: config_lib.TrainConfig, progress: bool = True) -> TrainResult:
    """Run one fine-tuning job as configured; returns where it went and how it did."""
    config.validate()
    if Path(config.model).expanduser().exists():  # the run folder must find its base from anywhere
        config = dataclasses.replace(config, model=str(Path(config.model).expanduser().resolve()))
    precision = precision_lib.resolve(config.precision)
    # Read the data before touching the output folder or loading a model:
    # a bad file fails in a second and leaves nothing behind.
    data.read_lines(config.train_file, "training file")
    if config.valid_file:
        data.read_lines(config.valid_file, "validation file")
    set_seed(config.seed)
    model, tokenizer, new_ids = model_lib.prepare_for_training(config)
    train_set = data.LineDataset(data.load_examples(config.train_file, tokenizer, config.max_length, "training file"))
    valid_set = (
        data.LineDataset(data.load_examples(config.valid_file, tokenizer, config.max_length, "validation file"))
        if config.valid_file
        else None
    )
    output = prepare_output_dir(config)
    # Trainer divides the summed loss by its own count of label tokens, and
    # counts the shifted labels[..., 1:] only when the model names a causal-LM
    # loss_type. Models whose config leaves loss_type unset (GPT-2, Llama)
    # would be divided by one extra token per example: a loss biased low,
    # about 1/length, in training and in eval_loss alike.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "loss_type", None) is None:
        base.loss_type = "ForCausalLM"
    trainable, total = model_lib.count_parameters(model)
    facts = {
        "precision_used": precision,
        "new_token_ids": new_ids,
        "vocab_size": len(tokenizer),
        "train_examples": len(train_set),
        "valid_examples": len(valid_set) if valid_set else 0,
        "trainable_params": trainable,
    }
    config_lib.save(config, output / model_lib.RUN_CONFIG, facts)

    trainer = PeftgenTrainer(
        model=model,
        args=training_arguments(config, output, precision, valid_set is not None, progress),
        train_dataset=train_set,
        eval_dataset=valid_set,
        data_collator=data.PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    if config.sample_every:
        from peftgen.sampling import SampleCallback

        trainer.add_callback(SampleCallback(config, tokenizer, output, trainer))
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=True if config.resume else None)
    metrics = dict(outcome.metrics)
    if valid_set is not None:
        metrics.update(_final_evaluation(trainer))
    metrics["wall_seconds"] = time.perf_counter() - started

    trainer.save_model(str(output))  # adapter (new rows included) or full model, plus tokenizer
    history = trainer.state.log_history
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (output / "log_history.json").write_text(json.dumps(history, indent=2), encoding="utf-8")
    title = f"{config.mode} fine-tuning of {Path(config.model).name}"
    curve = plot.loss_curves(history, output / LOSS_PLOT, title)
    return TrainResult(output, metrics, trainable, total, precision, curve, history)
