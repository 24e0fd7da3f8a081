"""The MaskPlan contract: every masker's plan, run by every backend, equals dense attention under
``plan.token_mask()`` in the caller's order, including per-head permutations of queries and keys."""

import math

import pytest
import torch

import vidsparse
from vidsparse import BlockMask, MaskPlan, maskers
from vidsparse.maskers.token_order import grid_coords, tiled_order
from vidsparse.plan import append_dense_tokens, invert_perm

GRID = (2, 8, 8)  # 128 tokens
N = math.prod(GRID)
BQ, BK = 32, 16


def masked_attention(q, k, v, token_mask, scale=None):
    """Plain softmax attention restricted to ``token_mask`` (B, H, Lq, Lk); empty rows give 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v.double()).to(q.dtype)


class RandomPermMasker(maskers.Masker):
    """Test-only masker: random per-head permutations of queries and keys (different ones) and a
    random block mask with some empty rows, to prove the contract before real methods use it."""

    defaults = {"density": 0.4, "seed": 0}

    def build(self, q, k, *, block_q, block_k, grid, positions, state, density, seed):
        g = torch.Generator().manual_seed(seed)
        b, h, lq, _ = q.shape
        lk = k.shape[2]
        perm = torch.stack([torch.randperm(lq, generator=g) for _ in range(b * h)]).view(b, h, lq)
        k_perm = torch.stack([torch.randperm(lk, generator=g) for _ in range(b * h)]).view(b, h, lk)
        nqb, nkb = -(-lq // block_q), -(-lk // block_k)
        dense = torch.rand(b, h, nqb, nkb, generator=g) < density
        dense[:, :, 0] = False  # an empty row: zero output there
        mask = BlockMask.from_dense(dense.to(q.device), block_q=block_q, block_k=block_k, q_len=lq, k_len=lk)
        return MaskPlan(mask, perm.to(q.device), k_perm=k_perm.to(q.device))


@pytest.fixture(scope="module", autouse=True)
def random_perm_masker():
    maskers.register("test_random_perm")(RandomPermMasker)
    yield
    maskers.unregister("test_random_perm")


def _qkv(b=2, h=2, n=N, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float32).to(dtype) for _ in range(3)]


def _all_maskers():
    return sorted(set(maskers.available()) | {"test_random_perm"})


@pytest.mark.parametrize("name", _all_maskers())
@pytest.mark.parametrize("backend", ["gather", "reference"])
def test_every_masker_plan_equals_attention_under_its_token_mask(name, backend):
    q, k, v = (t.requires_grad_() for t in _qkv())
    # the integration hands maskers (B, H, N, D) views of (B, N, H, D) tensors: not contiguous
    bnhd = lambda t: t.detach().transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    plan = maskers.get(name)(bnhd(q), bnhd(k), grid=GRID, block_q=BQ, block_k=BK)
    assert isinstance(plan, MaskPlan) and 0.0 <= plan.sparsity() < 1.0
    tm = plan.token_mask()
    assert tm.shape[2:] == (N, N) and tm.shape[0] in (1, 2) and tm.shape[1] in (1, 2) and tm.dtype == torch.bool
    tm = tm.expand(2, 2, N, N)  # a static method's plan may broadcast over batch and heads
    o, lse = vidsparse.block_sparse_attention(q, k, v, plan, backend=backend, return_lse=True)
    ref = masked_attention(q, k, v, tm)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5)
    # lse in the caller's order: logsumexp of the kept scores of each query
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    ref_lse = torch.logsumexp(s.masked_fill(~tm, float("-inf")), dim=-1)
    kept = tm.any(-1)
    torch.testing.assert_close(lse[kept].double(), ref_lse[kept], atol=2e-5, rtol=2e-5)
    assert torch.isneginf(lse[~kept]).all()
    go = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_runs_a_permuted_plan(dtype):
    q, k, v = _qkv(b=1, dtype=dtype, seed=3)
    plan = maskers.get("test_random_perm")(q, k, block_q=BQ, block_k=BK, density=0.5, seed=3)
    o = vidsparse.block_sparse_attention(q, k, v, plan, backend="triton")
    ref = masked_attention(q.float(), k.float(), v.float(), plan.token_mask())
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(o.float(), ref, atol=tol, rtol=tol)


def test_bnhd_layout_and_broadcast_perm_round_trip():
    q, k, v = _qkv(b=2, h=3)
    plan = maskers.get("hybrid")(q, k, grid=GRID, block_q=BQ, block_k=BK, topk=0.25, topp=None,
                                 token_order="tiled")
    assert plan.perm.shape == (1, 1, N)  # one order shared by every head
    assert torch.equal(plan.perm[0, 0], tiled_order(GRID, (2, 4, 4)))
    o = vidsparse.block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan,
                                         layout="bnhd")
    torch.testing.assert_close(o.transpose(1, 2), masked_attention(q, k, v, plan.token_mask()),
                               atol=2e-5, rtol=2e-5)


def test_plan_rejects_what_is_not_a_permutation():
    mask = BlockMask.full(block_q=16, block_k=16, q_len=32, k_len=32)
    with pytest.raises(ValueError, match="exactly once"):
        MaskPlan(mask, torch.zeros(1, 1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="has 31 positions"):
        MaskPlan(mask, torch.arange(31)[None, None])
    with pytest.raises(ValueError, match="integer tensor"):
        MaskPlan(mask, torch.arange(32.0)[None, None])
    with pytest.raises(TypeError, match="BlockMask"):
        MaskPlan("mask")
    with pytest.raises(TypeError, match="BlockMask or MaskPlan"):
        vidsparse.block_sparse_attention(*_qkv(n=32), object())


def test_token_mask_follows_the_permutations():
    # one query block (positions 0-15) keeps key block 1 (positions 16-31) only
    dense = torch.tensor([[False, True], [True, True]])[None, None]
    mask = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=32, k_len=32)
    perm = torch.randperm(32)[None, None]
    k_perm = torch.randperm(32)[None, None]
    tm = MaskPlan(mask, perm, k_perm=k_perm).token_mask()[0, 0]
    for pos in range(32):
        for kpos in range(32):
            assert tm[perm[0, 0, pos], k_perm[0, 0, kpos]] == dense[0, 0, pos // 16, kpos // 16]
    assert torch.equal(invert_perm(perm)[0, 0][perm[0, 0]], torch.arange(32))


@pytest.mark.parametrize("extra_first", [False, True])
def test_append_dense_tokens_keeps_text_whole(extra_first):
    n, n_text = 64, 10
    q, k, v = _qkv(b=1, n=n + n_text, seed=5)
    video = slice(n_text, None) if extra_first else slice(0, n)
    plan = maskers.get("test_random_perm")(q[:, :, video], k[:, :, video], block_q=BQ, block_k=BK, seed=5)
    full = append_dense_tokens(plan, n_text, extra_first=extra_first)
    tm = full.token_mask()
    text = slice(0, n_text) if extra_first else slice(n, None)
    assert tm[:, :, text].all() and tm[:, :, :, text].all()
    # the video part keeps (at least) the masker's pairs; blocks that straddle text are whole
    assert (tm[:, :, video, video] | ~plan.token_mask()).all()
    o = vidsparse.block_sparse_attention(q, k, v, full)
    torch.testing.assert_close(o, masked_attention(q, k, v, tm), atol=2e-5, rtol=2e-5)


def test_append_dense_tokens_drops_padded_keys():
    n, n_text, k_len = 64, 12, 70
    q, k, v = _qkv(b=1, n=n + n_text, seed=6)
    plan = maskers.get("test_random_perm")(q[:, :, :n], k[:, :, :n], block_q=BQ, block_k=BK, seed=6)
    full = append_dense_tokens(plan, n_text, k_len=k_len)
    assert full.mask.k_len == k_len and full.k_perm.shape[-1] == k_len
    o = vidsparse.block_sparse_attention(q, k[:, :, :k_len], v[:, :, :k_len], full)
    ref = masked_attention(q, k[:, :, :k_len], v[:, :, :k_len], full.token_mask())
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="extra tokens last"):
        append_dense_tokens(plan, n_text, extra_first=True, k_len=k_len)


# ------------------------------------------------------------------------------------ priors
def _sparse_plan(**priors):
    q, k, _ = _qkv(b=1, h=2, seed=7)
    return maskers.get("test_random_perm")(q, k, grid=GRID, block_q=BQ, block_k=BK, density=0.05, **priors)


def test_sink_prior_keeps_the_first_token_for_every_query_under_any_order():
    tm = _sparse_plan(keep_sink=True).token_mask()
    assert tm[..., 0].all()


def test_diagonal_prior_keeps_each_query_itself():
    q, k, _ = _qkv(b=1, h=2, seed=8)
    # queries and keys share one order here (keep_diagonal needs a common order to be blockwise)
    plan = maskers.get("hybrid")(q, k, grid=GRID, block_q=BQ, block_k=BK, topk=0.01, topp=None,
                                 keep_diagonal=True, token_order="tiled")
    assert torch.diagonal(plan.token_mask(), dim1=-2, dim2=-1).all()
    tm = _sparse_plan(keep_diagonal=True).token_mask()
    assert torch.diagonal(tm, dim1=-2, dim2=-1).all()


def test_window_prior_keeps_the_3d_neighbourhood():
    radius = (1, 1, 1)
    tm = _sparse_plan(window=radius).token_mask()[0, 0]
    c = grid_coords(GRID)
    near = ((c[:, None] - c[None]).abs() <= torch.tensor(radius)).all(-1)  # (N, N) token window
    assert tm[near].all()


def test_priors_and_orders_are_validated_with_the_method_named():
    q, k, _ = _qkv(b=1, seed=9)
    hybrid = maskers.get("hybrid")
    with pytest.raises(ValueError, match="masker 'hybrid': token_order='tiled' needs the latent grid"):
        hybrid(q, k, token_order="tiled")
    with pytest.raises(ValueError, match="masker 'hybrid': grid .* has 126 tokens"):
        hybrid(q, k, grid=(2, 7, 9))
    with pytest.raises(ValueError, match="masker 'hybrid': unknown option 'topq'"):
        hybrid(q, k, topq=0.1)
    with pytest.raises(ValueError, match="option 'window' must be three ints"):
        hybrid(q, k, grid=GRID, window=(1, 1))
    with pytest.raises(ValueError, match="unknown masker 'nope'; registered: .*hybrid"):
        maskers.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        maskers.register("hybrid")(RandomPermMasker)


def test_registry_lists_the_methods():
    assert "hybrid" in maskers.available() and "test_random_perm" in maskers.available()
    assert maskers.available() == sorted(maskers.available())
    assert "topk" in maskers.get("hybrid").option_names and "keep_sink" in maskers.get("hybrid").option_names


@pytest.mark.gpu
@pytest.mark.parametrize("name", _all_maskers())
def test_every_masker_bf16_triton_on_gpu(name):
    """bf16 on CUDA: the fused/batched GPU path of each masker, run by the Triton kernels, against
    fp32 attention under the plan's token mask (outputs and gradients)."""
    grid = (4, 16, 32)  # 2,048 tokens
    n = math.prod(grid)
    q, k, v = (t.cuda().to(torch.bfloat16).requires_grad_() for t in _qkv(b=2, h=2, n=n, d=64, seed=11))
    plan = maskers.get(name)(q, k, grid=grid, block_q=128, block_k=64)
    o = vidsparse.block_sparse_attention(q, k, v, plan, backend="triton")
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = masked_attention(qf, kf, vf, plan.token_mask())
    torch.testing.assert_close(o.float(), ref, atol=2e-2, rtol=2e-2)
    go = torch.randn_like(ref)
    grads = torch.autograd.grad(o, (q, k, v), go.to(o.dtype))
    for got, want in zip(grads, torch.autograd.grad(ref, (qf, kf, vf), go)):
        rel = (got.float() - want).norm() / want.norm().clamp_min(1e-6)
        assert rel < 1e-2, f"{name}: relative gradient error {rel:.2e}"


def test_hybrid_defaults_to_tiles_when_the_grid_is_known():
    q, k, _ = _qkv(b=1, seed=12)
    hybrid = maskers.get("hybrid")
    with_grid = hybrid(q, k, grid=GRID, block_q=BQ, block_k=BK)
    assert torch.equal(with_grid.perm[0, 0], tiled_order(GRID, (2, 4, 4)))
    assert hybrid(q, k, block_q=BQ, block_k=BK).perm is None  # no grid: the model's order
    assert hybrid(q, k, grid=GRID, block_q=BQ, block_k=BK, token_order="raster").perm is None
