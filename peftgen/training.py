"""Fine-tuning on transformers.Trainer: ``peftgen train -c configs/lora.yaml``, or from Python::

    result = peftgen.train("configs/lora.yaml")           # or a TrainConfig, or a dict of settings

Trainer (through accelerate) owns the loop, mixed precision, checkpoints and
distribution, so ``accelerate launch -m peftgen train ...`` or ``torchrun -m
peftgen train ...`` run data-parallel, FSDP or DeepSpeed; the main process
alone reads the data and keeps the run folder (``peftgen.runs``). peftgen
adds what the article's script did by hand: the special tokens, the
line-by-line data, perplexity next to every eval loss, a run folder that
reproduces itself, and a PNG of the loss curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import rotate_checkpoints

from peftgen import allocator, attention, batching, corpus, data, efficiency, plot, run_files, runs
from peftgen import config as config_lib
from peftgen import model as model_lib
from peftgen import precision as precision_lib
from peftgen.errors import PeftgenError
from peftgen.fused_loss import FusedHeadLoss

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
    main_process: bool = True  # under torchrun, only the main process reports


class PeftgenTrainer(Trainer):
    """Trainer with perplexity in its logs and adapter checkpoints that hold only the new rows."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not isinstance(self.compute_loss_func, FusedHeadLoss):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The model runs whole (through DDP and accelerate's autocast) with its
        # output layer passing hidden states through; the fused loss applies it.
        with self.compute_loss_func.bypass():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

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

    # ------------------------------------------- checkpoints a kill cannot spoil

    run: runs.RunFolder | None = None  # set by train(): the folder to publish at the first checkpoint
    _staging = False

    def _get_output_dir(self, trial) -> str:
        if self._staging:  # Trainer writes checkpoint-N under here; _save_checkpoint renames it when whole
            return str(Path(self.args.output_dir) / runs.STAGING)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every process has written its part (its RNG state)
        if self.is_world_process_zero():
            folder = Path(self.args.output_dir)
            runs.move_into(folder / runs.STAGING, folder, last=())
            # Trainer rotated inside the staging folder; rotate here, by step: a
            # resumed run's checkpoints are newer on disk than their steps say.
            rotate_checkpoints(str(folder), self.args.save_total_limit, self.state.best_model_checkpoint)
            if self.run is not None:
                runs.publish(self.run)  # the new run has something to show: it takes the folder now
        self.accelerator.wait_for_everyone()
        if self.run is not None:
            self.run.published = True
            self.args.output_dir = str(self.run.final)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        asked = list(getattr(scheduler, "base_lrs", []))
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not asked or scheduler.base_lrs == asked or not hasattr(scheduler, "lr_lambdas"):
            return
        # The checkpoint restored the learning rate it was saved with;
        # ``--resume --lr`` asks for another (e.g. after a diverged run).
        scheduler.base_lrs = asked
        for group, base, factor in zip(self.optimizer.param_groups, asked, scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if self.is_world_process_zero():
            runs.note(f"continuing with learning rate {self.args.learning_rate:g} instead of the checkpoint's.")

    # ------------------------------------------------------ a loss gone NaN stops

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # One flag from every process, so that all of them stop at the same step.
        finite = self.accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1))
        if finite.min().item() < 1:
            raise PeftgenError(self._diverged(loss.item()))
        return loss

    def _diverged(self, loss: float) -> str:
        """Drop the checkpoints saved from the weights that gave a non-finite loss; say how to go on."""
        step, lr = self.state.global_step + 1, self.args.learning_rate
        folder = Path(self.args.output_dir)
        # The loss of step N comes from the weights after step N-1: a checkpoint
        # of those weights gives the same loss again, whatever the learning rate.
        bad = [p for p in runs.checkpoints(folder) if int(p.name.split("-")[1]) >= self.state.global_step]
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            for checkpoint in bad:
                shutil.rmtree(checkpoint)
        self.accelerator.wait_for_everyone()
        message = f"The training loss became {loss} at step {step} (learning rate {lr:g}); training stopped."
        if bad:
            message += f" Removed {', '.join(p.name for p in bad)}: saved from the weights that gave it."
        good = runs.checkpoints(folder) if self.run is None or self.run.published else []
        if good:
            return message + (
                f" {folder / good[-1].name} holds the last good weights; continue from it with a lower learning rate: "
                f"the same command with --resume --lr {lr / 10:g} (and without --overwrite)."
            )
        return message + f" No checkpoint was saved before it: start again with a lower learning rate, e.g. --lr {lr / 10:g} --overwrite."


