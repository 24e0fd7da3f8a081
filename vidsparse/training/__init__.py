"""Training code: flow-matching pretraining of the tiny Wan model (:mod:`.pretrain`) and plots.

Run ``python -m vidsparse.training.pretrain --help`` for the command line. Names are resolved
lazily so that ``python -m vidsparse.training.pretrain`` does not import the module twice.
"""

from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "train", "main", "flow_matching_loss", "make_optimizer", "make_scheduler", "EMA"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".pretrain", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
