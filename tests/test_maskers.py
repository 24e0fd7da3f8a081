"""The seeds' maskers (svg, svg2, xattention, radial, vmoba) on the MaskPlan contract.

For every method: attention under its plan equals dense attention under ``plan.token_mask()``
(outputs and gradients, batch 2, a real grid, every CPU backend and the Triton interpreter), the
batched path equals the eager per-head reference exactly (float64 inputs, so rounding cannot move
a selection boundary), the method's defining behaviour, and its option errors.
"""

import math

import pytest
import torch

import vidsparse
from vidsparse.maskers import radial as R
from vidsparse.maskers import svg as S
from vidsparse.maskers import svg2 as S2
from vidsparse.maskers import vmoba as V
from vidsparse.maskers import xattention as X
from vidsparse.maskers import groups
from vidsparse.maskers.token_order import grid_coords, token_permutation

GRID = (4, 8, 8)
N = 256
BQ, BK = 32, 16
OPTIONS = {
    "svg": dict(budget=0.2, samples=16),
    "svg2": dict(q_clusters=6, k_clusters=12, iters=3, top_p=0.6, min_fraction=0.1),
    "xattention": dict(threshold=0.6),
    "radial": dict(dense_frames=0, sink_frames=1, decay=0.5),
    "vmoba": dict(partition="3d", chunk_2d=(4, 4), chunk_3d=(2, 4, 4), topk=0.25),
}
METHODS = sorted(OPTIONS)


