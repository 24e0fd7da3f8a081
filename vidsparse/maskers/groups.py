"""Block maps from token groups: the shared step of the maskers that reorder tokens by group.

svg (frames or pixel columns), svg2 (k-means clusters) and vmoba (chunks) sort the tokens of each
head by a group label, decide which (query group, key group) pairs attend, and need the block map
of that group-level mask over the sorted sequences. :func:`group_block_mask` computes it exactly
with prefix sums over the groups (no Lq x Lk tensor); :func:`group_block_mask_reference` is its
oracle.
"""

from __future__ import annotations

import torch

from ..mask import num_blocks
from ..plan import invert_perm

__all__ = ["work_dtype", "raster_to_seen", "key_groups_to_blocks", "group_block_mask", "group_block_mask_reference"]


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def raster_to_seen(raster_perm: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """A permutation given in raster indices -> the same one in indices of the order the masker sees.

    ``positions`` (N,) is the raster index of each token the masker sees (None: raster).
    """
    if positions is None:
        return raster_perm
    return invert_perm(positions)[raster_perm]


# ------------------------------------------------------------------------------- blocks from groups
def _block_ends(groups: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last group label of each block of a (..., L) nondecreasing label sequence."""
    length = groups.shape[-1]
    n = num_blocks(length, block)
    starts = torch.arange(n, device=groups.device) * block
    ends = torch.clamp(starts + block, max=length) - 1
    return groups.index_select(-1, starts), groups.index_select(-1, ends)


def _range_any(flags: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dim: int) -> torch.Tensor:
    """any(flags[..., lo:hi+1, ...]) along ``dim`` for every (lo, hi), by a prefix sum."""
    csum = torch.nn.functional.pad(flags.int().cumsum(dim), (0, 0, 1, 0) if dim == -2 else (1, 0))
    if dim == -2:
        idx = lambda i: i[..., :, None].expand(*i.shape, csum.shape[-1])  # noqa: E731
    else:
        idx = lambda i: i[..., None, :].expand(*csum.shape[:-1], i.shape[-1])  # noqa: E731
    return (torch.gather(csum, dim, idx(hi + 1)) - torch.gather(csum, dim, idx(lo))) > 0


def key_groups_to_blocks(rows: torch.Tensor, k_groups: torch.Tensor, block_k: int) -> torch.Tensor:
    """Per-row kept key groups -> kept key blocks.

    Args:
        rows: (B, H, R, C) bool, group c kept for row r (groups without a token are ignored).
        k_groups: (B or 1, H or 1, Lk) int64 group of each key in attention order, nondecreasing.
    Returns:
        (B, H, R, NKB) bool: key block j kept when it holds a key of a kept group.
    """
    b, h = rows.shape[:2]
    occupied = torch.zeros(*k_groups.shape[:2], rows.shape[-1], dtype=torch.bool, device=rows.device)
    occupied.scatter_(-1, k_groups, True)
    rows = rows & occupied[:, :, None, :]
    lo, hi = _block_ends(k_groups, block_k)
    return _range_any(rows, lo.expand(b, h, -1), hi.expand(b, h, -1), -1)


def group_block_mask(q_groups: torch.Tensor, k_groups: torch.Tensor, keep: torch.Tensor, *,
                     block_q: int, block_k: int) -> torch.Tensor:
    """Block map of a group-level mask over sequences sorted by group.

    Args:
        q_groups: (B or 1, H or 1, Lq) int64 group of each query in attention order, nondecreasing.
        k_groups: (B or 1, H or 1, Lk) likewise for keys.
        keep: (B or 1, H or 1, Cq, Ck) bool, query group i attends key group j.
    Returns:
        (B, H, NQB, NKB) bool: a block pair is kept when it holds a (query, key) token pair whose
        groups are kept (exact; groups without tokens never keep anything).
    """
    b = max(q_groups.shape[0], k_groups.shape[0], keep.shape[0])
    h = max(q_groups.shape[1], k_groups.shape[1], keep.shape[1])
    keep = keep.expand(b, h, -1, -1)
    occupied = torch.zeros(*q_groups.shape[:2], keep.shape[-2], dtype=torch.bool, device=keep.device)
    occupied.scatter_(-1, q_groups, True)
    keep = keep & occupied[..., :, None]
    lo, hi = _block_ends(q_groups, block_q)
    lo, hi = lo.expand(b, h, -1), hi.expand(b, h, -1)
    rows = _range_any(keep, lo, hi, -2)  # (B, H, NQB, Ck): key groups kept by any query group of the block
    return key_groups_to_blocks(rows, k_groups, block_k)


def group_block_mask_reference(q_groups, k_groups, keep, *, block_q, block_k) -> torch.Tensor:
    """Oracle of :func:`group_block_mask` for one head: the token mask, reduced by any()."""
    tok = keep[q_groups][:, k_groups]  # (Lq, Lk)
    lq, lk = tok.shape
    nq, nk = num_blocks(lq, block_q), num_blocks(lk, block_k)
    out = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            out[i, j] = tok[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].any()
    return out
