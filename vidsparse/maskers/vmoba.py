"""VMoBA's layer-cycled 1-D / 2-D / 3-D chunk gating (arXiv 2506.23858) as a masker.

The latent grid (T, H, W) is partitioned into key chunks, one of three ways:

* ``"1d"`` (temporal): chunks of ``chunk_1d`` consecutive whole frames;
* ``"2d"`` (spatial): tiles of ``chunk_2d`` = (h, w) pixels through all frames;
* ``"3d"`` (spatio-temporal): tiles of ``chunk_3d`` = (t, h, w) tokens.

Chunks are numbered in raster order of chunks (partial tiles at the far edges are chunks too). The
token order is the chunk order (chunk by chunk, raster order inside a chunk), the same for queries
and keys, so every chunk is a contiguous run of key blocks. Each query block is gated against every
chunk by ``mean(q over the block) . mean(k over the chunk) / sqrt(D)`` and keeps

* ``topk``: the ``max(1, floor(topk * C))`` best chunks (ties: lower chunk index), or
* ``threshold``: the fewest best chunks whose softmax-normalised gate mass reaches ``threshold``,

plus, always, its own chunk(s) (those holding any of its tokens). A key block is kept when it
holds a token of a kept chunk.

``partition="cycle"`` takes 1d, 2d, 3d in turn by ``layer % 3`` (VMoBA's layer cycling): the
layer is the option ``layer`` or, through the diffusers integration, the ``"layer"`` entry of the
per-layer state; with a state but no layer the partition cycles over calls; a lone call with
neither uses the 3d partition.

Departures from VMoBA: gating per query *block* (VMoBA gates each query token, then runs
variable-length FlashAttention); the own chunk is added to the selection rather than counted in
it; the threshold is per (batch, head, query block) row only (VMoBA also offers per-head and global
thresholds); chunk sizes are options per partition.

Options: ``partition`` ("cycle"), ``layer`` (None), ``chunk_1d`` (1), ``chunk_2d`` ((8, 8)),
``chunk_3d`` ((4, 8, 8)), ``topk`` (0.1), ``threshold`` (None; when given it replaces ``topk``). Sparsity: about ``1 - topk`` (the own chunks add a little; on Wan 480p the 1d
partition has only 21 chunks, so its steps are 1/21).
"""

from __future__ import annotations

import math

import torch

from ..mask import BlockMask, num_blocks
from ..plan import MaskPlan, invert_perm
from .registry import Masker, register
from .groups import key_groups_to_blocks, raster_to_seen, work_dtype
from .token_order import grid_coords

__all__ = ["PARTITIONS", "chunk_ids", "vmoba_reference", "vmoba_plan", "VMoBAMasker"]

PARTITIONS = ("1d", "2d", "3d")


