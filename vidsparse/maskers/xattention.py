"""XAttention's antidiagonal block scoring (arXiv 2503.16428) as a masker.

With stride S, the (Lq x Lk) score matrix is cut into S x S tiles; each tile is represented by the
sum of its antidiagonal, ``sum_a q[rS + a] . k[cS + S - 1 - a]`` for a = 0..S-1. All of them come from
one matmul: the queries of row group r are concatenated along the head dim in reverse order
(q[rS + S - 1], ..., q[rS]) and the keys of column group c in forward order (k[cS], ..., k[cS + S - 1]),
giving (Lq/S, S*D) and (Lk/S, S*D) matrices whose product is the (Lq/S, Lk/S) antidiagonal sums.

Those sums are scaled by ``1 / (sqrt(D) * S)``, softmaxed over the key groups of each query row
group, and summed into (block_q x block_k) tiles, so each query block's row of block scores sums to
its number of row groups. Per query block the key blocks are sorted in descending order (ties:
lower index first) and the fewest whose sum reaches ``threshold`` of the row total are kept (at
least one; ``threshold = 1`` keeps every block).

Conventions: S must divide block_q and block_k; a sequence that is not a multiple of S is padded
with zero vectors (a padded key's dot product is 0, and key groups made only of padding get no
probability). Scores are computed in the input dtype (bf16 on the GPU, tensor cores) and the
softmax in float32 (float64 inputs stay float64).

Departures from XAttention: no ``keep_sink`` / ``keep_recent`` of its own (the base priors
``keep_sink``, ``keep_diagonal`` and ``window`` do that for every masker); block sizes are any
(powers of two) rather than 128; the threshold is a single float (XAttention also takes per-head
thresholds).

Options: ``stride`` (8), ``threshold`` (0.9). Sparsity is set by ``threshold``: lower keeps fewer
blocks (on random inputs nearly every block scores alike, so high sparsity needs structured q, k).
"""

from __future__ import annotations

import math

import torch

from ..mask import BlockMask, num_blocks
from ..plan import MaskPlan
from .registry import Masker, register
from .svg2 import work_dtype

__all__ = ["antidiagonal_scores", "antidiagonal_scores_reference", "xattention_block_scores",
           "select_threshold", "xattention_reference", "xattention_plan", "XAttentionMasker"]


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[2])) if length > x.shape[2] else x


