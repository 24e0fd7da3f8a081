"""Property-based fuzzing of the public API and the masker registry (hypothesis).

* every backend against the reference (outputs, LSE, gradients) over random shapes, dtypes,
  layouts, block sizes, masks with empty rows and columns and broadcast batch/head dims;
* NaN / inf placed inside kept and inside dropped blocks: a dropped block never changes any
  result, a kept one reaches only the rows that keep it;
* every registered masker: its plan through ``block_sparse_attention`` equals plain dense
  attention under ``plan.token_mask()`` (rows with no kept key give 0);
* bad values get a ValueError / TypeError whose message names the argument.

Examples are derandomized and bounded: the counts below are what CI runs (docs/checks.md).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vidsparse
from vidsparse import BlockMask, block_sparse_attention

#: max_examples of each fuzz test (per parametrization).
EXAMPLES = {
    "eager_backends": 24,
    "triton": 6,
    "flex_forward": 6,
    "non_finite": 20,
    "masker": 6,  # per registered masker
    "bad_values": 60,
}
MASKERS = vidsparse.maskers.available()
#: Total examples the suite runs (the masker test runs once per registered masker).
FUZZ_EXAMPLES = sum(EXAMPLES.values()) + EXAMPLES["masker"] * (len(MASKERS) - 1)


def _settings(name):
    return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------ strategies
@st.composite
def problems(draw, *, max_len=256, dims=(8, 16, 32), blocks=(16, 32, 64), dtypes=(torch.float64,)):
    """q, k, v (+ the output gradient), a mask with empty rows/columns, a layout and a scale."""
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    lq, lk = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    d = draw(st.sampled_from(dims))
    bq, bk = draw(st.sampled_from(blocks)), draw(st.sampled_from(blocks))
    mb = draw(st.sampled_from(sorted({1, b})))
    mh = draw(st.sampled_from(sorted({1, h})))
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    dense = torch.rand(mb, mh, nqb, nkb, generator=g) < density
    if draw(st.booleans()):  # an empty query row and an empty key column
        dense[..., draw(st.integers(0, nqb - 1)), :] = False
        dense[..., :, draw(st.integers(0, nkb - 1))] = False
    mask = BlockMask.from_dense(dense, block_q=bq, block_k=bk, q_len=lq, k_len=lk)
    dtype = draw(st.sampled_from(dtypes))
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, h, lk, d, generator=g).to(dtype) for _ in range(2))
    do = torch.randn(b, h, lq, d, generator=g).to(dtype)
    layout = draw(st.sampled_from(["bhnd", "bnhd"]))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    return dict(q=q, k=k, v=v, do=do, mask=mask, layout=layout, scale=scale)


def _layout(t, layout):
    return t.transpose(1, 2) if layout == "bnhd" else t


def _attend(p, backend, *, grad=True, q=None, k=None, v=None, compute=None):
    """(o, lse, dq, dk, dv) in BHND order for problem ``p`` (or overridden tensors)."""
    q, k, v = (p[n] if t is None else t for n, t in (("q", q), ("k", k), ("v", v)))
    do = p["do"]
    if compute is not None:
        q, k, v, do = (t.to(compute) for t in (q, k, v, do))
    ins = [_layout(t.detach().clone(), p["layout"]).requires_grad_(grad) for t in (q, k, v)]
    with torch.set_grad_enabled(grad):
        o, lse = block_sparse_attention(*ins, p["mask"], scale=p["scale"], layout=p["layout"],
                                        return_lse=True, backend=backend)
    if not grad:
        return _layout(o, p["layout"]), lse
    grads = torch.autograd.grad(o, ins, _layout(do, p["layout"]).to(o.dtype))
    return (_layout(o, p["layout"]), lse, *(_layout(g, p["layout"]) for g in grads))


def _rel(a, b):
    """Relative error in the norm; a tensor that is ~0 (e.g. rounding-level gradients) is
    measured against unit-scale entries, the scale of the random inputs."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / (b.norm() + 1e-3 * math.sqrt(max(1, b.numel())))).item()


def _same(results, expected, tol, names=("o", "lse", "dq", "dk", "dv")):
    for name, a, b in zip(names, results, expected):
        assert a.shape == b.shape, name
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), f"{name}: non-finite pattern differs"
        assert torch.equal(a[~fin], b[~fin]) or torch.equal(a[~fin].isnan(), b[~fin].isnan()), name
        assert _rel(a[fin], b[fin]) < tol, f"{name}: rel err {_rel(a[fin], b[fin])}"


