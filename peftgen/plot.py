"""Loss curves as a PNG, from Trainer's log history."""
from __future__ import annotations

from pathlib import Path


def loss_curves(log_history: list[dict], path: Path, title: str = "") -> Path | None:
    """Plot training loss and validation loss against the optimizer step; None if nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    valid = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
