"""Small helpers shared by the per-architecture processors (no diffusers import)."""

from __future__ import annotations

__all__ = ["adopt_backend_settings", "reject_context_parallel"]

# Per-instance settings diffusers' dispatcher-based processors may carry
# (``model.set_attention_backend`` / context parallelism set them on the processor instance).
_BACKEND_ATTRS = ("_attention_backend", "_parallel_config")


def adopt_backend_settings(new, original) -> None:
    """Copy the original processor's per-instance dispatcher settings onto its replacement, so
    that calls deferred to the stock ``__call__`` (cross-attention, dense warm-up) run as before."""
    if original is None:
        return
    for name in _BACKEND_ATTRS:
        if name in vars(original):
            setattr(new, name, vars(original)[name])


def reject_context_parallel(processor) -> None:
    """Sparse attention over a sequence split across devices is not implemented: fail loudly
    rather than silently running dense."""
    if getattr(processor, "_parallel_config", None) is not None:
        raise NotImplementedError(
            "vidsparse: context parallelism (a processor _parallel_config) is not supported by the sparse "
            "self-attention; unpatch the model or disable context parallelism"
        )