# ----------------------------------------------------------------------- backends vs reference
@_settings("eager_backends")
@given(p=problems(dtypes=(torch.float64, torch.float32)))
def test_gather_matches_reference(p):
    _same(_attend(p, "gather"), _attend(p, "reference"), 1e-10 if p["q"].dtype == torch.float64 else 1e-5)


@_settings("triton")
@given(p=problems(max_len=96, dims=(16, 32), blocks=(16, 32), dtypes=(torch.float32, torch.float16)))
def test_triton_matches_reference(p):
    tol = 1e-4 if p["q"].dtype == torch.float32 else 2e-2
    got = _attend(p, "triton")
    assert got[0].dtype == p["q"].dtype
    _same(got, _attend(p, "reference", compute=torch.float32), tol)


@_settings("flex_forward")
@given(p=problems(max_len=128, dtypes=(torch.float32, torch.float64)))
def test_flex_forward_matches_reference(p):
    pytest.importorskip("torch.nn.attention.flex_attention")
    tol = 1e-10 if p["q"].dtype == torch.float64 else 1e-5
    _same(_attend(p, "flex", grad=False), _attend(p, "reference", grad=False), tol, names=("o", "lse"))


# ------------------------------------------------------------------------- NaN / inf isolation
@_settings("non_finite")
@given(p=problems(max_len=80, dims=(8, 16), blocks=(16, 32), dtypes=(torch.float32,)),
       backend=st.sampled_from(["reference", "gather", "triton", "flex"]),
       which=st.sampled_from(["q", "k", "v"]), bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       data=st.data())