def speed_settings(config: config_lib.TrainConfig, model, tokenizer, precision: str, multiple: int = 0) -> tuple[bool, bool, FusedHeadLoss | None]:
    """Whether batches are packed, whether their attention runs per example, and the fused loss if any
    (its label rows padded to ``multiple``): what was asked, where this model allows it."""
    per_example = (
        config.packing and config.attention_per_example and attention.use_per_example_attention(model, config.block_attention, config.keeps_attention_probs)
    )
    packing = config.packing and batching.packing_works(model, len(tokenizer), tokenizer.pad_token_id, precision, per_example)
    if config.packing and not packing:
        runs.note(f"{type(model).__name__} does not keep packed examples apart: batches are padded instead.")
        per_example = False
    # FSDP and DeepSpeed shard the weights and gather them only inside the
    # model's own forward, where the fused loss, outside it, cannot reach them.
    sharded = any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true") for name in ("FSDP", "DEEPSPEED"))
    fuses = config.fuses_loss and not sharded and FusedHeadLoss.supports(model)
    loss = FusedHeadLoss(model, precision_lib.autocast_dtype(precision), multiple) if fuses else None
    if config.fuses_loss and loss is None:
        why = "FSDP / DeepSpeed shard its weights" if sharded else "this model's output layer is not a plain linear head"
        runs.note(f"{why}: the loss is transformers' own (fused_loss is off).")
    return packing, per_example, loss


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
        optim=config.optim,
    )


