"""Eager block-sparse attention that computes only the kept blocks (any device, with autograd).

For every query block it gathers the kept key/value blocks from the mask's index table, so the
work and memory grow with the kept fraction: at 95% sparsity about 1/20 of dense attention. This
is what "auto" runs where Triton cannot (the CPU); the exact oracle stays
:mod:`vidsparse.kernels.reference`, which computes every score and masks it, and the tests hold
this backend to it.

Same semantics as the reference (see its module docstring): a row that keeps no block gets
o = 0, lse = -inf and zero gradients; a dropped block never influences any result (non-finite
values reach only rows that keep their key block, in o, lse and the gradients). Computation is in
float32 (float64 for float64 inputs); o is returned in the input dtype, lse in the computation
dtype.
Gradients come from PyTorch autograd through the gathers.

On the CPU each query block attends its gathered keys through ATen's fused CPU flash-attention
op (one call for every (batch, head, query block), an additive -inf bias on the slots that are
not kept; it returns the LSE). Measured on 2 cores at B=8, H=4, N=4,096, D=64, 128x64 blocks:
0.36 s at 10% density against 1.8 s materialising the scores and 0.55 s for dense SDPA; on
other devices the scores are materialised per chunk of query blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mask import BlockMask

name = "gather"

# Score elements per chunk of query blocks (x4 bytes each for float32, kept for backward).
_CHUNK_ELEMENTS = 1 << 24
# ATen's fused CPU attention, returning (o, lse); it takes an additive mask (torch >= 2.3)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def not_supported_reasons(q, k, v, mask, *, needs_grad: bool, explicit: bool) -> list[str]:
    return []  # takes every valid input; it pays off whenever some blocks are dropped


def _blocks(x: torch.Tensor, block: int, n_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, n_blocks, block, D), zero-padded at the end, in ``dtype``."""
    b, h, length, d = x.shape
    x = F.pad(x.to(dtype), (0, 0, 0, n_blocks * block - length))
    return x.view(b, h, n_blocks, block, d)


def attention(q, k, v, mask: BlockMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on (B, H, N, D) tensors; returns (o (B, H, Lq, Dv), lse (B, H, Lq))."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    bq, bk = mask.block_q, mask.block_k
    nqb, nkb = mask.num_q_blocks, mask.num_k_blocks
    cnt = mask.kv_counts.expand(b, h, nqb)
    table = mask.kv_indices
    if torch.compiler.is_compiling():
        # reading the counts on the host would break the graph (issue 19): gather the table's
        # full width instead; padding slots are masked out below, so the result is the same, but
        # the work is that of dense attention (compiled models on the GPU run Triton instead)
        width = max(1, table.shape[-1])
    else:
        # at least one slot: a mask that keeps nothing runs as all-empty rows (o = 0, zero gradients)
        width = max(1, int(cnt.max()) if cnt.numel() else 0)
    if table.shape[-1] < width:  # only when nothing is kept (width 0 table)
        table = F.pad(table, (0, width - table.shape[-1]))
    idx = table[..., :width].expand(b, h, nqb, width).long()
    slot_ok = torch.arange(width, device=q.device) < cnt[..., None]  # (B, H, NQB, W)
    idx = torch.where(slot_ok, idx, 0)
    key_pos = idx[..., None] * bk + torch.arange(bk, device=q.device)  # (B, H, NQB, W, bk)
    key_ok = (slot_ok[..., None] & (key_pos < lk)).flatten(-2)  # (B, H, NQB, W*bk)

    qb = _blocks(q, bq, nqb, cdt)
    kb = _blocks(k, bk, nkb, cdt)
    vb = _blocks(v, bk, nkb, cdt)
    bi = torch.arange(b, device=q.device)[:, None, None, None]
    hi = torch.arange(h, device=q.device)[None, :, None, None]
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        o, lse = _cpu_flash(qb, kb, vb, (bi, hi, idx), key_ok, scale)
        return o[:, :, :lq].to(q.dtype), lse[:, :, :lq]

    per_block = max(1, b * h * bq * width * bk)
    step = max(1, _CHUNK_ELEMENTS // per_block)
    outs, lses = [], []
    for s0 in range(0, nqb, step):
        sl = slice(s0, min(s0 + step, nqb))
        ic, ok = idx[:, :, sl], key_ok[:, :, sl]  # (B, H, c, W), (B, H, c, W*bk)
        kg = kb[bi, hi, ic].flatten(3, 4)  # (B, H, c, W*bk, D)
        vg = vb[bi, hi, ic].flatten(3, 4)
        # padding slots hold block 0 and tail slots hold padding keys: select them away (not
        # multiply by zero), in k as well as v, so a NaN there reaches neither o nor the
        # gradients (the backward of q @ kg^T multiplies by kg); where's backward passes no
        # gradient to the excluded entries either
        kg = torch.where(ok[..., None], kg, 0)
        vg = torch.where(ok[..., None], vg, 0)
        s = (qb[:, :, sl] @ kg.transpose(-1, -2)) * scale  # (B, H, c, bq, W*bk)
        keep = ok[:, :, :, None, :]
        empty = ~ok.any(-1)  # (B, H, c): query block keeps nothing
        # softmax over kept keys; an empty row softmaxes zeros and is zeroed after (no NaN grads)
        s = torch.where(keep, s, float("-inf")).masked_fill(empty[..., None, None], 0.0)
        p = torch.softmax(s, dim=-1).masked_fill(empty[..., None, None], 0.0)
        outs.append(p @ vg)
        with torch.no_grad():
            lses.append(torch.logsumexp(s, dim=-1).masked_fill(empty[..., None], float("-inf")))
    o = torch.cat(outs, dim=2).flatten(2, 3)[:, :, :lq]
    lse = torch.cat(lses, dim=2).flatten(2, 3)[:, :, :lq]
    return o.to(q.dtype), lse


def _cpu_flash(qb, kb, vb, where, key_ok, scale):
    """The kept blocks through the CPU flash op: qb (B, H, NQB, bq, D), kb/vb (B, H, NKB, bk, D),
    ``where`` the gather indices of the kept slots, key_ok (B, H, NQB, W*bk). Returns
    (o (B, H, NQB*bq, D), lse (B, H, NQB*bq))."""
    b, h, nqb, bq, d = qb.shape
    ok = key_ok[..., None]
    # slots that are not kept (padding, tail keys) become zero keys and values and get a -inf
    # bias: selected away, so a non-finite value there reaches nothing
    kg = torch.where(ok, kb[where].flatten(3, 4), 0)
    vg = torch.where(ok, vb[where].flatten(3, 4), 0)
    empty = ~key_ok.any(-1)  # (B, H, NQB): a query block that keeps nothing
    # an empty row attends its first (zeroed) slot with a zeroed query instead: o = 0 and zero
    # gradients whatever its q holds; its lse is set below
    attend = key_ok.clone()
    attend[..., 0] |= empty
    qb = torch.where(empty[..., None, None], 0, qb)
    bias = torch.zeros(attend.shape, dtype=qb.dtype).masked_fill_(~attend, float("-inf"))
    n, width = b * h * nqb, kg.shape[3]
    o, lse = _CPU_FLASH(qb.reshape(n, 1, bq, d), kg.reshape(n, 1, width, d), vg.reshape(n, 1, width, vg.shape[-1]),
                        attn_mask=bias.reshape(n, 1, 1, width), scale=scale)
    lse = torch.where(empty[..., None], float("-inf"), lse.view(b, h, nqb, bq).to(qb.dtype))
    return o.view(b, h, nqb * bq, -1), lse.flatten(2, 3)
