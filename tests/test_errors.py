"""Every contract violation of the public API raises a clear error that names the argument."""

import math

import pytest
import torch

from vidsparse import BlockMask, NoBackendError, block_sparse_attention, hybrid_block_mask, sparse_attention
from vidsparse import dispatch


def _qkv(b=1, h=2, lq=64, lk=48, d=16, dtype=torch.float32):
    return torch.randn(b, h, lq, d, dtype=dtype), torch.randn(b, h, lk, d, dtype=dtype), torch.randn(b, h, lk, d, dtype=dtype)


def _full(lq=64, lk=48, b=1, h=1, device=None):
    return BlockMask.full(block_q=32, block_k=16, q_len=lq, k_len=lk, batch=b, heads=h, device=device)


# ------------------------------------------------------------------------------- q, k, v
def test_k_and_v_shapes_must_match():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k and v must have the same shape, got k shape \(1, 2, 48, 16\).*v shape \(1, 2, 40, 16\)"):
        block_sparse_attention(q, k, v[:, :, :40], _full())


@pytest.mark.parametrize(
    "k_shape",
    [(2, 2, 48, 16), (1, 3, 48, 16), (1, 2, 48, 8)],  # batch, heads, head_dim differ from q
)
def test_q_and_k_must_agree_on_batch_heads_head_dim(k_shape):
    q = torch.randn(1, 2, 64, 16)
    k = torch.randn(k_shape)
    with pytest.raises(ValueError, match=r"q and k must agree on batch, heads and head_dim"):
        block_sparse_attention(q, k, k.clone(), _full())
    with pytest.raises(ValueError, match=r"q and k must agree on batch, heads and head_dim"):
        hybrid_block_mask(q, k)


def test_bnhd_shapes_are_read_in_their_layout():
    q = torch.randn(1, 64, 2, 16)
    k = torch.randn(1, 48, 3, 16)  # 3 heads against 2 in BNHD order
    with pytest.raises(ValueError, match=r"q and k must agree.*q \(1, 2, 64, 16\), k \(1, 3, 48, 16\)"):
        block_sparse_attention(q, k, k.clone(), _full(), layout="bnhd")


def test_inputs_must_share_a_device():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q, k, v must be on one device, got q cpu, k meta, v cpu"):
        block_sparse_attention(q, k.to("meta"), v, _full())


def test_inputs_must_share_a_dtype():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"q, k, v must share one dtype, got q torch.float32, k torch.float32, v torch.float64"):
        block_sparse_attention(q, k, v.double(), _full())
    with pytest.raises(TypeError, match="must share one dtype"):
        sparse_attention(q.half(), k, v)


@pytest.mark.parametrize("shape", [(2, 64, 16), (1, 1, 2, 64, 16)])
def test_inputs_must_be_4d(shape):
    _, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"q must be 4-D \(BHND layout\), got {len(shape)}-D tensor"):
        block_sparse_attention(torch.randn(shape), k, v, _full())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_inputs_must_be_floating(dtype):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=rf"k must be a floating tensor .* got {dtype}"):
        block_sparse_attention(q, k.to(dtype), v, _full())


def test_inputs_must_be_tensors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="v must be a torch.Tensor, got list"):
        block_sparse_attention(q, k, v.tolist(), _full())
    with pytest.raises(TypeError, match="q and k must be torch.Tensors"):
        hybrid_block_mask(q.numpy(), k)


def test_empty_sequences_are_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="empty sequence or head_dim"):
        block_sparse_attention(q, k[:, :, :0], v[:, :, :0], _full())


# ---------------------------------------------------------------------------- topk / topp
@pytest.mark.parametrize("name", ["topk", "topp"])
@pytest.mark.parametrize("bad", [0, 0.0, -0.2, 1.5, math.nan, math.inf])
def test_fractions_outside_zero_one(name, bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"{name} must lie in \(0, 1\], got {bad}"):
        sparse_attention(q, k, v, **{name: bad})
    with pytest.raises(ValueError, match=rf"{name} must lie in \(0, 1\]"):
        hybrid_block_mask(q, k, **{name: torch.tensor(bad)})  # 0-d tensors read as floats


