"""Token orders for the attention call: raster or tiled video tokens, text tokens last.

Every processor runs attention on the sequence ``[video tokens; text tokens]``: video first, in
either order below, and the text (if the architecture mixes it into self-attention) after it.
The permutation ``perm`` maps attention position -> the model's token position, so
``x_attn = x.index_select(seq_dim, perm)`` and the output goes back with ``inverse``.

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
    The order is a pure permutation: nothing is padded, so attention over the permuted sequence
    is the same function of the tokens, and inverse-permuting the output is exact.
"""

from __future__ import annotations

import math

import torch

__all__ = ["choose_tile_shape", "tiled_order", "sequence_order", "invert"]


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


def invert(perm: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: ``x.index_select(d, perm).index_select(d, invert(perm)) == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def sequence_order(
    n_video: int,
    n_text: int,
    *,
    text_first: bool,
    grid: tuple[int, int, int] | None = None,
    tile: tuple[int, int, int] | None = None,
) -> torch.Tensor | None:
    """Attention order ``[video (raster or tiled); text]`` of a model sequence, or None if identity.

    Args:
        n_video: video tokens in the model's sequence.
        n_text: text tokens sharing the self-attention (0 for Wan).
        text_first: the model puts text before video (CogVideoX) rather than after (HunyuanVideo).
        grid, tile: the latent grid and tile for the tiled order; both None for raster.
    Returns:
        perm (n_video + n_text,) int64 on CPU mapping attention position -> model position, or
        None when the model's order is already the attention order.
    """
    if (grid is None) != (tile is None):
        raise ValueError("grid and tile must be given together (tiled order) or both omitted (raster)")
    if grid is not None:
        if grid[0] * grid[1] * grid[2] != n_video:
            raise ValueError(f"latent grid {tuple(grid)} has {grid[0] * grid[1] * grid[2]} tokens, expected {n_video}")
        video = tiled_order(grid, tile)
    else:
        if not (text_first and n_text):
            return None
        video = torch.arange(n_video)
    offset = n_text if text_first else 0
    text_start = 0 if text_first else n_video
    return torch.cat([video + offset, torch.arange(text_start, text_start + n_text)])

