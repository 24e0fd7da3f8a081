"""Figures of the tiny harness: frame strips of videos and sample strips of the tiny model.

matplotlib is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..training.plots import pyplot

__all__ = ["save_frame_strip", "save_sample_strip"]


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

    plt = pyplot()
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

    ``sampler``: the other keyword arguments of :func:`vidsparse.tiny.flow.sample` (guidance_scale,
    guidance_interval, eta, shift); ``generator`` (on the model's device) draws the initial noise.
    Runs on the model's device in its dtype. Returns the captions, one per condition.
    """
    from .data import ShapesConfig, describe, embed, render, sample_conditions
    from .flow import describe_sampler, sample

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
