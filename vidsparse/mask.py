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

A mask is immutable and owns its storage: the public constructors copy the tensors they are given
(a block map is small: one bool per block pair), so editing the caller's tensor afterwards changes
nothing, and the tensors a mask hands out must not be edited in place. An in-place edit of them
is detected (through the tensors' version counters) and the next use of the mask raises
``RuntimeError`` instead of letting the two views disagree. Internal code that builds a fresh
tensor for one mask hands it over without a copy (``BlockMask._adopt``).
"""

from __future__ import annotations

import math

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


def _check_positive_int(name: str, val) -> None:
    if isinstance(val, bool) or not isinstance(val, int):
        raise TypeError(f"{name} must be a positive int, got {type(val).__name__} {val!r}")
    if val < 1:
        raise ValueError(f"{name} must be a positive int, got {val!r}")


def _check_geometry(block_q, block_k, q_len, k_len) -> None:
    check_block_size("block_q", block_q)
    check_block_size("block_k", block_k)
    for name, val in (("q_len", q_len), ("k_len", k_len)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


def _check_batch_heads(what: str, shape) -> None:
    """A mask covers at least one batch element and one head (1 broadcasts; 0 covers nothing)."""
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"{what} must have batch >= 1 and heads >= 1 (1 broadcasts), got shape {tuple(shape)}"
        )


def _check_kv_range(idx: torch.Tensor, cnt: torch.Tensor, nkb: int) -> None:
    """Counts in [0, W] and the used indices in [0, nkb), checked in the caller's integer dtype
    (before any cast: int64 2**32 + 3 must not pass as 3)."""
    w = idx.shape[-1]
    if bool((cnt < 0).any()) or bool((cnt > w).any()):
        raise ValueError(f"kv_counts must lie in [0, {w}] (the width of kv_indices)")
    used = idx[torch.arange(w, device=idx.device) < cnt[..., None]]
    if used.numel() and (bool((used < 0).any()) or bool((used >= nkb).any())):
        raise ValueError(f"kv_indices must lie in [0, {nkb}) (key blocks)")


def _version(t: torch.Tensor) -> int | None:
    # None: not tracked. Inference-mode tensors keep no version counter (and cannot be edited
    # outside that mode); under torch.compile the tensors are traced values (and reading the
    # counter would break the graph), so a mask built while compiling is not tracked
    if torch.compiler.is_compiling() or t.is_inference():
        return None
    return t._version


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

    __slots__ = ("block_q", "block_k", "q_len", "k_len", "_dense", "_kv", "_kv_normalised", "_frozen", "__dict__")

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
        _owned: bool = False,
    ):
        # _kv_normalised: the table comes from one of our maskers (sorted, duplicate-free, built
        # for this mask): taken as is. _owned: the tensors were built for this mask: no copy.
        _check_geometry(block_q, block_k, q_len, k_len)
        self.block_q, self.block_k, self.q_len, self.k_len = block_q, block_k, q_len, k_len
        owned = _owned or _kv_normalised
        nqb, nkb = self.num_q_blocks, self.num_k_blocks
        if dense is None and kv_indices is None:
            raise ValueError("BlockMask needs either dense or kv_indices/kv_counts")
        if dense is not None:
            if not isinstance(dense, torch.Tensor):
                raise TypeError(f"dense block map must be a torch.Tensor, got {type(dense).__name__}")
            if dense.dtype != torch.bool:
                raise TypeError(f"dense block map must be torch.bool, got {dense.dtype}")
            if dense.dim() != 4 or tuple(dense.shape[-2:]) != (nqb, nkb):
                raise ValueError(
                    f"dense block map must have shape (B, H, {nqb}, {nkb}) for q_len={q_len}, "
                    f"k_len={k_len}, block_q={block_q}, block_k={block_k}; got {tuple(dense.shape)}"
                )
            _check_batch_heads("dense block map", dense.shape)
            if not owned:
                dense = dense.clone()
        if kv_indices is not None:
            if kv_counts is None:
                raise ValueError("kv_indices needs kv_counts")
            for name, t in (("kv_indices", kv_indices), ("kv_counts", kv_counts)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
            _check_batch_heads("kv_indices", kv_indices.shape)
            if not _kv_normalised:
                _check_kv_range(kv_indices, kv_counts, nkb)  # a user's table: fail here, before the cast
            kv_indices = kv_indices.to(torch.int32, copy=not owned)
            kv_counts = kv_counts.to(torch.int32, copy=not owned)
        self._dense = dense
        self._kv = None if kv_indices is None else (kv_indices, kv_counts)
        # a table from our own maskers is already sorted and duplicate-free; a user's is normalised
        self._kv_normalised = _kv_normalised or dense is not None
        self._frozen: list = []
        for t in (dense, kv_indices, kv_counts):
            if t is not None:
                self._freeze(t)

    def _freeze(self, t: torch.Tensor) -> torch.Tensor:
        """Record ``t`` as part of this mask's storage (an in-place edit is detected later)."""
        self._frozen.append((t, _version(t)))
        return t

    def _verify(self) -> None:
        if torch.compiler.is_compiling():
            return  # traced code cannot edit the caller's tensors behind the trace
        for t, version in self._frozen:
            if version is not None and t._version != version:
                raise RuntimeError(
                    "a BlockMask's tensor was edited in place after the mask was built; masks are "
                    "immutable: build a new one, e.g. BlockMask.from_dense(edited, ...) from "
                    "mask.dense.clone()"
                )

    # pickling and copy.deepcopy: the copy's tensors are new objects with their own version
    # counters, so only the storage travels and the copy records its tensors afresh
    def __getstate__(self) -> dict:
        return {"block_q": self.block_q, "block_k": self.block_k, "q_len": self.q_len, "k_len": self.k_len,
                "_dense": self._dense, "_kv": self._kv, "_kv_normalised": self._kv_normalised}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._frozen = []
        for t in (self._dense, *(self._kv or ())):
            if t is not None:
                self._freeze(t)

    @classmethod
    def _adopt(cls, dense: torch.Tensor, *, block_q: int, block_k: int, q_len: int, k_len: int) -> "BlockMask":
        """Internal: a mask over a bool map built for it alone (checked, not copied). For maskers."""
        return cls(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, dense=dense, _owned=True)

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_dense(
        cls, block_map: torch.Tensor, *, block_q: int, block_k: int, q_len: int, k_len: int
    ) -> "BlockMask":
        """From a boolean block map of shape (B, H, NQB, NKB) (or (NQB, NKB), broadcast).

        The map is copied: editing ``block_map`` afterwards does not change the mask.
        """
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
        """From an index table (B, H, NQB, W) and counts (B, H, NQB); indices need not be sorted.

        int32 or int64; the used entries are range-checked in their own dtype before the table is
        stored (copied) as int32.
        """
        return cls(
            block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
            kv_indices=kv_indices, kv_counts=kv_counts,
        )

    @classmethod
    def full(
        cls, *, block_q: int, block_k: int, q_len: int, k_len: int, batch: int = 1, heads: int = 1,
        device: torch.device | str | None = None,
    ) -> "BlockMask":
        """A mask that keeps every block (dense attention); ``batch``, ``heads`` >= 1."""
        _check_geometry(block_q, block_k, q_len, k_len)  # before the sizes are used below
        _check_positive_int("batch", batch)
        _check_positive_int("heads", heads)
        nqb, nkb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
        dense = torch.ones(batch, heads, nqb, nkb, dtype=torch.bool, device=device)
        return cls(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, dense=dense, _owned=True)

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

    @property
    def dense(self) -> torch.Tensor:
        """(B, H, NQB, NKB) bool, True where the block pair is computed. Read only."""
        self._verify()
        return self._dense_view

    def _cached(self, name: str, build):
        # a plain per-instance cache: functools.cached_property takes an RLock on Python 3.11,
        # which torch.compile cannot trace (a graph break per use inside a compiled model)
        if name not in self.__dict__:
            self.__dict__[name] = build()
        return self.__dict__[name]

    @property
    def _dense_view(self) -> torch.Tensor:
        if self._dense is not None:
            return self._dense
        return self._cached("_dense_cache", lambda: self._freeze(self._dense_from_kv()))

    def _dense_from_kv(self) -> torch.Tensor:
        idx, cnt = self._kv
        b, h, nqb, w = idx.shape
        valid = torch.arange(w, device=idx.device) < cnt[..., None]
        out = torch.zeros(b, h, nqb, self.num_k_blocks + 1, dtype=torch.bool, device=idx.device)
        # invalid slots are scattered into the extra column, then dropped
        target = torch.where(valid, idx.long().clamp(0, self.num_k_blocks - 1), self.num_k_blocks)
        out.scatter_(-1, target, True)
        return out[..., : self.num_k_blocks].contiguous()

    @property
    def _kv_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kv is not None and self._kv_normalised:
            return self._kv
        # no table yet, or a user's table: sort and deduplicate it through the dense view
        return self._cached("_kv_cache", lambda: tuple(self._freeze(t) for t in _dense_to_indices(self.dense)))

    @property
    def kv_indices(self) -> torch.Tensor:
        """(B, H, NQB, W) int32, kept key blocks per query block, ascending. Read only."""
        self._verify()
        return self._kv_table[0]

    @property
    def kv_counts(self) -> torch.Tensor:
        """(B, H, NQB) int32, valid entries of :attr:`kv_indices`. Read only."""
        self._verify()
        return self._kv_table[1]

    @property
    def _q_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cached("_q_cache", lambda: tuple(
            self._freeze(t) for t in _dense_to_indices(self.dense.transpose(-1, -2))))

    @property
    def q_indices(self) -> torch.Tensor:
        self._verify()
        return self._q_table[0]

    @property
    def q_counts(self) -> torch.Tensor:
        self._verify()
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
        # .to() on the same device returns the same tensor: sharing is safe, both are immutable
        return BlockMask(
            block_q=self.block_q, block_k=self.block_k, q_len=self.q_len, k_len=self.k_len,
            dense=self.dense.to(device), _owned=True,
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
            dense=self.dense.expand(batch, heads, -1, -1), _owned=True,
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
        return cls.from_dense(dense[..., :nqb, :nkb], block_q=bq, block_k=bk, q_len=q_len, k_len=k_len)
