"""The block-mask contract shared by every masker and every attention backend.

A :class:`BlockMask` says, for each (batch, head, query block), which key blocks are attended.
Its block shape is part of the object (``block_q`` x ``block_k`` tokens), never inferred from
the GPU: a kernel that tiles differently converts at its own boundary, the mask's meaning stays.

Two equivalent views are kept, each derived lazily from the other:

* the dense boolean view ``dense`` of shape (B, H, NQB, NKB), with
  NQB = ceil(q_len / block_q) and NKB = ceil(k_len / block_k);
* the index table ``kv_indices`` (B, H, NQB, W) int32 with ``kv_counts`` (B, H, NQB) int32:
  row (b, h, i) attends key blocks ``kv_indices[b, h, i, :kv_counts[b, h, i]]``, ascending.
  Entries past the count are padding (their value is unspecified). This is what kernels read.

B and H may be 1 to broadcast over the batch and heads of q/k/v.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch

__all__ = ["BlockMask", "num_blocks", "check_block_size"]


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of ``block`` tokens covering ``length`` tokens (the tail may be partial)."""
    return (length + block - 1) // block


def check_block_size(name: str, value: int) -> None:
    """Block sizes must be powers of two >= 16 (Triton's ``tl.arange`` and ``tl.dot`` need it)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def _check_geometry(block_q, block_k, q_len, k_len) -> None:
    check_block_size("block_q", block_q)
    check_block_size("block_k", block_k)
    for name, val in (("q_len", q_len), ("k_len", k_len)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


def _dense_to_indices(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N) bool -> ascending kept indices (..., N) int32 (kept first) and counts (...)."""
    n = dense.shape[-1]
    counts = dense.sum(-1, dtype=torch.int32)
    # Kept blocks get keys 0..N-1 (their own index), dropped ones N..2N-1: one sort puts the kept
    # indices first in ascending order, deterministically, with no stable-sort requirement.
    ar = torch.arange(n, device=dense.device, dtype=torch.int32)
    keys = torch.where(dense, ar, ar + n)
    idx = keys.sort(dim=-1).values
    idx = torch.where(idx >= n, idx - n, idx)
    return idx.to(torch.int32).contiguous(), counts.contiguous()


