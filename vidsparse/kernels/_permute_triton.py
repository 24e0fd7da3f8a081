"""Triton row gather behind :func:`vidsparse.kernels.permute.permute_rows` (its torch reference
is ``torch_permute_rows`` beside it)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _permute_rows(
    X, IDX, OUT, sxb, sxh, sxn, sxd, sib, sih, H, n, head_dim,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program copies ROWS rows of one (batch, head): ROWS indices, then a (ROWS, D) tile
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    ok = rows < n
    src = tl.load(IDX + b * sib + h * sih + rows, mask=ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    m = ok[:, None] & (offs_d < head_dim)[None, :]
    x = tl.load(X + b * sxb + h * sxh + src[:, None] * sxn + offs_d[None, :] * sxd, mask=m)
    out = OUT + (pid_bh.to(tl.int64) * n + rows)[:, None] * head_dim + offs_d[None, :]
    tl.store(out, x, mask=m)


_TILE = 64 * 128  # elements per program: 16 KB of bf16 in flight


def permute_rows_kernel(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) any strides, index (B or 1, H or 1, N) int -> contiguous x[b, h, index[b, h, i]]."""
    b, h, n, d = x.shape
    idx = index.to(torch.int64).contiguous()
    out = torch.empty(b, h, n, d, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(d)
    rows = max(16, min(256, _TILE // block_d))
    sib = 0 if idx.shape[0] == 1 else idx.stride(0)
    sih = 0 if idx.shape[1] == 1 else idx.stride(1)
    _permute_rows[(triton.cdiv(n, rows), b * h)](
        x, idx, out, *x.stride(), sib, sih, h, n, d, ROWS=rows, BLOCK_D=block_d, num_warps=4,
    )
    return out
