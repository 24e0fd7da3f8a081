"""Backend selection for block-sparse attention.

Each backend is a module under ``vidsparse.kernels`` exposing

* ``name``;
* ``not_supported_reasons(q, k, v, mask, *, needs_grad, explicit) -> list[str]`` (empty when it
  can take the inputs; q, k, v are (B, H, N, D) views);
* ``attention(q, k, v, mask, scale) -> (o, lse)`` with autograd when it supports backward.

Modules are imported on first use only, so a missing optional dependency (Triton) costs nothing
until that backend is asked for. When nothing fits, one error lists every backend and why.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["BACKENDS", "AUTO_ORDER", "NoBackendError", "select_backend", "backend_report"]

BACKENDS = {
    "triton": "vidsparse.kernels.triton_attention",
    "flex": "vidsparse.kernels.flex",
    "gather": "vidsparse.kernels.gather",
    "reference": "vidsparse.kernels.reference",
}
# "auto" tries these in order. FlexAttention is left out: it compiles per shape and mask layout,
# which a user should opt into (backend="flex"). "gather" (eager, only the kept blocks) takes
# everything Triton refuses, so "reference" (the oracle, every score) runs only when asked for.
AUTO_ORDER = ("triton", "gather")


class NoBackendError(NotImplementedError):
    """No attention backend accepts the inputs; the message lists each one's reasons."""


_DEFAULT_PATHS = dict(BACKENDS)
_FAILED: dict[str, str] = {}  # path -> why it cannot be imported (checked once)


def _import(name: str) -> ModuleType:
    # import statements, not importlib.import_module: torch.compile traces an import statement,
    # a backend's first import included, but breaks the graph at import_module; so a compiled
    # model whose first call is compiled has no break either (nor a cache entry that a guard
    # would see change after that call)
    if name == "triton":
        from .kernels import triton_attention as module
    elif name == "flex":
        from .kernels import flex as module
    elif name == "gather":
        from .kernels import gather as module
    else:
        from .kernels import reference as module
    return module


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """The backend module, or None and why it cannot be imported (remembered: no retry per call)."""
    path = BACKENDS[name]
    if path in _FAILED:
        return None, _FAILED[path]
    try:
        if path != _DEFAULT_PATHS.get(name):  # a BACKENDS entry pointed elsewhere
            return importlib.import_module(path), None
        return _import(name), None
    except ImportError as exc:  # e.g. triton not installed
        hint = "; pip install 'vidsparse[triton]'" if name == "triton" else ""
        _FAILED[path] = f"cannot be imported ({exc}){hint}"
        return None, _FAILED[path]


def _describe_inputs(q, needs_grad: bool) -> str:
    b, h, n, d = q.shape
    return f"q=(B={b}, H={h}, N={n}, D={d}) {str(q.dtype).replace('torch.', '')} on {q.device}, requires_grad={needs_grad}"


def select_backend(backend: str, q, k, v, mask, *, needs_grad: bool) -> ModuleType:
    """Return the backend module to run, or raise :class:`NoBackendError` saying why none fits."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {tuple(BACKENDS)}, got {backend!r}")
    explicit = backend != "auto"
    candidates = (backend,) if explicit else AUTO_ORDER
    reasons: dict[str, list[str]] = {}
    for name in candidates:
        module, err = _load(name)
        if module is None:
            reasons[name] = [err]
            continue
        why = module.not_supported_reasons(q, k, v, mask, needs_grad=needs_grad, explicit=explicit)
        if not why:
            return module
        reasons[name] = why
    lines = [f"no backend for block-sparse attention with {_describe_inputs(q, needs_grad)}"]
    lines += [f"  {name}: {'; '.join(why)}" for name, why in reasons.items()]
    raise NoBackendError("\n".join(lines))


def backend_report(device: str = "cpu") -> dict[str, str]:
    """For `vidsparse info`: which backends would take small fp16/bf16 inputs here, and why not."""
    import torch

    from .mask import BlockMask

    report = {}
    dtype = torch.float16
    q = torch.zeros(1, 1, 128, 64, dtype=dtype, device=device)
    mask = BlockMask.full(block_q=128, block_k=64, q_len=128, k_len=128, device=device)
    for name in BACKENDS:
        module, err = _load(name)
        if module is None:
            report[name] = err
            continue
        why = module.not_supported_reasons(q, q, q, mask, needs_grad=True, explicit=True)
        report[name] = "usable (forward + backward)" if not why else "; ".join(why)
    return report
