"""Input checks shared by the public functions. Every error names the argument and what was expected."""

from __future__ import annotations

import torch

from .mask import BlockMask

LAYOUTS = ("bhnd", "bnhd")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {str(t.dtype).replace('torch.', '')}, {t.device}"


def to_bhnd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate q, k, v and return (B, H, N, D) *views* of them (no copy).

    ``layout="bhnd"``: tensors are (batch, heads, tokens, head_dim); ``"bnhd"``: (batch, tokens,
    heads, head_dim), as diffusers' processors hold them.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({layout.upper()} layout), got {t.dim()}-D tensor of shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if layout == "bnhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {_describe(k)} and v {_describe(v)} (in BHND order)")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "q and k must agree on batch, heads and head_dim (BHND order): "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if q.shape[0] == 0 or q.shape[1] == 0:
        which = "batch" if q.shape[0] == 0 else "heads"
        raise ValueError(f"q, k, v have no {which} (BHND shape {tuple(q.shape)}); batch and heads must be >= 1")
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"empty sequence or head_dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    return q, k, v


def check_mask(mask: BlockMask, q: torch.Tensor, k: torch.Tensor) -> None:
    """``mask`` must match (B, H, Lq, Lk) of q/k in BHND order (B and H may broadcast from 1)."""
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask must be a vidsparse.BlockMask, got {type(mask).__name__}")
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if (mask.q_len, mask.k_len) != (lq, lk):
        raise ValueError(
            f"mask was built for q_len={mask.q_len}, k_len={mask.k_len} but q has {lq} tokens and k has {lk}"
        )
    mb, mh = mask.shape[:2]
    if mb not in (1, b) or mh not in (1, h):
        want = lambda n: "1" if n == 1 else f"1 or {n}"  # noqa: E731
        raise ValueError(
            f"mask has batch={mb}, heads={mh} but q has batch={b}, heads={h}; the mask's batch must be "
            f"{want(b)} and its heads {want(h)} (1 broadcasts)"
        )
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")


def check_fraction(name: str, value, heads: int | None = None, *, allow_none: bool = True):
    """A float in (0, 1], or a (H,) tensor of such values; returns a float or a float32 tensor."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must not be None")
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = float(value)
        else:
            if value.dim() != 1 or (heads is not None and value.shape[0] != heads):
                raise ValueError(f"{name} as a tensor must have shape (H,) = ({heads},), got {tuple(value.shape)}")
            if not torch.is_floating_point(value):
                raise TypeError(f"{name} tensor must be floating, got {value.dtype}")
            # reading the values on the host is a graph break inside torch.compile, once per
            # masker call; there the check is skipped (the settings were checked eagerly when the
            # SparseConfig was built, and eager calls still check every time)
            if not torch.compiler.is_compiling() and bool(((value <= 0) | (value > 1) | value.isnan()).any()):
                raise ValueError(f"{name} values must lie in (0, 1], got {value.tolist()}")
            return value.float()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1] or a (H,) tensor, got {type(value).__name__}")
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {value}")
    return float(value)


def parse_fraction(text: str) -> float | None:
    """A command-line Top-k / Top-p value: "none" (the rule off) -> None, else a float in (0, 1].

    Raises:
        ValueError: saying what was expected (callers prefix the flag's name).
    """
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number in (0, 1] or 'none', got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must lie in (0, 1], got {text}")
    return value

