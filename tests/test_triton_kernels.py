"""Triton kernels against the exact reference: O, LSE, dQ, dK, dV and the fused mask predictor.

On CPU these run in Triton's interpreter (fp32, fp16; small shapes). With a GPU present
(VIDSPARSE_TEST_GPU=1 pytest -m gpu) the `gpu` tests check bf16/fp16 at realistic sizes.
"""

import pytest
import torch

import vidsparse
from vidsparse import BlockMask
from vidsparse.dispatch import NoBackendError

triton_attention = pytest.importorskip("vidsparse.kernels.triton_attention")
from vidsparse.maskers.hybrid_triton import fused_hybrid_block_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(b, h, lq, lk, d, dtype, device=DEVICE, layout="bhnd"):
    def make(n):
        shape = (b, h, n, d) if layout == "bhnd" else (b, n, h, d)
        return torch.randn(shape, dtype=dtype, device=device).requires_grad_()

    return make(lq), make(lk), make(lk)


def _random_mask(b, h, lq, lk, bq, bk, density, device=DEVICE):
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    dense = torch.rand(b, h, nqb, nkb, device=device) < density
    return BlockMask.from_dense(dense, block_q=bq, block_k=bk, q_len=lq, k_len=lk)


def _run(q, k, v, mask, backend, layout="bhnd", scale=None):
    o, lse = vidsparse.block_sparse_attention(
        q, k, v, mask, backend=backend, layout=layout, return_lse=True, scale=scale
    )
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    return o, lse, grads, do


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_against_reference(q, k, v, mask, tol, layout="bhnd", scale=None):
    o, lse, grads, do = _run(q, k, v, mask, "triton", layout, scale)
    # the reference gets float32 copies of the same inputs and the same output gradient
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o_ref, lse_ref = vidsparse.block_sparse_attention(
        q32, k32, v32, mask, backend="reference", layout=layout, return_lse=True, scale=scale
    )
    grads_ref = torch.autograd.grad(o_ref, (q32, k32, v32), do.float())
    assert o.dtype == q.dtype and o.shape == q.shape
    assert torch.isfinite(o).all()
    assert _rel(o, o_ref) < tol, f"o rel err {_rel(o, o_ref)}"
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - lse_ref[finite]).abs().max().item() < tol * 10
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert _rel(g, g_ref) < tol, f"{name} rel err {_rel(g, g_ref)}"


CPU_CASES = [
    # (b, h, lq, lk, d, block_q, block_k, density)
    (1, 2, 256, 256, 64, 64, 32, 0.5),    # even lengths
    (2, 1, 200, 136, 32, 64, 32, 0.6),    # ragged tails, Nq != Nk, batch 2
    (1, 1, 96, 160, 40, 32, 16, 0.5),     # head dim not a power of two (padded tile)
    (1, 2, 128, 128, 16, 128, 64, 1.0),   # every block kept (dense)
]


