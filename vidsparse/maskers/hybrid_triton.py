"""Fused GPU predictor for the hybrid Top-k + Top-p block mask.

The GPU path of the ``hybrid`` masker: same rule and conventions as
:func:`vidsparse.maskers.hybrid.hybrid_block_mask` (the eager reference beside it, the oracle in
tests), in three launches:

1. ``_pool_kernel`` mean-pools the Q and the K blocks, both in one launch, straight from their
   (bf16/fp16/fp32) storage; each program reads a tile of about 128 x 128 elements (one 128-token
   Q block or two 64-token K blocks at D = 128);
2. one batched matmul gives the unscaled pooled scores (B, H, NQB, NKB);
3. ``_select_kernel``, one program per (batch*head, query block): scale, softmax over the row; the
   Top-k and Top-p cut-off values found by bisection over the int32 bit patterns of the fp32
   probabilities (at most 30 steps each; a Top-k-only call runs only the Top-k one); blocks tied
   at the cut-off value are settled in index order with one cumsum (the lower index first, as the
   eager stable sort); union of the two rules, optional sink/diagonal priors; a prefix-sum
   compaction writes the ascending index table.

No sort: an earlier version sorted each row twice with ``tl.sort``, which cost 0.18 ms of GPU
time at the Wan2.1-1.3B shape and 11.4 ms at 14B/720p (2,048-wide rows) on an H100.
It writes the dense block map (bool, straight from the kernel) and the index table at once, so
the BlockMask needs no further conversion before the forward kernel. The whole predictor is one
custom op, ``torch.ops.vidsparse.hybrid_mask``, with a fake (meta) implementation: under
``torch.compile`` it is a single opaque graph node (issue 19: inductor could not lower the
earlier int8 -> bool ``view`` of the map). Given the same probabilities, Top-k and the tie order match
the eager masker exactly. The probabilities themselves (pooling, matmul, softmax) and the Top-p
mass are summed in other orders than the eager torch ops (the mass as a tree sum, a tied run as
rank x probability instead of torch.cumsum), so a row with two blocks, or its mass, within float
rounding of each other, or of p, may keep one block more or less than the eager masker.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._validation import check_fraction, to_bhnd
from ..mask import BlockMask, check_block_size, num_blocks
from .hybrid import topk_blocks


@triton.jit
def _pool_tile(
    X, OUT, sxb, sxh, sxn, sxd, b, h, pid_bh, chunk, length, head_dim,
    BLOCK: tl.constexpr, SUB: tl.constexpr, NBP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # NBP consecutive blocks of BLOCK tokens, read SUB tokens per block at a time: a (NBP, SUB, D)
    # tile, so 64-token K blocks and 128-token Q blocks give a program the same bytes in flight
    blk = chunk * NBP + tl.arange(0, NBP)
    offs_t = tl.arange(0, SUB)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    base = X + b * sxb + h * sxh
    acc = tl.zeros((NBP, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, BLOCK, SUB):
        tok = blk[:, None] * BLOCK + t0 + offs_t[None, :]  # (NBP, SUB)
        x = tl.load(
            base + tok.to(tl.int64)[:, :, None] * sxn + offs_d[None, None, :] * sxd,
            mask=(tok < length)[:, :, None] & d_ok[None, None, :], other=0.0,
        )
        acc += tl.sum(x.to(tl.float32), 1)
    n = tl.minimum(length - blk * BLOCK, BLOCK)  # the tail block averages its real tokens
    nb = tl.cdiv(length, BLOCK)
    mean = acc / tl.maximum(n, 1).to(tl.float32)[:, None]
    out = OUT + (pid_bh.to(tl.int64) * nb + blk)[:, None] * head_dim + offs_d[None, :]
    tl.store(out, mean, mask=(blk < nb)[:, None] & d_ok[None, :])


@triton.jit
def _pool_kernel(
    Q, K, QOUT, KOUT, sqb, sqh, sqn, sqd, skb, skh, skn, skd,
    H, q_len, k_len, head_dim, q_progs,
    BLOCK_Q: tl.constexpr, SUB_Q: tl.constexpr, NBP_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, NBP_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one launch for both tensors: programs [0, q_progs) pool Q, the rest pool K
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    if pid < q_progs:
        _pool_tile(Q, QOUT, sqb, sqh, sqn, sqd, b, h, pid_bh, pid, q_len, head_dim, BLOCK_Q, SUB_Q, NBP_Q, BLOCK_D)
    else:
        _pool_tile(K, KOUT, skb, skh, skn, skd, b, h, pid_bh, pid - q_progs, k_len, head_dim, BLOCK_K, SUB_K, NBP_K, BLOCK_D)


@triton.jit
def _select_kernel(
    SCORES, DENSE, KV_IDX, KV_CNT, NK, TOPP,
    H, nqb, nkb, q_len, block_q, block_k, scale,
    NKB_P2: tl.constexpr, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr,
    # which bisections run (the host knows whether topk/topp is None); within a running rule the
    # tables' sentinels (NK = 0, TOPP < 0) still switch it off per head
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, FANOUT: tl.constexpr,
):
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % H
    base = (pid_bh.to(tl.int64) * nqb + row) * nkb
    offs = tl.arange(0, NKB_P2)
    valid = offs < nkb

    s = tl.where(valid, tl.load(SCORES + base + offs, mask=valid, other=0.0) * scale, float("-inf"))
    s = s - tl.max(s, 0)
    e = tl.where(valid, tl.exp(s), 0.0)
    prob = e / tl.sum(e, 0)

    # Non-negative fp32 bit patterns order like the values, so both cut-off values are found by
    # bisection over int32 bits in [min, max + 1) (<= 30 steps: 1.0 is 0x3F800000; fewer for a
    # narrow range): only reductions, no sort. Blocks tied at a cut-off are settled afterwards in
    # index order, as the eager stable sort does (among equal probabilities the lower index first).
    bits = tl.where(valid, prob.to(tl.int32, bitcast=True), -1)
    lo = tl.min(tl.where(valid, bits, 0x7FFFFFFF), 0)
    hi = tl.max(bits, 0) + 1
    # Top-k: largest v with count(bits >= v) >= n_k (the n_k-th largest value)
    lo_k = lo
    hi_k = hi
    if HAS_TOPK:
        n_k = tl.maximum(tl.load(NK + h), 1)  # 0 = rule off, but the rule keeps >= 1 block anyway
    else:
        hi_k = lo + 1
    # Top-p: largest v with mass(bits >= v) >= p; the kept prefix ends among the blocks at v
    lo_p = lo
    hi_p = hi
    if HAS_TOPP:
        p = tl.load(TOPP + h)  # < 0: rule off for this head
        # the same masked sum as the bisection's at v = lo, so the two agree on reaching p
        short = tl.sum(prob, 0) < p
    else:
        hi_p = lo + 1
    # FANOUT thresholds per round (FANOUT = 2: plain bisection) shrink each range FANOUT-fold:
    # fewer rounds of cross-warp reductions on wide rows, at FANOUT x the element work per round
    j = tl.arange(0, FANOUT) + 1  # threshold j sits at lo + j * step; the last one is >= hi
    while (hi_k - lo_k > 1) | (hi_p - lo_p > 1):
        if HAS_TOPK:
            t_k = tl.minimum(lo_k + j * ((hi_k - lo_k + FANOUT - 1) // FANOUT), hi_k)
            ok_k = tl.sum((bits[None, :] >= t_k[:, None]).to(tl.int32), 1) >= n_k
            lo_k, hi_k = tl.max(tl.where(ok_k, t_k, lo_k), 0), tl.min(tl.where(ok_k, hi_k, t_k), 0)
        if HAS_TOPP:
            t_p = tl.minimum(lo_p + j * ((hi_p - lo_p + FANOUT - 1) // FANOUT), hi_p)
            ok_p = tl.sum(tl.where(bits[None, :] >= t_p[:, None], prob[None, :], 0.0), 1) >= p
            lo_p, hi_p = tl.max(tl.where(ok_p, t_p, lo_p), 0), tl.min(tl.where(ok_p, hi_p, t_p), 0)

    # Both rules keep prefixes of one order, so the union is the longer prefix: everything above
    # the lower cut-off v, plus a leading run (in index order) of the blocks tied at v.
    if HAS_TOPK and HAS_TOPP:
        v = tl.minimum(lo_k, lo_p)
    elif HAS_TOPK:
        v = lo_k
    else:
        v = lo_p
    above = bits > v
    tie = (bits == v).to(tl.int32)
    rank = tl.cumsum(tie, 0) - tie  # tied blocks before this one
    # A rule whose own cut-off lies above v keeps no tied block below: its count (mass) above v
    # already reaches n_k (p), so its test fails for every rank without checking which rule cut.
    keep = above
    if HAS_TOPK:
        n_above = tl.sum(above.to(tl.int32), 0)
        keep = keep | ((tie != 0) & (rank < n_k - n_above))
    if HAS_TOPP:
        # mass before a tied block: the mass above v (the same sum as the bisection's at v + 1,
        # which stayed < p) plus its tied predecessors, which all hold the same probability
        mass_above = tl.sum(tl.where(above, prob, 0.0), 0)
        keep = keep | ((tie != 0) & (mass_above + rank.to(tl.float32) * prob < p))
        # p = 1 is dense even where probabilities underflow; a row whose total mass rounds below
        # p keeps every block, as the eager clamp to NKB does
        keep = tl.where((p >= 1.0) | short, valid, keep)

    if KEEP_SINK:
        keep = keep | (offs == 0)
    if KEEP_DIAG:
        q_start = row * block_q
        q_end = tl.minimum(q_start + block_q, q_len)
        k_start = offs * block_k
        keep = keep | (valid & (k_start < q_end) & (k_start + block_k > q_start))

    tl.store(DENSE + base + offs, keep, mask=valid)
    # compaction in index order: kept blocks first (ascending), then the dropped ones
    n_keep = tl.sum(keep.to(tl.int32), 0)
    kept_pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    drop_pos = n_keep + tl.cumsum((valid & ~keep).to(tl.int32), 0) - 1
    pos = tl.where(keep, kept_pos, drop_pos)
    tl.store(KV_IDX + base + pos, offs.to(tl.int32), mask=valid)
    tl.store(KV_CNT + pid_bh.to(tl.int64) * nqb + row, n_keep)


_POOL_TILE = 128 * 128  # elements a pooling program reads at once (fp32 partial sums: 128 per thread at 4 warps)


def _pool_plan(length: int, block: int, rows: int) -> tuple[int, int, int]:
    """(tokens read per block per step, blocks per program, programs) for one tensor."""
    sub = min(block, rows)
    nbp = max(1, rows // block)
    return sub, nbp, triton.cdiv(num_blocks(length, block), nbp)


def _pool(q: torch.Tensor, block_q: int, k: torch.Tensor | None = None, block_k: int = 16):
    """Block means of q (and of k, in the same launch).

    Args:
        q: (B, H, Lq, D), k: (B, H, Lk, D) or None; any float dtype, any strides.
    Returns:
        (B, H, ceil(Lq/block_q), D) float32 and, with k, (B, H, ceil(Lk/block_k), D) float32.
    """
    b, h, lq, d = q.shape
    block_d = max(16, triton.next_power_of_2(d))
    rows = max(16, _POOL_TILE // block_d)
    sub_q, nbp_q, progs_q = _pool_plan(lq, block_q, rows)
    q_out = torch.empty(b, h, num_blocks(lq, block_q), d, dtype=torch.float32, device=q.device)
    if k is None:  # a K half that no program reaches
        k, k_out, lk, sub_k, nbp_k, progs_k = q, q_out, lq, sub_q, nbp_q, 0
        block_k = block_q
    else:
        lk = k.shape[2]
        sub_k, nbp_k, progs_k = _pool_plan(lk, block_k, rows)
        k_out = torch.empty(b, h, num_blocks(lk, block_k), d, dtype=torch.float32, device=q.device)
    _pool_kernel[(progs_q + progs_k, b * h)](
        q, k, q_out, k_out, *q.stride(), *k.stride(), h, lq, lk, d, progs_q,
        BLOCK_Q=block_q, SUB_Q=sub_q, NBP_Q=nbp_q, BLOCK_K=block_k, SUB_K=sub_k, NBP_K=nbp_k,
        BLOCK_D=block_d, num_warps=4,
    )
    return q_out, k_out


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) any float dtype -> (B, H, ceil(L/block), D) float32 block means."""
    return _pool(x, block)[0]


