"""SpargeAttention2's hybrid Top-k + Top-p block masker (arXiv 2602.13515, Eq. 9).

Per (batch, head, query block) row: mean-pool the query block and every key block, softmax the
pooled scores over key blocks, sort once in descending order, and keep the union of

* Top-k: the ``max(1, floor(topk * NKB))`` largest entries, and
* Top-p: the shortest prefix of the descending row whose sum reaches ``topp``.

Both rules are prefixes of the same order, so the union is the longer prefix (one sort, so ties
cannot make the union larger than either rule). Conventions the paper leaves open, chosen here:

* k is rounded down with a minimum of one block, so no row is ever empty;
* the Top-p prefix is the *minimal* one whose fp32 cumulative sum is >= p (it may therefore go
  one block past p; it is clamped to NKB when rounding keeps the sum just below p ~ 1);
* ties are broken by key-block index (the lower index first), deterministically;
* a partial tail block is pooled over its real tokens only;
* the masker runs without gradient on detached q and k; it is recomputed on every call.

Registered as the ``"hybrid"`` masker (options ``topk``, ``topp``); on CUDA it runs the fused
Triton predictor in :mod:`vidsparse.maskers.hybrid_triton`, elsewhere :func:`hybrid_block_mask`
here, which is the oracle that path is tested against.
"""

from __future__ import annotations

import math

import torch

from .._validation import check_fraction, to_bhnd
from ..mask import BlockMask, check_block_size, num_blocks
from ..plan import MaskPlan
from .registry import Masker, register

__all__ = ["hybrid_block_mask", "block_mean", "pooled_block_scores", "select_hybrid", "HybridMasker"]


def block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over consecutive blocks of ``block`` tokens.

    Args:
        x: (B, H, L, D) any float dtype.
    Returns:
        (B, H, ceil(L / block), D) float32; the tail block averages its real tokens only.
    """
    b, h, length, d = x.shape
    n = num_blocks(length, block)
    pad = n * block - length
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    sums = xf.view(b, h, n, block, d).sum(dim=3)
    counts = torch.full((n, 1), float(block), device=x.device)
    counts[-1] = block - pad
    return sums / counts


def pooled_block_scores(
    q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_k: int, scale: float | None = None
) -> torch.Tensor:
    """softmax(mean-pooled Q @ mean-pooled K^T * scale) over key blocks.

    Args:
        q: (B, H, Lq, D), k: (B, H, Lk, D).
    Returns:
        (B, H, NQB, NKB) float32, each row summing to 1.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qb = block_mean(q, block_q)
    kb = block_mean(k, block_k)
    return torch.softmax(qb @ kb.transpose(-1, -2) * scale, dim=-1)


def _per_row(value, like: torch.Tensor) -> torch.Tensor:
    """float or (H,) tensor -> tensor broadcastable to (B, H, NQB)."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device)[None, :, None]
    return torch.tensor(float(value), device=like.device)


def topk_blocks(topk: torch.Tensor, nkb: int) -> torch.Tensor:
    """Top-k block count: floor(topk * NKB) with a minimum of 1 (int64, same shape as topk)."""
    # k arrives as float32 (float32(0.13) * 900 = 116.99999...): a relative tolerance in
    # float64 keeps such exact products from flooring one block short
    return torch.floor(topk.double() * nkb * (1 + 1e-6)).long().clamp(min=1)


def select_hybrid(
    probs: torch.Tensor, *, topk=None, topp=None
) -> torch.Tensor:
    """Hybrid selection on pooled block probabilities.

    Args:
        probs: (B, H, NQB, NKB) float32 rows of a softmax.
        topk: fraction of key blocks (float or (H,) tensor) or None (no Top-k rule).
        topp: probability mass (float or (H,) tensor) or None (no Top-p rule).
    Returns:
        (B, H, NQB, NKB) bool block map.
    """
    nkb = probs.shape[-1]
    vals, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    n_keep = torch.ones(probs.shape[:-1], dtype=torch.long, device=probs.device)
    if topk is not None:
        n_k = topk_blocks(_per_row(topk, probs), nkb)
        n_keep = torch.maximum(n_keep, n_k.expand_as(n_keep))
    if topp is not None:
        p = _per_row(topp, probs)
        csum = vals.cumsum(dim=-1)
        n_p = 1 + (csum < p[..., None]).sum(dim=-1)
        # p = 1 means dense even when trailing blocks underflow to probability 0
        n_p = torch.where(p >= 1.0, nkb, n_p)
        n_keep = torch.maximum(n_keep, n_p)
    n_keep = n_keep.clamp(max=nkb)
    keep_sorted = torch.arange(nkb, device=probs.device) < n_keep[..., None]
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _diagonal_blocks(q_len: int, block_q: int, block_k: int, device) -> torch.Tensor:
    """(NQB, NKB) bool: key blocks whose token span overlaps each query block's span."""
    nqb, nkb = num_blocks(q_len, block_q), num_blocks(q_len, block_k)
    qi = torch.arange(nqb, device=device)
    kj = torch.arange(nkb, device=device)
    q_start, q_end = qi * block_q, torch.clamp((qi + 1) * block_q, max=q_len)
    k_start, k_end = kj * block_k, torch.clamp((kj + 1) * block_k, max=q_len)
    return (k_start[None, :] < q_end[:, None]) & (k_end[None, :] > q_start[:, None])