@pytest.mark.parametrize("case", CPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(case, dtype):
    b, h, lq, lk, d, bq, bk, density = case
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    mask = _random_mask(b, h, lq, lk, bq, bk, density)
    _check_against_reference(q, k, v, mask, tol=1e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("case", CPU_CASES)
def test_tma_kernels_match_reference(case, monkeypatch):
    # the tensor-descriptor forward and dK/dV pass (fp32 in the interpreter, fp16 on a GPU); the
    # pointer kernels they replace must not run
    monkeypatch.setattr(triton_attention, "TMA_MODE", "1")
    monkeypatch.setattr(triton_attention, "_fwd_kernel", None)
    monkeypatch.setattr(triton_attention, "_bwd_dkdv_kernel", None)
    b, h, lq, lk, d, bq, bk, density = case
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    mask = _random_mask(b, h, lq, lk, bq, bk, density)
    _check_against_reference(q, k, v, mask, tol=1e-5 if dtype == torch.float32 else 3e-3)


def test_tma_kernels_bnhd_layout_and_empty_rows(monkeypatch):
    monkeypatch.setattr(triton_attention, "TMA_MODE", "1")
    monkeypatch.setattr(triton_attention, "_fwd_kernel", None)
    monkeypatch.setattr(triton_attention, "_bwd_dkdv_kernel", None)
    q, k, v = _qkv(2, 2, 160, 192, 32, torch.float16, layout="bnhd")
    mask = _random_mask(2, 2, 160, 192, 32, 32, 0.4)
    dense = mask.dense.clone()
    dense[1, 0, 2] = False  # a query block that keeps nothing: o = 0, lse = -inf
    mask = BlockMask.from_dense(dense, block_q=32, block_k=32, q_len=160, k_len=192)
    _check_against_reference(q, k, v, mask, tol=3e-3, layout="bnhd", scale=0.2)
    o, lse, _, _ = _run(q, k, v, mask, "triton", layout="bnhd", scale=0.2)
    assert torch.all(o[1, 64:96, 0] == 0) and torch.all(torch.isneginf(lse[1, 0, 64:96]))


def test_tma_is_skipped_for_misaligned_strides(monkeypatch):
    monkeypatch.setattr(triton_attention, "TMA_MODE", "1")
    q, k, v = _qkv(1, 1, 64, 64, 12, torch.float16)  # 12 x 2 bytes per row: not 16-byte aligned
    assert not triton_attention._tma_ok(16, q, k, v, q)
    q, k, v = _qkv(1, 1, 64, 64, 16, torch.float16)
    assert triton_attention._tma_ok(16, q, k, v, q)
    assert not triton_attention._tma_ok(256, q, k, v, q)  # head dims above 128 keep the pointer kernels


def test_tma_mode_auto_and_off(monkeypatch):
    # auto: 16-bit inputs on a TMA GPU only, so the interpreter tests keep the pointer kernels
    q, k, v = _qkv(1, 1, 64, 64, 16, torch.float16)
    monkeypatch.setattr(triton_attention, "TMA_MODE", "auto")
    expect = q.is_cuda and torch.cuda.get_device_capability()[0] >= 9
    assert triton_attention._tma_ok(16, q, k, v, q) == expect
    assert not triton_attention._tma_ok(16, q.float(), k.float(), v.float(), q.float())
    monkeypatch.setattr(triton_attention, "TMA_MODE", "0")
    assert not triton_attention._tma_ok(16, q, k, v, q)


def test_bnhd_layout_and_broadcast_mask():
    q, k, v = _qkv(2, 3, 160, 160, 32, torch.float32, layout="bnhd")
    mask = _random_mask(1, 3, 160, 160, 32, 32, 0.4)  # batch-broadcast mask
    _check_against_reference(q, k, v, mask, tol=1e-5, layout="bnhd", scale=0.3)
    o = vidsparse.block_sparse_attention(q, k, v, mask, layout="bnhd", backend="triton")
    assert o.shape == q.shape and o.is_contiguous()  # written in the caller's layout, no copy


def test_single_block_rows_and_empty_rows():
    b, h, lq, lk, bq, bk = 1, 2, 128, 192, 32, 32
    nqb, nkb = lq // bq, lk // bk
    idx = torch.randint(0, nkb, (b, h, nqb, 1), dtype=torch.int32, device=DEVICE)
    cnt = torch.ones(b, h, nqb, dtype=torch.int32, device=DEVICE)
    cnt[0, 1, 2] = 0  # one row keeps nothing
    mask = BlockMask.from_indices(idx, cnt, block_q=bq, block_k=bk, q_len=lq, k_len=lk)
    q, k, v = _qkv(b, h, lq, lk, 32, torch.float32)
    o, lse, (dq, dk, dv), _ = _run(q, k, v, mask, "triton")
    rows = slice(2 * bq, 3 * bq)
    assert torch.all(o[0, 1, rows] == 0) and torch.all(torch.isneginf(lse[0, 1, rows]))
    assert torch.all(dq[0, 1, rows] == 0)
    _check_against_reference(q, k, v, mask, tol=1e-5)


def test_mask_block_larger_than_kernel_tile():
    # block_k = 128 is processed as sub-tiles; block_q = 256 spans several query tiles
    q, k, v = _qkv(1, 1, 300, 400, 32, torch.float32)
    mask = _random_mask(1, 1, 300, 400, 256, 128, 0.5)
    _check_against_reference(q, k, v, mask, tol=1e-5)


@pytest.fixture(params=[2, 8], ids=["bisection", "fanout8"])
def select_fanout(request, monkeypatch):
    """Runs a test with the selection kernel at plain bisection and at 8 thresholds per round."""
    from vidsparse.maskers import hybrid_triton

    default = hybrid_triton._select_config
    monkeypatch.setattr(hybrid_triton, "_select_config", lambda p2: (default(p2)[0], request.param))
    return request.param


@pytest.mark.parametrize("kw", [
    dict(topk=0.1, topp=0.3),
    dict(topk=None, topp=0.6),
    dict(topk=0.25, topp=None),
    dict(topk=0.05, topp=0.5, keep_sink=True, keep_diagonal=True),
])
def test_fused_masker_matches_eager(kw, select_fanout):
    q = torch.randn(2, 3, 500, 48, device=DEVICE) * 2
    k = torch.randn(2, 3, 500, 48, device=DEVICE) * 2
    for bq, bk in ((64, 32), (32, 64)):
        eager = vidsparse.hybrid_block_mask(q, k, block_q=bq, block_k=bk, **kw)
        fused = fused_hybrid_block_mask(q, k, block_q=bq, block_k=bk, **kw)
        assert torch.equal(eager.dense, fused.dense)
        assert torch.equal(eager.kv_counts, fused.kv_counts)
        assert torch.equal(eager.kv_indices, fused.kv_indices)
        assert 0.0 < fused.sparsity() < 1.0


@pytest.mark.parametrize("kw", [dict(topk=0.3, topp=None), dict(topk=None, topp=0.45), dict(topk=0.1, topp=0.7)])
def test_fused_masker_breaks_exact_ties_like_eager(kw, select_fanout):
    # every key block identical except two: equal pooled probabilities, so ties decide the mask
    q = torch.randn(1, 2, 256, 32, device=DEVICE)
    block = torch.randn(1, 2, 16, 32, device=DEVICE)
    k = block.repeat(1, 1, 20, 1)
    k[:, :, 64:80] += 1.0  # block 4 stands out; the rest tie
    k[:, :, 200:216] -= 1.0
    eager = vidsparse.hybrid_block_mask(q, k, block_q=32, block_k=16, **kw)
    fused = fused_hybrid_block_mask(q, k, block_q=32, block_k=16, **kw)
    assert torch.equal(eager.dense, fused.dense)
    assert torch.equal(eager.kv_indices, fused.kv_indices)


def test_fused_masker_per_head_and_dense_limits():
    q = torch.randn(1, 3, 256, 32, device=DEVICE)
    k = torch.randn(1, 3, 256, 32, device=DEVICE)
    topk = torch.tensor([0.1, 0.5, 1.0])
    fused = fused_hybrid_block_mask(q, k, topk=topk, topp=None, block_q=32, block_k=16)
    assert fused.kv_counts[0, 0].eq(1).all() and fused.kv_counts[0, 1].eq(8).all()
    assert fused.dense[0, 2].all()  # topk = 1.0 is dense
    dense_p = fused_hybrid_block_mask(q, k, topk=None, topp=1.0, block_q=32, block_k=16)
    assert dense_p.dense.all()


# key-block pattern for the tie tests: values 3 (7 blocks), 1 (5), 2 (4), 0 (3) repeat, so the
# cut-offs land inside runs of exactly equal probabilities
_TIE_A = ([1, 3, 3, 0, 3, 1, 2, 3, 0, 1, 3, 2, 2, 3, 1, 0, 3, 2, 1], [1] * 19)  # head 0, head 1 (all equal)
_TIE_C = [1, 2, 4, 3, 512]  # per query block; 512 underflows every block below the row's best to 0


def _tied_qk(bq=32, bk=16, d=16):
    """q, k whose pooled scores are exact small multiples: pooled q block i = C[i] e0, pooled k
    block j = A[h][j] e0, so equal A give bit-equal probabilities in both maskers. Tails on both
    (Lq = 155, Lk = 297) and NQB = 5 != NKB = 19."""
    nqb, nkb = len(_TIE_C), len(_TIE_A[0])
    k = torch.zeros(1, 2, nkb * bk, d, device=DEVICE)
    for h, a in enumerate(_TIE_A):
        k[0, h, :, 0] = torch.tensor(a, dtype=torch.float32, device=DEVICE).repeat_interleave(bk)
    q = torch.zeros(1, 2, nqb * bq, d, device=DEVICE)
    q[0, :, :, 0] = torch.tensor(_TIE_C, dtype=torch.float32, device=DEVICE).repeat_interleave(bq)
    return q[:, :, : nqb * bq - 5], k[:, :, : nkb * bk - 7]


@pytest.mark.parametrize("name, kw", [
    ("topk", dict(topk=0.3, topp=None)),  # Top-k only: the cut falls inside the 7-way tie
    ("topk-zeros", dict(topk=0.5, topp=None)),  # ... and, in the 512 row, among 12 zero probabilities
    ("topp", dict(topk=None, topp=0.45)),
    ("hybrid-p-longer", dict(topk=0.1, topp=0.6)),
    ("hybrid-k-longer", dict(topk=0.5, topp=0.2)),
    ("hybrid-same-run", dict(topk=0.2, topp=0.3)),  # both cuts inside the same tie run
    ("per-head", dict(topk=torch.tensor([0.3, 0.1]), topp=torch.tensor([0.2, 0.75]))),
    ("tiny-p", dict(topk=None, topp=1e-6)),  # one block: the lowest index among the best
    ("p-dense", dict(topk=None, topp=1.0)),  # dense even where probabilities underflow
    ("k-dense", dict(topk=1.0, topp=None)),
])
def test_fused_masker_exact_tie_runs_like_eager(name, kw, select_fanout):
    from vidsparse.maskers.hybrid import pooled_block_scores

    q, k = _tied_qk()
    probs = pooled_block_scores(q, k, block_q=32, block_k=16)
    assert (probs[0, 1] == probs[0, 1, :, :1]).all() and (probs[0, 0, 4] == 0).sum() == 12  # the ties are real
    topp = kw["topp"]
    if topp is not None:
        # the test's p values sit clear of every cumulative sum, so float rounding cannot decide
        csum = torch.sort(probs, dim=-1, descending=True, stable=True).values.cumsum(-1)
        p = topp if not isinstance(topp, torch.Tensor) else topp.to(DEVICE)[None, :, None, None]
        near = ((csum - p).abs() < 1e-4) & (torch.as_tensor(p, device=DEVICE) < 1.0)
        assert not near.any()
    eager = vidsparse.hybrid_block_mask(q, k, block_q=32, block_k=16, **kw)
    fused = fused_hybrid_block_mask(q, k, block_q=32, block_k=16, **kw)
    assert torch.equal(eager.dense, fused.dense)
    assert torch.equal(eager.kv_counts, fused.kv_counts)
    assert torch.equal(eager.kv_indices, fused.kv_indices)
    if name == "topk":  # head 1 ties everywhere: the floor(0.3 * 19) = 5 lowest indices
        assert fused.dense[0, 1, :, :5].all() and not fused.dense[0, 1, :, 5:].any()
    if name == "tiny-p":  # block 1 is the first of head 0's best run (A = 3), block 0 of head 1's
        assert fused.kv_counts.eq(1).all() and fused.kv_indices[..., 0].flatten().tolist() == [1] * 5 + [0] * 5
    if name.endswith("dense"):
        assert fused.dense.all()


@pytest.mark.parametrize("topk, topp, n_keep", [(None, 0.25, 4), (0.1, 0.25, 4), (0.5, 0.25, 8), (None, 0.2, 4)])
def test_fused_masker_top_p_exact_boundary(topk, topp, n_keep, select_fanout):
    # all 16 key blocks equal: every probability is exactly 1/16, so the sums are exact and p = 0.25
    # is reached at the 4th block; the mass strictly before a kept block must be < p
    q = torch.randn(1, 2, 100, 16, device=DEVICE)
    k = torch.zeros(1, 2, 16 * 16 - 3, 16, device=DEVICE)
    eager = vidsparse.hybrid_block_mask(q, k, topk=topk, topp=topp, block_q=32, block_k=16)
    fused = fused_hybrid_block_mask(q, k, topk=topk, topp=topp, block_q=32, block_k=16)
    assert torch.equal(eager.dense, fused.dense)
    assert fused.dense[..., :n_keep].all() and not fused.dense[..., n_keep:].any()


@pytest.mark.parametrize("case", [
    # lq, lk, d, block_q, block_k, dtype: tails on both sides; d = 48 pads to 64; block_q = 256 at
    # d = 128 takes two steps per block; block_k = 16 pools several blocks per program
    (300, 200, 48, 128, 64, torch.float32),
    (300, 457, 128, 256, 16, torch.float16),
])
def test_fused_pool_single_launch_matches_torch_mean(case):
    from vidsparse.maskers.hybrid_triton import _pool, pool_blocks

    lq, lk, d, bq, bk, dtype = case
    q = torch.randn(2, 3, lq, d, device=DEVICE).to(dtype)  # BHND, contiguous
    k = torch.randn(2, lk, 3, d, device=DEVICE).to(dtype).transpose(1, 2)  # a BNHD view

    def ref(x, block):
        return torch.stack([x[:, :, i: i + block].float().mean(2) for i in range(0, x.shape[2], block)], 2)

    q_mean, k_mean = _pool(q, bq, k, bk)
    torch.testing.assert_close(q_mean, ref(q, bq), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_mean, ref(k, bk), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool_blocks(k, bk), k_mean, rtol=0, atol=0)


def test_triton_refuses_bf16_in_interpreter_and_float64():
    if DEVICE == "cuda":
        pytest.skip("interpreter-only behaviour")
    q = torch.randn(1, 1, 64, 32, dtype=torch.bfloat16)
    mask = BlockMask.full(block_q=32, block_k=32, q_len=64, k_len=64)
    with pytest.raises(NoBackendError, match=r"triton: .*bfloat16 is not supported by Triton's CPU interpreter"):
        vidsparse.block_sparse_attention(q, q, q, mask, backend="triton")
    # auto never picks the interpreter: it falls back to the reference
    o = vidsparse.block_sparse_attention(q.float(), q.float(), q.float(), mask)
    assert torch.isfinite(o).all()


def test_custom_op_traces_under_torch_compile():
    # the fake implementation lets torch.compile trace through the kernel without graph breaks
    q, k, v = _qkv(1, 2, 128, 128, 32, torch.float32)
    mask = _random_mask(1, 2, 128, 128, 32, 32, 0.5)
    idx, cnt = mask.kv_indices, mask.kv_counts
    empty = torch.empty(0, 0, 0, 0, dtype=torch.int32)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        o, lse = torch.ops.vidsparse.block_sparse_attn_fwd(q, k, v, idx, cnt, empty, empty, 32, 32, 0.1)
        assert o.shape == q.shape and lse.shape == (1, 2, 128) and lse.dtype == torch.float32


# ------------------------------------------------------------------------------ GPU (bf16)
GPU_CASES = [
    (1, 4, 4096, 4096, 128, 128, 64, 0.1),
    (2, 2, 3000, 2500, 64, 128, 64, 0.3),
    (1, 2, 2048, 2048, 128, 64, 128, 1.0),
    (1, 2, 1000, 1000, 96, 128, 64, 0.5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_matches_reference(case, dtype):
    b, h, lq, lk, d, bq, bk, density = case
    q, k, v = _qkv(b, h, lq, lk, d, dtype, device="cuda")
    mask = _random_mask(b, h, lq, lk, bq, bk, density, device="cuda")
    _check_against_reference(q, k, v, mask, tol=2e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("kernels", ["pointer", "tma"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_pointer_and_tma_kernels_match_reference(case, kernels, layout, monkeypatch):
    # each family on its own (the default picks TMA on sm_90+ and the pointer kernels elsewhere)
    monkeypatch.setattr(triton_attention, "TMA_MODE", "0" if kernels == "pointer" else "1")
    if kernels == "tma":
        monkeypatch.setattr(triton_attention, "_fwd_kernel", None)
        monkeypatch.setattr(triton_attention, "_bwd_dkdv_kernel", None)
    b, h, lq, lk, d, bq, bk, density = case
    q, k, v = _qkv(b, h, lq, lk, d, torch.bfloat16, device="cuda", layout=layout)
    mask = _random_mask(b, h, lq, lk, bq, bk, density, device="cuda")
    _check_against_reference(q, k, v, mask, tol=2e-2, layout=layout)


@pytest.mark.gpu
def test_gpu_large_offsets_do_not_overflow():
    # 40 heads x 75,600 tokens x 128 > 2^31 elements per tensor in BNHD layout with batch 1
    b, h, n, d = 1, 40, 75600, 128
    q = torch.randn(b, n, h, d, dtype=torch.bfloat16, device="cuda")
    mask = vidsparse.hybrid_block_mask(q, q, topk=0.01, topp=None, layout="bnhd")
    o = vidsparse.block_sparse_attention(q, q, q, mask, layout="bnhd")
    # spot-check the last head's last rows against the reference on a slice
    sl = slice(n - 300, n)
    qh = q[:, :, -1:].transpose(1, 2).float()
    sub = BlockMask.from_dense(mask.dense[:, -1:], block_q=128, block_k=64, q_len=n, k_len=n)
    ref = vidsparse.block_sparse_attention(qh, qh, qh, sub, backend="reference")
    assert _rel(o[:, sl, -1].float(), ref[0, 0, sl][None]) < 2e-2


@pytest.mark.parametrize("variant", [
    {"fwd": {}, "dq": {"SUB_M": 64}, "dkdv": {"SUB_M": 128}},
    {"fwd": {}, "dq": {"SUB_M": 128}, "dkdv": {"SUB_M": 64}},
])
def test_every_tile_variant_matches_reference(variant, monkeypatch):
    # autotuning picks one variant per shape; force each in turn so all code paths are checked
    import triton

    kernels = {"fwd": triton_attention._fwd_kernel, "dq": triton_attention._bwd_dq_kernel,
               "dkdv": triton_attention._bwd_dkdv_kernel}
    for key, kernel in kernels.items():
        warps = 4 if DEVICE == "cpu" else 8
        monkeypatch.setattr(kernel, "configs", [triton.Config(variant[key], num_warps=warps, num_stages=2)])
        monkeypatch.setattr(kernel, "cache", {})
    q, k, v = _qkv(1, 2, 200, 328, 64, torch.float32)  # ragged tails, odd block counts
    mask = _random_mask(1, 2, 200, 328, 128, 64, 0.6)
    _check_against_reference(q, k, v, mask, tol=1e-5)
