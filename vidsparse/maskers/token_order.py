"""Token orders a masker can work in: the model's raster order or compact 3-D tiles.

An order is a permutation of the video tokens, ``perm[i]`` = the raster index of the token at
position i, composed into the masker's :class:`~vidsparse.MaskPlan`.

Raster ("raster")
    The model's own flattening, frame-major (t, h, w): query block i holds tokens
    [i * block_q, (i + 1) * block_q), usually a strip of rows of one frame (the paper's order).

Tiled ("tiled")
    The latent grid (T, H, W) is cut into tiles of (tt, th, tw) tokens. Tiles that lie fully
    inside the grid come first, in raster order of tiles, each tile's tokens in raster order
    inside the tile. With tt * th * tw == block_q (the default choice) every query block is then
    exactly one compact 3-D tile, and every key block of block_q / 2 tokens is a half tile. The
    tokens of the partial tiles at the grid's far edges (when the tile does not divide the grid)
    follow, tile by tile, each tile kept contiguous; only those few query blocks straddle tiles.
    Nothing is padded, so attention in this order is the same function of the tokens.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TOKEN_ORDERS", "choose_tile_shape", "tiled_order", "token_permutation", "grid_coords", "check_grid"]


def _full_tile_tokens(grid, tile) -> int:
    return math.prod((g // t) * t for g, t in zip(grid, tile))


def choose_tile_shape(grid: tuple[int, int, int], block_q: int) -> tuple[int, int, int]:
    """Default tile for ``token_order="tiled"``: one query block per tile, as cube-like as fits.

    Candidates are the (2^a, 2^b, 2^c) with product ``block_q`` (a power of two). Among the most
    balanced ones (largest and smallest side within a factor of 2, relaxed only if none fits the
    grid) it takes the tile that leaves the most tokens in full tiles, then the one with fewer
    frames, then fewer rows. Examples: Wan 480p grid (21, 30, 52) and 720p (21, 45, 80) with
    block_q=128 both give (4, 4, 8).

    Args:
        grid: (T, H, W) latent tokens after patchification.
        block_q: query block size (power of two).
    Returns:
        (tt, th, tw) with tt * th * tw == block_q.
    """
    e = block_q.bit_length() - 1
    cands = [(a, b, e - a - b) for a in range(e + 1) for b in range(e + 1 - a)]
    best = None
    for spread in range(e + 1):
        fitting = []
        for exps in cands:
            if max(exps) - min(exps) > spread:
                continue
            tile = tuple(1 << x for x in exps)
            if all(t <= g for t, g in zip(tile, grid)):
                fitting.append(tile)
        if fitting:
            best = max(fitting, key=lambda t: (_full_tile_tokens(grid, t), -t[0], -t[1]))
            break
    if best is None:  # the grid is smaller than one block: any tile gives the raster order
        exps = min(cands, key=lambda x: (max(x) - min(x), x[0], x[1]))
        best = tuple(1 << x for x in exps)
    return best


def tiled_order(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """Permutation of raster video tokens into tile order (see the module docstring).

    Args:
        grid: (T, H, W) tokens, raster (frame-major) order in the model.
        tile: (tt, th, tw) tile shape, positive ints (need not divide the grid).
    Returns:
        perm: (T*H*W,) int64 on CPU; ``perm[i]`` is the raster index of the i-th token in tile
        order.
    """
    T, H, W = grid
    tt, th, tw = tile
    t = torch.arange(T).view(T, 1, 1)
    h = torch.arange(H).view(1, H, 1)
    w = torch.arange(W).view(1, 1, W)
    nth, ntw = -(-H // th), -(-W // tw)
    tile_idx = ((t // tt) * nth + h // th) * ntw + w // tw
    inner = ((t % tt) * th + h % th) * tw + w % tw
    # a tile is partial when it sticks out of the grid on any side
    partial = ((t // tt + 1) * tt > T) | ((h // th + 1) * th > H) | ((w // tw + 1) * tw > W)
    vol = tt * th * tw
    n_tiles = -(-T // tt) * nth * ntw
    key = partial.long() * (n_tiles * vol) + tile_idx * vol + inner
    return torch.argsort(key.flatten())


TOKEN_ORDERS = ("raster", "tiled", "auto")


def check_grid(grid, n_tokens: int, *, who: str) -> tuple[int, int, int]:
    """``grid`` as three positive ints whose product is ``n_tokens``; the error names ``who``."""
    if (not isinstance(grid, (tuple, list)) or len(grid) != 3
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)):
        raise ValueError(f"{who}: grid must be three positive ints (T, H, W), got {grid!r}")
    if math.prod(grid) != n_tokens:
        raise ValueError(f"{who}: grid {tuple(grid)} has {math.prod(grid)} tokens but the sequence has {n_tokens}")
    return tuple(grid)


_ORDERS: dict = {}


def token_permutation(order: str, grid, block_q: int, tile=None, device="cpu") -> torch.Tensor | None:
    """The token order's permutation (N,) int64 on ``device`` (None for raster), cached per shape."""
    if order == "raster":
        return None
    tile = tuple(tile) if tile is not None else choose_tile_shape(grid, block_q)
    key = (tuple(grid), tile, str(device))
    if key not in _ORDERS:
        if len(_ORDERS) > 64:
            _ORDERS.clear()
        _ORDERS[key] = tiled_order(grid, tile).to(device)
    return _ORDERS[key]


def grid_coords(grid, device="cpu") -> torch.Tensor:
    """(T*H*W, 3) int64: the (t, h, w) of every raster token."""
    t, h, w = (torch.arange(g, device=device) for g in grid)
    return torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1).reshape(-1, 3)
