"""The model-agnostic trainer: one training loop (:mod:`.loop`) with its EMA (:mod:`.ema`) and
``steps="auto"`` planner (:mod:`.planner`), velocity distillation of a sparse student
(:mod:`.distill`), the rectified-flow maths (:mod:`.flow`), optimizer and schedule
(:mod:`.optim`) and loss curves (:mod:`.plots`).

Run ``vidsparse distill --help`` (or ``python -m vidsparse.training.distill --help``) for the command line.
Names are resolved lazily so ``python -m vidsparse.training.distill`` does not import it twice.

The distillation function is not among these names: ``vidsparse.training.distill`` is its module,
so import the function from there, ``from vidsparse.training.distill import distill`` (or use
:func:`train_student`, which also returns the trained student).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "train_loop": ".loop", "LoopConfig": ".loop", "StepInfo": ".loop", "LoopResult": ".loop",
    "list_checkpoints": ".loop", "load_checkpoint": ".loop", "EMA": ".ema", "StepPlanner": ".planner",
    "DataSource": ".distill", "DistillConfig": ".distill", "train_student": ".distill",
    "make_optimizer": ".optim", "make_scheduler": ".optim", "flow_matching_loss": ".flow",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