_PARAM_CACHE: dict = {}


def _row_params(topk, topp, heads: int, nkb: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head Top-k block counts (int32, 0 = rule off) and Top-p masses (float32, -1 = off).

    Scalar settings are cached per (value, heads, NKB, device): building them costs several small
    launches, which would dominate a ~0.1 ms prediction.
    """
    key = None
    if not isinstance(topk, torch.Tensor) and not isinstance(topp, torch.Tensor):
        key = (topk, topp, heads, nkb, str(device))
        hit = _PARAM_CACHE.get(key)
        if hit is not None:
            return hit
    k = torch.as_tensor(0.0 if topk is None else topk, dtype=torch.float32).expand(heads).to(device)
    nk = torch.where(k > 0, topk_blocks(k, nkb), 0).to(torch.int32).contiguous()
    tp = torch.as_tensor(-1.0 if topp is None else topp, dtype=torch.float32).expand(heads).to(device).contiguous()
    if key is not None:
        if len(_PARAM_CACHE) > 256:
            _PARAM_CACHE.clear()
        _PARAM_CACHE[key] = (nk, tp)
    return nk, tp


def _predict(q, k, topk, topp, block_q: int, block_k: int, scale: float, keep_sink: bool, keep_diagonal: bool):
    """The three launches: (B, H, NQB, NKB) bool map, (B, H, NQB, NKB) int32 table, (B, H, NQB) int32 counts."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    nqb, nkb = num_blocks(lq, block_q), num_blocks(lk, block_k)
    q_mean, k_mean = _pool(q, block_q, k, block_k)
    scores = torch.matmul(q_mean, k_mean.transpose(-1, -2))  # unscaled
    nk, tp = _row_params(topk, topp, h, nkb, q.device)

    # the kernel stores its bool keep flags straight into the bool map (Triton writes one byte each)
    dense = torch.empty(b, h, nqb, nkb, dtype=torch.bool, device=q.device)
    kv_idx = torch.empty(b, h, nqb, nkb, dtype=torch.int32, device=q.device)
    kv_cnt = torch.empty(b, h, nqb, dtype=torch.int32, device=q.device)
    warps, fanout = _select_config(_nkb_p2(nkb))
    _select_kernel[(nqb, b * h)](
        scores, dense, kv_idx, kv_cnt, nk, tp,
        h, nqb, nkb, lq, block_q, block_k, scale,
        NKB_P2=_nkb_p2(nkb), KEEP_SINK=keep_sink, KEEP_DIAG=keep_diagonal,
        HAS_TOPK=topk is not None, HAS_TOPP=topp is not None,
        FANOUT=fanout, num_warps=warps,
    )
    return dense, kv_idx, kv_cnt


def _nkb_p2(nkb: int) -> int:
    return max(16, triton.next_power_of_2(nkb))


def _select_config(nkb_p2: int) -> tuple[int, int]:
    """(warps, fanout) of the selection kernel for rows of ``nkb_p2`` blocks. One warp keeps the
    bisection's reductions in-warp (H100, 512-wide rows, with the earlier 48-step int64
    bisection: 0.045 ms for 1 warp vs 0.074 for 4 and 0.115 for 8)."""
    return (1, 2) if nkb_p2 <= 1024 else (8, 2)


# The predictor as one opaque operator, so torch.compile puts a single node in the graph (no
# graph break, nothing for inductor to lower): scalar settings travel as floats (None = rule
# off), per-head settings as (H,) tensors in the *_heads arguments.
@torch.library.custom_op("vidsparse::hybrid_mask", mutates_args=())
def hybrid_mask_op(
    q: torch.Tensor, k: torch.Tensor,
    topk: Optional[float], topp: Optional[float],
    topk_heads: Optional[torch.Tensor], topp_heads: Optional[torch.Tensor],
    block_q: int, block_k: int, scale: float, keep_sink: bool, keep_diagonal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense (B, H, NQB, NKB) bool, kv_indices (B, H, NQB, NKB) int32, kv_counts (B, H, NQB) int32)."""
    topk = topk_heads if topk_heads is not None else topk
    topp = topp_heads if topp_heads is not None else topp
    return _predict(q, k, topk, topp, block_q, block_k, scale, keep_sink, keep_diagonal)


@hybrid_mask_op.register_fake
def _(q, k, topk, topp, topk_heads, topp_heads, block_q, block_k, scale, keep_sink, keep_diagonal):
    b, h, lq, _ = q.shape
    nqb, nkb = num_blocks(lq, block_q), num_blocks(k.shape[2], block_k)
    return (
        q.new_empty((b, h, nqb, nkb), dtype=torch.bool),
        q.new_empty((b, h, nqb, nkb), dtype=torch.int32),
        q.new_empty((b, h, nqb), dtype=torch.int32),
    )


def _fraction(name: str, value, heads: int):
    """check_fraction, except a per-head tensor's values under torch.compile: reading them on the
    host is a graph break (the masker checked them when its options were set)."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and torch.compiler.is_compiling():
        if value.shape[0] != heads or not torch.is_floating_point(value):
            return check_fraction(name, value, heads)  # the shape/dtype error, as eager
        return value.float()
    return check_fraction(name, value, heads)


@torch.no_grad()
def fused_hybrid_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    topk=0.03,
    topp=0.2,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
    layout: str = "bhnd",
    keep_diagonal: bool = False,
    keep_sink: bool = False,
) -> BlockMask:
    """GPU version of :func:`vidsparse.hybrid_block_mask`; same arguments, same result.

    Runs as the custom op ``torch.ops.vidsparse.hybrid_mask`` (with a fake implementation), so
    it can sit inside a ``torch.compile``-d model without a graph break.
    """
    q, k, _ = to_bhnd(q, k, k, layout)
    check_block_size("block_q", block_q)
    check_block_size("block_k", block_k)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    topk = _fraction("topk", topk, h)
    topp = _fraction("topp", topp, h)
    if topk is None and topp is None:
        raise ValueError("at least one of topk and topp must be given (use 1.0 for dense)")
    if keep_diagonal and lq != lk:
        raise ValueError(f"keep_diagonal needs self-attention (q_len == k_len), got {lq} and {lk}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    scale = d ** -0.5 if scale is None else float(scale)
    nkb = num_blocks(lk, block_k)
    if _nkb_p2(nkb) > 1 << 16:
        raise ValueError(f"the fused predictor supports up to 65,536 key blocks, got {nkb} (k_len={lk}, block_k={block_k})")
    tensor = lambda x: x if isinstance(x, torch.Tensor) else None  # noqa: E731
    scalar = lambda x: None if isinstance(x, torch.Tensor) else x  # noqa: E731
    dense, kv_idx, kv_cnt = hybrid_mask_op(
        q.detach(), k.detach(), scalar(topk), scalar(topp), tensor(topk), tensor(topp),
        block_q, block_k, scale, keep_sink, keep_diagonal,
    )
    return BlockMask(
        block_q=block_q, block_k=block_k, q_len=lq, k_len=lk,
        dense=dense, kv_indices=kv_idx, kv_counts=kv_cnt, _kv_normalised=True,
    )
