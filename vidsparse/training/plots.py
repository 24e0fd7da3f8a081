"""Loss curves of training runs (matplotlib, Agg backend) and the JSON-lines logs they read.

matplotlib is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["save_loss_curve", "read_jsonl", "pyplot"]


def pyplot():
    """matplotlib.pyplot with a headless backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; keeps an already chosen non-GUI backend
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSON-lines file (missing file -> empty list)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def save_loss_curve(
    log_path: str | os.PathLike, path: str | os.PathLike, *, title: str | None = None,
    ylabel: str = "flow-matching MSE",
) -> Path:
    """Plot the training loss (raw and smoothed), validation losses and learning rate of a run.

    Reads the JSONL log written by :mod:`vidsparse.training.pretrain` (records with ``kind`` "train"
    carry ``step``, ``loss`` and ``lr``; "eval" records carry ``val_loss`` and ``val_loss_ema``).
    """
    records = read_jsonl(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps = [r["step"] for r in train]
        loss = torch.tensor([r["loss"] for r in train])
        ax.plot(steps, loss.numpy(), color="tab:blue", alpha=0.3, lw=0.8, label="train loss")
        k = max(1, len(loss) // 25) | 1  # odd window keeps the smoothed curve centred
        if k > 1:
            smooth = torch.nn.functional.avg_pool1d(loss[None, None], k, stride=1, padding=k // 2, count_include_pad=False)[0, 0]
            ax.plot(steps, smooth[: len(steps)].numpy(), color="tab:blue", lw=1.5, label=f"train loss (mean of {k})")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange", ms=3, label="val loss")
        ax.plot([r["step"] for r in evals], [r["val_loss_ema"] for r in evals], "s-", color="tab:green", ms=3, label="val loss (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    values = [r["loss"] for r in train] + [r["val_loss"] for r in evals]
    if values and min(values) > 0 and max(values) / min(values) > 3:
        ax.set_yscale("log")  # only when the loss spans a wide range; otherwise ticks get unreadable
    ax.grid(True, which="both", alpha=0.3)
    if train:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray", lw=0.8, ls="--", label="lr")
        ax2.set_ylabel("learning rate", color="gray")
        ax2.tick_params(axis="y", colors="gray")
    if train or evals:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "training loss", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
