"""Exact eager-PyTorch block-sparse attention: the correctness oracle for every other backend.

Runs on any device and dtype, with autograd. It processes query rows in chunks whose score matrix
stays under a fixed element budget, and its backward recomputes probabilities from the saved
log-sum-exp chunk by chunk, so no Lq x Lk matrix is ever held for long sequences.

Semantics (shared by all backends):
    s = q k^T * scale, restricted to the kept blocks; o = softmax(s) v over the kept keys only;
    lse = logsumexp(s) over the kept keys. A row that keeps no block gets o = 0, lse = -inf and
    zero gradients.
Non-finite values: a dropped block never influences any result. Every product over a dropped
(query, key) pair is excluded (selected away), never multiplied by zero, so NaN or inf in a
dropped q, k, v entry (or in the output gradient of a row) reaches neither o, lse nor dq, dk, dv
of anything that does not keep it; inside a kept block it propagates as IEEE arithmetic says.
Computation is in float32 (float64 for float64 inputs); o is returned in the input dtype and lse
in the computation dtype (float32 for 16/32-bit inputs, float64 for float64).
"""

from __future__ import annotations

import torch

from ..mask import BlockMask

name = "reference"

# Score-matrix elements per chunk (x4 bytes for float32): bounds memory at ~128 MiB per tensor.
_CHUNK_ELEMENTS = 1 << 25


def not_supported_reasons(q, k, v, mask, *, needs_grad: bool, explicit: bool) -> list[str]:
    return []  # the reference takes every valid input


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(mask: BlockMask, batch: int, heads: int, k_len: int):
    """Yield query-row slices aligned to query blocks, sized to the element budget."""
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * k_len) // mask.block_q) * mask.block_q
    for start in range(0, mask.q_len, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, mask.q_len))


def _chunk_probs(qc, k, tmask, scale, lse=None):
    """Scores of one chunk, masked; returns (p, lse). With ``lse`` given, reuses it (backward).

    Dropped scores are *replaced* (``where``), so a NaN in a dropped q/k entry never reaches p:
    p is exactly 0 at every dropped position, whatever the inputs hold there.
    """
    s = (qc @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~tmask, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    # empty rows have lse = -inf: subtract 0 there so p = exp(-inf) = 0 instead of NaN
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - lse_safe[..., None]).masked_fill(~tmask, 0.0)  # NaN lse: dropped stay 0
    return p, lse


def _kept_matmul(a, b, keep, b_finite: bool):
    """``sum_j a[..., i, j] * b[..., j, :]`` over the kept j only (``keep``: (..., I, J) bool).

    Dropped terms are *excluded*, not multiplied by zero: a plain matmul adds 0 * b[j] for every
    dropped j, which is NaN when b[j] holds NaN or inf, and poisons rows that never keep j. When
    b is finite (``b_finite``, the usual case) that is exact and we take the matmul; otherwise
    the products are formed and selected elementwise, in row chunks under the element budget.
    """
    a = a.masked_fill(~keep, 0.0)
    if b_finite:
        return a @ b
    lead, i, j = a.shape[:-2], a.shape[-2], a.shape[-1]
    d = b.shape[-1]
    per_row = max(1, j * d * max(1, a[..., 0, 0].numel()))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    out = a.new_empty(*lead, i, d)
    for r0 in range(0, i, step):
        r = slice(r0, min(r0 + step, i))
        prod = a[..., r, :, None] * b[..., None, :, :]  # (..., r, J, D)
        prod = torch.where(keep[..., r, :, None], prod, torch.zeros((), dtype=prod.dtype))
        out[..., r, :] = prod.sum(-2)
    return out


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


class _ReferenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: BlockMask, scale: float):
        cdt = _compute_dtype(q.dtype)
        b, h, lq, d = q.shape
        kc, vc = k.to(cdt), v.to(cdt)
        v_finite = _finite(vc)
        out = torch.empty(b, h, lq, v.shape[-1], dtype=cdt, device=q.device)
        lse = torch.empty(b, h, lq, dtype=cdt, device=q.device)
        for rows in _row_chunks(mask, b, h, k.shape[2]):
            tmask = mask.token_mask(rows)
            p, lse_c = _chunk_probs(q[:, :, rows].to(cdt), kc, tmask, scale)
            out[:, :, rows] = _kept_matmul(p, vc, tmask, v_finite)
            lse[:, :, rows] = lse_c
        ctx.mask, ctx.scale = mask, scale
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        mask, scale = ctx.mask, ctx.scale
        cdt = out.dtype
        kc, vc, dout = k.to(cdt), v.to(cdt), dout.to(cdt)
        k_finite, q_finite, do_finite = _finite(kc), _finite(q), _finite(dout)
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
        dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
        b, h = q.shape[:2]
        for rows in _row_chunks(mask, b, h, k.shape[2]):
            qc, doc = q[:, :, rows].to(cdt), dout[:, :, rows]
            tmask = mask.token_mask(rows)
            p, _ = _chunk_probs(qc, kc, tmask, scale, lse[:, :, rows])
            delta = (doc * out[:, :, rows]).sum(-1, keepdim=True)
            dp = doc @ vc.transpose(-1, -2)  # NaN at (i, j) from a dropped v[j] is excluded next
            ds = torch.where(tmask, p * (dp - delta), torch.zeros((), dtype=cdt))
            tmask_t = tmask.transpose(-1, -2)
            dq[:, :, rows] = _kept_matmul(ds, kc, tmask, k_finite) * scale
            dk += _kept_matmul(ds.transpose(-1, -2), qc, tmask_t, q_finite) * scale
            dv += _kept_matmul(p.transpose(-1, -2), doc, tmask_t, do_finite)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def attention(q, k, v, mask: BlockMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on (B, H, N, D) tensors; returns (o (B, H, Lq, D), lse (B, H, Lq))."""
    o, lse = _ReferenceAttention.apply(q, k, v, mask, scale)
    return o, (lse if lse.dtype == torch.float64 else lse.float())
