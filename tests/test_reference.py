"""The exact reference backend, and the gather backend, against dense SDPA with the mask expanded to tokens.

``torch.nn.functional.scaled_dot_product_attention`` with ``mask.token_mask()`` as a boolean
``attn_mask`` is the ground truth for o and for autograd gradients; the LSE is checked against
``torch.logsumexp`` of the masked score matrix.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import vidsparse
from vidsparse import BlockMask
from vidsparse.kernels import reference

# "gather" computes only the kept blocks (the CPU default); it is held to the same oracle
EAGER_BACKENDS = ["reference", "gather"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _mask(b, h, lq, lk, bq, bk, density=0.5, seed=0, nonempty=True):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    dense = torch.rand(b, h, nqb, nkb, generator=g) < density
    if nonempty:  # SDPA gives NaN on a fully masked row; those rows have their own test
        first = torch.randint(0, nkb, (b, h, nqb), generator=g)
        dense.scatter_(-1, first[..., None], True)
    return BlockMask.from_dense(dense, block_q=bq, block_k=bk, q_len=lq, k_len=lk)


def _qkv(b, h, lq, lk, d, dtype, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (lq, lk, lk))
    if grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def _sdpa(q, k, v, mask, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.token_mask(), scale=scale)


def _masked_lse(q, k, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.logsumexp(s.masked_fill(~mask.token_mask(), float("-inf")), dim=-1)


CASES = [
    # b, h, lq, lk, d, bq, bk, mask_b, mask_h
    (1, 2, 128, 128, 16, 32, 16, 1, 2),
    (2, 3, 100, 77, 8, 32, 16, 2, 3),  # tails on both axes, Nq != Nk
    (2, 2, 50, 200, 16, 16, 64, 1, 2),  # broadcast over batch
    (2, 3, 200, 45, 8, 64, 32, 2, 1),  # broadcast over heads
    (3, 2, 33, 129, 8, 16, 16, 1, 1),  # both broadcast
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_forward_and_lse_match_masked_sdpa(backend, case, dtype):
    b, h, lq, lk, d, bq, bk, mb, mh = case
    q, k, v = _qkv(b, h, lq, lk, d, dtype, seed=lq + lk)
    mask = _mask(mb, mh, lq, lk, bq, bk, seed=lq)
    o, lse = vidsparse.block_sparse_attention(q, k, v, mask, backend=backend, return_lse=True)
    assert o.dtype == dtype and o.shape == (b, h, lq, d) and lse.shape == (b, h, lq)
    torch.testing.assert_close(o, _sdpa(q, k, v, mask), **TOL[dtype])
    torch.testing.assert_close(lse.to(dtype), _masked_lse(q, k, mask, d**-0.5), **TOL[dtype])


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_layout_bnhd_and_custom_scale(backend):
    q, k, v = _qkv(2, 3, 90, 70, 16, torch.float64, seed=1)
    mask = _mask(2, 3, 90, 70, 32, 16, seed=2)
    o, lse = vidsparse.block_sparse_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
        scale=0.37, layout="bnhd", backend=backend, return_lse=True,
    )
    assert o.shape == (2, 90, 3, 16)  # same layout out as in
    torch.testing.assert_close(o.transpose(1, 2), _sdpa(q, k, v, mask, scale=0.37), **TOL[torch.float64])
    torch.testing.assert_close(lse, _masked_lse(q, k, mask, 0.37), **TOL[torch.float64])


@pytest.mark.parametrize("case", CASES[1:4])
@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_gradients_match_autograd_through_sdpa(backend, case):
    b, h, lq, lk, d, bq, bk, mb, mh = case
    q, k, v = _qkv(b, h, lq, lk, d, torch.float64, seed=3, grad=True)
    mask = _mask(mb, mh, lq, lk, bq, bk, seed=4)
    do = torch.randn(b, h, lq, d, dtype=torch.float64)
    o = vidsparse.block_sparse_attention(q, k, v, mask, backend=backend, scale=0.2)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref = _sdpa(q, k, v, mask, scale=0.2)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float64])


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_gradients_float32_within_float32_tolerance(backend):
    q, k, v = _qkv(2, 2, 70, 100, 16, torch.float32, seed=5, grad=True)
    mask = _mask(1, 2, 70, 100, 32, 32, seed=6)
    do = torch.randn(2, 2, 70, 16)
    grads = torch.autograd.grad(vidsparse.block_sparse_attention(q, k, v, mask, backend=backend), (q, k, v), do)
    grads_ref = torch.autograd.grad(_sdpa(q, k, v, mask), (q, k, v), do)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_rows_keeping_no_block_give_zero_output_and_gradient(backend):
    b, h, lq, lk, d, bq, bk = 1, 2, 80, 64, 8, 32, 16
    # query block 1 of head 0 keeps nothing (count 0); the other rows keep 1-2 blocks
    idx = torch.tensor([[[[0, 3], [1, 2], [2, 0]], [[1, 0], [3, 0], [0, 2]]]])
    cnt = torch.tensor([[[2, 0, 1], [1, 2, 2]]])
    mask = BlockMask.from_indices(idx, cnt, block_q=bq, block_k=bk, q_len=lq, k_len=lk)
    q, k, v = _qkv(b, h, lq, lk, d, torch.float64, seed=7, grad=True)
    o, lse = vidsparse.block_sparse_attention(q, k, v, mask, backend=backend, return_lse=True)
    empty = slice(32, 64)
    assert bool((o[0, 0, empty] == 0).all())
    assert bool(torch.isneginf(lse[0, 0, empty]).all())
    assert bool(torch.isfinite(lse[0, 1]).all()) and bool(torch.isfinite(o).all())
    do = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    assert bool((dq[0, 0, empty] == 0).all())
    assert bool(torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all())
    # the other rows, and every dk/dv, equal SDPA over the non-empty rows only
    rows = torch.cat([torch.arange(0, 32), torch.arange(64, 80)])
    qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o_ref = F.scaled_dot_product_attention(qa[:, :1, rows], ka[:, :1], va[:, :1], attn_mask=mask.token_mask()[:, :1, rows])
    torch.testing.assert_close(o[:, :1, rows], o_ref, **TOL[torch.float64])
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(o_ref, (qa, ka, va), do[:, :1, rows])
    torch.testing.assert_close(dq[:, :1, rows], dq_ref[:, :1, rows], **TOL[torch.float64])
    torch.testing.assert_close(dk[:, :1], dk_ref[:, :1], **TOL[torch.float64])
    torch.testing.assert_close(dv[:, :1], dv_ref[:, :1], **TOL[torch.float64])


@pytest.mark.parametrize("path", ["cpu flash op", "scores, one query block per chunk"])
def test_gather_paths_match_the_reference_with_empty_rows(monkeypatch, path):
    """gather's CPU path (ATen's fused CPU attention over the gathered blocks) and its general
    path (materialised scores, chunked over query blocks; other devices) against the reference,
    with rows that keep nothing, and a mask that keeps nothing at all."""
    from vidsparse.kernels import gather

    if path != "cpu flash op":
        monkeypatch.setattr(gather, "_CPU_FLASH", None)
        monkeypatch.setattr(gather, "_CHUNK_ELEMENTS", 1)
    q, k, v = _qkv(2, 2, 150, 90, 8, torch.float64, seed=9, grad=True)
    mask = _mask(2, 2, 150, 90, 32, 16, density=0.4, seed=9, nonempty=False)
    assert bool((mask.kv_counts == 0).any())  # some rows keep nothing
    do = torch.randn(2, 2, 150, 8, dtype=torch.float64)
    o, lse = gather.attention(q, k, v, mask, 0.3)
    o_ref, lse_ref = reference.attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float64])
    torch.testing.assert_close(lse, lse_ref, **TOL[torch.float64])  # -inf where a row keeps nothing
    for a, b in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_ref, (q, k, v), do)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    nothing = BlockMask.from_dense(torch.zeros(1, 1, 5, 6, dtype=torch.bool), block_q=32, block_k=16, q_len=150, k_len=90)
    o3, lse3 = gather.attention(q, k, v, nothing, 0.3)
    assert bool((o3 == 0).all()) and bool(torch.isneginf(lse3).all())
    assert all(bool((g == 0).all()) for g in torch.autograd.grad(o3.sum(), (q, k, v), allow_unused=True) if g is not None)


def test_chunked_path_gives_the_same_results(monkeypatch):
    q, k, v = _qkv(2, 2, 150, 90, 8, torch.float64, seed=8, grad=True)
    mask = _mask(2, 1, 150, 90, 32, 16, seed=9)
    do = torch.randn(2, 2, 150, 8, dtype=torch.float64)

    def run():
        o, lse = vidsparse.block_sparse_attention(q, k, v, mask, backend="reference", return_lse=True)
        return (o, lse, *torch.autograd.grad(o, (q, k, v), do))

    whole = run()
    chunks = []
    token_mask = BlockMask.token_mask

    def spy(self, q_slice=None):
        chunks.append(q_slice)
        return token_mask(self, q_slice)

    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1)  # one query block per chunk
    monkeypatch.setattr(BlockMask, "token_mask", spy)
    chunked = run()
    # forward and backward each walk the 5 query blocks separately
    assert [(s.start, s.stop) for s in chunks] == [(i * 32, min(i * 32 + 32, 150)) for i in range(5)] * 2
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sparse_attention_is_masker_plus_block_sparse_attention():
    q, k, v = _qkv(2, 2, 130, 100, 16, torch.float32, seed=10)
    o, lse, plan = vidsparse.sparse_attention(
        q, k, v, topk=0.2, topp=0.4, block_q=32, block_k=16, return_lse=True, return_plan=True, backend="reference"
    )
    assert plan.perm is None  # raster order: the plan's mask is in the caller's order
    mask = plan.mask
    expected_mask = vidsparse.hybrid_block_mask(q, k, topk=0.2, topp=0.4, block_q=32, block_k=16)
    assert torch.equal(mask.dense, expected_mask.dense)
    o2, lse2 = vidsparse.block_sparse_attention(q, k, v, expected_mask, backend="reference", return_lse=True)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    torch.testing.assert_close(o, _sdpa(q, k, v, expected_mask), **TOL[torch.float32])
    assert 0.0 < mask.sparsity() < 1.0  # a real sparse case


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_non_finite_v_reaches_only_rows_that_attend_to_it(backend, bad):
    q, k, v = _qkv(1, 2, 96, 64, 8, torch.float32, seed=11)
    dense = torch.tensor([[True, False, False, True], [False, True, False, False], [True, True, True, True]])
    mask = BlockMask.from_dense(dense, block_q=32, block_k=16, q_len=96, k_len=64)
    v_bad = v.clone()
    v_bad[0, 1, 20, 5] = bad  # key block 1, kept only by query blocks 1 and 2
    o = vidsparse.block_sparse_attention(q, k, v_bad, mask, backend=backend)
    o_clean = _sdpa(q, k, v, mask)
    hit = torch.zeros_like(o, dtype=torch.bool)
    hit[0, 1, 32:96, 5] = True
    expect = torch.isnan(o) if bad != bad else torch.isposinf(o)
    assert torch.equal(expect, hit)
    torch.testing.assert_close(o[~hit], o_clean[~hit], **TOL[torch.float32])


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_half_precision_inputs_return_their_dtype(backend):
    q, k, v = _qkv(1, 2, 64, 64, 16, torch.float32, seed=12)
    mask = _mask(1, 2, 64, 64, 32, 16, seed=13)
    o32 = _sdpa(q, k, v, mask)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        o, lse = vidsparse.block_sparse_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), mask, backend=backend, return_lse=True
        )
        assert o.dtype == dtype and lse.dtype == torch.float32
        torch.testing.assert_close(o.float(), o32, rtol=tol, atol=tol)


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    lq=st.integers(1, 150),
    lk=st.integers(1, 150),
    d=st.sampled_from([4, 8, 16]),
    bq=st.sampled_from([16, 32, 64]),
    bk=st.sampled_from([16, 32]),
    bcast_b=st.booleans(),
    bcast_h=st.booleans(),
    density=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_forward_backward_property(backend, b, h, lq, lk, d, bq, bk, bcast_b, bcast_h, density, seed):
    q, k, v = _qkv(b, h, lq, lk, d, torch.float64, seed=seed, grad=True)
    mask = _mask(1 if bcast_b else b, 1 if bcast_h else h, lq, lk, bq, bk, density=density, seed=seed)
    do = torch.randn(b, h, lq, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    o, lse = vidsparse.block_sparse_attention(q, k, v, mask, backend=backend, return_lse=True)
    o_ref = _sdpa(q, k, v, mask)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float64])
    torch.testing.assert_close(lse, _masked_lse(q, k, mask, d**-0.5), **TOL[torch.float64])
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float64])
