"""Radial attention's static energy-decay mask (arXiv 2506.19852) as a masker.

The mask depends on the latent grid (T, H, W) only, never on q and k. With F = H * W tokens per
frame, a query at frame t and in-frame raster index s, a key at frame t' and index s', and the
temporal distance d = |t - t'|, the token pair is kept when

* ``d <= dense_frames`` (the query's own frame and its neighbours: dense), or
* ``t' < sink_frames`` (the first frame(s) as an attention sink, for every query), or
* the spatial band of distance d holds it: with ``level = floor(log2 d)`` the band width is
  ``w = decay * F / 2**level`` (it halves each time the distance doubles) and the pair is kept when
  ``|s - s'| <= w / 2``. When ``w`` is narrower than one key block, a band of ``block_k`` tokens is
  kept instead but only for every n-th distance, ``d % n == 0`` with ``n = ceil(block_k / w)``, so the
  density averaged over distances keeps decaying (``decay = 0``: no bands at all).

The token mask is reduced to blocks by a density vote: a block pair is kept when the fraction of
its (real) token pairs that are kept is at least ``vote`` (or any of them, ``vote="any"``); a query
block the vote leaves empty keeps its densest key blocks. The mask is computed in the token order
the masker sees (raster or tiled), in chunks of query blocks (no N x N tensor), once per (grid,
order, block sizes, options, device), and cached in a small module-level LRU: every call with the
same shape returns the same mask object. The plan broadcasts over batch and heads (B = H = 1).

Departures from Radial Attention: its band is defined per frame pair on 128-token blocks of its
FlashInfer layout; here it is a token-level rule voted into any block shape, with the sink frame
count and the vote as options. Text tokens are the integration's business (kept dense).

Options: ``dense_frames`` (1), ``sink_frames`` (1), ``decay`` (1.0), ``vote`` (0.5 or "any").
Sparsity: lower ``decay`` thins the bands; ``dense_frames`` and ``sink_frames`` set the floor
(Wan 480p, 21 frames: the defaults keep about 40% of the blocks; 90% needs ``dense_frames=0``,
``sink_frames=0`` or 1 and a small decay; 95% needs ``dense_frames=0, sink_frames=0`` and
``decay`` near 0, since the own frame alone is 1/21 of the keys).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from ..mask import BlockMask, num_blocks
from ..plan import MaskPlan
from .registry import Masker, register
from .token_order import grid_coords

__all__ = ["radius_table", "radial_token_mask", "radial_block_mask", "radial_reference", "RadialMasker"]

_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 16


def radius_table(t: int, frame_size: int, *, dense_frames: int, sink_frames: int, decay: float,
                 block_k: int) -> torch.Tensor:
    """(T, T) float64: a (query frame, key frame) pair keeps the token pairs with |s - s'| <= R.

    R is inf for dense pairs (near frames, sink frames), -1 for dropped ones, else the band's half
    width (see the module docstring).
    """
    tq = torch.arange(t)[:, None]
    tk = torch.arange(t)[None, :]
    d = (tq - tk).abs()
    level = torch.floor(torch.log2(d.clamp(min=1).double()))
    width = decay * frame_size / torch.exp2(level)
    n = torch.ceil(block_k / width.clamp(min=1e-300)).clamp(max=2.0 ** 62).long()
    narrow = torch.where((width > 0) & (d % n == 0), block_k / 2, -1.0)
    radius = torch.where(width >= block_k, width / 2, narrow).floor()  # in-frame distances are integers
    dense = (d <= dense_frames) | (tk < sink_frames)
    return torch.where(dense, torch.tensor(float("inf"), dtype=torch.float64), radius)


def radial_token_mask(tq: torch.Tensor, sq: torch.Tensor, tk: torch.Tensor, sk: torch.Tensor,
                      radius: torch.Tensor) -> torch.Tensor:
    """(len(tq), len(tk)) bool token mask from the frames (t), in-frame indices (s) and the radius table."""
    t = radius.shape[0]
    r = radius.to(torch.float32).flatten()[tq[:, None] * t + tk[None, :]]
    return (sq[:, None] - sk[None, :]).abs() <= r


def _vote(counts: torch.Tensor, sizes: torch.Tensor, vote) -> torch.Tensor:
    dens = counts / sizes
    keep = counts > 0 if vote == "any" else dens >= vote - 1e-12
    rowmax = dens.amax(-1, keepdim=True)
    empty = ~keep.any(-1, keepdim=True)
    return keep | (empty & (dens == rowmax) & (rowmax > 0))


def _block_sizes(length: int, block: int, device) -> torch.Tensor:
    n = num_blocks(length, block)
    sizes = torch.full((n,), block, dtype=torch.float64, device=device)
    sizes[-1] = length - (n - 1) * block
    return sizes


def radial_block_mask(grid, positions, *, block_q: int, block_k: int, dense_frames: int, sink_frames: int,
                      decay: float, vote, device="cpu") -> torch.Tensor:
    """The batched path: (NQB, NKB) bool, the token mask built a chunk of query blocks at a time."""
    t, h, w = grid
    n = t * h * w
    c = grid_coords(grid, device)
    if positions is not None:
        c = c[positions.to(device)]
    frame, spatial = c[:, 0], c[:, 1] * w + c[:, 2]
    nk = num_blocks(n, block_k)
    rows_per_chunk = max(1, (1 << 25) // (n * block_q)) * block_q
    radius = radius_table(t, h * w, dense_frames=dense_frames, sink_frames=sink_frames, decay=decay,
                          block_k=block_k).to(device)
    frame, spatial = frame.int(), spatial.int()
    counts = []
    for start in range(0, n, rows_per_chunk):  # bounded memory; the mask is built once per shape
        stop = min(n, start + rows_per_chunk)
        tok = radial_token_mask(frame[start:stop], spatial[start:stop], frame, spatial, radius)
        rq = num_blocks(stop - start, block_q)
        tok = torch.nn.functional.pad(tok, (0, nk * block_k - n, 0, rq * block_q - (stop - start)))
        counts.append(tok.view(rq, block_q, nk, block_k).sum(dim=(1, 3), dtype=torch.float64))
    counts = torch.cat(counts)
    sizes = _block_sizes(n, block_q, device)[:, None] * _block_sizes(n, block_k, device)[None, :]
    return _vote(counts, sizes, vote)


def radial_reference(grid, positions=None, *, block_q, block_k, dense_frames, sink_frames, decay, vote):
    """Eager oracle: the raster token mask frame pair by frame pair, permuted, voted block by block."""
    t, h, w = grid
    f, n = h * w, t * h * w
    s = torch.arange(f)
    ds = (s[:, None] - s[None, :]).abs()
    tok = torch.zeros(n, n, dtype=torch.bool)
    for tq in range(t):
        for tk in range(t):
            d = abs(tq - tk)
            if d <= dense_frames or tk < sink_frames:
                pair = torch.ones(f, f, dtype=torch.bool)
            else:
                width = decay * f / 2 ** math.floor(math.log2(d))
                if width >= block_k:
                    pair = ds <= width / 2
                elif width > 0 and d % math.ceil(block_k / width) == 0:
                    pair = ds <= block_k / 2
                else:
                    pair = torch.zeros(f, f, dtype=torch.bool)
            tok[tq * f:(tq + 1) * f, tk * f:(tk + 1) * f] = pair
    if positions is not None:
        tok = tok[positions][:, positions]
    nq, nk = num_blocks(n, block_q), num_blocks(n, block_k)
    dense = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        dens = [tok[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].double().mean().item()
                for j in range(nk)]
        row = [x > 0 if vote == "any" else x >= vote - 1e-12 for x in dens]
        if not any(row):
            row = [x == max(dens) and x > 0 for x in dens]
        dense[i] = torch.tensor(row)
    return dense


def _cached_mask(grid, positions, block_q, block_k, options, device) -> BlockMask:
    key = (tuple(grid), block_q, block_k, tuple(sorted(options.items())), str(device),
           None if positions is None else id(positions))
    hit = _CACHE.get(key)
    if hit is not None and hit[1] is positions:
        _CACHE.move_to_end(key)
        return hit[0]
    dense = radial_block_mask(grid, positions, block_q=block_q, block_k=block_k, device=device, **options)
    n = math.prod(grid)
    mask = BlockMask.from_dense(dense[None, None], block_q=block_q, block_k=block_k, q_len=n, k_len=n)
    _CACHE[key] = (mask, positions)  # the positions tensor is held so its id cannot be reused
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return mask


@register("radial")
class RadialMasker(Masker):
    """Radial attention's static mask from the grid (see the module docstring)."""

    defaults = {"dense_frames": 1, "sink_frames": 1, "decay": 1.0, "vote": 0.5}
    needs_grid = True
    # the decay widens the bands; no dense neighbour or sink frame, so high sparsity is reachable
    density_option, density_bounds, density_fixed = "decay", (1e-3, 8.0), {"dense_frames": 0, "sink_frames": 0}

    def validate(self, options, heads):
        o = dict(options)
        for name in ("dense_frames", "sink_frames"):
            v = o[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"masker 'radial': option {name!r} must be an int >= 0, got {v!r}")
        dec = o["decay"]
        if isinstance(dec, bool) or not isinstance(dec, (int, float)) or not math.isfinite(dec) or dec < 0:
            raise ValueError(f"masker 'radial': option 'decay' must be a finite float >= 0, got {dec!r}")
        o["decay"] = float(dec)
        v = o["vote"]
        if v != "any" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            raise ValueError(f"masker 'radial': option 'vote' must be a float in (0, 1] or 'any', got {v!r}")
        o["vote"] = v if v == "any" else float(v)
        return o

    def build(self, q, k, *, block_q, block_k, grid, positions, state, **options):
        return MaskPlan(_cached_mask(grid, positions, block_q, block_k, options, q.device), _checked=True)
