"""Triton block-sparse FlashAttention: forward, backward, autograd and a torch.library custom op.

Kernels (pointer arithmetic, or TMA tensor descriptors on Hopper and newer; block pointers are
gone in Triton 3.9):

* ``_fwd_kernel``: one program per (query tile, batch*head). It walks only the key blocks listed
  in the mask's index table for its query block, with an exp2 online softmax, and writes O and
  the natural-log LSE.
* ``_fwd_tma_kernel``: the same forward with Q, K, V and O moved by TMA tensor descriptors. The
  default for bf16/fp16 on GPUs of compute capability >= 9.0 with 16-byte aligned strides: on an
  H100 it ran the 95%-sparse forward 1.28-1.32x and the dense one 1.20x faster than ``_fwd_kernel``
  (``benchmarks/kernel_variants.py``; docs/benchmarks.md §1e). ``VIDSPARSE_TMA=0`` turns both TMA
  kernels off; ``1`` also uses them under the interpreter (tests).
* ``_bwd_delta_kernel``: delta = rowsum(O * dO), in fp32.
* ``_bwd_dkdv_kernel``: one program per (key tile, batch*head), walking the query blocks that keep
  its key block (the mask's transposed table); accumulates dK and dV. Deterministic, no atomics
  (adding dQ here with fp32 atomics instead of a dQ pass made the backward 1.46x slower on an
  H100, 1.3B shape, dense and 95%: the atomics cost more than the recomputed QK^T saves).
* ``_bwd_dq_kernel``: one program per (query tile, batch*head), walking the kept key blocks.
* ``_bwd_dkdv_tma_kernel``: the dK/dV pass through tensor descriptors, used where
  ``_fwd_tma_kernel`` is.

The mask's block shape is honoured whatever the kernel tile: a tile of BLOCK_M query rows always
lies inside one mask row (BLOCK_M divides block_q) and a mask block of block_k keys is processed
as block_k / BLOCK_N sub-tiles. Batch/head/row base offsets are int64, so 75,600 tokens x 40
heads x batch cannot overflow. Any head dim up to 256 works (the tile is padded to a power of
two with masked loads); any sequence length (ragged tails are masked).

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors in fp32 and fp16 (bf16 is broken in
Triton's interpreter, so the backend refuses it there).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..mask import BlockMask

name = "triton"

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------ dispatch
def not_supported_reasons(q, k, v, mask, *, needs_grad: bool, explicit: bool) -> list[str]:
    reasons = []
    if q.is_cuda:
        if q.dtype == torch.float64:
            reasons.append("float64 is not supported on GPU (use float32, float16 or bfloat16)")
    elif q.device.type == "cpu":
        if not _INTERPRET:
            reasons.append("needs CUDA tensors (or TRITON_INTERPRET=1 set before import, for CPU testing)")
        elif not explicit:
            reasons.append("CPU tensors run only in Triton's slow interpreter; auto never picks it (pass backend='triton')")
        if q.dtype in (torch.bfloat16, torch.float64):
            reasons.append(f"{q.dtype} is not supported by Triton's CPU interpreter (use float32 or float16)")
    else:
        reasons.append(f"device {q.device.type} is not supported (CUDA only)")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    if q.shape[-1] < 1:
        reasons.append("head_dim must be >= 1")
    return reasons


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: full fp32 products (tf32 would cost ~1e-3 relative error)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


# VIDSPARSE_AUTOTUNE=0 uses the first (default) config of each kernel: fast start-up for tests.
_AUTOTUNE = not _INTERPRET and os.environ.get("VIDSPARSE_AUTOTUNE", "1") != "0"


def _configs(options):
    """options: (meta-kwargs, num_warps, num_stages) tuples, the default first."""
    if _INTERPRET:
        return [triton.Config(options[0][0], num_warps=4, num_stages=1)]
    chosen = options if _AUTOTUNE else options[:1]
    return [triton.Config(meta, num_warps=w, num_stages=st) for meta, w, st in chosen]


# Key tiles stay one mask block wide, walked with a scalar block index. A variant that gathered
# two non-adjacent 64-key blocks into one 128-wide tile (per-element key indices) ran the dense
# forward 1.4x slower than this loop (23.1 ms on an H100 vs 16.4 ms on an H200 the run before;
# cuDNN 11.2 vs 11.6 ms there), so it was dropped.
# Peeling the ragged tail block off the key loop (unmasked loop, one masked step) made no
# difference dense and was 13% slower at 95% sparsity (H100, 1.026 vs 0.905 ms, same run, twice),
# so every step keeps its key mask. Nsight Compute: 186-232 registers per thread -> one 8-warp CTA
# per SM (12.5% occupancy), 37% SM / 34-36% memory throughput: latency-bound.
_FWD_OPTIONS = [({}, 8, 3), ({}, 4, 3), ({}, 8, 2), ({}, 4, 2), ({}, 8, 4)]
# Backward options, the default first, ordered by a sweep of every kernel alone over 24 configs
# (``benchmarks/bwd_sweep.py``; H100, 1.3B shape, bf16, 128x64 blocks). dK/dV: 32-row query
# steps without software pipelining (num_stages=1) were 1.49x faster than the next best at 95%
# sparsity and 1.35x dense. dQ: 128-row programs with 8 warps and 3 stages were 7% faster than
# 64 rows / 4 warps / 2 stages, but overflow shared memory for 64x128 mask blocks; the autotuner
# skips such configs, the single default (VIDSPARSE_AUTOTUNE=0) cannot.
_DQ_OPTIONS = [({"SUB_M": 64}, 4, 2), ({"SUB_M": 128}, 8, 3), ({"SUB_M": 128}, 8, 4), ({"SUB_M": 128}, 8, 2)]
_DKDV_OPTIONS = [({"SUB_M": 32}, 4, 1), ({"SUB_M": 16}, 4, 1), ({"SUB_M": 32}, 2, 1), ({"SUB_M": 64}, 4, 3),
                 ({"SUB_M": 64}, 4, 1)]


@triton.autotune(configs=_configs(_FWD_OPTIONS), key=["BLOCK_Q", "BLOCK_K", "BLOCK_M", "BLOCK_N", "BLOCK_D", "EVEN_K", "IEEE"])
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KV_IDX, KV_CNT,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    slb, slh,
    sib, sih, sim, sit,
    scb, sch, scm,
    H, q_len, k_len, head_dim, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    row = start_m // BLOCK_Q  # the mask row this tile lies in

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = (start_m + offs_m) < q_len
    d_valid = offs_d < head_dim

    q_ptrs = Q + b * sqb + h * sqh + start_m.to(tl.int64) * sqn + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    if EVEN_Q and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    idx_base = KV_IDX + b * sib + h * sih + row.to(tl.int64) * sim
    cnt = tl.load(KV_CNT + b * scb + h * sch + row * scm)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for t in range(0, cnt):
        j = tl.load(idx_base + t * sit).to(tl.int64)
        for sub in tl.static_range(BLOCK_K // BLOCK_N):
            start_n = j * BLOCK_K + sub * BLOCK_N
            k_ptrs = k_base + start_n * skn + offs_n[None, :] * skn + offs_d[:, None] * skd
            v_ptrs = v_base + start_n * svn + offs_n[:, None] * svn + offs_d[None, :] * svd
            n_valid = (start_n + offs_n) < k_len
            if EVEN_K and EVEN_D:
                kt = tl.load(k_ptrs)
                vv = tl.load(v_ptrs)
            else:
                kt = tl.load(k_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
                vv = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
            s = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
            if not EVEN_K:
                s = tl.where(n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a tile with every key masked keeps m = -inf: shift by 0 instead of NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = _dot(p.to(vv.dtype), vv, acc, IEEE)
            m_i = m_new

    empty = l_i == 0.0  # a row that keeps no block: o = 0, lse = -inf
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)

    o_ptrs = O + b * sob + h * soh + start_m.to(tl.int64) * son + offs_m[:, None] * son + offs_d[None, :] * sod
    lse_ptrs = LSE + b * slb + h * slh + start_m + offs_m
    if EVEN_Q and EVEN_D:
        tl.store(o_ptrs, o.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(lse_ptrs, lse, mask=m_valid)


# TMA variant of the forward: Q, K, V and O move through tensor descriptors, so no per-element
# pointer tensors occupy registers; out-of-range rows of a ragged tail load as zeros. Triton's
# warp specialisation of the key loop (tl.range(warp_specialize=True)) failed to compile here
# with Triton 3.6 ("NVGPUWarpSpecialization" pass), so the loop is a plain one. The autotuner
# picked 4 warps / 2 stages on an H100 (1.3B shape, dense and 95%), so that is the default.
_FWD_TMA_OPTIONS = [({}, 4, 2), ({}, 8, 3), ({}, 4, 3), ({}, 8, 2)]


@triton.autotune(configs=_configs(_FWD_TMA_OPTIONS), key=["BLOCK_Q", "BLOCK_K", "BLOCK_M", "BLOCK_N", "BLOCK_D", "EVEN_K"])
@triton.jit
def _fwd_tma_kernel(
    q_desc, k_desc, v_desc, o_desc, LSE, KV_IDX, KV_CNT,
    slb, slh,
    sib, sih, sim, sit,
    scb, sch, scm,
    H, q_len, k_len, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    row = start_m // BLOCK_Q
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)

    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    idx_base = KV_IDX + b.to(tl.int64) * sib + h.to(tl.int64) * sih + row.to(tl.int64) * sim
    cnt = tl.load(KV_CNT + b.to(tl.int64) * scb + h.to(tl.int64) * sch + row * scm)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in tl.range(0, cnt * (BLOCK_K // BLOCK_N)):
        j = tl.load(idx_base + (t // (BLOCK_K // BLOCK_N)) * sit)
        start_n = j * BLOCK_K + (t % (BLOCK_K // BLOCK_N)) * BLOCK_N
        kk = k_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        vv = v_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(kk)) * qk_scale
        if not EVEN_K:
            s = tl.where((start_n + offs_n)[None, :] < k_len, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None])
        m_i = m_new

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_desc.store([b, h, start_m, 0], o.to(o_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    tl.store(LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + start_m + offs_m, lse, mask=(start_m + offs_m) < q_len)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    H, q_len, head_dim,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs < q_len)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + b * sob + h * soh + offs[:, None].to(tl.int64) * son + offs_d[None, :] * sod, mask=msk, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs[:, None].to(tl.int64) * sdn + offs_d[None, :] * sdd, mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * q_len + offs, delta, mask=offs < q_len)


@triton.autotune(configs=_configs(_DKDV_OPTIONS), key=["BLOCK_Q", "BLOCK_K", "BLOCK_N", "BLOCK_D", "IEEE"])
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_IDX, Q_CNT,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    sib, sih, sim, sit,
    scb, sch, scm,
    H, q_len, k_len, head_dim, qk_scale, sm_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    SUB_M: tl.constexpr,
):
    # SUB_M query rows per step (capped by the mask's block_q)
    BLOCK_M: tl.constexpr = SUB_M if SUB_M < BLOCK_Q else BLOCK_Q
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    col = start_n // BLOCK_K  # the mask column this key tile lies in

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = (start_n + offs_n) < k_len
    d_valid = offs_d < head_dim
    nd_mask = n_valid[:, None] & d_valid[None, :]

    k = tl.load(K + b * skb + h * skh + start_n.to(tl.int64) * skn + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=nd_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + start_n.to(tl.int64) * svn + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=nd_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    row_base = pid_bh.to(tl.int64) * q_len  # LSE and DELTA are (B*H, q_len) contiguous
    idx_base = Q_IDX + b * sib + h * sih + col.to(tl.int64) * sim
    cnt = tl.load(Q_CNT + b * scb + h * sch + col * scm)

    for t in range(0, cnt):
        i = tl.load(idx_base + t * sit).to(tl.int64)
        for sub in tl.static_range(BLOCK_Q // BLOCK_M):
            start_m = i * BLOCK_Q + sub * BLOCK_M
            m_valid = (start_m + offs_m) < q_len
            qt = tl.load(q_base + start_m * sqn + offs_m[None, :] * sqn + offs_d[:, None] * sqd,
                         mask=m_valid[None, :] & d_valid[:, None], other=0.0)
            do = tl.load(do_base + start_m * sdn + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                         mask=m_valid[:, None] & d_valid[None, :], other=0.0)
            # padded query rows get lse = +inf so that their p is exactly 0
            lse2 = tl.load(LSE + row_base + start_m + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + start_m + offs_m, mask=m_valid, other=0.0)
            st = _dot(k, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE) * qk_scale
            pt = tl.math.exp2(st - lse2[None, :])
            dv = _dot(pt.to(do.dtype), do, dv, IEEE)
            dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE)
            dst = pt * (dpt - delta[None, :])
            dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk, IEEE)

    dk = dk * sm_scale
    dk_ptrs = DK + b * skb + h * skh + start_n.to(tl.int64) * skn + offs_n[:, None] * skn + offs_d[None, :] * skd
    dv_ptrs = DV + b * svb + h * svh + start_n.to(tl.int64) * svn + offs_n[:, None] * svn + offs_d[None, :] * svd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=nd_mask)


# TMA variant of the dK/dV pass (with the TMA forward): 32 query rows per step, the shape the
# backward sweep above found fastest for the pointer kernel; the autotuner picked 4 warps
# / 3 stages on an H100 (1.3B shape, dense and 95%), so that is the default.
_DKDV_TMA_OPTIONS = [({}, 4, 3), ({}, 4, 1), ({}, 4, 2), ({}, 8, 1)]


@triton.autotune(configs=_configs(_DKDV_TMA_OPTIONS), key=["BLOCK_Q", "BLOCK_K", "BLOCK_M", "BLOCK_N", "BLOCK_D"])
@triton.jit
def _bwd_dkdv_tma_kernel(
    q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, LSE, DELTA, Q_IDX, Q_CNT,
    sib, sih, sim, sit,
    scb, sch, scm,
    H, q_len, qk_scale, sm_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    SUBS: tl.constexpr = BLOCK_Q // BLOCK_M
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_n = pid_n * BLOCK_N
    col = start_n // BLOCK_K
    offs_m = tl.arange(0, BLOCK_M)

    k = k_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    v = v_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    row_base = pid_bh.to(tl.int64) * q_len  # LSE and DELTA are (B*H, q_len) contiguous
    idx_base = Q_IDX + b.to(tl.int64) * sib + h.to(tl.int64) * sih + col.to(tl.int64) * sim
    cnt = tl.load(Q_CNT + b.to(tl.int64) * scb + h.to(tl.int64) * sch + col * scm)

    for t in tl.range(0, cnt * SUBS):
        i = tl.load(idx_base + (t // SUBS) * sit)
        start_m = i * BLOCK_Q + (t % SUBS) * BLOCK_M
        q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        do = do_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        m_valid = (start_m + offs_m) < q_len
        # rows past the end load as zeros; lse = +inf makes their p exactly 0
        lse2 = tl.load(LSE + row_base + start_m + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + start_m + offs_m, mask=m_valid, other=0.0)
        pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk)

    dk_desc.store([b, h, start_n, 0], (dk * sm_scale).to(dk_desc.dtype).reshape(1, 1, BLOCK_N, BLOCK_D))
    dv_desc.store([b, h, start_n, 0], dv.to(dv_desc.dtype).reshape(1, 1, BLOCK_N, BLOCK_D))


@triton.autotune(configs=_configs(_DQ_OPTIONS), key=["BLOCK_Q", "BLOCK_K", "BLOCK_N", "BLOCK_D", "IEEE"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_IDX, KV_CNT,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    sib, sih, sim, sit,
    scb, sch, scm,
    H, q_len, k_len, head_dim, qk_scale, sm_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, SUB_M: tl.constexpr,
):
    BLOCK_M: tl.constexpr = SUB_M if SUB_M < BLOCK_Q else BLOCK_Q
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    row = start_m // BLOCK_Q

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = (start_m + offs_m) < q_len
    d_valid = offs_d < head_dim
    md_mask = m_valid[:, None] & d_valid[None, :]

    q = tl.load(Q + b * sqb + h * sqh + start_m.to(tl.int64) * sqn + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=md_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + start_m.to(tl.int64) * sdn + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=md_mask, other=0.0)
    row_base = pid_bh.to(tl.int64) * q_len
    lse2 = tl.load(LSE + row_base + start_m + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + start_m + offs_m, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    idx_base = KV_IDX + b * sib + h * sih + row.to(tl.int64) * sim
    cnt = tl.load(KV_CNT + b * scb + h * sch + row * scm)

    for t in range(0, cnt):
        j = tl.load(idx_base + t * sit).to(tl.int64)
        for sub in tl.static_range(BLOCK_K // BLOCK_N):
            start_n = j * BLOCK_K + sub * BLOCK_N
            n_valid = (start_n + offs_n) < k_len
            kt = tl.load(k_base + start_n * skn + offs_n[None, :] * skn + offs_d[:, None] * skd,
                         mask=n_valid[None, :] & d_valid[:, None], other=0.0)
            vt = tl.load(v_base + start_n * svn + offs_n[None, :] * svn + offs_d[:, None] * svd,
                         mask=n_valid[None, :] & d_valid[:, None], other=0.0)
            s = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where(n_valid[None, :], p, 0.0)
            dp = _dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, IEEE)

    dq = dq * sm_scale
    tl.store(DQ + b * sqb + h * sqh + start_m.to(tl.int64) * sqn + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
             dq.to(DQ.dtype.element_ty), mask=md_mask)


# ------------------------------------------------------------------------------------ launch
def _tiles(block_q: int, block_k: int, head_dim: int, backward: bool) -> tuple[int, int, int]:
    """Kernel tile (BLOCK_M, BLOCK_N, BLOCK_D) for a mask block shape; tiles divide the blocks.

    BLOCK_N keys of one mask key block are handled per step; in the backward kernels the query
    tile (SUB_M) is autotuned instead of BLOCK_M.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    big_d = block_d > 128
    if backward:
        bm, bn = min(block_q, 64 if big_d else 128), min(block_k, 32 if big_d else 64)
    else:
        bm, bn = min(block_q, 64 if big_d else 128), min(block_k, 32 if big_d else 64)
    return bm, bn, block_d


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _table(idx: torch.Tensor, cnt: torch.Tensor, b: int, h: int):
    """Broadcast an index table to (b, h, ...) as a stride-0 view (no copy)."""
    return idx.expand(b, h, -1, -1), cnt.expand(b, h, -1)


