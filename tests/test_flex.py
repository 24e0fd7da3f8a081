"""FlexAttention backend against the reference.

On CPU the backend runs eager ``flex_attention`` (forward only; see vidsparse/kernels/flex.py),
which applies only the mask_mod of :meth:`BlockMask.to_flex`, so these tests check that the
conversion keeps exactly the mask's blocks, tails included. Shapes are small: the first eager
call in a process costs ~2 s of Dynamo tracing and each new shape ~0.1-0.5 s.

The compiled path (CUDA) is checked by the ``gpu`` test at the end; ``VIDSPARSE_TEST_FLEX_COMPILE=1``
also runs the compiled CPU kernel (output only: it cannot return the LSE), ~10-25 s.
"""

import os

import pytest
import torch

import vidsparse
from vidsparse import BlockMask, NoBackendError

pytest.importorskip("torch.nn.attention.flex_attention")


def _case(b, h, lq, lk, d, bq, bk, mb, mh, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for n in (lq, lk, lk))
    dense = torch.rand(mb, mh, -(-lq // bq), -(-lk // bk), generator=g) < 0.5
    mask = BlockMask.from_dense(dense.to(device), block_q=bq, block_k=bk, q_len=lq, k_len=lk)
    return q, k, v, mask


def _both(q, k, v, mask, **kw):
    o, lse = vidsparse.block_sparse_attention(q, k, v, mask, backend="flex", return_lse=True, **kw)
    o_ref, lse_ref = vidsparse.block_sparse_attention(q, k, v, mask, backend="reference", return_lse=True, **kw)
    return o, lse, o_ref, lse_ref


def _assert_lse_close(lse, lse_ref, **tol):
    # rows that keep nothing: -inf in both
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite], lse_ref[finite], **tol)


@pytest.mark.parametrize(
    "shape",
    [
        # b, h, lq, lk, d, bq, bk, mask_b, mask_h
        (2, 2, 200, 150, 16, 128, 64, 2, 2),  # tails on both axes, Nq > Nk
        (1, 3, 70, 260, 16, 32, 64, 1, 3),  # Nq < Nk
        (2, 2, 100, 100, 8, 16, 32, 1, 1),  # broadcast mask
    ],
)
def test_forward_matches_reference(shape):
    q, k, v, mask = _case(*shape, seed=sum(shape))
    assert mask.sparsity() > 0.2  # a mask that actually drops blocks
    o, lse, o_ref, lse_ref = _both(q, k, v, mask)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    _assert_lse_close(lse, lse_ref, rtol=1e-5, atol=1e-5)  # natural log, like the reference
    assert bool(torch.isneginf(lse_ref).any()) == bool((~mask.dense).all(-1).any())


def test_forward_float64_bnhd_scale_and_empty_rows():
    q, k, v, mask = _case(2, 2, 90, 130, 16, 32, 16, 2, 2, dtype=torch.float64, seed=5)
    dense = mask.dense.clone()
    dense[1, 0, 2] = False  # a query block that keeps nothing
    mask = BlockMask.from_dense(dense, block_q=32, block_k=16, q_len=90, k_len=130)
    o, lse, o_ref, lse_ref = _both(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale=0.3, layout="bnhd")
    assert o.shape == (2, 90, 2, 16)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    _assert_lse_close(lse, lse_ref, rtol=1e-10, atol=1e-10)
    assert bool((o[1, 64:, 0] == 0).all()) and bool(torch.isneginf(lse[1, 0, 64:]).all())


def test_cpu_backward_is_refused_with_the_reason():
    q, k, v, mask = _case(1, 2, 64, 64, 16, 32, 32, 1, 1)
    q.requires_grad_()
    with pytest.raises(NoBackendError, match=r"flex: FlexAttention has no CPU backward") as err:
        vidsparse.block_sparse_attention(q, k, v, mask, backend="flex")
    assert "requires_grad=True" in str(err.value)
    # without a backward to build, the same inputs are accepted
    with torch.no_grad():
        o = vidsparse.block_sparse_attention(q, k, v, mask, backend="flex")
    torch.testing.assert_close(o, vidsparse.block_sparse_attention(q.detach(), k, v, mask, backend="reference"))


def test_auto_never_picks_flex():
    from vidsparse.dispatch import select_backend

    q, k, v, mask = _case(1, 1, 32, 32, 16, 16, 16, 1, 1)
    assert select_backend("auto", q, k, v, mask, needs_grad=False).name != "flex"


@pytest.mark.skipif(not os.environ.get("VIDSPARSE_TEST_FLEX_COMPILE"), reason="compiles a CPU kernel (~10-25 s)")
def test_compiled_cpu_kernel_uses_the_converted_mask():
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, mask = _case(2, 2, 200, 150, 16, 128, 64, 1, 2, seed=7)
    o = torch.compile(flex_attention)(q, k, v, block_mask=mask.to_flex())
    torch.testing.assert_close(o, vidsparse.block_sparse_attention(q, k, v, mask, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_and_backward_match_reference(dtype):
    q, k, v, mask = _case(2, 2, 300, 200, 64, 128, 64, 1, 2, dtype=dtype, seed=8, device="cuda")
    if dtype == torch.bfloat16:
        # Inductor (torch 2.11, H100) builds no 16-bit backward for 128x64 blocks: refused up front
        qq = q.detach().clone().requires_grad_()
        with pytest.raises(NoBackendError, match="16-bit backward does not compile for non-square mask blocks"):
            vidsparse.block_sparse_attention(qq, k, v, mask, backend="flex")
        return
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    do = torch.randn_like(q)
    outs = {}
    for backend in ("flex", "reference"):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o, lse = vidsparse.block_sparse_attention(qq, kk, vv, mask, backend=backend, return_lse=True)
        outs[backend] = (o, lse, *torch.autograd.grad(o, (qq, kk, vv), do))
    for a, b in zip(outs["flex"], outs["reference"]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