def chunk_ids(grid, partition: str, chunk_1d: int, chunk_2d, chunk_3d, device="cpu") -> torch.Tensor:
    """(N,) int64 chunk of every raster token for the partition."""
    t, h, w = grid
    c = grid_coords(grid, device)
    if partition == "1d":
        return c[:, 0] // chunk_1d
    if partition == "2d":
        ch, cw = chunk_2d
        return (c[:, 1] // ch) * -(-w // cw) + c[:, 2] // cw
    ct, ch, cw = chunk_3d
    return ((c[:, 0] // ct) * -(-h // ch) + c[:, 1] // ch) * -(-w // cw) + c[:, 2] // cw


def _chunk_order(grid, ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[0]
    return torch.argsort(ids * n + torch.arange(n, device=ids.device))


def _select(scores: torch.Tensor, topk, threshold) -> torch.Tensor:
    c = scores.shape[-1]
    vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    if topk is not None:
        n_keep = torch.full(scores.shape[:-1], max(1, math.floor(topk * c * (1 + 1e-9))), device=scores.device)
    else:
        n_keep = 1 + (torch.softmax(vals, dim=-1).cumsum(-1) < threshold).sum(-1)
        if threshold >= 1.0:
            n_keep = torch.full_like(n_keep, c)
    keep_sorted = torch.arange(c, device=scores.device) < n_keep.clamp(max=c)[..., None]
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def vmoba_plan(q, k, grid, positions, *, partition, chunk_1d, chunk_2d, chunk_3d, topk, threshold,
               block_q, block_k) -> MaskPlan:
    """The batched path for one partition ("1d", "2d" or "3d")."""
    b, h, n, d = q.shape
    dev = q.device
    ids = chunk_ids(grid, partition, chunk_1d, chunk_2d, chunk_3d, dev)
    order = _chunk_order(grid, ids)  # raster indices in chunk order
    groups = ids[order]
    perm = raster_to_seen(order, positions)
    n_chunks = int(ids.max()) + 1
    wd = work_dtype(q)
    nq = num_blocks(n, block_q)
    # block and chunk means straight from the caller's order (index_add by each token's block or
    # chunk): no permuted copies of q and k, which block_sparse_attention makes anyway
    q_block = invert_perm(perm) // block_q
    k_chunk = ids if positions is None else ids[positions]
    q_sizes = torch.bincount(q_block, minlength=nq).to(wd)
    sizes = torch.bincount(groups, minlength=n_chunks).to(wd)
    q_mean = torch.zeros(b, h, nq, d, dtype=wd, device=dev).index_add_(2, q_block, q.to(wd)) / q_sizes[:, None]
    k_mean = torch.zeros(b, h, n_chunks, d, dtype=wd, device=dev).index_add_(2, k_chunk, k.to(wd)) / sizes[:, None]
    scores = q_mean @ k_mean.transpose(-1, -2) / math.sqrt(d)
    rows = _select(scores, topk, threshold)
    starts = torch.arange(nq, device=dev) * block_q
    lo, hi = groups[starts], groups[torch.clamp(starts + block_q, max=n) - 1]
    c = torch.arange(n_chunks, device=dev)
    rows = rows | ((c >= lo[:, None]) & (c <= hi[:, None]))  # own chunks
    dense = key_groups_to_blocks(rows, groups[None, None], block_k)
    mask = BlockMask.from_dense(dense, block_q=block_q, block_k=block_k, q_len=n, k_len=n)
    return MaskPlan(mask, perm[None, None], _checked=True)


def vmoba_reference(q, k, grid, positions=None, *, partition, chunk_1d, chunk_2d, chunk_3d, topk, threshold,
                    block_q, block_k):
    """Eager oracle, one (batch, head, query block) at a time. Returns (dense, perm (N,))."""
    b, h, n, d = q.shape
    ids = chunk_ids(grid, partition, chunk_1d, chunk_2d, chunk_3d)
    order = sorted(range(n), key=lambda i: (ids[i].item(), i))
    seen_of_raster = torch.empty(n, dtype=torch.long)
    seen_of_raster[torch.arange(n) if positions is None else positions] = torch.arange(n)
    perm = seen_of_raster[torch.tensor(order)]
    groups = ids[torch.tensor(order)]
    n_chunks = int(ids.max()) + 1
    nq, nk = num_blocks(n, block_q), num_blocks(n, block_k)
    wd = work_dtype(q)
    dense = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            qa, ka = q[bi, hi, perm].to(wd), k[bi, hi, perm].to(wd)
            k_means = [ka[groups == c].mean(0) for c in range(n_chunks)]
            for i in range(nq):
                qm = qa[i * block_q:(i + 1) * block_q].mean(0)
                scores = [float(qm @ km) / math.sqrt(d) for km in k_means]
                ranked = sorted(range(n_chunks), key=lambda c: (-scores[c], c))
                if topk is not None:
                    kept = set(ranked[:max(1, math.floor(topk * n_chunks * (1 + 1e-9)))])
                else:
                    probs = torch.softmax(torch.tensor([scores[c] for c in ranked], dtype=wd), 0).tolist()
                    kept, acc = set(), 0.0
                    for c, p in zip(ranked, probs):
                        kept.add(c)
                        acc += p
                        if threshold < 1.0 and acc >= threshold:
                            break
                kept |= set(groups[i * block_q:(i + 1) * block_q].tolist())  # own chunks
                for j in range(nk):
                    dense[bi, hi, i, j] = any(g in kept for g in groups[j * block_k:(j + 1) * block_k].tolist())
    return dense, perm


def _check_ints(name, value, count, *, allow_int=False):
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if (not isinstance(value, (tuple, list)) or len(value) != count
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in value)):
        what = "a positive int" if count == 1 else f"{count} positive ints"
        raise ValueError(f"masker 'vmoba': option {name!r} must be {what}, got {value!r}")
    return tuple(value)


@register("vmoba")
class VMoBAMasker(Masker):
    """VMoBA's chunk gating with layer-cycled partitions (see the module docstring)."""

    defaults = {"partition": "cycle", "layer": None, "chunk_1d": 1, "chunk_2d": (8, 8), "chunk_3d": (4, 8, 8),
                "topk": 0.1, "threshold": None}
    needs_grid = True
    density_option, density_bounds = "topk", (1e-3, 1.0)

    def validate(self, options, heads):
        o = dict(options)
        if o["partition"] not in PARTITIONS + ("cycle",):
            raise ValueError(f"masker 'vmoba': option 'partition' must be one of {PARTITIONS + ('cycle',)}, "
                             f"got {o['partition']!r}")
        lay = o["layer"]
        if lay is not None and (isinstance(lay, bool) or not isinstance(lay, int) or lay < 0):
            raise ValueError(f"masker 'vmoba': option 'layer' must be None or an int >= 0, got {lay!r}")
        o["chunk_1d"] = _check_ints("chunk_1d", o["chunk_1d"], 1, allow_int=True)[0]
        o["chunk_2d"] = _check_ints("chunk_2d", o["chunk_2d"], 2)
        o["chunk_3d"] = _check_ints("chunk_3d", o["chunk_3d"], 3)
        if o["topk"] is None and o["threshold"] is None:
            raise ValueError("masker 'vmoba': option 'topk' or option 'threshold' must be given")
        for name in ("topk", "threshold"):
            v = o[name]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not 0 < v <= 1):
                raise ValueError(f"masker 'vmoba': option {name!r} must be a float in (0, 1], got {v!r}")
            o[name] = None if v is None else float(v)
        if o["threshold"] is not None:
            o["topk"] = None  # the threshold rule replaces Top-k
        return o

    def new_state(self) -> dict:
        return {}

    def build(self, q, k, *, block_q, block_k, grid, positions, state, partition, layer, **options):
        if partition == "cycle":
            if layer is None and state is not None:
                layer = state.get("layer")  # set by the diffusers integration
            if layer is not None:
                partition = PARTITIONS[layer % 3]
            elif state is not None:
                partition = PARTITIONS[state.get("calls", 0) % 3]
            else:
                partition = "3d"  # a single call with no layer to cycle over: the spatio-temporal chunks
        if state is not None:
            state["calls"] = state.get("calls", 0) + 1
            state["partition"] = partition
        return vmoba_plan(q, k, grid, positions, partition=partition, block_q=block_q, block_k=block_k, **options)