def _env_choice(var: str, allowed: tuple[str, ...]) -> str:
    """The variable's value (unset or empty: the first allowed), or a clear error."""
    value = os.environ.get(var, "") or allowed[0]
    if value not in allowed:
        raise ValueError(f"environment variable {var} must be one of {allowed}, got {value!r}")
    return value


# VIDSPARSE_TMA: "auto" (default) uses the TMA forward and dK/dV kernels for bf16/fp16 on GPUs
# with TMA (compute capability >= 9.0); "1" also under the interpreter (for tests); "0" never.
TMA_MODE = _env_choice("VIDSPARSE_TMA", ("auto", "0", "1"))


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ok(block_d: int, *tensors: torch.Tensor) -> bool:
    """Whether the TMA kernels take these tensors (the first sets dtype and device): the mode
    allows it, the GPU has TMA and the dtype is 16-bit (or, with mode "1", the interpreter runs
    them), and the descriptors get 16-byte aligned bases and strides and a unit last stride."""
    q = tensors[0]
    if TMA_MODE == "0" or block_d > 128:
        return False
    on_gpu = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _has_tma(q.device)
    if not on_gpu and not (TMA_MODE == "1" and _INTERPRET and q.dtype != torch.float64):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return False
    return True


def _descriptor(t: torch.Tensor, rows: int, block_d: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, block_d])


