"""Public attention functions: run a given mask or plan, or predict one with a masker and run it."""

from __future__ import annotations

import math

import torch

from . import maskers
from ._validation import check_mask, to_bhnd
from .dispatch import select_backend
from .mask import BlockMask
from .plan import MaskPlan, as_plan

__all__ = ["block_sparse_attention", "sparse_attention"]


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    return float(scale)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask | MaskPlan,
    *,
    scale: float | None = None,
    layout: str = "bhnd",
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention restricted to the key blocks kept in ``mask``.

    Args:
        q: (B, H, Lq, D) with ``layout="bhnd"`` or (B, Lq, H, D) with ``layout="bnhd"``;
            float16, bfloat16, float32 or float64.
        k, v: (B, H, Lk, D) (or (B, Lk, H, D)), same dtype and device as q.
        mask: a :class:`BlockMask` built for (Lq, Lk) (its batch and head dims may be 1), or a
            :class:`MaskPlan` from a masker: q, k, v are gathered into its attention order, and
            o and lse come back in the caller's order.
        scale: score scale, default 1/sqrt(D).
        layout: "bhnd" or "bnhd" (diffusers' processor layout); o comes back in the same layout.
        return_lse: also return the log-sum-exp of the kept scores, (B, H, Lq) in both layouts:
            float32 for 16/32-bit inputs, float64 for float64 (natural log; -inf for a row that
            keeps nothing). It carries no gradient.
        backend: "auto" (Triton on CUDA, else "gather": eager PyTorch over the kept blocks only),
            "triton", "flex", "gather" or "reference" (the exact oracle: computes every score).
    Returns:
        o in q's dtype and layout, or (o, lse) with ``return_lse=True``.
    Raises:
        TypeError / ValueError: inputs that break the contract (the message names the argument).
        vidsparse.dispatch.NoBackendError: the backend asked for cannot take these inputs; the
            message says why for each backend tried.

    Example:
        >>> mask = vidsparse.hybrid_block_mask(q, k, topk=0.03, topp=0.2)
        >>> o = vidsparse.block_sparse_attention(q, k, v, mask)
    """
    qb, kb, vb = to_bhnd(q, k, v, layout)
    plan = as_plan(mask)
    check_mask(plan.mask, qb, kb)
    scale = _check_scale(scale, qb.shape[-1])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    qb, kb, vb = plan.to_attention_order(qb, kb, vb)
    impl = select_backend(backend, qb, kb, vb, plan.mask, needs_grad=needs_grad)
    o, lse = impl.attention(qb, kb, vb, plan.mask, scale)
    o, lse = plan.to_caller_order(o), plan.to_caller_order(lse)
    if layout == "bnhd":
        o = o.transpose(1, 2)
    return (o, lse) if return_lse else o


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str = "hybrid",
    grid: tuple[int, int, int] | None = None,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
    layout: str = "bhnd",
    return_lse: bool = False,
    return_plan: bool = False,
    backend: str = "auto",
    **options,
):
    """Predict a plan with a registered masker, then attend: SpargeAttention2 in one call by default.

    Args:
        q, k, v, scale, layout, backend: as in :func:`block_sparse_attention`.
        method: masker name (``vidsparse.maskers.available()``); default "hybrid".
        grid: the latent (T, H, W) when known (needed by grid-based methods, tiled order, windows).
        block_q, block_k: the mask's block shape.
        **options: the masker's options, e.g. ``topk=0.03, topp=0.2`` for "hybrid".
    Returns:
        o, then lse if ``return_lse``, then the MaskPlan if ``return_plan`` (a tuple when either
        flag is set). The plan is recomputed on every call, without gradient.
    """
    qb, kb, _ = to_bhnd(q, k, v, layout)
    plan = maskers.get(method)(qb, kb, grid=grid, block_q=block_q, block_k=block_k, **options)
    o, lse = block_sparse_attention(q, k, v, plan, scale=scale, layout=layout, return_lse=True, backend=backend)
    extra = ((lse,) if return_lse else ()) + ((plan,) if return_plan else ())
    return (o, *extra) if extra else o
