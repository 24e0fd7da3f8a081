"""Optimizer and learning-rate schedule shared by every training run (pretraining, distillation)."""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["make_optimizer", "make_scheduler"]


def make_optimizer(
    model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool = False
) -> torch.optim.AdamW:
    """AdamW that decays only matrices: biases, norm scales and Wan's modulation tables are exempt."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "scale_shift_table" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int | Callable[[], int | None],
    min_lr_ratio: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak LR, then cosine decay to ``min_lr_ratio`` * peak at ``total_steps``.

    ``total_steps`` may be a callable, read at every step (for ``steps="auto"``, fixed after a
    short throughput measurement); while it returns None the LR stays at its peak after warm-up.
    """
    get_total = total_steps if callable(total_steps) else (lambda: total_steps)

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        total = get_total()
        if total is None:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