def _qkv(b=2, h=2, d=16, grid=GRID, dtype=torch.float32, seed=0):
    """Video-like q, k: head 0 shares a per-frame signal (spatial), head 1 a per-pixel one (temporal)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    c = grid_coords(grid)
    frame, pixel = c[:, 0], c[:, 1] * grid[2] + c[:, 2]
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    sig_f = 2 * torch.randn(grid[0], d, generator=g, dtype=torch.float64)[frame]
    sig_p = 2 * torch.randn(grid[1] * grid[2], d, generator=g, dtype=torch.float64)[pixel]
    for x in (q, k):
        x[:, 0] += sig_f
        x[:, 1 % h] += sig_p
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _plan(method, q, k, grid=GRID, **extra):
    return vidsparse.maskers.get(method)(q, k, grid=grid, block_q=BQ, block_k=BK, **{**OPTIONS[method], **extra})


def _masked_attention(q, k, v, tm):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~tm, float("-inf")), dim=-1) @ v


def _check_attention(method, backend, dtype, q, k, v, atol, rtol, token_order="raster", grid=GRID):
    plan = _plan(method, q, k, grid=grid, token_order=token_order)
    assert 0 < plan.density() < 1
    tm = plan.token_mask()
    assert tm.any(-1).all(), "every query keeps at least one key"
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o = vidsparse.block_sparse_attention(*leaves, plan, backend=backend)
    ref_leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = _masked_attention(*ref_leaves, tm)
    torch.testing.assert_close(o.double(), ref, atol=atol, rtol=rtol)
    g = torch.randn_like(ref)
    (o.double() * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=atol, rtol=rtol)


# ------------------------------------------------------------------ attention under the plan
@pytest.mark.parametrize("backend", ["gather", "reference"])
@pytest.mark.parametrize("method", METHODS)
def test_attention_under_plan_matches_token_mask(method, backend):
    q, k, v = _qkv()
    _check_attention(method, backend, torch.float32, q, k, v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_attention_under_plan_tiled_order(method):
    q, k, v = _qkv(seed=3)
    _check_attention(method, "gather", torch.float32, q, k, v, atol=1e-4, rtol=1e-4, token_order="tiled")


@pytest.mark.parametrize("method,dtype", [("svg", torch.float32), ("svg2", torch.float16), ("xattention", torch.float32),
                                          ("radial", torch.float16), ("vmoba", torch.float32)])
def test_triton_interpreter_under_plan(method, dtype):
    grid = (4, 4, 8)  # small: the interpreter runs every program in Python
    q, k, v = _qkv(b=2, h=1, d=16, grid=grid, dtype=dtype, seed=1)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _check_attention(method, "triton", dtype, q, k, v, atol=tol, rtol=tol, grid=grid)


# ------------------------------------------------------------------ batched path == reference
def test_svg_batched_equals_reference():
    q, k, _ = _qkv(b=2, h=3, dtype=torch.float64)
    for positions in (None, token_permutation("tiled", GRID, BQ)):
        qq, kk = (q, k) if positions is None else (q[:, :, positions], k[:, :, positions])
        plan, kinds = S.svg_plan(qq, kk, GRID, positions, budget=0.2, samples=16, block_q=BQ, block_k=BK)
        kinds_r, dense_r, perm_r = S.svg_reference(qq, kk, GRID, positions, budget=0.2, samples=16,
                                                   block_q=BQ, block_k=BK)
        assert torch.equal(kinds, kinds_r)
        assert torch.equal(plan.mask.dense.expand_as(dense_r), dense_r)
        assert torch.equal(plan.perm, perm_r)


def test_svg2_batched_equals_reference():
    q, k, _ = _qkv(b=2, h=2, dtype=torch.float64)
    o = dict(q_clusters=7, k_clusters=13, iters=4, top_p=0.6, min_fraction=0.1, block_q=BQ, block_k=BK)
    plan = S2.svg2_plan(q, k, warm_iters=2, **o)
    dense, perm, k_perm = S2.svg2_reference(q, k, **o)
    assert torch.equal(plan.mask.dense, dense)
    assert torch.equal(plan.perm, perm) and torch.equal(plan.k_perm, k_perm)


def test_group_block_mask_equals_reference():
    g = torch.Generator().manual_seed(5)
    for lq, lk, cq, ck in [(100, 90, 9, 14), (64, 64, 20, 3)]:
        qg = torch.sort(torch.randint(0, cq, (lq,), generator=g)).values
        kg = torch.sort(torch.randint(0, ck, (lk,), generator=g)).values
        keep = torch.rand(cq, ck, generator=g) < 0.2
        got = groups.group_block_mask(qg[None, None], kg[None, None], keep[None, None], block_q=16, block_k=32)
        assert torch.equal(got[0, 0], groups.group_block_mask_reference(qg, kg, keep, block_q=16, block_k=32))


@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
def test_xattention_batched_equals_reference(threshold):
    q, k, _ = _qkv(b=2, h=2, dtype=torch.float64)
    for n in (N, N - 6):  # also a length that is not a multiple of the stride
        o = dict(stride=8, threshold=threshold, block_q=BQ, block_k=BK)
        plan = X.xattention_plan(q[:, :, :n], k[:, :, :n], **o)
        assert torch.equal(plan.mask.dense, X.xattention_reference(q[:, :, :n], k[:, :, :n], **o))


@pytest.mark.parametrize("opts", [dict(dense_frames=1, sink_frames=1, decay=1.0, vote=0.5),
                                  dict(dense_frames=0, sink_frames=0, decay=0.3, vote="any"),
                                  dict(dense_frames=0, sink_frames=1, decay=0.05, vote=0.5)])
def test_radial_batched_equals_reference(opts):
    grid = (8, 8, 8)
    for positions in (None, token_permutation("tiled", grid, BQ)):
        got = R.radial_block_mask(grid, positions, block_q=BQ, block_k=BK, **opts)
        assert torch.equal(got, R.radial_reference(grid, positions, block_q=BQ, block_k=BK, **opts))


@pytest.mark.parametrize("partition", V.PARTITIONS)
def test_vmoba_batched_equals_reference(partition):
    q, k, _ = _qkv(b=2, h=2, dtype=torch.float64)
    for sel in (dict(topk=0.25, threshold=None), dict(topk=None, threshold=0.5)):
        o = dict(partition=partition, chunk_1d=1, chunk_2d=(4, 4), chunk_3d=(2, 4, 4), block_q=BQ, block_k=BK, **sel)
        positions = token_permutation("tiled", GRID, BQ)
        for pos in (None, positions):
            qq, kk = (q, k) if pos is None else (q[:, :, pos], k[:, :, pos])
            plan = V.vmoba_plan(qq, kk, GRID, pos, **o)
            dense, perm = V.vmoba_reference(qq, kk, GRID, pos, **o)
            assert torch.equal(plan.mask.dense, dense) and torch.equal(plan.perm[0, 0], perm)


# ------------------------------------------------------------------------ defining behaviour
def test_svg_candidate_blocks_cached_per_shape_and_compiled_plan_equal():
    q, k, _ = _qkv(b=2, h=2)
    S._pattern_blocks.cache_clear()
    first = _plan("svg", q, k)
    again = _plan("svg", q.flip(0), k.flip(0))  # other inputs, same shape: the candidates are reused
    assert S._pattern_blocks.cache_info().hits == 1 and S._pattern_blocks.cache_info().misses == 1
    assert torch.equal(again.mask.dense, first.mask.dense.flip(0)) and torch.equal(again.perm, first.perm.flip(0))
    compiled = torch.compile(lambda q, k: _plan("svg", q, k), fullgraph=True)(q, k)
    assert torch.equal(compiled.mask.dense, first.mask.dense) and torch.equal(compiled.perm, first.perm)


def test_svg_temporal_head_keeps_same_position_in_every_frame():
    q, k, _ = _qkv(b=2, h=2)
    state = vidsparse.maskers.get("svg").new_state()
    plan = _plan("svg", q, k, state=state)
    assert state["kinds"][:, 0].logical_not().all() and state["kinds"][:, 1].all()  # head 0 spatial, 1 temporal
    tm = plan.token_mask()
    c = grid_coords(GRID)
    same_pixel = (c[:, None, 1:] == c[None, :, 1:]).all(-1)
    same_frame = c[:, None, 0] == c[None, :, 0]
    assert (tm[:, 1] >= same_pixel).all()  # temporal head: every frame of its own pixel
    assert (tm[:, 0] >= same_frame).all()  # spatial head: its whole frame
    # per-head orders: frame-major for the spatial head, position-major for the temporal one
    assert torch.equal(plan.perm[0, 0], torch.arange(N))
    pm = plan.perm[0, 1]
    assert torch.equal(c[pm][: GRID[0], 0], torch.arange(GRID[0])) and (c[pm][: GRID[0], 1:] == 0).all()


def test_svg_reprofiles_every_n_calls():
    masker = vidsparse.maskers.get("svg")
    q, k, _ = _qkv(b=1, h=2)
    state = masker.new_state()
    _plan("svg", q, k, state=state, profile_every=3)
    state["kinds"] = ~state["kinds"]  # a stale profile is reused until the next re-profile
    flipped = state["kinds"].clone()
    _plan("svg", q, k, state=state, profile_every=3)
    _plan("svg", q, k, state=state, profile_every=3)
    assert torch.equal(state["kinds"], flipped) and state["calls"] == 3
    _plan("svg", q, k, state=state, profile_every=3)
    assert torch.equal(state["kinds"], ~flipped)


def test_svg2_clusters_cover_every_token_once_and_warm_start():
    q, k, _ = _qkv(b=2, h=2)
    masker = vidsparse.maskers.get("svg2")
    state = masker.new_state()
    plan = _plan("svg2", q, k, state=state, iters=5, warm_iters=1)
    assert state["last_iters"] == 5 and not state["warm"]
    for p in (plan.perm, plan.k_perm):  # every token exactly once per (batch, head)
        assert torch.equal(p.sort(-1).values, torch.arange(N).expand(2, 2, N))
    assert not torch.equal(plan.perm, plan.k_perm)
    lab, cent, counts = S2.kmeans(q.reshape(4, N, -1), 6, 5)
    assert counts.sum(-1).eq(N).all() and lab.min() >= 0 and lab.max() < 6
    torch.testing.assert_close(cent[0, lab[0, 0]], q.reshape(4, N, -1)[0][lab[0] == lab[0, 0]].mean(0))
    cached = state["q_centroids"].clone()
    _plan("svg2", q, k, state=state, iters=5, warm_iters=1)
    assert state["last_iters"] == 1 and state["warm"] and state["calls"] == 2
    # the warm call ran one iteration from the cached centroids
    _, expect, _ = S2.kmeans(q.reshape(4, N, -1).float(), 6, 1, cached)
    torch.testing.assert_close(state["q_centroids"], expect)


def test_svg2_more_mass_keeps_more_blocks():
    q, k, _ = _qkv(b=1, h=2)
    dens = [_plan("svg2", q, k, top_p=p, min_fraction=0.0).density() for p in (0.3, 0.6, 0.95)]
    assert dens[0] <= dens[1] <= dens[2] and dens[0] < dens[2]


def test_radial_static_cached_and_denser_near_diagonal():
    q, k, _ = _qkv(b=1, h=1)
    grid = (8, 4, 8)
    o = dict(dense_frames=1, sink_frames=1, decay=1.0, vote=0.5)
    a = _plan("radial", q, k, grid=grid, **o)
    b = _plan("radial", torch.randn_like(q), torch.randn_like(k), grid=grid, **o)
    assert a.mask is b.mask  # cached per shape, independent of q and k
    tm = a.token_mask()[0, 0].float()
    f = 32
    per_d = [torch.stack([tm[t * f:(t + 1) * f, (t + d) * f:(t + d + 1) * f].mean() for t in range(8 - d)]).mean()
             for d in range(1, 8)]
    assert all(x >= y for x, y in zip(per_d, per_d[1:])) and per_d[0] == 1 and per_d[0] > per_d[-1]
    assert (tm[:, :f] == 1).all()  # sink frame


def test_xattention_threshold_monotone_and_antidiagonals():
    q, k, _ = _qkv(b=1, h=2, dtype=torch.float64)
    torch.testing.assert_close(X.antidiagonal_scores(q, k, 8), X.antidiagonal_scores_reference(q, k, 8))
    # one tile by hand: q[rS + a] . k[cS + S - 1 - a]
    r, c, s = 3, 5, 8
    hand = sum(q[0, 0, r * s + a] @ k[0, 0, c * s + s - 1 - a] for a in range(s))
    torch.testing.assert_close(X.antidiagonal_scores(q, k, s)[0, 0, r, c], hand)
    dens = [_plan("xattention", q, k, threshold=t).density() for t in (0.3, 0.6, 0.9, 1.0)]
    assert all(x <= y for x, y in zip(dens, dens[1:])) and dens[-1] == 1.0


def test_vmoba_own_chunk_and_cycle():
    q, k, _ = _qkv(b=1, h=2)
    masker = vidsparse.maskers.get("vmoba")
    state = masker.new_state()
    seen = []
    for _ in range(4):
        plan = _plan("vmoba", q, k, state=state, partition="cycle", topk=0.1)
        seen.append(state["partition"])
        ids = V.chunk_ids(GRID, state["partition"], 1, (4, 4), (2, 4, 4))
        own = ids[:, None] == ids[None, :]
        tm = plan.token_mask()
        blocks_own = torch.zeros_like(tm)  # a query's block keeps the whole own chunk of each of its tokens
        inv = plan.inverse[0, 0]
        for blk in range(N // BQ):
            members = plan.perm[0, 0, blk * BQ:(blk + 1) * BQ]
            blocks_own[:, :, members] |= own[members].any(0)
        assert (tm >= blocks_own).all() and inv.numel() == N
    assert seen == ["1d", "2d", "3d", "1d"]
    assert [_plan("vmoba", q, k, partition="cycle", layer=i).perm is not None for i in range(3)] == [True] * 3


# ------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("method,opts,match", [
    ("svg", dict(bogus=1), "unknown option 'bogus'"),
    ("svg", dict(budget=0.0), "option 'budget'"),
    ("svg", dict(samples=0), "option 'samples'"),
    ("svg2", dict(top_p=1.5), "option 'top_p'"),
    ("svg2", dict(q_clusters=0), "option 'q_clusters'"),
    ("svg2", dict(min_fraction=-0.1), "option 'min_fraction'"),
    ("svg2", dict(kmeans="cuda"), "option 'kmeans'"),
    ("xattention", dict(stride=3), "option 'stride'"),
    ("xattention", dict(stride=64), "option 'stride'"),
    ("xattention", dict(threshold=0), "option 'threshold'"),
    ("radial", dict(dense_frames=-1), "option 'dense_frames'"),
    ("radial", dict(vote=2), "option 'vote'"),
    ("radial", dict(decay=float("nan")), "option 'decay'"),
    ("vmoba", dict(partition="4d"), "option 'partition'"),
    ("vmoba", dict(topk=None), "option 'topk'"),
    ("vmoba", dict(chunk_3d=(2, 4)), "option 'chunk_3d'"),
])
def test_bad_options_name_method_and_option(method, opts, match):
    q, k, _ = _qkv(b=1, h=1)
    with pytest.raises(ValueError, match=f"masker '{method}'.*{match}"):
        _plan(method, q, k, **opts)


@pytest.mark.parametrize("method", ["svg", "radial", "vmoba"])
def test_grid_missing_or_wrong(method):
    q, k, _ = _qkv(b=1, h=1)
    masker = vidsparse.maskers.get(method)
    with pytest.raises(ValueError, match=f"masker '{method}'.*grid"):
        masker(q, k, block_q=BQ, block_k=BK, **OPTIONS[method])
    with pytest.raises(ValueError, match=f"masker '{method}'.*grid"):
        masker(q, k, grid=(4, 8, 9), block_q=BQ, block_k=BK, **OPTIONS[method])


def test_smoke_benchmark_quick_runs(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_maskers.py", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    import json
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"].split()[0] for r in rows} >= set(METHODS) | {"hybrid"}
    assert all(0 <= r["sparsity"] < 1 and r["mask_ms"] > 0 for r in rows)