def _forward(q, k, v, kv_idx, kv_cnt, block_q: int, block_k: int, scale: float):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    o = torch.empty_like(q)  # keeps q's strides: a BNHD view in gives a BNHD-contiguous output
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    kv_idx, kv_cnt = _table(kv_idx, kv_cnt, b, h)
    bm, bn, bd = _tiles(block_q, block_k, d, backward=False)
    if _tma_ok(bd, q, k, v, o):
        _fwd_tma_kernel[(triton.cdiv(lq, bm), b * h)](
            _descriptor(q, bm, bd), _descriptor(k, bn, bd), _descriptor(v, bn, bd), _descriptor(o, bm, bd),
            lse, kv_idx, kv_cnt, lse.stride(0), lse.stride(1), *_strides4(kv_idx), *kv_cnt.stride(),
            h, lq, lk, scale * _LOG2E,
            BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            EVEN_K=lk % bn == 0,
        )
        return o, lse
    grid = (triton.cdiv(lq, bm), b * h)
    _fwd_kernel[grid](
        q, k, v, o, lse, kv_idx, kv_cnt,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(o),
        lse.stride(0), lse.stride(1),
        *_strides4(kv_idx), *kv_cnt.stride(),
        h, lq, lk, d, scale * _LOG2E,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        EVEN_Q=lq % bm == 0, EVEN_K=lk % bn == 0, EVEN_D=bd == d, IEEE=q.dtype == torch.float32,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt, block_q: int, block_k: int, scale: float):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    do = do.contiguous() if do.stride(-1) != 1 else do
    bm, bn, bd = _tiles(block_q, block_k, d, backward=True)
    delta = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(lq, 64), b * h)](
        o, do, delta, *_strides4(o), *_strides4(do), h, lq, d, BLOCK=64, BLOCK_D=bd,
    )
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    ieee = q.dtype == torch.float32
    q_idx, q_cnt = _table(q_idx, q_cnt, b, h)
    kv_idx, kv_cnt = _table(kv_idx, kv_cnt, b, h)
    common = dict(BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_N=bn, BLOCK_D=bd, IEEE=ieee)
    # dK/dV are written with k's/v's strides (torch.empty_like keeps them)
    if _tma_ok(bd, q, k, v, do, dk, dv):
        sub = min(32, block_q)
        _bwd_dkdv_tma_kernel[(triton.cdiv(lk, bn), b * h)](
            _descriptor(q, sub, bd), _descriptor(k, bn, bd), _descriptor(v, bn, bd), _descriptor(do, sub, bd),
            _descriptor(dk, bn, bd), _descriptor(dv, bn, bd), lse, delta, q_idx, q_cnt,
            *_strides4(q_idx), *q_cnt.stride(), h, lq, scale * _LOG2E, scale,
            BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=sub, BLOCK_N=bn, BLOCK_D=bd,
        )
    else:
        _bwd_dkdv_kernel[(triton.cdiv(lk, bn), b * h)](
            q, k, v, do, lse, delta, dk, dv, q_idx, q_cnt,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do),
            *_strides4(q_idx), *q_cnt.stride(),
            h, lq, lk, d, scale * _LOG2E, scale, **common,
        )
    _bwd_dq_kernel[lambda meta: (triton.cdiv(lq, min(meta["SUB_M"], block_q)), b * h)](
        q, k, v, do, lse, delta, dq, kv_idx, kv_cnt,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do),
        *_strides4(kv_idx), *kv_cnt.stride(),
        h, lq, lk, d, scale * _LOG2E, scale, **common,
    )
    return dq, dk, dv


