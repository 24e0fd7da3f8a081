"""Integrations with model libraries.

* :mod:`vidsparse.integrations.config`: :class:`SparseConfig` (torch only).
* :mod:`vidsparse.integrations.diffusers`: :func:`patch`, :func:`unpatch`, :func:`stats` for
  diffusers' Wan, CogVideoX and HunyuanVideo transformers (imports diffusers on first use).
* :mod:`vidsparse.integrations.tiling`: raster / tiled token orders (torch only).
* :mod:`vidsparse.integrations.sparse_stats`: :class:`SparseStats`, the per-layer, per-step records.

diffusers is imported lazily, so ``import vidsparse.integrations`` stays cheap.
"""

from .config import SparseConfig

_LAZY = {
    "patch": "vidsparse.integrations.diffusers",
    "unpatch": "vidsparse.integrations.diffusers",
    "stats": "vidsparse.integrations.diffusers",
    "is_patched": "vidsparse.integrations.diffusers",
    "reset_steps": "vidsparse.integrations.diffusers",
    "set_mask_callback": "vidsparse.integrations.diffusers",
    "SparseStats": "vidsparse.integrations.sparse_stats",
}

__all__ = ["SparseConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vidsparse.integrations' has no attribute {name!r}")
