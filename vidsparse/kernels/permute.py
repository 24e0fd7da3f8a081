"""Row permutation of (B, H, N, D) tensors: the gathers into and out of a plan's attention order.

``permute_rows(x, index, inverse)`` returns a contiguous ``out[b, h, i] = x[b, h, index[b, h, i]]``
(``index`` broadcasts over B and H). On CUDA it is one Triton launch that reads each row once and
writes it once; elsewhere it is ``torch.gather`` / ``index_select``. It is the custom op
``vidsparse::permute_rows`` (fake implementation, autograd: the gradient is the same gather by
``inverse``), so a compiled model keeps it as one graph node.

Why a kernel: ``torch.gather`` needs an index as large as the output (B, H, N, D) int64, four
times the bytes of the bf16 data it moves; at the Wan2.1-1.3B 480p shape the gathers of q, k, v
and the output took 0.65 ms on an H200 against a 0.7 ms sparse kernel (docs/benchmarks.md §3e).
"""

from __future__ import annotations

import torch

__all__ = ["permute_rows", "torch_permute_rows"]


def torch_permute_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Eager reference: x (B, H, N, ...) -> x[b, h, index[b, h, i]]; index (B or 1, H or 1, N)."""
    if index.shape[0] == 1 and index.shape[1] == 1:
        return x.index_select(2, index[0, 0])
    b, h = x.shape[:2]
    idx = index.expand(b, h, -1)
    if x.dim() == 4:
        idx = idx[..., None].expand(-1, -1, -1, x.shape[-1])
    return torch.gather(x, 2, idx)


def _triton_permute_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    from ._permute_triton import permute_rows_kernel

    return permute_rows_kernel(x, index)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dim() == 4 and x.dtype != torch.float64


@torch.library.custom_op("vidsparse::permute_rows", mutates_args=())
def _permute_op(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        return _triton_permute_rows(x, index)
    return torch_permute_rows(x, index).contiguous()


@_permute_op.register_fake
def _(x, index, inverse):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, index, inverse = inputs
    ctx.save_for_backward(index, inverse)


def _backward(ctx, grad):
    index, inverse = ctx.saved_tensors
    # out[i] = x[index[i]], and index is a permutation: dx[j] = dout[inverse[j]]
    return _permute_op(grad, inverse, index), None, None


_permute_op.register_autograd(_backward, setup_context=_setup_context)


def permute_rows(x: torch.Tensor, index: torch.Tensor | None, inverse: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, N, ...) in one token order -> the order ``index`` gives (a copy; x itself if None).

    Args:
        x: (B, H, N) or (B, H, N, D), any strides.
        index: None or (B or 1, H or 1, N) int64, a permutation of [0, N) per (batch, head).
        inverse: the inverse permutation of ``index`` (same shape); the backward gathers by it.
    """
    if index is None:
        return x
    if x.dim() != 4:  # LSE-like (B, H, N): small, and never differentiated
        return torch_permute_rows(x, index)
    return _permute_op(x, index, inverse)
