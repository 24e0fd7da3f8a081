"""``MaskPlan``: a block mask plus the token order it applies to.

Every masker returns a plan. The mask's blocks are contiguous runs of the *attention order*; the
permutations say which of the caller's tokens sit at each position of that order:

* ``perm``: None (the caller's order is the attention order) or a long tensor (B or 1, H or 1, Lq)
  with ``perm[b, h, i]`` = the caller's index of the query at attention position i;
* ``k_perm``: the same for the keys and values, (B or 1, H or 1, Lk). By default the keys follow
  ``perm`` (self-attention with one order); a masker that orders queries and keys differently
  (k-means on each) gives both.

:func:`vidsparse.block_sparse_attention` gathers q, k, v into the attention order (one copy
each), runs the backend on ``plan.mask`` and scatters the output and LSE back, so callers always
see their own order. ``token_mask()`` gives the (B, H, Lq, Lk) boolean mask in the caller's order,
the ground truth every backend is tested against.
"""

from __future__ import annotations

import torch

from .kernels.permute import permute_rows, torch_permute_rows
from .mask import BlockMask

__all__ = ["MaskPlan", "as_plan", "invert_perm", "append_dense_tokens"]


def invert_perm(perm: torch.Tensor) -> torch.Tensor:
    """Inverse along the last dim: ``inv[..., perm[..., i]] = i``."""
    inv = torch.empty_like(perm)
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return inv.scatter_(-1, perm, ar)


def _check_perm(name: str, perm: torch.Tensor, length: int, mask: BlockMask) -> torch.Tensor:
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"MaskPlan.{name} must be a torch.Tensor or None, got {type(perm).__name__}")
    if perm.dtype not in (torch.int64, torch.int32) or perm.dim() != 3:
        raise ValueError(f"MaskPlan.{name} must be an integer tensor of shape (B or 1, H or 1, {length}), "
                         f"got {perm.dtype} {tuple(perm.shape)}")
    if perm.shape[-1] != length:
        raise ValueError(f"MaskPlan.{name} has {perm.shape[-1]} positions but the mask covers {length} tokens")
    if perm.device != mask.device:
        raise ValueError(f"MaskPlan.{name} is on {perm.device} but the mask is on {mask.device}")
    perm = perm.to(torch.int64, copy=True)  # owned: editing the caller's tensor later changes nothing
    ar = torch.arange(length, device=perm.device)
    if not torch.equal(perm.sort(dim=-1).values, ar.expand_as(perm)):
        raise ValueError(f"MaskPlan.{name} must hold every index in [0, {length}) exactly once per (batch, head)")
    return perm


