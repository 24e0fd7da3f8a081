"""The best-mass block oracle: the bound of any block predictor at a given layout and block size.

Not a method anyone should run: it reads the full attention matrix, which sparse attention exists
to avoid. ``vidsparse compare`` draws it next to the methods so that a target out of their reach
shows what bounds it. Per (batch, head, query block) row, the exact attention mass of every key
block is ``sum over the block's (query, key) pairs of softmax(q k^T / sqrt(D))``; the oracle keeps
the ``count`` key blocks of largest mass (ties: lower block index first). No mask with the same
kept count in each row, in the same token order and block size, keeps more attention mass.

As a masker (registered only for a comparison's duration, :func:`registered`) it takes the
option ``density``: ``count = max(1, floor(density * NKB))`` blocks in every row, the Top-k
rounding of the ``hybrid`` masker, so both reach the same block sparsities. The layout is the
common ``token_order`` option ("raster" frame-major, "tiled" 3-D tiles).
"""

from __future__ import annotations

import contextlib
import math

import torch

from .. import maskers
from ..mask import BlockMask, num_blocks
from ..maskers.groups import work_dtype
from ..maskers.hybrid import topk_blocks
from ..plan import MaskPlan

__all__ = ["ORACLE", "block_mass", "best_blocks", "best_mass_plan", "oracle_count", "oracle_density",
           "BestMassMasker", "registered"]

#: registry name of the oracle while :func:`registered` is active
ORACLE = "best_mass_oracle"


def block_mass(q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_k: int,
               max_elements: int = 1 << 24) -> torch.Tensor:
    """Exact attention mass per block, q and k already in attention order.

    Args:
        q: (B, H, Lq, D), k: (B, H, Lk, D) any float dtype (computed in float32, float64 stays).
        max_elements: size of the probability chunk held at once (whole query blocks per chunk).
    Returns:
        (B, H, NQB, NKB): softmax(q k^T / sqrt(D)) summed over each block; a row sums to its
        number of queries.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    wd = work_dtype(q)
    nq, nk = num_blocks(lq, block_q), num_blocks(lk, block_k)
    kt = k.to(wd).transpose(-1, -2)
    rows = max(1, max_elements // max(1, b * h * lk * block_q)) * block_q
    out = torch.empty(b, h, nq, nk, dtype=wd, device=q.device)
    for start in range(0, lq, rows):
        p = torch.softmax(q[:, :, start:start + rows].to(wd) @ kt / math.sqrt(d), dim=-1)
        r = p.shape[2]
        p = torch.nn.functional.pad(p, (0, nk * block_k - lk)).view(b, h, r, nk, block_k).sum(-1)
        groups = num_blocks(r, block_q)
        p = torch.nn.functional.pad(p, (0, 0, 0, groups * block_q - r)).view(b, h, groups, block_q, nk).sum(3)
        first = start // block_q
        out[:, :, first:first + groups] = p
    return out


def best_blocks(mass: torch.Tensor, counts) -> torch.Tensor:
    """(..., NKB) bool: the ``counts`` (int, or (...) ints) key blocks of largest mass per row;
    ties go to the lower block index."""
    nk = mass.shape[-1]
    counts = torch.as_tensor(counts, device=mass.device).clamp(0, nk)
    order = torch.sort(mass, dim=-1, descending=True, stable=True).indices
    keep_sorted = torch.arange(nk, device=mass.device) < counts[..., None]
    keep_sorted = keep_sorted.expand(mass.shape)
    return torch.zeros(mass.shape, dtype=torch.bool, device=mass.device).scatter_(-1, order, keep_sorted)


def _to_order(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    if perm is None:
        return x
    b, h = x.shape[:2]
    return torch.gather(x, 2, perm.expand(b, h, -1)[..., None].expand(-1, -1, -1, x.shape[-1]))


def best_mass_plan(q: torch.Tensor, k: torch.Tensor, counts, *, block_q: int, block_k: int,
                   perm: torch.Tensor | None = None, k_perm: torch.Tensor | None = None) -> MaskPlan:
    """The oracle's plan in a given layout.

    Args:
        q, k: (B, H, N, D) in the caller's order.
        counts: kept key blocks per row: an int, or (B or 1, H or 1, NQB) ints (e.g. another
            plan's ``mask.dense.sum(-1)``, to compare at equal counts row by row).
        perm, k_perm: the layout, as :class:`MaskPlan` takes them (None: the caller's order;
            ``k_perm`` defaults to ``perm`` for self-attention).
    Returns:
        MaskPlan with that layout and the best-mass blocks.
    """
    if k_perm is None and q.shape[2] == k.shape[2]:
        k_perm = perm
    mass = block_mass(_to_order(q, perm), _to_order(k, k_perm), block_q=block_q, block_k=block_k)
    mask = BlockMask.from_dense(best_blocks(mass, counts), block_q=block_q, block_k=block_k,
                                q_len=q.shape[2], k_len=k.shape[2])
    return MaskPlan(mask, perm, k_perm=k_perm)


def oracle_count(density: float, nkb: int) -> int:
    """Kept key blocks per row at ``density``: hybrid's Top-k count, max(1, floor(density * NKB))."""
    return int(topk_blocks(torch.tensor(density), nkb))


def oracle_density(target_sparsity: float, nkb: int) -> tuple[float, float]:
    """(density, block sparsity) of the kept count closest to ``target_sparsity``."""
    count = min(nkb, max(1, round((1 - target_sparsity) * nkb)))
    return count / nkb, 1 - count / nkb


class BestMassMasker(maskers.Masker):
    """The oracle as a masker (see the module docstring); it computes full attention per call."""

    defaults = {"density": 0.1}
    density_option, density_bounds = "density", (1e-3, 1.0)

    def validate(self, options, heads):
        d = options["density"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or not 0 < d <= 1:
            raise ValueError(f"masker {self.name!r}: option 'density' must be a float in (0, 1], got {d!r}")
        return {"density": float(d)}

    def build(self, q, k, *, block_q, block_k, grid, positions, state, density):
        mass = block_mass(q, k, block_q=block_q, block_k=block_k)
        dense = best_blocks(mass, oracle_count(density, mass.shape[-1]))
        return MaskPlan(BlockMask.from_dense(dense, block_q=block_q, block_k=block_k, q_len=q.shape[2],
                                             k_len=k.shape[2]), _checked=True)


@contextlib.contextmanager
def registered():
    """Register :class:`BestMassMasker` as :data:`ORACLE` for the duration (the core's registry
    lists methods; the oracle is not one)."""
    maskers.register(ORACLE, replace=True)(BestMassMasker)
    try:
        yield maskers.get(ORACLE)
    finally:
        maskers.unregister(ORACLE)
