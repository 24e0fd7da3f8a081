"""Exponential moving average of a model's weights, checkpointed by the training loop as ``state``."""

from __future__ import annotations

import copy

import torch

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a model's parameters, kept in a separate float32 copy.

    ``update(model, step)`` uses decay ``min(decay, (1 + step) / (10 + step))`` so the average is
    not dominated by the random initialisation early on. ``state_dict`` / ``load_state_dict`` make
    it a ``state`` object of :func:`vidsparse.training.loop.train_loop` (checkpointed and resumed
    with the model).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema = list(self.model.parameters())
        cur = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, cur, 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