def test_non_finite_values_reach_only_rows_that_keep_them(p, backend, which, bad, data):
    b, h = p["q"].shape[:2]
    tm = p["mask"].token_mask().expand(b, h, -1, -1)  # (B, H, Lq, Lk)
    n = p[which].shape[2]
    bi, hi = data.draw(st.integers(0, b - 1)), data.draw(st.integers(0, h - 1))
    tok, ch = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, p["q"].shape[-1] - 1))
    poisoned = p[which].clone()
    poisoned[bi, hi, tok, ch] = bad
    grad = backend != "flex"
    clean = _attend(p, backend, grad=grad)
    dirty = _attend(p, backend, grad=grad, **{which: poisoned})
    # rows that can see the bad entry: its own query row, or the rows that keep its key
    rows_hit = torch.zeros(b, h, tm.shape[2], dtype=torch.bool)
    if which == "q":
        rows_hit[bi, hi, tok] = bool(tm[bi, hi, tok].any())
    else:
        rows_hit[bi, hi] = tm[bi, hi, :, tok]
    safe = ~rows_hit
    # forward: every row that cannot see it is unchanged, bit for bit a function of its kept inputs
    for name, c, d in zip(("o", "lse"), clean[:2], dirty[:2]):
        torch.testing.assert_close(d[safe], c[safe], rtol=1e-5, atol=1e-5, equal_nan=False, msg=name)
    if not rows_hit.any():  # dropped placement: nothing at all may change, gradients included
        for name, c, d in zip(("o", "lse", "dq", "dk", "dv"), clean, dirty):
            torch.testing.assert_close(d, c, rtol=1e-5, atol=1e-5, msg=f"{backend}: {name} changed")
        return
    if grad:
        dq, dk, dv = dirty[2:]
        torch.testing.assert_close(dq[safe], clean[2][safe], rtol=1e-5, atol=1e-5)
        keys_safe = ~(tm & rows_hit[..., None]).any(2)  # keys no affected row keeps
        if which != "q":
            keys_safe[bi, hi, tok] = False
        for c, d in ((clean[3], dk), (clean[4], dv)):
            torch.testing.assert_close(d[keys_safe], c[keys_safe], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- masker registry
def _dense_attention(q, k, v, token_mask, scale):
    """Plain torch: softmax over the kept scores only; a row that keeps nothing gives 0."""
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("name", MASKERS)
@_settings("masker")
@given(data=st.data())
def test_every_masker_plan_equals_dense_attention_under_its_token_mask(name, data):
    masker = vidsparse.maskers.get(name)
    t, hh, ww = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 8)), data.draw(st.integers(2, 8))
    n = t * hh * ww  # self-attention over a (T, H, W) grid, N <= 256
    b, h = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    d = data.draw(st.sampled_from([8, 16, 32]))
    bq, bk = data.draw(st.sampled_from([16, 32, 64])), data.draw(st.sampled_from([16, 32, 64]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    grid = (t, hh, ww)
    plan = masker(q, k, grid=grid, block_q=bq, block_k=bk, state=masker.new_state())
    tm = plan.token_mask().expand(b, h, -1, -1)
    expected = _dense_attention(q, k, v, tm, d**-0.5)
    for backend in ("gather", "reference"):
        o = block_sparse_attention(q, k, v, plan, backend=backend)
        torch.testing.assert_close(o, expected, rtol=1e-9, atol=1e-9, msg=f"{name} via {backend}")


# ---------------------------------------------------------------------------------- bad values
def _qkv(b=1, h=2, n=64, d=16):
    return tuple(torch.randn(b, h, n, d) for _ in range(3))


def _full(**kw):
    return BlockMask.full(**{"block_q": 16, "block_k": 16, "q_len": 64, "k_len": 64, **kw})


def _bsa(**kw):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v, "mask": _full(), **kw}
    pos = [args.pop(n) for n in ("q", "k", "v", "mask")]
    return lambda: block_sparse_attention(*pos, **args)


_BAD_NUMBERS = [-1, 0, 3, 15, 48, 100, 1.5, "16", None, True, float("nan")]
_BAD_SCALES = [0, -1.0, float("nan"), float("inf"), "0.1", True]


@st.composite
def bad_calls(draw):
    """(call, argument name the message must contain, what makes it bad)."""
    kind = draw(st.sampled_from([
        "q type", "k shape", "v dtype", "layout", "backend", "scale", "mask type", "mask lengths",
        "block size", "full dims", "from_dense map", "from_indices range", "masker block", "masker option",
        "masker q",
    ]))
    x = draw(st.sampled_from(_BAD_NUMBERS))
    if kind == "q type":
        bad = draw(st.sampled_from([[1.0], 3.0, "q", None]))
        return _bsa(q=bad), "q"
    if kind == "k shape":
        shape = draw(st.sampled_from([(2, 64, 16), (1, 3, 64, 16), (1, 2, 64, 8), (2, 2, 64, 16), (1, 2, 64, 16, 1)]))
        return _bsa(k=torch.randn(shape)), "k"
    if kind == "v dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.bool, torch.complex64, torch.float64]))
        return _bsa(v=torch.zeros(1, 2, 64, 16, dtype=dtype)), "v"
    if kind == "layout":
        return _bsa(layout=draw(st.sampled_from(["BHND", "nhd", "", 3]))), "layout"
    if kind == "backend":
        return _bsa(backend=draw(st.sampled_from(["cuda", "", "Triton", 1]))), "backend"
    if kind == "scale":
        return _bsa(scale=draw(st.sampled_from(_BAD_SCALES))), "scale"
    if kind == "mask type":
        return _bsa(mask=draw(st.sampled_from([None, torch.ones(4, 4, dtype=torch.bool), "full"]))), "mask"
    if kind == "mask lengths":
        return _bsa(mask=_full(q_len=draw(st.sampled_from([32, 65])))), "mask"
    if kind == "block size":
        arg = draw(st.sampled_from(["block_q", "block_k"]))
        return (lambda: _full(**{arg: x})), arg
    if kind == "full dims":
        arg = draw(st.sampled_from(["batch", "heads", "q_len", "k_len"]))
        return (lambda: _full(**{arg: draw(st.sampled_from([-1, 0, -5, 2.0, None]))})), arg
    if kind == "from_dense map":
        bad = draw(st.sampled_from([torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 4, dtype=torch.bool),
                                    torch.ones(1, 0, 4, 4, dtype=torch.bool), [[True]]]))
        return (lambda: BlockMask.from_dense(bad, block_q=16, block_k=16, q_len=64, k_len=64)), "block"
    if kind == "from_indices range":
        big = draw(st.sampled_from([-1, 4, 2**32 + 1, 2**40]))
        idx = torch.tensor([[[[big]]]], dtype=torch.int64)
        return (lambda: BlockMask.from_indices(idx, torch.ones(1, 1, 1, dtype=torch.int64),
                                               block_q=16, block_k=16, q_len=16, k_len=64)), "kv_indices"
    masker = vidsparse.maskers.get(draw(st.sampled_from(MASKERS)))
    q, k, _ = _qkv()
    if kind == "masker block":
        arg = draw(st.sampled_from(["block_q", "block_k"]))
        return (lambda: masker(q, k, grid=(1, 8, 8), **{arg: x})), arg
    if kind == "masker option":
        return (lambda: masker(q, k, grid=(1, 8, 8), block_q=16, block_k=16, no_such_option=1)), "no_such_option"
    return (lambda: masker(q[0], k, grid=(1, 8, 8), block_q=16, block_k=16)), "q"


@_settings("bad_values")
@given(case=bad_calls())
def test_bad_values_raise_errors_that_name_the_argument(case):
    call, arg = case
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert arg in str(err.value), f"{type(err.value).__name__}: {err.value}"