def train(
    config: config_lib.TrainConfig | str | Path | Mapping[str, Any],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Run one fine-tuning job; returns where it went and how it did.

    config: a TrainConfig, a YAML file of settings or a dict of them.
    resume: continue from the newest complete checkpoint in its output_dir.
    overwrite: replace a run already in output_dir (only once the new one has a checkpoint).
    progress: progress bars on stderr.
    """
    config = config_lib.load(config)
    if resume and overwrite:
        raise PeftgenError("--resume continues the run in the output folder; --overwrite deletes it. Pick one.")
    if Path(config.model).expanduser().exists():  # the run folder must find its base from anywhere
        config = dataclasses.replace(config, model=str(Path(config.model).expanduser().resolve()))
    precision = precision_lib.resolve(config.precision)
    processes = runs.Processes(cpu=not torch.cuda.is_available())
    # Check the data and the output folder before loading a model: a bad file
    # or a refused folder fails in a second and changes nothing on disk.
    run = processes.on_main(_check_inputs, config, resume, overwrite)
    set_seed(config.seed)
    model, tokenizer, new_ids = model_lib.prepare_for_training(config, precision)
    efficiency.own_weights(model)  # lets the mapped weights file go
    # The main process tokenizes into the cache (or finds it there); every process then reads it memory-mapped.
    train_data, valid_data = processes.on_main(_examples, config, tokenizer)
    train_set = train_data.open()
    valid_set = valid_data.open() if valid_data is not None else None
    output = run.work  # the run folder, or beside it until the new run replaces an old one
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
        "total_params": total,
        "versions": _versions(),
        "malloc_tunables": allocator.active(),  # lean_malloc took effect
    }
    multiple = config.token_multiple_on(gpu=torch.cuda.is_available())
    packing, per_example, loss = speed_settings(config, model, tokenizer, precision, multiple)
    try:
        trainer = PeftgenTrainer(
            model=model,
            args=training_arguments(config, output, precision, valid_set is not None, progress),
            train_dataset=train_set,
            eval_dataset=valid_set,
            data_collator=batching.collator(packing, tokenizer.pad_token_id, model_lib.hidden_width(model), per_example, multiple),
            compute_loss_func=loss,
            processing_class=tokenizer,
        )
        if config.sample_every:
            from peftgen.sampling import SampleCallback

            trainer.add_callback(SampleCallback(config, tokenizer, output, trainer))
        trainer.run = run
        # Only now, with the model loaded and the trainer built, does anything on disk change.
        processes.on_main(_start_run, run, config, facts)
        started = time.perf_counter()
        with efficiency.reusing_freed_memory() if config.reuses_memory else contextlib.nullcontext():
            outcome = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        metrics = dict(outcome.metrics)
        if valid_set is not None:
            metrics.update(_final_evaluation(trainer))
        metrics["wall_seconds"] = time.perf_counter() - started
        history = trainer.state.log_history
        curve = _save_run(trainer, processes, run, metrics, f"{config.mode} fine-tuning of {Path(config.model).name}")
    except BaseException as error:
        if processes.main:
            runs.discard(run)
        elif isinstance(error, PeftgenError):
            raise SystemExit(1) from None  # the main process says what went wrong
        raise
    return TrainResult(run.final, metrics, trainable, total, precision, curve, history, processes.main)


def _check_inputs(config: config_lib.TrainConfig, resume: bool, overwrite: bool) -> runs.RunFolder:
    """Refuse unusable data files and an output folder that must not be touched (main process)."""
    _sources(config)
    data.check_writable_folder(config.output_dir, "--output-dir")
    return runs.plan(config.output_dir, resume=resume, overwrite=overwrite)


def _sources(config: config_lib.TrainConfig) -> tuple[corpus.Source, corpus.Source | None]:
    train = corpus.describe(config.train_file, "training file", config.text_field, config.split)
    valid = corpus.describe(config.valid_file, "validation file", config.text_field) if config.valid_file else None
    return train, valid


def _examples(config: config_lib.TrainConfig, tokenizer) -> tuple[corpus.Tokenized, corpus.Tokenized | None]:
    train, valid = _sources(config)
    return (corpus.tokenize(train, tokenizer, config.max_length), corpus.tokenize(valid, tokenizer, config.max_length) if valid else None)


def _start_run(run: runs.RunFolder, config: config_lib.TrainConfig, facts: dict) -> None:
    """The run's facts, then its settings, each whole or absent: peftgen.yaml, which marks a run, comes last."""
    runs.create(run)
    runs.write_text(run.work / run_files.RUN_FACTS, json.dumps(facts, indent=2))
    partial = run.work / f".{run_files.RUN_CONFIG}.partial"
    config_lib.save(config, partial)
    os.replace(partial, run.work / run_files.RUN_CONFIG)


def _versions() -> dict[str, str]:
    """The versions of the libraries a run's numbers depend on (those installed)."""
    found = {}
    for name in ("peftgen", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _save_run(trainer: PeftgenTrainer, processes: runs.Processes, run: runs.RunFolder, metrics: dict, title: str) -> Path | None:
    """The final model, metrics and curves, each whole or absent; then the run takes its folder."""
    folder = Path(trainer.args.output_dir)
    staging = folder / runs.STAGING / "final"
    trainer.save_model(str(staging))  # adapter (new rows included) or full model, plus tokenizer
    processes.barrier()
    curve = None
    if processes.main:
        if staging.is_dir():  # the files that mark a finished model arrive last
            runs.move_into(staging, folder, last=("config.json", "adapter_config.json"))
        history = trainer.state.log_history
        runs.write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
        runs.write_text(folder / "log_history.json", json.dumps(history, indent=2))
        curve = plot.loss_curves(history, folder / LOSS_PLOT, title)
        runs.publish(run)
        runs.finish(run)
    processes.barrier()
    return run.final / curve.name if curve else None
