"""Integrations with model libraries.

* :mod:`vidsparse.integrations.diffusers`: :func:`patch`, :func:`unpatch`, :func:`stats` for
  diffusers' Wan, CogVideoX and HunyuanVideo transformers (imports diffusers on first use).
* :mod:`vidsparse.integrations.sparse_stats`: :class:`SparseStats`, the per-layer, per-step records.

The settings they take are :class:`vidsparse.SparseConfig`. diffusers is imported lazily, so
``import vidsparse.integrations`` stays cheap.
"""

_LAZY = {
    "patch": "vidsparse.integrations.diffusers",
    "unpatch": "vidsparse.integrations.diffusers",
    "stats": "vidsparse.integrations.diffusers",
    "is_patched": "vidsparse.integrations.diffusers",
    "reset_steps": "vidsparse.integrations.diffusers",
    "set_mask_callback": "vidsparse.integrations.diffusers",
    "SparseStats": "vidsparse.integrations.sparse_stats",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vidsparse.integrations' has no attribute {name!r}")