class BlockMask:
    """A block-sparse attention mask with an explicit block shape.

    Build one with :meth:`from_dense`, :meth:`from_indices`, :meth:`full` or a masker such as
    :func:`vidsparse.hybrid_block_mask`; do not call the constructor directly.

    Attributes:
        block_q, block_k: tokens per query block and per key block (powers of two >= 16).
        q_len, k_len: sequence lengths the mask was built for.
        dense: (B, H, NQB, NKB) bool, True where the block pair is computed.
        kv_indices: (B, H, NQB, W) int32, kept key blocks per query block, ascending.
        kv_counts: (B, H, NQB) int32, number of valid entries of ``kv_indices``.
        q_indices / q_counts: the transposed table (B, H, NKB, NQB) / (B, H, NKB): query blocks
            that keep each key block, used by backward kernels.
    """

    __slots__ = ("block_q", "block_k", "q_len", "k_len", "_dense", "_kv", "_kv_normalised", "__dict__")

    def __init__(
        self,
        *,
        block_q: int,
        block_k: int,
        q_len: int,
        k_len: int,
        dense: torch.Tensor | None = None,
        kv_indices: torch.Tensor | None = None,
        kv_counts: torch.Tensor | None = None,
        _kv_normalised: bool = False,
    ):
        _check_geometry(block_q, block_k, q_len, k_len)
        self.block_q, self.block_k, self.q_len, self.k_len = block_q, block_k, q_len, k_len
        nqb, nkb = self.num_q_blocks, self.num_k_blocks
        if dense is None and kv_indices is None:
            raise ValueError("BlockMask needs either dense or kv_indices/kv_counts")
        if dense is not None:
            if dense.dtype != torch.bool:
                raise TypeError(f"dense block map must be torch.bool, got {dense.dtype}")
            if dense.dim() != 4 or tuple(dense.shape[-2:]) != (nqb, nkb):
                raise ValueError(
                    f"dense block map must have shape (B, H, {nqb}, {nkb}) for q_len={q_len}, "
                    f"k_len={k_len}, block_q={block_q}, block_k={block_k}; got {tuple(dense.shape)}"
                )
        if kv_indices is not None:
            if kv_counts is None:
                raise ValueError("kv_indices needs kv_counts")
            if kv_indices.dtype not in (torch.int32, torch.int64) or kv_counts.dtype not in (
                torch.int32,
                torch.int64,
            ):
                raise TypeError("kv_indices and kv_counts must be integer tensors")
            if kv_indices.dim() != 4 or kv_indices.shape[2] != nqb or kv_indices.shape[3] > nkb:
                raise ValueError(
                    f"kv_indices must have shape (B, H, {nqb}, W<= {nkb}), got {tuple(kv_indices.shape)}"
                )
            if tuple(kv_counts.shape) != tuple(kv_indices.shape[:3]):
                raise ValueError(
                    f"kv_counts must have shape {tuple(kv_indices.shape[:3])}, got {tuple(kv_counts.shape)}"
                )
            kv_indices, kv_counts = kv_indices.to(torch.int32), kv_counts.to(torch.int32)
        self._dense = dense
        self._kv = None if kv_indices is None else (kv_indices, kv_counts)
        # a table from our own maskers is already sorted and duplicate-free; a user's is normalised
        self._kv_normalised = _kv_normalised or dense is not None
        if self._kv is not None and not self._kv_normalised:
            self._check_kv_table()  # a user's table: fail here, not at first use

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_dense(
        cls, block_map: torch.Tensor, *, block_q: int, block_k: int, q_len: int, k_len: int
    ) -> "BlockMask":
        """From a boolean block map of shape (B, H, NQB, NKB) (or (NQB, NKB), broadcast)."""
        if not isinstance(block_map, torch.Tensor):
            raise TypeError(f"block_map must be a torch.Tensor, got {type(block_map).__name__}")
        if block_map.dim() == 2:
            block_map = block_map[None, None]
        # no .bool() here: a float map (e.g. block probabilities) would silently become all-True
        return cls(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, dense=block_map)

    @classmethod
    def from_indices(
        cls,
        kv_indices: torch.Tensor,
        kv_counts: torch.Tensor,
        *,
        block_q: int,
        block_k: int,
        q_len: int,
        k_len: int,
    ) -> "BlockMask":
        """From an index table (B, H, NQB, W) and counts (B, H, NQB); indices need not be sorted."""
        return cls(
            block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
            kv_indices=kv_indices, kv_counts=kv_counts,
        )

    @classmethod
    def full(
        cls, *, block_q: int, block_k: int, q_len: int, k_len: int, batch: int = 1, heads: int = 1,
        device: torch.device | str | None = None,
    ) -> "BlockMask":
        """A mask that keeps every block (dense attention)."""
        _check_geometry(block_q, block_k, q_len, k_len)  # before the sizes are used below
        nqb, nkb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
        dense = torch.ones(batch, heads, nqb, nkb, dtype=torch.bool, device=device)
        return cls(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, dense=dense)

    # ------------------------------------------------------------------------------- properties
    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.q_len, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return num_blocks(self.k_len, self.block_k)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, NQB, NKB) of the dense view (B and H may be 1: broadcast)."""
        t = self._dense if self._dense is not None else self._kv[1]
        return (t.shape[0], t.shape[1], self.num_q_blocks, self.num_k_blocks)

    @property
    def device(self) -> torch.device:
        return (self._dense if self._dense is not None else self._kv[0]).device

    @cached_property
    def dense(self) -> torch.Tensor:
        if self._dense is not None:
            return self._dense
        idx, cnt = self._kv
        b, h, nqb, w = idx.shape
        valid = torch.arange(w, device=idx.device) < cnt[..., None]
        out = torch.zeros(b, h, nqb, self.num_k_blocks + 1, dtype=torch.bool, device=idx.device)
        # invalid slots are scattered into the extra column, then dropped
        target = torch.where(valid, idx.long().clamp(0, self.num_k_blocks - 1), self.num_k_blocks)
        out.scatter_(-1, target, True)
        return out[..., : self.num_k_blocks].contiguous()

    def _check_kv_table(self) -> None:
        idx, cnt = self._kv
        w = idx.shape[-1]
        if bool((cnt < 0).any()) or bool((cnt > w).any()):
            raise ValueError(f"kv_counts must lie in [0, {w}] (the width of kv_indices)")
        used = idx[torch.arange(w, device=idx.device) < cnt[..., None]]
        if used.numel() and (bool((used < 0).any()) or bool((used >= self.num_k_blocks).any())):
            raise ValueError(f"kv_indices must lie in [0, {self.num_k_blocks}) (key blocks)")

    @cached_property
    def _kv_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kv is not None and self._kv_normalised:
            return self._kv
        # no table yet, or a user's table: sort and deduplicate it through the dense view
        return _dense_to_indices(self.dense)

    @property
    def kv_indices(self) -> torch.Tensor:
        return self._kv_table[0]

    @property
    def kv_counts(self) -> torch.Tensor:
        return self._kv_table[1]

    @cached_property
    def _q_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _dense_to_indices(self.dense.transpose(-1, -2))

    @property
    def q_indices(self) -> torch.Tensor:
        return self._q_table[0]

    @property
    def q_counts(self) -> torch.Tensor:
        return self._q_table[1]

    # ---------------------------------------------------------------------------------- methods
    def density(self, *, token_weighted: bool = False) -> float:
        """Fraction of block pairs computed (1 - sparsity); see :meth:`sparsity`."""
        return 1.0 - self.sparsity(token_weighted=token_weighted)

    def sparsity(self, *, token_weighted: bool = False) -> float:
        """Fraction of block pairs skipped, averaged over batch and heads.

        By default every block pair counts once (the paper's block-level figure), so a partial
        tail block weighs as much as a full one. With ``token_weighted=True`` each pair is weighted
        by its real (query tokens x key tokens), i.e. the fraction of the token-level score matrix
        that is skipped.
        """
        d = self.dense.float()
        if not token_weighted:
            return float(1.0 - d.mean())
        wq = self._block_sizes(self.q_len, self.block_q, d.device)
        wk = self._block_sizes(self.k_len, self.block_k, d.device)
        w = wq[:, None] * wk[None, :]
        kept = (d * w).sum(dim=(-1, -2)) / w.sum()
        return float(1.0 - kept.mean())

    def per_head_sparsity(self) -> torch.Tensor:
        """(B, H) float: block-level sparsity of each batch element and head."""
        return 1.0 - self.dense.float().mean(dim=(-1, -2))

    @staticmethod
    def _block_sizes(length: int, block: int, device) -> torch.Tensor:
        n = num_blocks(length, block)
        sizes = torch.full((n,), float(block), device=device)
        sizes[-1] = length - (n - 1) * block
        return sizes

    def to(self, device: torch.device | str) -> "BlockMask":
        return BlockMask(
            block_q=self.block_q, block_k=self.block_k, q_len=self.q_len, k_len=self.k_len,
            dense=self.dense.to(device),
        )

    def expand(self, batch: int, heads: int) -> "BlockMask":
        """Broadcast a (1 or B, 1 or H) mask to exactly (batch, heads)."""
        b, h = self.shape[:2]
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"mask with batch={b}, heads={h} cannot broadcast to ({batch}, {heads})")
        if (b, h) == (batch, heads):
            return self
        return BlockMask(
            block_q=self.block_q, block_k=self.block_k, q_len=self.q_len, k_len=self.k_len,
            dense=self.dense.expand(batch, heads, -1, -1),
        )

    def token_mask(self, q_slice: slice | None = None) -> torch.Tensor:
        """Token-level bool mask (B, H, Lq, Lk) (or the rows in ``q_slice``). For tests and small L."""
        dense = self.dense
        rows = torch.arange(self.q_len, device=dense.device)
        if q_slice is not None:
            rows = rows[q_slice]
        cols = torch.arange(self.k_len, device=dense.device)
        return dense[:, :, rows // self.block_q][:, :, :, cols // self.block_k]

    def __repr__(self) -> str:
        b, h, nqb, nkb = self.shape
        return (
            f"BlockMask(block=({self.block_q}, {self.block_k}), q_len={self.q_len}, k_len={self.k_len}, "
            f"shape=(B={b}, H={h}, NQB={nqb}, NKB={nkb}), sparsity={self.sparsity():.3f})"
        )

    def render(self, batch: int = 0, head: int = 0, *, max_rows: int = 64, max_cols: int = 128) -> str:
        """Text picture of one head's block map: '#' kept, '.' skipped (downsampled if large)."""
        d = self.dense[min(batch, self.shape[0] - 1), min(head, self.shape[1] - 1)].float()
        rs, cs = math.ceil(d.shape[0] / max_rows), math.ceil(d.shape[1] / max_cols)
        if rs > 1 or cs > 1:
            d = torch.nn.functional.max_pool2d(d[None, None], (rs, cs), ceil_mode=True)[0, 0]
        return "\n".join("".join("#" if x > 0 else "." for x in row) for row in d.tolist())

    # ----------------------------------------------------------------------- FlexAttention bridge
    def to_flex(self):
        """Convert to ``torch.nn.attention.flex_attention.BlockMask`` (same kept blocks).

        FlexAttention handles partial tail blocks itself given ``seq_lengths``. Kept blocks are
        attended in full, so they go in as FlexAttention *full* blocks (no per-token masking in
        compiled kernels), and ``mask_mod`` looks the block map up per token: eager
        ``flex_attention`` ignores the block tables and applies only ``mask_mod``.
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        idx, cnt = self.kv_indices, self.kv_counts
        nkb = self.num_k_blocks
        if idx.shape[-1] < nkb:  # FlexAttention infers the number of key blocks from the width
            idx = torch.nn.functional.pad(idx, (0, nkb - idx.shape[-1]))
        dense = self.dense.contiguous()
        mb, mh = dense.shape[:2]
        bq, bk = self.block_q, self.block_k

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[b % mb, h % mh, q_idx // bq, kv_idx // bk]

        # the (empty) partial table must be its own tensor: inductor's CPU codegen fails when one
        # tensor is passed as both the partial and the full table (torch 2.13)
        return FlexBlockMask.from_kv_blocks(
            torch.zeros_like(cnt),
            torch.zeros_like(idx),
            cnt.contiguous(),
            idx.contiguous(),
            BLOCK_SIZE=(bq, bk),
            mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.k_len),
        )

    @classmethod
    def from_flex(cls, flex_mask) -> "BlockMask":
        """Convert a FlexAttention ``BlockMask`` (partial and full blocks both count as kept)."""
        bq, bk = flex_mask.BLOCK_SIZE
        q_len, k_len = flex_mask.seq_lengths
        dense = flex_mask.to_dense().bool()
        nqb, nkb = num_blocks(q_len, bq), num_blocks(k_len, bk)
        return cls.from_dense(dense[..., :nqb, :nkb].contiguous(), block_q=bq, block_k=bk, q_len=q_len, k_len=k_len)