# ---------------------------------------------------------------- custom op (torch.compile-able)
@torch.library.custom_op("vidsparse::block_sparse_attn_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_idx: torch.Tensor, kv_cnt: torch.Tensor, q_idx: torch.Tensor, q_cnt: torch.Tensor,
    block_q: int, block_k: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, kv_idx, kv_cnt, block_q, block_k, scale)


@_fwd_op.register_fake
def _(q, k, v, kv_idx, kv_cnt, q_idx, q_cnt, block_q, block_k, scale):
    b, h, lq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("vidsparse::block_sparse_attn_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    kv_idx: torch.Tensor, kv_cnt: torch.Tensor, q_idx: torch.Tensor, q_cnt: torch.Tensor,
    block_q: int, block_k: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt, block_q, block_k, scale)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt, block_q, block_k, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_idx, kv_cnt, q_idx, q_cnt, block_q, block_k, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt)
    ctx.block_q, ctx.block_k, ctx.scale = block_q, block_k, scale
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, do, _dlse):
    q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt = ctx.saved_tensors
    if q_idx.numel() == 0:
        raise RuntimeError("vidsparse: backward through an attention call made without gradients enabled")
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt, ctx.block_q, ctx.block_k, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None, None


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """BHND-contiguous or BNHD-contiguous views pass as they are; anything else is copied.

    Outputs and gradients are allocated with ``empty_like`` and written with the input's
    strides, which is only right for such dense layouts (a slice of a fused QKV is not).
    """
    if t.is_contiguous() or t.transpose(1, 2).is_contiguous():
        return t
    return t.contiguous()


def attention(q, k, v, mask: BlockMask, scale: float):
    """Block-sparse attention on (B, H, N, D) views; returns (o, lse) with autograd.

    The transposed index table needed by backward is built (and cached on the mask) only when a
    gradient is required.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad:
        q_idx, q_cnt = mask.q_indices, mask.q_counts
    else:
        q_idx = q_cnt = torch.empty(0, 0, 0, 0, dtype=torch.int32, device=q.device)
    q, k, v = _dense(q), _dense(k), _dense(v)
    return _fwd_op(q, k, v, mask.kv_indices, mask.kv_counts, q_idx, q_cnt, mask.block_q, mask.block_k, float(scale))
