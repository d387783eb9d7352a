"""Settings of the few-step training runs the tests share (a tiny model on the shared text files), and one bf16 training step."""

from __future__ import annotations

from pathlib import Path

# Six updates of four examples, evaluated and saved every third, fp32 so that losses compare exactly.
TINY_RUN = dict(
    max_steps=6,
    eval_steps=3,
    save_steps=3,
    logging_steps=1,
    batch_size=4,
    lr=1e-2,
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    precision="fp32",
)


def run_settings(base, text_files: dict[str, Path], output_dir, mode: str = "lora", **overrides) -> dict:
    """A run of ``mode`` on ``base`` writing to ``output_dir``: TINY_RUN, then ``overrides``."""
    return dict(
        model=str(base),
        mode=mode,
        train_file=str(text_files["train"]),
        valid_file=str(text_files["valid"]),
        output_dir=str(output_dir),
        **{**TINY_RUN, **overrides},
    )


def bf16_step(model, ids):
    """One forward and backward pass under bf16 autocast: (fp32 logits, {parameter name: gradient})."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {name: p.grad.clone() for name, p in model.named_parameters()}
