"""Optional dependencies: one error type, one message naming the extra that installs them.

    >>> from vidsparse._optional import require
    >>> diffusers = require("diffusers", "diffusers")        # the module, or a clear error
    >>> imageio = require("imageio.v2", "video")

The error is a :class:`MissingDependencyError`, a subclass of ``ImportError``, so code that already
catches ``ImportError`` keeps working, and its message says what to ``pip install``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependencyError", "require"]


class MissingDependencyError(ImportError):
    """An optional dependency of vidsparse is not installed; the message names the extra."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` and return it, or raise :class:`MissingDependencyError`.

    Args:
        module: dotted module name, e.g. ``"diffusers"`` or ``"torchmetrics.functional.image"``.
        extra: the vidsparse extra that installs it (``"diffusers"``, ``"video"``, ``"triton"``, ...).
    Raises:
        MissingDependencyError: ``module`` or a package it imports cannot be found; the message
            ends with "pip install 'vidsparse[<extra>]'". Other import failures (an error raised
            inside an installed module) propagate unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        top = module.split(".")[0]
        own = missing.split(".")[0] == top  # the module itself (or a submodule) is missing
        detail = "" if own else f" (importing {top!r} failed: no module named {missing!r})"
        raise MissingDependencyError(
            f"vidsparse needs the optional package {(missing if own else top)!r} here, which is not installed{detail}: "
            f"pip install 'vidsparse[{extra}]'",
            name=missing,
        ) from exc
