"""Sparse VideoGen's per-head spatial / temporal patterns (SVG, arXiv 2502.01776) as a masker.

Every (batch, head) is labelled *spatial* or *temporal* by which pattern loses less attention on
a few sampled query rows, then runs in the token order that makes its pattern dense blocks:

* **spatial**: a query at frame t attends every key of frames t' with ``|t - t'| <= rt`` (its own
  frame for rt = 0); token order frame-major (the raster order, t then h then w);
* **temporal**: a query at pixel p = h * W + w attends the keys of pixels ``|p - p'| <= rp`` in every
  frame (rp = 0: exactly the same position across all frames); token order position-major (all
  frames of one pixel adjacent, pixels in raster order).

One option sets both radii: ``budget`` is the fraction of keys each query's pattern covers,
``rt = max(0, round((budget * T - 1) / 2))`` and ``rp = max(0, round((budget * H * W - 1) / 2))``
(0.05 on Wan 480p (21, 30, 52): rt = 0, the own frame, 4.8% of keys; rp = 38, 77 pixels in all
frames, 4.9%). In each order the pattern is a band over contiguous groups (frames or pixels), so a
(query block, key block) pair is kept exactly when it holds a (query, key) pair of the pattern.

Profiling: ``samples`` query rows at evenly spaced positions of the sequence (SVG samples them at
random), their exact attention over all keys (softmax of q.k / sqrt(D)), and each pattern's error
= the attention mass it drops, averaged over the rows (the L1 distance between the exact row and
the pattern's renormalised row is twice that mass; SVG uses the MSE of the attention output, which
needs V, which a masker does not see). The lower error wins; ties go to spatial. With a ``state``
the labels are kept and the heads re-profiled every ``profile_every`` calls (and whenever batch or
heads change); without one, every call profiles.

The plan's ``perm`` is per (batch, head): the frame-major or the position-major order. The base
``token_order`` option therefore has no effect on the kept tokens (the method picks its own order).

Options: ``budget`` (0.05), ``samples`` (64), ``profile_every`` (1). Sparsity is set by ``budget``:
block sparsity is about ``1 - budget`` minus the blocks straddling group borders. Wan 480p, 128 x 64
blocks: budget 0.05 gives 94.7% (spatial heads) / 94.6% (temporal); 0.1 gives 85.7% / 89.7% (the
frame radius moves in whole frames: rt = 1 is three frames); 0.2 gives 77.1% / 80.4%.
"""

from __future__ import annotations

import functools
import math

import torch

from ..mask import BlockMask, num_blocks
from ..plan import MaskPlan
from .registry import Masker, register
from .groups import group_block_mask, raster_to_seen, work_dtype
from .token_order import grid_coords

__all__ = ["svg_radii", "svg_orders", "profile_heads", "svg_reference", "svg_plan", "SVGMasker"]


def svg_radii(grid, budget: float) -> tuple[int, int]:
    """(rt, rp): the frame radius of the spatial pattern and the pixel radius of the temporal one."""
    t, h, w = grid
    return max(0, round((budget * t - 1) / 2)), max(0, round((budget * h * w - 1) / 2))


