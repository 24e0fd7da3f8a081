"""``steps="auto"``: plan the total number of optimizer steps from measured throughput."""

from __future__ import annotations

import time

import torch

from ..utils import sync

__all__ = ["StepPlanner"]


class StepPlanner:
    """Times steps ``[start, end)`` of a run, then fixes the total that fits the time budget.

    One object plays three parts of :func:`vidsparse.training.loop.train_loop`:

    * ``LoopConfig(steps=planner)``: calling it gives the total, None while it is not known;
    * ``state={"plan": planner}``: the chosen total is checkpointed, so a resumed run keeps the
      schedule it chose;
    * ``planner.observe(info.step)`` from the loop's callback after every step.

    Args:
        time_limit_s: the wall-clock budget, counted from ``started`` (``time.monotonic()``).
        reserve_s: seconds kept free at the end (final checkpoint, export).
        overhead: extra cost per step as a fraction of a training step (e.g. periodic
            evaluation), added to the measured step time.
        start, end: the timed steps (after warm-up: cuDNN autotuning, ``torch.compile``).
        margin: share of the remaining budget that is planned (the rest is slack).
        device: synchronised before each reading of the clock.
    """

    def __init__(self, *, time_limit_s: float, started: float, reserve_s: float = 0.0, overhead: float = 0.0,
                 start: int = 5, end: int = 25, margin: float = 0.93, device: torch.device | None = None):
        if not 0 <= start < end:
            raise ValueError(f"StepPlanner needs 0 <= start < end, got start={start}, end={end}")
        self.time_limit_s, self.started, self.reserve_s = time_limit_s, started, reserve_s
        self.overhead, self.start, self.end, self.margin = overhead, start, end, margin
        self.device = device
        self.total: int | None = None
        self._from: tuple[int, float] | None = None  # (step, time) where the measurement began

    def __call__(self) -> int | None:
        return self.total

    def _now(self) -> float:
        if self.device is not None:
            sync(self.device)
        return time.monotonic()

    def observe(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based count of steps taken); fixes the total at ``end``."""
        if self.total is not None or step < self.start:
            return
        if self._from is None:
            self._from = (step, self._now())
            return
        if step - self._from[0] < self.end - self.start:
            return
        now = self._now()
        step_time = (now - self._from[1]) / (step - self._from[0])
        budget = self.time_limit_s - (now - self.started) - self.reserve_s
        self.total = max(step, step + int(self.margin * budget / (step_time * (1 + self.overhead))))

    def state_dict(self) -> dict:
        return {"total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.total = state["total"]
