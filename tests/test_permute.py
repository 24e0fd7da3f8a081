"""The row permutation behind every permuted plan: Triton kernel and custom op against torch.gather."""

import pytest
import torch

from vidsparse.kernels.permute import permute_rows, torch_permute_rows
from vidsparse.plan import invert_perm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _perms(shape, n, device=DEVICE):
    return torch.argsort(torch.rand(*shape, n, device=device), dim=-1)


def _reference(x, index):
    """x[b, h, index[b, h, i]] by explicit loops (independent of both implementations)."""
    b, h = x.shape[:2]
    idx = index.expand(b, h, -1)
    out = torch.empty_like(x)
    for bi in range(b):
        for hi in range(h):
            out[bi, hi] = x[bi, hi, idx[bi, hi]]
    return out


@pytest.mark.parametrize("index_shape", [(1, 1), (1, 3), (2, 3)])
@pytest.mark.parametrize("n,d", [(100, 24), (257, 64)])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_triton_kernel_equals_reference(index_shape, n, d, layout):
    from vidsparse.kernels._permute_triton import permute_rows_kernel

    shape = (2, 3, n, d) if layout == "bhnd" else (2, n, 3, d)
    x = torch.randn(shape, device=DEVICE)
    if layout == "bnhd":
        x = x.transpose(1, 2)  # (B, H, N, D) view with the sequence outer
    index = _perms(index_shape, n)
    out = permute_rows_kernel(x, index)
    assert out.is_contiguous() and out.shape == x.shape
    assert torch.equal(out, _reference(x, index))


def test_triton_kernel_fp16_and_empty():
    from vidsparse.kernels._permute_triton import permute_rows_kernel

    x = torch.randn(1, 2, 70, 16, device=DEVICE).half()
    index = _perms((1, 2), 70)
    assert torch.equal(permute_rows_kernel(x, index), _reference(x, index))
    empty = torch.empty(1, 2, 0, 16, device=DEVICE)
    assert permute_rows_kernel(empty, _perms((1, 2), 0)).shape == (1, 2, 0, 16)


@pytest.mark.parametrize("index_shape", [(1, 1), (2, 3)])
def test_custom_op_forward_and_gradient(index_shape):
    x = torch.randn(2, 3, 50, 8, dtype=torch.float64, requires_grad=True)
    index = _perms(index_shape, 50, device="cpu")
    out = permute_rows(x, index, invert_perm(index))
    assert torch.equal(out, _reference(x.detach(), index))
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    x2 = x.detach().requires_grad_()
    (dx_ref,) = torch.autograd.grad(torch_permute_rows(x2, index), x2, g)
    assert torch.equal(dx, dx_ref)
    assert torch.equal(permute_rows(out, invert_perm(index), index), x)  # inverse undoes it


def test_none_and_three_dims():
    x = torch.randn(1, 2, 10)
    assert permute_rows(x, None, None) is x
    index = _perms((1, 2), 10, device="cpu")
    assert torch.equal(permute_rows(x, index, invert_perm(index)), _reference(x[..., None], index)[..., 0])


@pytest.mark.gpu
def test_bf16_cuda_path_and_gradient():
    x = torch.randn(1, 4, 4097, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    x.requires_grad_()
    index = _perms((1, 4), 4097)
    out = permute_rows(x, index, invert_perm(index))
    assert torch.equal(out, _reference(x.detach(), index))
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    assert torch.equal(dx, _reference(g, invert_perm(index)))