def antidiagonal_scores(q: torch.Tensor, k: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, H, ceil(Lq/S), ceil(Lk/S)) antidiagonal sums of the S x S tiles of q k^T (unscaled).

    q, k are zero-padded to multiples of S; the product is taken in their dtype.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    rq, rk = -(-lq // stride), -(-lk // stride)
    qs = _pad_to(q, rq * stride).reshape(b, h, rq, stride, d).flip(3).reshape(b, h, rq, stride * d)
    ks = _pad_to(k, rk * stride).reshape(b, h, rk, stride * d)  # any strides (a BNHD view too)
    return qs @ ks.transpose(-1, -2)


def antidiagonal_scores_reference(q: torch.Tensor, k: torch.Tensor, stride: int) -> torch.Tensor:
    """Oracle of :func:`antidiagonal_scores`: every tile's q k^T, then its antidiagonal, one at a time."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    rq, rk = -(-lq // stride), -(-lk // stride)
    qp, kp = _pad_to(q, rq * stride), _pad_to(k, rk * stride)
    out = torch.zeros(b, h, rq, rk, dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            for r in range(rq):
                for c in range(rk):
                    tile = qp[bi, hi, r * stride:(r + 1) * stride] @ kp[bi, hi, c * stride:(c + 1) * stride].T
                    out[bi, hi, r, c] = torch.fliplr(tile).diagonal().sum()  # entries (a, S - 1 - a)
    return out


def xattention_block_scores(q, k, *, stride: int, block_q: int, block_k: int) -> torch.Tensor:
    """(B, H, NQB, NKB) block scores: softmax of the scaled antidiagonal sums, summed into blocks."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    wd = work_dtype(q)
    scores = antidiagonal_scores(q, k, stride).to(wd) / (math.sqrt(d) * stride)
    rk = scores.shape[-1]
    real = torch.arange(rk, device=q.device) * stride < lk  # every key group holds a real key here
    scores = scores.masked_fill(~real, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    nq, nk = num_blocks(lq, block_q), num_blocks(lk, block_k)
    gq, gk = block_q // stride, block_k // stride
    probs = torch.nn.functional.pad(probs, (0, nk * gk - rk, 0, nq * gq - probs.shape[2]))
    return probs.view(b, h, nq, gq, nk, gk).sum(dim=(3, 5))


def select_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fewest blocks per row (descending, ties to the lower index) whose sum reaches threshold x total."""
    nkb = scores.shape[-1]
    vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    target = threshold * scores.sum(-1, keepdim=True)
    n_keep = 1 + (vals.cumsum(-1) < target).sum(-1)
    if threshold >= 1.0:
        n_keep = torch.full_like(n_keep, nkb)
    keep_sorted = torch.arange(nkb, device=scores.device) < n_keep.clamp(max=nkb)[..., None]
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def xattention_plan(q, k, *, stride: int, threshold: float, block_q: int, block_k: int) -> MaskPlan:
    """The batched path."""
    scores = xattention_block_scores(q, k, stride=stride, block_q=block_q, block_k=block_k)
    dense = select_threshold(scores, threshold)
    mask = BlockMask.from_dense(dense, block_q=block_q, block_k=block_k, q_len=q.shape[2], k_len=k.shape[2])
    return MaskPlan(mask, _checked=True)


def xattention_reference(q, k, *, stride: int, threshold: float, block_q: int, block_k: int) -> torch.Tensor:
    """Eager oracle, one (batch, head, query block) at a time. Returns dense (B, H, NQB, NKB)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    wd = work_dtype(q)
    sums = antidiagonal_scores_reference(q.to(wd), k.to(wd), stride) / (math.sqrt(d) * stride)
    nq, nk = num_blocks(lq, block_q), num_blocks(lk, block_k)
    gq, gk = block_q // stride, block_k // stride
    dense = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    n_groups = -(-lk // stride)
    for bi in range(b):
        for hi in range(h):
            probs = torch.softmax(sums[bi, hi, :, :n_groups], dim=-1)
            for i in range(nq):
                block_scores = [probs[i * gq:(i + 1) * gq, j * gk:(j + 1) * gk].sum().item() for j in range(nk)]
                total = sum(block_scores)
                order = sorted(range(nk), key=lambda j: (-block_scores[j], j))
                acc = 0.0
                for count, j in enumerate(order, start=1):
                    dense[bi, hi, i, j] = True
                    acc += block_scores[j]
                    if threshold < 1.0 and acc >= threshold * total:
                        break
    return dense


@register("xattention")
class XAttentionMasker(Masker):
    """XAttention's antidiagonal scoring with a cumulative threshold (see the module docstring)."""

    defaults = {"stride": 8, "threshold": 0.9}
    density_option, density_bounds = "threshold", (1e-3, 1.0)

    def validate(self, options, heads):
        s, t = options["stride"], options["threshold"]
        if isinstance(s, bool) or not isinstance(s, int) or s < 1 or s & (s - 1):
            raise ValueError(f"masker 'xattention': option 'stride' must be a power of two >= 1, got {s!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 < t <= 1:
            raise ValueError(f"masker 'xattention': option 'threshold' must be a float in (0, 1], got {t!r}")
        return {"stride": s, "threshold": float(t)}

    def build(self, q, k, *, block_q, block_k, grid, positions, state, stride, threshold):
        if block_q % stride or block_k % stride:
            raise ValueError(f"masker 'xattention': option 'stride' ({stride}) must divide block_q ({block_q}) "
                             f"and block_k ({block_k})")
        return xattention_plan(q, k, stride=stride, threshold=threshold, block_q=block_q, block_k=block_k)