@torch.no_grad()
def hybrid_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    topk: float | torch.Tensor | None = 0.03,
    topp: float | torch.Tensor | None = 0.2,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
    layout: str = "bhnd",
    keep_diagonal: bool = False,
    keep_sink: bool = False,
) -> BlockMask:
    """Predict SpargeAttention2's hybrid Top-k + Top-p block mask from q and k.

    Args:
        q: (B, H, Lq, D) (or (B, Lq, H, D) with ``layout="bnhd"``), any float dtype.
        k: (B, H, Lk, D) likewise. Only q and k are read; no gradient flows through the mask.
        topk: fraction of key blocks kept per row, in (0, 1], as a float or an (H,) tensor for
            per-head values; rounded down with a minimum of one block. None disables Top-k.
        topp: pooled probability mass kept per row, in (0, 1], float or (H,) tensor. None
            disables Top-p. At least one of topk and topp must be given; 1.0 for either is dense.
        block_q, block_k: block shape of the mask (the paper's 128 x 64 by default).
        scale: score scale, default 1/sqrt(D).
        keep_diagonal: also keep, for each query block, the key blocks covering the same tokens
            (self-attention only: needs Lq == Lk). Off by default, as in the paper.
        keep_sink: also keep the first key block for every query block (attention-sink prior).
    Returns:
        BlockMask of shape (B, H, ceil(Lq/block_q), ceil(Lk/block_k)).

    Example:
        >>> mask = hybrid_block_mask(q, k, topk=0.03, topp=0.2)
        >>> mask.sparsity()
    """
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError("q and k must be torch.Tensors")
    q, k, _ = to_bhnd(q, k, k, layout)
    check_block_size("block_q", block_q)
    check_block_size("block_k", block_k)
    heads = q.shape[1]
    topk = check_fraction("topk", topk, heads)
    topp = check_fraction("topp", topp, heads)
    if topk is None and topp is None:
        raise ValueError("at least one of topk and topp must be given (use 1.0 for dense)")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    probs = pooled_block_scores(q, k, block_q=block_q, block_k=block_k, scale=scale)
    dense = select_hybrid(probs, topk=topk, topp=topp)
    q_len, k_len = q.shape[2], k.shape[2]
    if keep_diagonal:
        if q_len != k_len:
            raise ValueError(f"keep_diagonal needs self-attention (q_len == k_len), got {q_len} and {k_len}")
        dense |= _diagonal_blocks(q_len, block_q, block_k, dense.device)
    if keep_sink:
        dense[..., 0] = True
    return BlockMask.from_dense(dense, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len)


@register("hybrid")
class HybridMasker(Masker):
    """SpargeAttention2's rule as a registered masker: ``topk`` / ``topp`` as in
    :func:`hybrid_block_mask` (a float, an (H,) tensor, or None for the rule off)."""

    defaults = {"topk": 0.03, "topp": 0.2}
    native_priors = ("keep_sink", "keep_diagonal")
    # a target sparsity is reached with Top-k alone: at equal sparsity uniform Top-k had lower
    # velocity error than rows widened by Top-p on the embedded model (docs/benchmarks.md)
    density_option, density_bounds, density_fixed = "topk", (1e-4, 1.0), {"topp": None}
    # tiled when the grid is known: tiled Top-k had 2.5x lower velocity error than the paper's
    # frame-major order at every sparsity on the embedded model (docs/benchmarks.md, compare)
    default_token_order = "auto"

    def validate(self, options, heads):
        topk = check_fraction("topk", options["topk"], heads)
        topp = check_fraction("topp", options["topp"], heads)
        if topk is None and topp is None:
            raise ValueError("masker 'hybrid': at least one of topk and topp must be given (1.0 = dense)")
        return {"topk": topk, "topp": topp}

    def build(self, q, k, *, block_q, block_k, grid, positions, state, topk, topp,
              keep_sink=False, keep_diagonal=False):
        predict = hybrid_block_mask
        if q.is_cuda:
            from .hybrid_triton import fused_hybrid_block_mask as predict
        mask = predict(q, k, topk=topk, topp=topp, block_q=block_q, block_k=block_k,
                       keep_diagonal=keep_diagonal, keep_sink=keep_sink)
        return MaskPlan(mask, _checked=True)