def svg_orders(grid, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raster indices of the frame-major and position-major orders, and the group of each position.

    Returns:
        (spatial_perm, spatial_groups, temporal_perm, temporal_groups), each (N,) int64: the raster
        token at each position of the order, and its frame (spatial) or pixel (temporal).
    """
    t, h, w = grid
    n = t * h * w
    raster = torch.arange(n, device=device)
    frame, pixel = raster // (h * w), raster % (h * w)
    temporal = torch.argsort(pixel * t + frame)
    return raster, frame, temporal, pixel[temporal]


def _sample_rows(n: int, samples: int, device) -> torch.Tensor:
    return torch.linspace(0, n - 1, min(samples, n), device=device).round().long()


def _coords(grid, positions, device):
    c = grid_coords(grid, device)
    if positions is not None:
        c = c[positions]
    return c[:, 0], c[:, 1] * grid[2] + c[:, 2]  # frame and pixel of each token seen


def profile_heads(q, k, grid, positions, *, budget: float, samples: int) -> torch.Tensor:
    """(B, H) bool: True for heads whose temporal pattern drops less sampled attention mass."""
    rt, rp = svg_radii(grid, budget)
    frame, pixel = _coords(grid, positions, q.device)
    rows = _sample_rows(q.shape[2], samples, q.device)
    wd = work_dtype(q)
    probs = torch.softmax(q[:, :, rows].to(wd) @ k.to(wd).transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    spatial = (frame[None, :] - frame[rows, None]).abs() <= rt  # (S, N)
    temporal = (pixel[None, :] - pixel[rows, None]).abs() <= rp
    lost_s = 1 - (probs * spatial).sum(-1).mean(-1)
    lost_t = 1 - (probs * temporal).sum(-1).mean(-1)
    return lost_t < lost_s


@functools.lru_cache(maxsize=16)
def _pattern_blocks(grid, rt: int, rp: int, block_q: int, block_k: int, device: torch.device):
    """The two candidate block maps (1, 1, NQB, NKB) and raster orders (N,): fixed by the grid and
    radii, so built once per shape rather than every call (they were most of the plan's cost).
    Callers must not modify them."""
    s_perm, s_groups, t_perm, t_groups = svg_orders(grid, device)
    t_, hh, ww = grid
    frames, pixels = torch.arange(t_, device=device), torch.arange(hh * ww, device=device)
    keep_s = (frames[:, None] - frames[None, :]).abs() <= rt
    keep_t = (pixels[:, None] - pixels[None, :]).abs() <= rp
    blocks = lambda g, keep: group_block_mask(g[None, None], g[None, None], keep[None, None],  # noqa: E731
                                              block_q=block_q, block_k=block_k)
    return blocks(s_groups, keep_s), blocks(t_groups, keep_t), s_perm, t_perm


def svg_plan(q, k, grid, positions, *, budget, samples, block_q, block_k, kinds=None) -> tuple[MaskPlan, torch.Tensor]:
    """The batched path. ``kinds`` (B, H) bool reuses a profile. Returns (plan, kinds)."""
    n = q.shape[2]
    if kinds is None:
        kinds = profile_heads(q, k, grid, positions, budget=budget, samples=samples)
    rt, rp = svg_radii(grid, budget)
    # dynamo traces the builder itself (it cannot trace the cache)
    build = _pattern_blocks.__wrapped__ if torch.compiler.is_compiling() else _pattern_blocks
    m_s, m_t, s_perm, t_perm = build(tuple(grid), rt, rp, block_q, block_k, q.device)
    dense = torch.where(kinds[..., None, None], m_t, m_s)
    perm = torch.where(kinds[..., None], raster_to_seen(t_perm, positions), raster_to_seen(s_perm, positions))
    mask = BlockMask.from_dense(dense, block_q=block_q, block_k=block_k, q_len=n, k_len=n)
    return MaskPlan(mask, perm, _checked=True), kinds


def svg_reference(q, k, grid, positions=None, *, budget, samples, block_q, block_k):
    """Eager oracle, one (batch, head) and one sampled row at a time.

    Returns (kinds (B, H) bool, dense (B, H, NQB, NKB), perm (B, H, N)).
    """
    b, h, n, d = q.shape
    t_, hh, ww = grid
    rt, rp = svg_radii(grid, budget)
    coords = grid_coords(grid)
    seen = coords if positions is None else coords[positions]
    raster_pos = torch.arange(n) if positions is None else positions
    seen_of_raster = torch.empty(n, dtype=torch.long)
    seen_of_raster[raster_pos] = torch.arange(n)
    rows = _sample_rows(n, samples, "cpu")
    kinds = torch.zeros(b, h, dtype=torch.bool)
    dense = torch.zeros(b, h, num_blocks(n, block_q), num_blocks(n, block_k), dtype=torch.bool)
    perm = torch.empty(b, h, n, dtype=torch.long)
    wd = work_dtype(q)
    for bi in range(b):
        for hi in range(h):
            lost = {"spatial": 0.0, "temporal": 0.0}
            for r in rows.tolist():
                p = torch.softmax(k[bi, hi].to(wd) @ q[bi, hi, r].to(wd) / math.sqrt(d), dim=0)
                tq, yq, xq = seen[r].tolist()
                for j in range(n):
                    tk, yk, xk = seen[j].tolist()
                    if abs(tk - tq) > rt:
                        lost["spatial"] += p[j].item()
                    if abs((yk * ww + xk) - (yq * ww + xq)) > rp:
                        lost["temporal"] += p[j].item()
            temporal = lost["temporal"] < lost["spatial"]
            kinds[bi, hi] = temporal
            # the head's order: raster indices sorted frame-major or position-major
            order = sorted(range(n), key=lambda i: ((coords[i, 1] * ww + coords[i, 2]).item(), coords[i, 0].item())
                           if temporal else i)
            perm[bi, hi] = seen_of_raster[torch.tensor(order)]
            c = coords[torch.tensor(order)]
            if temporal:
                g = c[:, 1] * ww + c[:, 2]
                tok = (g[:, None] - g[None, :]).abs() <= rp
            else:
                tok = (c[:, 0][:, None] - c[:, 0][None, :]).abs() <= rt
            for i in range(dense.shape[2]):
                for j in range(dense.shape[3]):
                    dense[bi, hi, i, j] = tok[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].any()
    return kinds, dense, perm


@register("svg")
class SVGMasker(Masker):
    """SVG's per-head spatial / temporal choice with per-head token orders (see the module docstring)."""

    defaults = {"budget": 0.05, "samples": 64, "profile_every": 1}
    needs_grid = True
    density_option, density_bounds = "budget", (1e-3, 1.0)

    def validate(self, options, heads):
        o = dict(options)
        bud = o["budget"]
        if isinstance(bud, bool) or not isinstance(bud, (int, float)) or not math.isfinite(bud) or not 0 < bud <= 1:
            raise ValueError(f"masker 'svg': option 'budget' must be a float in (0, 1], got {bud!r}")
        o["budget"] = float(bud)
        for name in ("samples", "profile_every"):
            v = o[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"masker 'svg': option {name!r} must be an int >= 1, got {v!r}")
        return o

    def new_state(self) -> dict:
        return {}

    def build(self, q, k, *, block_q, block_k, grid, positions, state, budget, samples, profile_every):
        kinds = None
        if state is not None:
            calls = state.get("calls", 0)
            cached = state.get("kinds")
            if (cached is not None and cached.shape == q.shape[:2] and cached.device == q.device
                    and calls % profile_every != 0):
                kinds = cached
        plan, kinds = svg_plan(q, k, grid, positions, budget=budget, samples=samples, block_q=block_q,
                               block_k=block_k, kinds=kinds)
        if state is not None:
            state["kinds"] = kinds
            state["calls"] = state.get("calls", 0) + 1
        return plan
