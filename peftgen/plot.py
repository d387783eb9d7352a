"""Plots as PNGs: loss curves from Trainer's log history, and decoders side by side."""

from __future__ import annotations

from pathlib import Path

EOS_RATE = "eval_sample_eos_rate"  # logged by peftgen.sampling when samples are on


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def loss_curves(log_history: list[dict], path: Path, title: str = "") -> Path | None:
    """Plot training and validation loss against the optimizer step, and beside them the share
    of samples that ended at <EOS> when samples were on; None if nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    valid = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    stops = [(e["step"], e[EOS_RATE]) for e in log_history if EOS_RATE in e and "step" in e]
    if not train and not valid:
        return None
    plt = _pyplot()
    if stops:
        fig, (ax, eos) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, width_ratios=(7, 4))
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1.4)
    if valid:
        ax.plot(*zip(*valid), label="validation loss", color="tab:orange", marker="o", linewidth=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title or "peftgen training")
    ax.grid(alpha=0.3)
    ax.legend()
    if stops:
        eos.plot(*zip(*stops), color="tab:green", marker="s", linewidth=1.6)
        eos.set_ylim(-0.05, 1.05)
        eos.set_xlabel("optimizer step")
        eos.set_ylabel("share of samples")
        eos.set_title("samples ending at <EOS>")
        eos.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def decoder_bars(decoders: list[str], metrics: dict[str, list], path: Path) -> Path:
    """A small bar chart per metric (``{title: one value per decoder}``), decoders side by side.

    Metrics with no value at all (a judge column without --judge) are left out."""
    shown = {title: values for title, values in metrics.items() if any(v is not None for v in values)}
    plt = _pyplot()
    cols = 3
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=110, squeeze=False)
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(decoders))]
    for ax, (title, values) in zip(axes.flat, shown.items()):
        ax.bar(range(len(decoders)), [0 if v is None else v for v in values], color=colors)
        ax.set_xticks(range(len(decoders)), decoders, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
