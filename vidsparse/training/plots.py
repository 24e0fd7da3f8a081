"""Figures for training runs: frame strips of videos and loss curves (matplotlib, Agg backend).

matplotlib is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["save_frame_strip", "save_sample_strip", "save_loss_curve", "read_jsonl"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; keeps an already chosen non-GUI backend
    import matplotlib.pyplot as plt

    return plt


def save_frame_strip(
    path: str | os.PathLike,
    videos: torch.Tensor,
    captions: Sequence[str] | None = None,
    *,
    frames: int = 8,
    title: str | None = None,
) -> Path:
    """Save one row of evenly spaced frames per video, with an optional caption above each row.

    Args:
        path: output PNG.
        videos: (N, 3, T, H, W) in [-1, 1] (clamped for display).
        captions: N strings, or None.
        frames: frames per row (at most T), spread evenly from the first to the last frame.

    Returns:
        The path written.
    """
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be (N, 3, T, H, W), got shape {tuple(videos.shape)}")
    n, _, t, h, w = videos.shape
    if captions is not None and len(captions) != n:
        raise ValueError(f"captions must have one entry per video ({n}), got {len(captions)}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    frames = min(frames, t)
    idx = torch.linspace(0, t - 1, frames).round().long()
    pix = ((videos.detach().float().cpu()[:, :, idx].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    gap = max(1, w // 16)
    rows = torch.full((n, h, frames * (w + gap) - gap, 3), 255, dtype=torch.uint8)
    for j in range(frames):
        rows[:, :, j * (w + gap) : j * (w + gap) + w] = pix[:, :, j].permute(0, 2, 3, 1)

    plt = _pyplot()
    scale = max(1, 96 // h)  # draw small clips at least ~96 px tall
    row_h_in = (h * scale) / 100 + (0.22 if captions else 0.04)
    title_h_in = 0.35 if title else 0.0
    fig_h_in = n * row_h_in + title_h_in
    fig, axes = plt.subplots(n, 1, figsize=(rows.shape[2] * scale / 100 + 0.1, fig_h_in), dpi=100, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        ax.imshow(rows[i].numpy(), interpolation="nearest")
        ax.set_axis_off()
        if captions is not None:
            ax.set_title(captions[i], fontsize=7, loc="left", pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.2, h_pad=0.3, rect=(0, 0, 1, 1 - title_h_in / fig_h_in))  # leave room for the title
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSON-lines file (missing file -> empty list)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def save_sample_strip(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    num_samples: int,
    seed: int,
    steps: int,
    generator: torch.Generator | None = None,
    data=None,
    progress: bool = False,
    **sampler,
) -> list[str]:
    """Sample the first ``num_samples`` "val" conditions of ``seed`` with a tiny-model-shaped
    ``model`` and save a strip whose rows alternate the real clip and the sample for its condition.

    ``sampler``: the other keyword arguments of :func:`vidsparse.models.flow.sample` (guidance_scale,
    guidance_interval, eta, shift); ``generator`` (on the model's device) draws the initial noise.
    Runs on the model's device in its dtype. Returns the captions, one per condition.
    """
    from ..data import ShapesConfig, describe, embed, render, sample_conditions
    from ..models.flow import describe_sampler, sample

    data = data or ShapesConfig()
    device = next(model.parameters()).device
    cond = sample_conditions(num_samples, seed=seed, split="val", config=data, device=device)
    captions = describe(cond)
    videos = sample(model, embed(cond, config=data), shape=(3, data.frames, data.size, data.size), steps=steps,
                    generator=generator, progress=progress, **sampler)
    both = torch.stack([render(cond, config=data).cpu(), videos.cpu()], dim=1).flatten(0, 1)  # data, sample, ...
    labels = [f"{kind}: {c}" for c in captions for kind in ("data", "sample")]
    title = f"val conditions; samples: {steps} Euler steps, {describe_sampler(**sampler)}"
    save_frame_strip(path, both, labels, title=title)
    return captions


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
    plt = _pyplot()
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
