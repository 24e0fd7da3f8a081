"""The hybrid Top-k + Top-p masker against an independent NumPy implementation of its rule.

The expected selection is recomputed per row from the pooled probabilities: a stable descending
order (ties: lower key-block index first), the Top-k count max(1, floor(k * NKB)) in exact
integer arithmetic (k is drawn as i/100), and the minimal prefix whose sum reaches p. Where a
prefix sum lies within float32 rounding of p the boundary is ambiguous, and either side passes.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vidsparse
from vidsparse.maskers.hybrid import block_mean, hybrid_block_mask, pooled_block_scores, select_hybrid

_P_TOL = 1e-5  # float32 cumulative sums: a prefix this close to p may land on either side


def _topk_count(k_percent, nkb):
    return max(1, (k_percent * nkb) // 100)


def _expected_rows(probs, k_percent=None, p=None):
    """(B, H, NQB, NKB) probabilities -> (lo, hi, order): the allowed kept counts and the order."""
    probs = probs.double().numpy()
    nkb = probs.shape[-1]
    order = np.argsort(-probs, axis=-1, kind="stable")
    vals = np.take_along_axis(probs, order, axis=-1)
    csum = np.cumsum(vals, axis=-1)
    n_k = _topk_count(k_percent, nkb) if k_percent is not None else 1
    lo = np.full(probs.shape[:-1], n_k)
    hi = np.full(probs.shape[:-1], n_k)
    if p is not None:
        p = np.broadcast_to(np.asarray(p, dtype=np.float64)[None, :, None] if np.ndim(p) else p, lo.shape)
        for idx in np.ndindex(lo.shape):
            if p[idx] >= 1.0:
                lo[idx] = hi[idx] = nkb
                continue
            # minimal prefix reaching p, with the rounding band on both sides
            first_lo = int(np.argmax(csum[idx] >= p[idx] - _P_TOL)) + 1 if (csum[idx] >= p[idx] - _P_TOL).any() else nkb
            first_hi = int(np.argmax(csum[idx] >= p[idx] + _P_TOL)) + 1 if (csum[idx] >= p[idx] + _P_TOL).any() else nkb
            lo[idx], hi[idx] = max(lo[idx], first_lo), max(hi[idx], first_hi)
    return np.minimum(lo, nkb), np.minimum(hi, nkb), order


def _assert_is_expected_prefix(mask_dense, probs, k_percent=None, p=None):
    lo, hi, order = _expected_rows(probs, k_percent, p)
    dense = mask_dense.numpy()
    for idx in np.ndindex(lo.shape):
        n = int(dense[idx].sum())
        assert lo[idx] <= n <= hi[idx], (idx, n, lo[idx], hi[idx])
        expected = np.zeros(dense.shape[-1], dtype=bool)
        expected[order[idx][:n]] = True
        assert (dense[idx] == expected).all(), (idx, dense[idx], expected)


def _qk(b, h, lq, lk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g)


# ---------------------------------------------------------------------------------- pooling
def test_block_mean_pools_tail_over_real_tokens_only():
    x = torch.randn(2, 3, 70, 5)
    got = block_mean(x, 32)
    assert got.shape == (2, 3, 3, 5) and got.dtype == torch.float32
    for i, (a, b) in enumerate([(0, 32), (32, 64), (64, 70)]):
        torch.testing.assert_close(got[:, :, i], x[:, :, a:b].mean(dim=2), rtol=0, atol=1e-6)


def test_pooled_block_scores_by_hand():
    q, k = _qk(1, 2, 40, 50, 8, seed=1)
    got = pooled_block_scores(q, k, block_q=32, block_k=16, scale=0.3)
    for h in range(2):
        qb = [q[0, h, a : a + 32].double().mean(0) for a in (0, 32)]
        kb = [k[0, h, a : a + 16].double().mean(0) for a in (0, 16, 32, 48)]
        for i in range(2):
            s = [float(qb[i] @ kb[j]) * 0.3 for j in range(4)]
            m = max(s)
            e = [math.exp(x - m) for x in s]
            for j in range(4):
                assert got[0, h, i, j].item() == pytest.approx(e[j] / sum(e), abs=1e-6)


# -------------------------------------------------------------------------- the hybrid rule
@pytest.mark.parametrize("k_percent,p", [(3, 20), (10, 50), (25, None), (None, 30), (50, 90), (1, 5)])
def test_hybrid_is_longer_prefix_on_random_rows(k_percent, p):
    q, k = _qk(2, 3, 300, 700, 16, seed=2)
    q = q * 3  # sharper pooled rows, so Top-p and Top-k both matter
    mask = hybrid_block_mask(
        q, k, topk=None if k_percent is None else k_percent / 100, topp=None if p is None else p / 100,
        block_q=64, block_k=32,
    )
    probs = pooled_block_scores(q, k, block_q=64, block_k=32)
    _assert_is_expected_prefix(mask.dense, probs, k_percent, None if p is None else p / 100)


def test_topk_count_exact():
    q, k = _qk(1, 2, 128, 1000, 8, seed=3)
    for k_percent in (1, 3, 7, 13, 50, 99):
        mask = hybrid_block_mask(q, k, topk=k_percent / 100, topp=None, block_q=64, block_k=16)
        nkb = math.ceil(1000 / 16)
        assert mask.kv_counts.unique().tolist() == [_topk_count(k_percent, nkb)]


def test_topk_rounding_of_float32_fractions():
    # float32(0.13) * 900 = 116.99999...; the exact product 117 must not floor to 116
    probs = torch.softmax(torch.randn(1, 2, 3, 900), -1)
    assert select_hybrid(probs, topk=0.13).sum(-1).unique().tolist() == [117]
    per_head = select_hybrid(probs, topk=torch.tensor([0.13, 0.7])).sum(-1)
    assert per_head[0, 0].unique().tolist() == [117] and per_head[0, 1].unique().tolist() == [630]
    assert select_hybrid(torch.softmax(torch.randn(1, 1, 1, 7), -1), topk=0.1).sum().item() == 1  # min one


def test_topp_is_the_minimal_prefix():
    q, k = _qk(2, 2, 256, 640, 16, seed=4)
    q = q * 2
    for p in (0.1, 0.3, 0.6, 0.95):
        mask = hybrid_block_mask(q, k, topk=None, topp=p, block_q=64, block_k=32)
        probs = pooled_block_scores(q, k, block_q=64, block_k=32).double()
        kept_mass = (probs * mask.dense).sum(-1)
        smallest_kept = torch.where(mask.dense, probs, torch.inf).amin(-1)
        assert bool((kept_mass >= p - _P_TOL).all())  # reaches p
        assert bool((kept_mass - smallest_kept < p + _P_TOL).all())  # one block fewer would not
        _assert_is_expected_prefix(mask.dense, probs.float(), None, p)


def test_monotone_in_k_and_in_p():
    q, k = _qk(1, 3, 200, 500, 16, seed=5)
    masks_k = [hybrid_block_mask(q, k, topk=kk, topp=0.2, block_q=32, block_k=32).dense for kk in (0.02, 0.1, 0.3, 0.7)]
    masks_p = [hybrid_block_mask(q, k, topk=0.05, topp=pp, block_q=32, block_k=32).dense for pp in (0.1, 0.4, 0.8, 0.99)]
    for masks in (masks_k, masks_p):
        for small, big in zip(masks, masks[1:]):
            assert bool((small <= big).all())  # subset
        assert masks[-1].sum() > masks[0].sum()  # and the parameters did change something


def test_dense_at_one_for_either_rule_even_with_underflow():
    q, k = _qk(1, 2, 64, 320, 8, seed=6)
    q = q * 1000  # pooled softmax underflows: most block probabilities are exactly 0
    probs = pooled_block_scores(q, k, block_q=32, block_k=16)
    assert bool((probs == 0).any())
    for kw in ({"topk": 1.0, "topp": None}, {"topk": None, "topp": 1.0}, {"topk": 0.01, "topp": 1.0}):
        assert bool(hybrid_block_mask(q, k, block_q=32, block_k=16, **kw).dense.all())


def test_per_head_tensor_parameters():
    q, k = _qk(2, 3, 128, 640, 16, seed=7)
    topk = torch.tensor([0.05, 0.2, 0.5])
    topp = torch.tensor([0.9, 0.1, 0.3])
    mask = hybrid_block_mask(q, k, topk=topk, topp=topp, block_q=32, block_k=32)
    probs = pooled_block_scores(q, k, block_q=32, block_k=32)
    for h, (kp, pp) in enumerate([(5, 0.9), (20, 0.1), (50, 0.3)]):
        _assert_is_expected_prefix(mask.dense[:, h : h + 1], probs[:, h : h + 1], kp, pp)
        # and the same as the scalar call for that head
        single = hybrid_block_mask(q[:, h : h + 1], k[:, h : h + 1], topk=kp / 100, topp=pp, block_q=32, block_k=32)
        assert torch.equal(single.dense, mask.dense[:, h : h + 1])


# ---------------------------------------------------------------------------- adversarial rows
def test_exact_ties_break_by_lower_index():
    # 8 identical key blocks: every pooled probability is exactly 1/8
    q = torch.randn(1, 1, 32, 4)
    k = torch.randn(1, 1, 16, 4).repeat(1, 1, 8, 1)
    probs = pooled_block_scores(q, k, block_q=32, block_k=16)
    assert bool((probs == 0.125).all())
    cases = [((0.25, None), 2), ((None, 0.5), 4), ((0.25, 0.5), 4), ((0.75, 0.5), 6), ((None, 0.51), 5)]
    for (kk, pp), n in cases:
        mask = hybrid_block_mask(q, k, topk=kk, topp=pp, block_q=32, block_k=16)
        assert mask.dense[0, 0, 0].tolist() == [True] * n + [False] * (8 - n), (kk, pp)


def test_near_uniform_rows_need_many_blocks_under_topp():
    q = torch.randn(1, 1, 64, 8) * 1e-3  # near-zero pooled query: a nearly flat row
    k = torch.randn(1, 1, 64 * 40, 8)
    probs = pooled_block_scores(q, k, block_q=64, block_k=64)
    assert float(probs.max() - probs.min()) < 1e-4
    mask = hybrid_block_mask(q, k, topk=0.03, topp=0.5, block_q=64, block_k=64)
    # Top-k alone gives 1 block; half the mass of a flat 40-block row needs about 20
    assert 19 <= mask.kv_counts.item() <= 21
    _assert_is_expected_prefix(mask.dense, probs, 3, 0.5)


def test_dominant_sink_block():
    d = 8
    q = torch.zeros(1, 1, 64, d)
    q[..., 0] = 4.0
    k = torch.randn(1, 1, 16 * 20, d) * 0.1
    k[:, :, :16, 0] = 6.0  # key block 0 aligns with every query: an attention sink
    probs = pooled_block_scores(q, k, block_q=64, block_k=16)
    assert probs[0, 0, 0, 0] > 0.99
    assert hybrid_block_mask(q, k, topk=None, topp=0.9, block_q=64, block_k=16).dense[0, 0, 0].nonzero().flatten().tolist() == [0]
    hyb = hybrid_block_mask(q, k, topk=0.2, topp=0.9, block_q=64, block_k=16)
    assert hyb.kv_counts.item() == 4 and bool(hyb.dense[0, 0, 0, 0])
    _assert_is_expected_prefix(hyb.dense, probs, 20, 0.9)


def test_paper_worked_example_row():
    # sink 0.6, then 0.2, 0.1, ...: Top-p at p = 0.6 stops at the sink alone
    row = torch.tensor([0.6, 0.2, 0.1, 0.04, 0.02, 0.01, 0.01, 0.01, 0.005, 0.005])
    probs = row[None, None, None]
    assert select_hybrid(probs, topp=0.6)[0, 0, 0].tolist() == [True] + [False] * 9
    hyb = select_hybrid(probs, topk=0.3, topp=0.6)[0, 0, 0]
    assert hyb.tolist() == [True, True, True] + [False] * 7  # k * NKB = 3 blocks, not 1
    # the same through the whole masker: pooled scores log(row) give back softmax = row
    d = 4
    q = torch.zeros(1, 1, 32, d)
    q[..., 0] = d ** 0.5  # with scale 1/sqrt(d), pooled score j = key-block value j
    k = torch.zeros(1, 1, 16 * 10, d)
    k[..., 0] = row.log().repeat_interleave(16)
    mask = hybrid_block_mask(q, k, topk=0.3, topp=0.55, block_q=32, block_k=16)
    assert mask.dense[0, 0, 0].tolist() == [True, True, True] + [False] * 7
    assert hybrid_block_mask(q, k, topk=None, topp=0.55, block_q=32, block_k=16).kv_counts.item() == 1


# ------------------------------------------------------------------------- shapes and options
def test_batch_rows_are_independent():
    q, k = _qk(3, 2, 100, 260, 8, seed=8)
    mask = hybrid_block_mask(q, k, topk=0.1, topp=0.4, block_q=32, block_k=16)
    for b in range(3):
        one = hybrid_block_mask(q[b : b + 1], k[b : b + 1], topk=0.1, topp=0.4, block_q=32, block_k=16)
        assert torch.equal(one.dense, mask.dense[b : b + 1])
    assert not torch.equal(mask.dense[0], mask.dense[1])  # the batch elements really differ


def test_layout_bnhd_equals_bhnd():
    q, k = _qk(2, 3, 90, 150, 8, seed=9)
    a = hybrid_block_mask(q, k, topk=0.1, topp=0.3, block_q=32, block_k=16)
    b = hybrid_block_mask(q.transpose(1, 2), k.transpose(1, 2), topk=0.1, topp=0.3, block_q=32, block_k=16, layout="bnhd")
    assert torch.equal(a.dense, b.dense)
    assert (b.q_len, b.k_len) == (90, 150)


def test_keep_diagonal_adds_overlapping_key_blocks():
    q, k = _qk(1, 2, 100, 100, 8, seed=10)
    base = hybrid_block_mask(q, k, topk=0.01, topp=0.05, block_q=32, block_k=16)
    diag = hybrid_block_mask(q, k, topk=0.01, topp=0.05, block_q=32, block_k=16, keep_diagonal=True)
    expected = base.dense.clone()
    for i in range(4):
        q_tokens = set(range(32 * i, min(32 * i + 32, 100)))
        for j in range(7):
            if q_tokens & set(range(16 * j, min(16 * j + 16, 100))):
                expected[..., i, j] = True
    assert torch.equal(diag.dense, expected)
    assert diag.dense.sum() > base.dense.sum()


def test_keep_sink_adds_first_key_block():
    q, k = _qk(2, 2, 64, 400, 8, seed=11)
    k[:, :, :16] = -k[:, :, :16]  # make block 0 unlikely to be chosen on its own
    base = hybrid_block_mask(q, k, topk=0.05, topp=0.1, block_q=32, block_k=16)
    sink = hybrid_block_mask(q, k, topk=0.05, topp=0.1, block_q=32, block_k=16, keep_sink=True)
    assert bool(sink.dense[..., 0].all())
    assert torch.equal(sink.dense[..., 1:], base.dense[..., 1:])
    assert not bool(base.dense[..., 0].all())


def test_no_gradient_flows_through_the_mask():
    q, k = _qk(1, 2, 64, 128, 8, seed=12)
    q.requires_grad_()
    k.requires_grad_()
    mask = hybrid_block_mask(q, k, topk=0.2, topp=0.3, block_q=32, block_k=16)
    assert not mask.dense.requires_grad and mask.dense.grad_fn is None
    assert q.grad is None and k.grad is None


def test_sparse_attention_mask_matches_masker():
    q, k = _qk(1, 2, 70, 90, 8, seed=13)
    v = torch.randn_like(k)
    _, plan = vidsparse.sparse_attention(q, k, v, topk=0.2, topp=0.3, block_q=32, block_k=16, return_plan=True)
    assert plan.perm is None
    assert torch.equal(plan.mask.dense, hybrid_block_mask(q, k, topk=0.2, topp=0.3, block_q=32, block_k=16).dense)


# ------------------------------------------------------------------------------------ property
@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    lq=st.integers(1, 200),
    lk=st.integers(1, 300),
    d=st.sampled_from([4, 8, 16]),
    block_q=st.sampled_from([16, 32, 64]),
    block_k=st.sampled_from([16, 32]),
    k_percent=st.one_of(st.none(), st.integers(1, 100)),
    p_percent=st.integers(1, 100),
    use_p=st.booleans(),
    sharp=st.sampled_from([0.1, 1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_hybrid_property(b, h, lq, lk, d, block_q, block_k, k_percent, p_percent, use_p, sharp, seed):
    if k_percent is None:
        use_p = True
    p = p_percent / 100 if use_p else None
    q, k = _qk(b, h, lq, lk, d, seed=seed)
    q = q * sharp
    mask = hybrid_block_mask(
        q, k, topk=None if k_percent is None else k_percent / 100, topp=p, block_q=block_q, block_k=block_k
    )
    assert mask.shape == (b, h, -(-lq // block_q), -(-lk // block_k))
    probs = pooled_block_scores(q, k, block_q=block_q, block_k=block_k)
    _assert_is_expected_prefix(mask.dense, probs, k_percent, p)