@pytest.mark.parametrize("name", ["topk", "topp"])
def test_fraction_tensors(name):
    q, k, _ = _qkv(h=2)
    with pytest.raises(ValueError, match=rf"{name} as a tensor must have shape \(H,\) = \(2,\), got \(3,\)"):
        hybrid_block_mask(q, k, **{name: torch.tensor([0.1, 0.2, 0.3])})
    with pytest.raises(ValueError, match=rf"{name} as a tensor must have shape \(H,\) = \(2,\), got \(1, 2\)"):
        hybrid_block_mask(q, k, **{name: torch.tensor([[0.1, 0.2]])})
    for bad in ([0.1, 0.0], [0.1, 1.01], [math.nan, 0.5], [-0.1, 0.5]):
        with pytest.raises(ValueError, match=rf"{name} values must lie in \(0, 1\]"):
            hybrid_block_mask(q, k, **{name: torch.tensor(bad)})
    with pytest.raises(TypeError, match=rf"{name} tensor must be floating, got torch.int64"):
        hybrid_block_mask(q, k, **{name: torch.tensor([1, 1])})


@pytest.mark.parametrize("bad", ["0.1", True, [0.1]])
def test_fractions_of_the_wrong_type(bad):
    q, k, _ = _qkv()
    with pytest.raises(TypeError, match=r"topk must be a float in \(0, 1\] or a \(H,\) tensor"):
        hybrid_block_mask(q, k, topk=bad)


def test_at_least_one_rule():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="at least one of topk and topp must be given"):
        sparse_attention(q, k, v, topk=None, topp=None)


def test_keep_diagonal_needs_self_attention():
    q, k, _ = _qkv(lq=64, lk=48)
    with pytest.raises(ValueError, match="keep_diagonal needs self-attention \\(q_len == k_len\\), got 64 and 48"):
        hybrid_block_mask(q, k, keep_diagonal=True)


# ------------------------------------------------------------------------------ block sizes
@pytest.mark.parametrize("bad", [8, 48, 100])
def test_block_sizes_must_be_powers_of_two_at_least_16(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"block_q must be a power of two >= 16, got {bad}"):
        sparse_attention(q, k, v, block_q=bad)
    with pytest.raises(ValueError, match=rf"block_k must be a power of two >= 16, got {bad}"):
        hybrid_block_mask(q, k, block_k=bad)


# -------------------------------------------------------------------------------------- mask
def test_mask_must_be_a_vidsparse_blockmask():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="mask must be a vidsparse.BlockMask or MaskPlan, got Tensor"):
        block_sparse_attention(q, k, v, _full().dense)
    with pytest.raises(TypeError, match="mask must be a vidsparse.BlockMask or MaskPlan, got BlockMask"):
        block_sparse_attention(q, k, v, _full().to_flex())  # FlexAttention's own class


@pytest.mark.parametrize("lengths", [(32, 48), (64, 64), (65, 48)])
def test_mask_lengths_must_match(lengths):
    q, k, v = _qkv(lq=64, lk=48)
    lq, lk = lengths
    with pytest.raises(ValueError, match=rf"mask was built for q_len={lq}, k_len={lk} but q has 64 tokens and k has 48"):
        block_sparse_attention(q, k, v, _full(lq, lk))


def test_mask_block_shape_with_other_lengths_is_caught_by_lengths():
    # a mask's block shape is its own; a mask for a different sequence is caught by its lengths
    q, k, v = _qkv(lq=64, lk=48)
    other = BlockMask.full(block_q=64, block_k=64, q_len=128, k_len=48)
    with pytest.raises(ValueError, match="mask was built for q_len=128, k_len=48"):
        block_sparse_attention(q, k, v, other)


