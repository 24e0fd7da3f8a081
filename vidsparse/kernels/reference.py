"""Exact eager-PyTorch block-sparse attention: the correctness oracle for every other backend.

Runs on any device and dtype, with autograd. It processes query rows in chunks whose score matrix
stays under a fixed element budget, and its backward recomputes probabilities from the saved
log-sum-exp chunk by chunk, so no Lq x Lk matrix is ever held for long sequences.

Semantics (shared by all backends):
    s = q k^T * scale, restricted to the kept blocks; o = softmax(s) v over the kept keys only;
    lse = logsumexp(s) over the kept keys. A row that keeps no block gets o = 0, lse = -inf and
    zero gradients. NaN in q, k or v propagates to the affected outputs.
Computation is in float32 (float64 for float64 inputs); o is returned in the input dtype.
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
    """Scores of one chunk, masked; returns (p, lse). With ``lse`` given, reuses it (backward)."""
    s = (qc @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~tmask, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    # empty rows have lse = -inf: subtract 0 there so p = exp(-inf) = 0 instead of NaN
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - lse_safe[..., None])
    return p, lse


def _pv_nonfinite(p, v, v_bad, tmask):
    """p @ v when v holds NaN/inf. A plain matmul also multiplies the zero probabilities of
    skipped keys by their values (0 * nan = nan), poisoning every row; here a non-finite value
    reaches only the rows that keep its key, as in a kernel that skips the dropped blocks."""
    o = p @ v.masked_fill(v_bad, 0)
    kept = tmask.to(v.dtype)
    nan_hit = (kept @ v.isnan().to(v.dtype)) > 0
    pos_hit = (kept @ (v == float("inf")).to(v.dtype)) > 0
    neg_hit = (kept @ (v == float("-inf")).to(v.dtype)) > 0
    o = o.masked_fill(pos_hit, float("inf")).masked_fill(neg_hit, float("-inf"))
    return o.masked_fill(nan_hit | (pos_hit & neg_hit), float("nan"))


class _ReferenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: BlockMask, scale: float):
        cdt = _compute_dtype(q.dtype)
        b, h, lq, d = q.shape
        kc, vc = k.to(cdt), v.to(cdt)
        v_bad = None if bool(torch.isfinite(vc).all()) else ~torch.isfinite(vc)
        out = torch.empty(b, h, lq, v.shape[-1], dtype=cdt, device=q.device)
        lse = torch.empty(b, h, lq, dtype=cdt, device=q.device)
        for rows in _row_chunks(mask, b, h, k.shape[2]):
            tmask = mask.token_mask(rows)
            p, lse_c = _chunk_probs(q[:, :, rows].to(cdt), kc, tmask, scale)
            out[:, :, rows] = p @ vc if v_bad is None else _pv_nonfinite(p, vc, v_bad, tmask)
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
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
        dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
        b, h = q.shape[:2]
        for rows in _row_chunks(mask, b, h, k.shape[2]):
            qc, doc = q[:, :, rows].to(cdt), dout[:, :, rows]
            p, _ = _chunk_probs(qc, kc, mask.token_mask(rows), scale, lse[:, :, rows])
            delta = (doc * out[:, :, rows]).sum(-1, keepdim=True)
            dp = doc @ vc.transpose(-1, -2)
            ds = p * (dp - delta)
            dq[:, :, rows] = (ds @ kc) * scale
            dk += (ds.transpose(-1, -2) @ qc) * scale
            dv += p.transpose(-1, -2) @ doc
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def attention(q, k, v, mask: BlockMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on (B, H, N, D) tensors; returns (o (B, H, Lq, D), lse (B, H, Lq))."""
    o, lse = _ReferenceAttention.apply(q, k, v, mask, scale)
    return o, (lse if lse.dtype == torch.float64 else lse.float())
