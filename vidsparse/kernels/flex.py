"""FlexAttention backend: block-sparse attention through ``torch.nn.attention.flex_attention``.

Opt-in only (``backend="flex"``; "auto" never picks it, see :mod:`vidsparse.dispatch`). The mask
goes through :meth:`vidsparse.BlockMask.to_flex`: kept blocks become FlexAttention "full" blocks
plus a ``mask_mod`` that looks the block map up per token, so both of FlexAttention's execution
paths see the same kept set.

How it runs, per device (measured with torch 2.13 on a 2-core CPU; the CUDA path is the same code
as on the GPU machines' torch 2.11 but was not timed here):

* **CUDA**: ``torch.compile(flex_attention)``, compiled once per process and cached in this
  module; Inductor generates a fused Triton kernel that visits only the kept blocks, forward and
  backward. Each new (shape, dtype) compiles again (torch.compile's own cache and recompile rules).
* **CPU**: *eager* ``flex_attention``, forward only. Compiled CPU FlexAttention cannot return the
  log-sum-exp ("torch.compile on CPU only supports inference and `return_lse` is not supported
  yet", torch 2.13), and every backend must return it. Eager FlexAttention is unfused: it
  materialises the (B, H, Lq, Lk) score matrix, like dense SDPA, and costs about 1.8 s on the first
  call in a process (Dynamo traces it), 0.1-0.5 s for each new shape, ~0.01 s at small shapes after
  that. Compiling on CPU (no LSE) cost 6.5-8 s per new shape cold. So on CPU this backend is a
  cross-check of the mask conversion against the reference, not a fast path.

Non-finite values: a dropped block never influences a result. Compiled kernels never visit dropped
blocks; the eager CPU path scores every pair and replaces dropped scores through ``mask_mod``
(a select, so NaN in a dropped q or k is harmless), and adds the non-finite *values* of v to the
rows that keep them itself (see ``_add_nonfinite_values``).

The LSE comes back in natural log: FlexAttention's kernels keep base-2 statistics but its public
function rescales them by ln 2 before returning (torch >= 2.5); the tests compare it with the
reference's natural-log LSE.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import warnings

import torch

from ..mask import BlockMask

name = "flex"

_compiled_flex = None  # torch.compile(flex_attention), built on the first CUDA call


@functools.lru_cache(maxsize=None)
def _flex_module():
    """The FlexAttention module, or None when this torch has none (or too old a one)."""
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError:
        return None
    # BlockMask.to_flex passes seq_lengths, which is what makes partial tail blocks correct
    if "seq_lengths" not in inspect.signature(fa.BlockMask.from_kv_blocks).parameters:
        return None
    return fa


def not_supported_reasons(q, k, v, mask, *, needs_grad: bool, explicit: bool) -> list[str]:
    reasons = []
    fa = _flex_module()
    if fa is None:
        reasons.append(f"torch {torch.__version__} has no usable FlexAttention (BlockMask.from_kv_blocks with seq_lengths)")
    elif not torch._dynamo.is_dynamo_supported():
        reasons.append("FlexAttention needs TorchDynamo, which this Python/torch build does not support")
    device = q.device.type
    if device == "cpu":
        if needs_grad:
            reasons.append(
                "FlexAttention has no CPU backward (inputs require grad); use backend='reference' "
                "or run under torch.no_grad()"
            )
    elif device == "cuda":
        if q.dtype == torch.float64:
            reasons.append("float64 is not supported by the compiled FlexAttention CUDA kernels; use backend='reference'")
        if q.shape[-1] < 16:
            reasons.append(f"compiled FlexAttention on CUDA needs head_dim >= 16, got {q.shape[-1]}")
        if needs_grad and q.dtype in (torch.float16, torch.bfloat16) and mask.block_q != mask.block_k:
            # seen on an H100 with torch 2.11: Inductor finds no backward kernel for a 128x64 mask
            # ("NoValidChoicesError ... flex_attention_backward"), even with divisible tile sizes
            reasons.append(
                f"FlexAttention's 16-bit backward does not compile for non-square mask blocks "
                f"({mask.block_q}x{mask.block_k}) on torch {torch.__version__}; use backend='triton'"
            )
        if importlib.util.find_spec("triton") is None:
            reasons.append("compiled FlexAttention on CUDA needs Triton, which is not installed")
    else:
        reasons.append(f"FlexAttention runs on CPU and CUDA only, got {q.device}")
    return reasons


def _lse_request(fa) -> dict:
    # return_aux=AuxRequest(lse=True) replaced the deprecated return_lse=True (torch >= 2.9);
    # older torch only has the latter
    if hasattr(fa, "AuxRequest"):
        return {"return_aux": fa.AuxRequest(lse=True)}
    return {"return_lse": True}


def _unpack(result):
    out, aux = result
    return out, (aux.lse if hasattr(aux, "lse") else aux)


def kernel_options(mask: BlockMask) -> dict:
    """Tile sizes for compiled FlexAttention that divide the mask's blocks.

    Inductor's defaults on Hopper (e.g. 128-key tiles) do not divide a 64-key mask block, and
    torch 2.11 then fails with "Q and KV block size must be divisible by BLOCK_M and BLOCK_N"
    (forward) or "NoValidChoicesError" (backward) for a 128x64 mask.
    """
    bm, bn = min(mask.block_q, 128), min(mask.block_k, 64)
    bwd = min(mask.block_q, mask.block_k, 64)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_M1": bwd, "BLOCK_N1": bwd, "BLOCK_M2": bwd, "BLOCK_N2": bwd}


def attention(q, k, v, mask: BlockMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on (B, H, N, D) tensors; returns (o (B, H, Lq, D), lse (B, H, Lq))."""
    global _compiled_flex
    fa = _flex_module()
    block_mask = mask.to_flex()
    kwargs = dict(block_mask=block_mask, scale=scale, **_lse_request(fa))
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(fa.flex_attention)
        o, lse = _unpack(_compiled_flex(q, k, v, kernel_options=kernel_options(mask), **kwargs))
    else:
        # flex_attention rejects CPU inputs that require grad even under no_grad; the dispatcher
        # only sends CPU work here when no backward is needed, so detaching loses nothing
        q, k, v = q.detach(), k.detach(), v.detach()
        v_bad = ~torch.isfinite(v)
        has_bad = bool(v_bad.any())
        with warnings.catch_warnings():
            # eager use is deliberate on CPU (see the module docstring); silence the advice
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            warnings.filterwarnings("ignore", message="return_lse is deprecated")
            o, lse = _unpack(fa.flex_attention(q, k, v.masked_fill(v_bad, 0) if has_bad else v, **kwargs))
        if has_bad:
            o = _add_nonfinite_values(o, lse, q, k, v, v_bad, mask, scale)
    # the LSE carries no gradient in vidsparse's contract (as in the reference backend)
    lse = lse.detach()
    return o, (lse if lse.dtype == torch.float64 else lse.float())  # float64 only for float64 inputs


