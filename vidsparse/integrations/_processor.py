"""Small helpers shared by the per-architecture processors (no diffusers import)."""

from __future__ import annotations

__all__ = ["adopt_backend_settings", "reject_context_parallel", "no_cp_plan_error"]

# Per-instance settings diffusers' dispatcher-based processors may carry
# (``model.set_attention_backend`` / context parallelism set them on the processor instance).
_BACKEND_ATTRS = ("_attention_backend", "_parallel_config")


def adopt_backend_settings(new, original) -> None:
    """Copy the original processor's per-instance dispatcher settings onto its replacement, so
    that calls deferred to the stock ``__call__`` (cross-attention, dense warm-up) run as before.
    ``unpatch`` uses it the other way round, for settings made while patched."""
    if original is None:
        return
    for name in _BACKEND_ATTRS:
        if name in vars(original):
            setattr(new, name, vars(original)[name])


def no_cp_plan_error(model_name: str) -> NotImplementedError:
    """The refusal for a model diffusers 0.42 gives no context-parallel plan (``_cp_plan``)."""
    return NotImplementedError(
        f"vidsparse: context parallelism is supported for WanTransformer3DModel only. diffusers 0.42 defines no "
        f"context-parallel plan (_cp_plan) for {model_name}, so how its joint text+video sequence is split is the "
        "caller's own plan, and vidsparse cannot keep the text tokens as on one GPU; unpatch the model or run it "
        "without context parallelism")


def reject_context_parallel(processor, model_name: str) -> None:
    """Refuse a processor that diffusers handed a ``_parallel_config`` for a model without a
    context-parallel plan (the caller passed its own ``cp_plan``), rather than attend a split it
    cannot know."""
    if getattr(processor, "_parallel_config", None) is not None:
        raise no_cp_plan_error(model_name)