@pytest.mark.parametrize("qbh,mbh", [((1, 2), (2, 1)), ((2, 2), (1, 3)), ((2, 2), (3, 2))])
def test_mask_batch_and_heads_must_broadcast(qbh, mbh):
    q, k, v = _qkv(b=qbh[0], h=qbh[1])
    with pytest.raises(
        ValueError,
        match=rf"mask has batch={mbh[0]}, heads={mbh[1]} but q has batch={qbh[0]}, heads={qbh[1]}; the mask's batch "
              rf"must be {'1' if qbh[0] == 1 else f'1 or {qbh[0]}'} and its heads 1 or {qbh[1]}",
    ):
        block_sparse_attention(q, k, v, _full(b=mbh[0], h=mbh[1]))


def test_mask_device_must_match():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="mask is on meta but q is on cpu"):
        block_sparse_attention(q, k, v, _full(device="meta"))


# ------------------------------------------------------------------- layout / backend / scale
@pytest.mark.parametrize("bad", ["bshd", "BHND", None])
def test_bad_layout(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"layout must be one of \('bhnd', 'bnhd'\)"):
        block_sparse_attention(q, k, v, _full(), layout=bad)
    with pytest.raises(ValueError, match="layout must be one of"):
        hybrid_block_mask(q, k, layout=bad)


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", None])
def test_bad_backend_name(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \('triton', 'flex', 'gather', 'reference'\)"):
        block_sparse_attention(q, k, v, _full(), backend=bad)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "0.1", torch.tensor(0.1)])
def test_bad_scale(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale must be a positive finite float"):
        block_sparse_attention(q, k, v, _full(), scale=bad)
    with pytest.raises(ValueError, match="scale must be a positive finite float"):
        hybrid_block_mask(q, k, scale=bad)


# -------------------------------------------------------------------------------- dispatch
def test_no_backend_error_names_the_backend_and_why():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(NoBackendError) as err:
        block_sparse_attention(q, k, v, _full(), backend="triton")
    msg = str(err.value)
    assert msg.startswith("no backend for block-sparse attention with q=(B=1, H=2, N=64, D=16) float64 on cpu, requires_grad=False")
    assert "\n  triton: " in msg and "float64" in msg
    assert isinstance(err.value, NotImplementedError)


def test_no_backend_error_lists_every_backend_tried(monkeypatch):
    from vidsparse.kernels import gather

    monkeypatch.setattr(gather, "not_supported_reasons", lambda *a, **kw: ["disabled for this test"])
    q, k, v = _qkv(dtype=torch.float64)
    q.requires_grad_()
    with pytest.raises(NoBackendError) as err:
        block_sparse_attention(q, k, v, _full())  # auto: triton, then gather
    lines = str(err.value).splitlines()
    assert "requires_grad=True" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == list(dispatch.AUTO_ORDER)
    assert lines[-1] == "  gather: disabled for this test"
    assert "float64" in lines[1]  # triton's own reason


def test_no_backend_error_reports_an_unimportable_backend(monkeypatch):
    monkeypatch.setitem(dispatch.BACKENDS, "flex", "vidsparse.kernels._no_such_backend")
    q, k, v = _qkv()
    with pytest.raises(NoBackendError, match=r"\n  flex: cannot be imported \(No module named 'vidsparse.kernels._no_such_backend'\)"):
        block_sparse_attention(q, k, v, _full(), backend="flex")


def test_flex_reasons_are_listed_on_cpu_backward():
    q, k, v = _qkv()
    k.requires_grad_()
    with pytest.raises(NoBackendError, match=r"\n  flex: FlexAttention has no CPU backward"):
        block_sparse_attention(q, k, v, _full(), backend="flex")


def test_backend_report_describes_each_backend():
    report = dispatch.backend_report("cpu")
    assert set(report) == set(dispatch.BACKENDS)
    assert report["reference"] == report["gather"] == "usable (forward + backward)"
    assert "no CPU backward" in report["flex"]  # the report asks for a backward
    assert report["triton"]  # a reason or "usable": never empty
