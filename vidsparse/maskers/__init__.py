"""Maskers: methods that choose which blocks of attention to compute.

Every masker is registered by name and returns a :class:`~vidsparse.MaskPlan`::

    >>> plan = vidsparse.maskers.get("hybrid")(q, k, topk=0.03, topp=0.2)
    >>> vidsparse.maskers.available()
    ['hybrid', ...]

See :mod:`vidsparse.maskers.registry` for the contract and the options every masker shares
(token order, priors). Each method is one module with its eager reference beside its GPU path.
"""

from . import hybrid  # noqa: F401  (registers "hybrid")
from . import radial, svg, svg2, vmoba, xattention  # noqa: F401  (register the seeds' methods)
from .hybrid import block_mean, hybrid_block_mask, pooled_block_scores, select_hybrid
from .registry import COMMON_OPTIONS, Masker, apply_priors, available, get, register, unregister

__all__ = [
    "Masker", "register", "unregister", "get", "available", "apply_priors", "COMMON_OPTIONS",
    "hybrid_block_mask", "block_mean", "pooled_block_scores", "select_hybrid",
]