def _add_nonfinite_values(o, lse, q, k, v, v_bad, mask: BlockMask, scale: float) -> torch.Tensor:
    """Eager FlexAttention multiplies the whole (Lq, Lk) probability matrix by v, so a NaN/inf
    value of a *dropped* key would reach every row (0 * nan = nan). The call above ran with those
    entries zeroed; here each non-finite value is added back to the rows that keep its key only,
    as ``p[i, j] * v[j, d]`` (selected with ``where``, never multiplied by a zero p)."""
    cols = v_bad.flatten(0, 1).any(0).any(-1).nonzero().flatten()  # keys with a bad value anywhere
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h = q.shape[:2]
    dense = mask.dense.expand(b, h, -1, -1)
    rows = torch.arange(q.shape[2], device=q.device) // mask.block_q
    kept = dense[:, :, rows][:, :, :, cols // mask.block_k]  # (B, H, Lq, J)
    s = (q.to(cdt) @ k[:, :, cols].to(cdt).transpose(-1, -2)) * scale
    p = torch.exp(s - lse.to(cdt)[..., None])  # (B, H, Lq, J)
    vj, bad = v[:, :, cols].to(cdt), v_bad[:, :, cols]  # (B, H, J, D)
    terms = p[..., None] * vj[:, :, None]  # (B, H, Lq, J, D)
    terms = torch.where(kept[..., None] & bad[:, :, None], terms, torch.zeros((), dtype=cdt))
    return (o.to(cdt) + terms.sum(-2)).to(o.dtype)
