"""Public attention functions: run a given BlockMask, or predict one and run it."""

from __future__ import annotations

import math

import torch

from ._validation import check_mask, to_bhnd
from .dispatch import select_backend
from .mask import BlockMask
from .maskers.hybrid import hybrid_block_mask

__all__ = ["block_sparse_attention", "sparse_attention", "predict_mask"]


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
    mask: BlockMask,
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
        mask: a :class:`BlockMask` built for (Lq, Lk); its batch and head dims may be 1.
        scale: score scale, default 1/sqrt(D).
        layout: "bhnd" or "bnhd" (diffusers' processor layout); o comes back in the same layout.
        return_lse: also return the log-sum-exp of the kept scores, (B, H, Lq) float32 in both
            layouts (natural log; -inf for a row that keeps nothing). It carries no gradient.
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
    check_mask(mask, qb, kb)
    scale = _check_scale(scale, qb.shape[-1])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    impl = select_backend(backend, qb, kb, vb, mask, needs_grad=needs_grad)
    o, lse = impl.attention(qb, kb, vb, mask, scale)
    if layout == "bnhd":
        o = o.transpose(1, 2)
    return (o, lse) if return_lse else o


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: float | torch.Tensor | None = 0.03,
    topp: float | torch.Tensor | None = 0.2,
    block_q: int = 128,
    block_k: int = 64,
    keep_diagonal: bool = False,
    keep_sink: bool = False,
    scale: float | None = None,
    layout: str = "bhnd",
    return_lse: bool = False,
    return_mask: bool = False,
    backend: str = "auto",
):
    """Predict the hybrid Top-k + Top-p mask from q and k, then attend: SpargeAttention2 in one call.

    Arguments are those of :func:`vidsparse.hybrid_block_mask` and
    :func:`block_sparse_attention`. The mask is recomputed on every call, without gradient.

    Returns:
        o, then lse if ``return_lse``, then the BlockMask if ``return_mask`` (a tuple when either
        flag is set).
    """
    mask = predict_mask(
        q, k, topk=topk, topp=topp, block_q=block_q, block_k=block_k,
        keep_diagonal=keep_diagonal, keep_sink=keep_sink, scale=scale, layout=layout,
    )
    o, lse = block_sparse_attention(q, k, v, mask, scale=scale, layout=layout, return_lse=True, backend=backend)
    extra = ((lse,) if return_lse else ()) + ((mask,) if return_mask else ())
    return (o, *extra) if extra else o


def predict_mask(q, k, **kwargs) -> BlockMask:
    """Hybrid mask with the fastest predictor for the device (fused Triton on CUDA when present)."""
    if q.is_cuda:
        try:
            from .kernels.triton_masker import fused_hybrid_block_mask
        except ImportError:
            pass
        else:
            return fused_hybrid_block_mask(q, k, **kwargs)
    return hybrid_block_mask(q, k, **kwargs)
