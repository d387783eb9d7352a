"""Samples during training: watch the model learn to write, and to stop.

    peftgen train -c configs/lora.yaml --sample-every 1 --sample-decoder topk --sample-option p=0.9

Every ``sample_every``-th evaluation the model continues ``sample_prompt``
(default ``<BOS>``) ``sample_count`` times with any installed decoder. Each
sample becomes a line of ``samples.jsonl`` in the run folder, is printed under
the evaluation line and goes to TensorBoard / Weights & Biases as text; the
share of samples that ended at ``<EOS>`` is logged as ``eval_sample_eos_rate``
and drawn in ``loss.png``.

Sampling leaves training exactly as it was: the decoder draws from its own
``torch.Generator`` (seeded from the config, the same seed every round so that
rounds differ only by the model), never from the global RNG that dropout and
shuffling use; no gradient is recorded; the model goes back to training mode.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from transformers import TrainerCallback

from peftgen.plot import EOS_RATE  # "eval_..." files it with the evaluation metrics in trackers

SAMPLES_FILE = "samples.jsonl"


def build_decoder(config):
    """The configured decoder, checked against the sampling settings (raises PeftgenError)."""
    from peftgen import plugins
    from peftgen.generation import build_decoder as build
    from peftgen.generation import check_request

    info = plugins.get_decoder(config.sample_decoder)
    decoder = build(info.cls, config.sample_options)
    check_request(decoder, config.sample_count, config.sample_max_new_tokens)
    return decoder


class SampleCallback(TrainerCallback):
    """Generates samples at evaluations; needs the trainer to log its metric and find the trackers."""

    def __init__(self, config, tokenizer, output_dir: str | Path, trainer, echo=None):
        from peftgen.generation import resolved_options
        from peftgen.generation.engine import check_context
        from peftgen.generation.text import default_prompt, encode_prompt, stop_token_ids

        self.config, self.tokenizer, self.trainer = config, tokenizer, trainer
        self.path = Path(output_dir) / SAMPLES_FILE
        self.decoder = build_decoder(config)
        self.options = resolved_options(self.decoder)
        self.prompt = config.sample_prompt if config.sample_prompt is not None else default_prompt(tokenizer)
        self.prompt_ids = encode_prompt(tokenizer, self.prompt)
        self.stops = stop_token_ids(tokenizer, None)
        check_context(trainer.model, len(self.prompt_ids), config.sample_max_new_tokens)
        self.echo = echo or _write
        self._warned = False

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        evaluations = sum("eval_loss" in entry for entry in state.log_history)  # survives --resume
        if evaluations % self.config.sample_every or not state.is_world_process_zero:
            return
        if self._sharded(args):
            return
        samples = self.sample(model if model is not None else self.trainer.model, state.global_step)
        rate = sum(s["finish_reason"] == "stop" for s in samples) / len(samples)
        self.trainer.log({EOS_RATE: rate})
        with self.path.open("a", encoding="utf-8") as file:
            for sample in samples:
                file.write(json.dumps(sample, ensure_ascii=False) + "\n")
        for number, sample in enumerate(samples, 1):
            end = "<EOS>" if sample["finish_reason"] == "stop" else f"length limit, {sample['new_tokens']} tokens"
            self.echo(f"--- sample {number} of {len(samples)} at step {sample['step']} ({self.config.sample_decoder}, {end})")
            self.echo(sample["text"])
        self._to_trackers(samples, state.global_step)

    def sample(self, model, step: int) -> list[dict]:
        """``sample_count`` completions of the prompt, as samples.jsonl lines."""
        from peftgen.generation import generate
        from peftgen.generation.text import completion_text

        was_training = model.training
        model.eval()  # no dropout while sampling; the training step's masks are drawn later, unchanged
        try:
            # generate() runs under inference_mode and draws only from a generator seeded here.
            completions = generate(
                model,
                [self.prompt_ids],
                self.decoder,
                max_new_tokens=self.config.sample_max_new_tokens,
                num_return_sequences=self.config.sample_count,
                stop_tokens=self.stops,
                pad_token_id=self.tokenizer.pad_token_id,
                seed=self.config.seed,
            )[0]
        finally:
            model.train(was_training)
        return [
            {
                "step": step,
                "decoder": self.config.sample_decoder,
                "options": self.options,
                "prompt": self.prompt,
                "text": completion_text(self.tokenizer, c),
                "finish_reason": c.finish_reason,
                "new_tokens": len(c.token_ids),
            }
            for c in completions
        ]

    def _sharded(self, args) -> bool:
        """FSDP and DeepSpeed ZeRO-3 need every process in each forward, so one process cannot sample."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not (args.fsdp or is_deepspeed_zero3_enabled()):
            return False
        if not self._warned:
            warnings.warn("sample_every is ignored under FSDP / DeepSpeed ZeRO-3: their sharded weights cannot sample on one process.", stacklevel=2)
            self._warned = True
        return True

    def _to_trackers(self, samples: list[dict], step: int) -> None:
        """Samples as text in the trackers of report_to that show text: TensorBoard and Weights & Biases."""
        table = "| # | finish | text |\n|---|---|---|\n" + "\n".join(
            f"| {i} | {s['finish_reason']} | {s['text'].replace('|', '&#124;').replace(chr(10), ' ')} |" for i, s in enumerate(samples, 1)
        )
        for callback in self.trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.add_text("samples", table, global_step=step)
            wandb = getattr(callback, "_wandb", None)
            if wandb is not None and getattr(wandb, "run", None) is not None:
                rows = [[s["step"], s["finish_reason"], s["text"]] for s in samples]
                wandb.log({"samples": wandb.Table(columns=["step", "finish_reason", "text"], data=rows)})


def _write(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text)  # below the training bar rather than through it