class MaskPlan:
    """A :class:`BlockMask` in attention order and the permutations that define that order.

    Args:
        mask: the block mask over the attention order.
        perm: None, or (B or 1, H or 1, Lq) int: caller index of the query at each position.
        k_perm: None, or (B or 1, H or 1, Lk) int for keys/values. Default: ``perm`` when
            Lq == Lk (one order for both), the identity otherwise.
    Raises:
        ValueError: a permutation of the wrong length or not a permutation.

    Example:
        >>> plan = vidsparse.maskers.get("hybrid")(q, k, topk=0.05, topp=None, token_order="tiled", grid=(4, 16, 16))
        >>> o = vidsparse.block_sparse_attention(q, k, v, plan)     # in q's token order
    """

    __slots__ = ("mask", "perm", "k_perm", "_inverse", "_k_inverse")

    def __init__(self, mask: BlockMask, perm: torch.Tensor | None = None, *, k_perm: torch.Tensor | None = None,
                 _checked: bool = False):
        if not isinstance(mask, BlockMask):
            raise TypeError(f"MaskPlan.mask must be a vidsparse.BlockMask, got {type(mask).__name__}")
        if k_perm is None and perm is not None and mask.q_len == mask.k_len:
            k_perm = perm
        if not _checked:
            perm = None if perm is None else _check_perm("perm", perm, mask.q_len, mask)
            k_perm = None if k_perm is None else _check_perm("k_perm", k_perm, mask.k_len, mask)
        self.mask, self.perm, self.k_perm = mask, perm, k_perm
        self._inverse = self._k_inverse = None  # built on first use (plain attributes: traceable)

    # ----------------------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.mask.shape

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def inverse(self) -> torch.Tensor | None:
        """(B or 1, H or 1, Lq): attention position of each caller query (None: identity)."""
        if self._inverse is None and self.perm is not None:
            self._inverse = invert_perm(self.perm)
        return self._inverse

    @property
    def k_inverse(self) -> torch.Tensor | None:
        """(B or 1, H or 1, Lk): attention position of each caller key (None: identity)."""
        if self._k_inverse is None and self.k_perm is not None:
            self._k_inverse = self.inverse if self.k_perm is self.perm else invert_perm(self.k_perm)
        return self._k_inverse

    def sparsity(self, **kwargs) -> float:
        """Block-level sparsity of the mask (see :meth:`BlockMask.sparsity`)."""
        return self.mask.sparsity(**kwargs)

    def density(self, **kwargs) -> float:
        return self.mask.density(**kwargs)

    # --------------------------------------------------------------------------- permutations
    def to_attention_order(self, q, k, v):
        """(B, H, N, D) q, k, v in the caller's order -> the attention order (one copy each)."""
        return (permute_rows(q, self.perm, self.inverse), permute_rows(k, self.k_perm, self.k_inverse),
                permute_rows(v, self.k_perm, self.k_inverse))

    def to_caller_order(self, x: torch.Tensor) -> torch.Tensor:
        """A per-query result (B, H, Lq[, D]) in attention order -> the caller's order."""
        return permute_rows(x, self.inverse, self.perm)

    def token_mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, Lq, Lk) bool in the caller's token order. For tests and debugging (O(Lq*Lk)).

        Args:
            rows: optional (R,) caller query indices: only those rows, (B, H, R, Lk).
        """
        if rows is None:
            tm = self.mask.token_mask()
            if self.inverse is not None:
                tm = torch_permute_rows(tm, self.inverse)
        else:
            pos = rows.to(self.device)[None, None] if self.inverse is None else self.inverse[..., rows.to(self.device)]
            d = self.mask.dense
            b, h = max(d.shape[0], pos.shape[0]), max(d.shape[1], pos.shape[1])
            blocks = (pos // self.mask.block_q).expand(b, h, -1)[..., None].expand(-1, -1, -1, d.shape[-1])
            kept = torch.gather(d.expand(b, h, -1, -1), 2, blocks)  # (B, H, R, NKB)
            tm = kept[..., torch.arange(self.mask.k_len, device=self.device) // self.mask.block_k]
        if self.k_inverse is not None:
            b, h = tm.shape[:2]
            idx = self.k_inverse.expand(b, h, -1)[:, :, None, :].expand(-1, -1, tm.shape[2], -1)
            tm = torch.gather(tm, 3, idx)
        return tm

    def to(self, device) -> "MaskPlan":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MaskPlan(self.mask.to(device), mv(self.perm), k_perm=mv(self.k_perm), _checked=True)

    def __repr__(self) -> str:
        order = "caller order" if self.perm is None else f"permuted {tuple(self.perm.shape)}"
        return f"MaskPlan({self.mask!r}, {order})"


def as_plan(mask) -> MaskPlan:
    """A :class:`MaskPlan` for a plan or a bare :class:`BlockMask` (identity order)."""
    if isinstance(mask, MaskPlan):
        return mask
    if isinstance(mask, BlockMask):
        return MaskPlan(mask, _checked=True)
    raise TypeError(f"mask must be a vidsparse.BlockMask or MaskPlan, got {type(mask).__name__}")


def append_dense_tokens(plan: MaskPlan, n_extra: int, *, extra_first: bool = False, k_len: int | None = None) -> MaskPlan:
    """Extend a plan over N tokens to N + n_extra tokens that attend and are attended densely.

    Used for text tokens in joint attention (CogVideoX, HunyuanVideo): the attention order is
    ``[plan's order; extra tokens]``, every block that holds an extra token is kept whole, so only
    the original tokens' block pairs stay sparse. The caller's order is ``[extra; original]`` when
    ``extra_first`` else ``[original; extra]``.

    Args:
        plan: over N queries and N keys (self-attention).
        n_extra: tokens appended (>= 0).
        extra_first: the caller puts the extra tokens before the original ones.
        k_len: keep only the first ``k_len`` keys of the attention order (drops padded extra
            keys); default all N + n_extra.
    Returns:
        MaskPlan over Lq = N + n_extra queries and ``k_len`` keys.
    """
    m = plan.mask
    n = m.q_len
    s = n + n_extra
    k_len = s if k_len is None else k_len
    if n_extra == 0 and k_len == s:
        return plan
    bq, bk = m.block_q, m.block_k
    b, h = m.shape[:2]
    nq, nk = -(-s // bq), -(-k_len // bk)
    rq, rk = n // bq, n // bk  # blocks made of original tokens only
    dense = torch.ones(b, h, nq, nk, dtype=torch.bool, device=m.device)
    dense[:, :, :rq, :rk] = m.dense[:, :, :rq, :rk]
    mask = BlockMask.from_dense(dense, block_q=bq, block_k=bk, q_len=s, k_len=k_len)

    if k_len < s and extra_first:
        raise ValueError("append_dense_tokens: dropping keys (k_len < N + n_extra) needs the extra tokens last")
    offset = n_extra if extra_first else 0
    extra_start = 0 if extra_first else n
    extra = torch.arange(extra_start, extra_start + n_extra, device=m.device)

    def extend(p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None and not extra_first:
            return None  # [original; extra] is already the caller's order
        if p is None:
            p = torch.arange(n, device=m.device)[None, None]
        pb, ph = p.shape[:2]
        return torch.cat([p + offset, extra.expand(pb, ph, -1)], dim=-1)

    perm, k_perm = extend(plan.perm), extend(plan.k_perm)
    if k_perm is not None:
        k_perm = k_perm[..., :k_len]  # extra tokens are last here: a prefix of the caller's keys
    return MaskPlan(mask, perm, k_perm=k_perm, _checked=True)
