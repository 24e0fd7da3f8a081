"""Sparse self-attention under diffusers' context parallelism: Ulysses and ring.

``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U, ring_degree=R))``
splits the video tokens of a diffusers transformer into P = R * U chunks, ring-major over the
(ring, ulysses) device mesh (equal chunks; ``torch.tensor_split`` sizes with ``ulysses_anything``
or ``ring_anything``), and hands every attention processor a ``_parallel_config`` that holds the
mesh. A patched processor receives q, k, v of its rank's chunk, (B, S_r, H, D), and calls
:func:`attend_parallel`. vidsparse's kernel is not diffusers' dispatcher, so the exchange is done
here, with the process groups of that mesh (torch.distributed only; no diffusers import). The
result equals one process's.

Ulysses (``ulysses_degree=U``)
    An all-to-all turns (B, S/U, H, D) into (B, S, H/U, D): every rank holds the whole sequence
    for its heads (the heads split as ``torch.tensor_split`` does). The layer's masker and the
    kernel then run exactly as on one GPU, on those heads: per-head options (per-head Top-k / Top-p
    fractions) are sliced to them, and the layer's masker state (svg's head labels, svg2's
    centroids) holds the rank's heads only. A second all-to-all gives (B, S/U, H, D) back. This
    path is differentiable.

Ring (``ring_degree=R``)
    The sequence stays split.

    1. The plan is global. ``hybrid``: its token order (raster or tiled) depends on the grid
       alone; q, k, v are moved into it (step 2), each rank mean-pools its query and key blocks,
       the pooled keys (B, H, NKB, D) are all-gathered (tiny) and each rank applies the Top-k /
       Top-p rule to its own query blocks over all key blocks. ``radial``: the mask depends on the
       grid alone; every rank builds it. Every other masker (svg's profiling, svg2's k-means,
       xattention, vmoba, registered ones) needs token-level q and k: they are all-gathered *for
       prediction only* (transient memory 2 * B * N * H * D per rank), every rank runs the
       masker, and ring rank 0's plan is broadcast, so all ranks use one plan even where GPU
       reductions are not bitwise reproducible.
    2. A plan's permutations may move tokens across chunks (svg's temporal heads, svg2's
       clusters, the tiled order). An all-to-all moves q (by ``perm``) and k, v (by ``k_perm``)
       into the attention order so that rank r holds the r-th run of whole blocks of it
       (``max(block_q, block_k)``-token blocks, split as evenly as whole blocks allow). Every rank
       derives the index tables from the plan (:func:`routes`); no indices travel.
    3. R steps: at step s rank r attends its queries to key/value chunk (r - s) mod R with that
       chunk's columns of its mask rows, while it passes the chunk on to rank r + 1. A chunk with
       no kept block is skipped without compute (the chunk still travels). Partial outputs are
       merged by their log-sum-exp in float32 (:func:`merge_partial`).
    4. An all-to-all takes the output back to the caller's order and chunk.

    Forward only: a call that needs gradients raises (train with Ulysses).

Both degrees > 1: Ulysses inside each group of U ranks, then the ring over the R groups'
sequence chunks, on the rank's heads.

Dense warm-up (``SparseConfig.dense_steps``): under Ulysses alone the processor hands the call to
the stock processor, which runs diffusers' own Ulysses attention. diffusers' ring needs a backend
that returns the log-sum-exp (the default native SDPA refuses: "Native attention does not
support return_lse=True"), so under ring vidsparse runs the warm-up itself: the same ring with
every block kept, which is exact dense attention.

Statistics and the mask callback record what each rank ran: Ulysses records hold the rank's
heads (``heads``, ``head_sparsity``); ring records its attention-order queries against all keys
(``q_len``, ``k_len``); both add ``cp`` ("ulysses", "ring" or "ulysses+ring"), ``cp_rank`` (the
rank's sequence chunk) and ``cp_heads`` ([first, last + 1) of the global head indices), and ring
adds ``cp_queries`` ([first, last + 1) attention-order positions). ``mask_ms`` runs until the
rank's mask rows are known, ``attn_ms`` the rest; both include communication.

Supported: ``WanTransformer3DModel``, whose diffusers 0.42 ``_cp_plan`` splits the video tokens
(and RoPE) on the sequence dim and leaves the text alone (it only enters the cross-attention,
which runs per rank). diffusers 0.42 defines no ``_cp_plan`` for ``CogVideoXTransformer3DModel``
or ``HunyuanVideoTransformer3DModel``: :func:`check_model` refuses those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..api import block_sparse_attention
from ..mask import BlockMask, num_blocks
from ..maskers import apply_priors
from ..maskers.hybrid import HybridMasker, block_mean, select_hybrid
from ..maskers.radial import RadialMasker
from ..maskers.token_order import token_permutation
from ..plan import MaskPlan
from ._processor import no_cp_plan_error
from .sparse_stats import Timer

__all__ = [
    "Axis", "Topology", "topology", "check_model", "split_sizes", "attention_bounds",
    "sequence_to_heads", "heads_to_sequence", "Routes", "routes", "to_attention_order",
    "to_caller_order", "merge_partial", "ring_attention", "chunk_masks", "hybrid_rows", "attend_parallel",
]


# ------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Axis:
    """One axis of the context-parallel mesh: its process group, its size and this rank's index."""

    group: object
    size: int
    rank: int

    def global_rank(self, index: int) -> int:
        return dist.get_global_rank(self.group, index)


@dataclass(frozen=True)
class Topology:
    """This rank's place in diffusers' (ring, ulysses) mesh.

    ``chunk`` is the index of the rank's sequence chunk: diffusers splits the video tokens over
    the flattened mesh, ring-major, so ``chunk = ring.rank * ulysses.size + ulysses.rank``.
    """

    ulysses: Axis
    ring: Axis
    chunk: int

    @property
    def degree(self) -> int:
        return self.ulysses.size * self.ring.size

    @property
    def mode(self) -> str:
        return "+".join(name for name, axis in (("ulysses", self.ulysses), ("ring", self.ring)) if axis.size > 1)

    def ulysses_sizes(self, n: int) -> list[int]:
        """Chunk lengths of the ranks of this rank's Ulysses group, in Ulysses rank order."""
        u = self.ulysses.size
        return split_sizes(n, self.degree)[self.ring.rank * u:(self.ring.rank + 1) * u]

    def ring_sizes(self, n: int) -> list[int]:
        """Sequence length each ring rank holds after the Ulysses exchange, in ring rank order."""
        u, sizes = self.ulysses.size, split_sizes(n, self.degree)
        return [sum(sizes[i * u:(i + 1) * u]) for i in range(self.ring.size)]


def _context_config(parallel_config):
    """diffusers' ContextParallelConfig inside a ParallelConfig (or itself), None without one."""
    if parallel_config is None:
        return None
    return getattr(parallel_config, "context_parallel_config", parallel_config)


def topology(parallel_config) -> Topology | None:
    """The layout of a processor's ``_parallel_config``; None when it holds no context parallelism."""
    cp = _context_config(parallel_config)
    if cp is None:
        return None
    if getattr(cp, "_mesh", None) is None:
        raise RuntimeError("vidsparse: the ContextParallelConfig has no device mesh; transformer.enable_parallelism("
                           "config=...) sets it up")
    ulysses = Axis(cp._ulysses_mesh.get_group(), cp.ulysses_degree, cp._ulysses_local_rank)
    ring = Axis(cp._ring_mesh.get_group(), cp.ring_degree, cp._ring_local_rank)
    chunk = dist.get_rank(cp._flattened_mesh.get_group())
    if chunk != ring.rank * ulysses.size + ulysses.rank:
        raise NotImplementedError(
            f"vidsparse: unexpected context-parallel mesh: sequence chunk {chunk} on ring rank {ring.rank}, "
            f"ulysses rank {ulysses.rank}; vidsparse expects diffusers' ('ring', 'ulysses') mesh, ring-major")
    return Topology(ulysses, ring, chunk)


def split_sizes(n: int, parts: int) -> list[int]:
    """Chunk lengths of ``torch.tensor_split(range(n), parts)`` (equal when parts divides n)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _bounds(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _lengths(bounds: list[int]) -> list[int]:
    return [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def attention_bounds(n: int, parts: int, block: int) -> list[int]:
    """``parts + 1`` boundaries cutting n attention-order positions into runs of whole blocks.

    Rank r holds [bounds[r], bounds[r + 1]); each boundary but the last is a multiple of
    ``block`` (the largest of block_q and block_k), and the runs differ by at most one block.
    """
    nb = num_blocks(n, block)
    return [min(n, (i * nb // parts) * block) for i in range(parts + 1)]


# ------------------------------------------------------------------------------------- checks
def check_model(arch_name: str, model, grid, config) -> None:
    """Refuse, before any work, a context-parallel forward vidsparse cannot run exactly.

    Called by the patched transformer's forward pre-hook with the latent ``grid`` of the call.
    Raises NotImplementedError for a model without a diffusers context-parallel plan, ValueError
    for degrees that do not fit the heads or the video (the message names the degree and size).
    """
    cp = _context_config(getattr(model, "_parallel_config", None))
    if cp is None:
        return
    if arch_name != "wan":
        raise no_cp_plan_error(type(model).__name__)
    if grid is None:
        raise RuntimeError("vidsparse: context parallelism needs the latent grid; call the transformer with 5-D "
                           "hidden_states (B, C, F, H, W)")
    check_degrees(cp, heads=model.config.num_attention_heads, tokens=math.prod(grid),
                  block=max(config.block_q, config.block_k))


def check_degrees(cp, *, heads: int, tokens: int, block: int) -> None:
    """The Ulysses degree must divide the heads and the degrees the video (without the "anything"
    modes); a ring needs at least one whole block of the attention order per rank."""
    u, r = cp.ulysses_degree, cp.ring_degree
    if u > 1 and cp.ulysses_anything and heads < u:
        raise ValueError(f"vidsparse: ContextParallelConfig(ulysses_degree={u}) exceeds the model's {heads} "
                         "attention heads")
    if u > 1 and not cp.ulysses_anything and heads % u:
        raise ValueError(
            f"vidsparse: ContextParallelConfig(ulysses_degree={u}) must divide the number of attention heads "
            f"({heads}); use a divisor of {heads} or ulysses_anything=True")
    p = u * r
    if tokens % p and not (cp.ulysses_anything or cp.ring_anything):
        raise ValueError(
            f"vidsparse: ContextParallelConfig(ring_degree={r}, ulysses_degree={u}) splits the video over {p} ranks, "
            f"which does not divide its {tokens} tokens; choose degrees whose product divides {tokens}, or "
            "ring_anything=True / ulysses_anything=True for uneven chunks")
    if r > 1 and num_blocks(tokens, block) < r:
        raise ValueError(
            f"vidsparse: ContextParallelConfig(ring_degree={r}) needs at least {r} blocks of {block} video tokens "
            f"(each ring rank holds whole blocks); this video has {tokens} tokens")


def _tokens(layer) -> int:
    grid = layer.state.grid
    if grid is None:
        raise RuntimeError("vidsparse: context parallelism needs the latent grid, which the transformer's forward "
                           "pre-hook records; call the transformer module itself (model(...)), not model.forward(...)")
    return math.prod(grid)


# ------------------------------------------------------------------------------------ Ulysses
def _all_to_all(x: torch.Tensor, out_counts: list[int], in_counts: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of the rows (dim 0) of x: ``in_counts[j]`` rows go to rank j."""
    from torch.distributed import _functional_collectives as funcol  # torch's autograd-aware collectives

    out = funcol.all_to_all_single_autograd(x.contiguous(), out_counts, in_counts, group)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def sequence_to_heads(x: torch.Tensor, seq_sizes: list[int], head_sizes: list[int], axis: Axis) -> torch.Tensor:
    """(B, S_r, H, D), this rank's chunk of the sequence -> (B, S, H_r, D), the whole sequence of its heads.

    ``seq_sizes``: every rank's chunk length (S = their sum); ``head_sizes``: the heads each rank
    gets, in rank order (H_r = head_sizes[axis.rank]).
    """
    b, s, _, d = x.shape
    hb, hr = _bounds(head_sizes), head_sizes[axis.rank]
    send = torch.cat([x[:, :, hb[j]:hb[j + 1]].reshape(-1) for j in range(axis.size)])
    out_counts = [b * si * hr * d for si in seq_sizes]
    recv = _all_to_all(send, out_counts, [b * s * hj * d for hj in head_sizes], axis.group)
    return torch.cat([p.view(b, si, hr, d) for p, si in zip(recv.split(out_counts), seq_sizes)], dim=1)


def heads_to_sequence(y: torch.Tensor, seq_sizes: list[int], head_sizes: list[int], axis: Axis) -> torch.Tensor:
    """Inverse of :func:`sequence_to_heads`: (B, S, H_r, D) -> (B, S_r, H, D)."""
    b, _, hr, d = y.shape
    sb, s = _bounds(seq_sizes), seq_sizes[axis.rank]
    send = torch.cat([y[:, sb[i]:sb[i + 1]].reshape(-1) for i in range(axis.size)])
    out_counts = [b * s * hj * d for hj in head_sizes]
    recv = _all_to_all(send, out_counts, [b * si * hr * d for si in seq_sizes], axis.group)
    return torch.cat([p.view(b, s, hj, d) for p, hj in zip(recv.split(out_counts), head_sizes)], dim=2)


# --------------------------------------------------------------------- ring: attention order
@dataclass(frozen=True)
class Routes:
    """One rank's index tables for moving tokens between caller-order and attention-order chunks.

    ``send_rows``: rows of the caller chunk (B, S_r, H, ·) seen as (B*S_r*H, ·), in sending order,
    grouped by destination rank (``send_counts`` rows each). ``recv_rows``: the rows of the
    attention chunk (B, H, length, ·) seen as (B*H*length, ·) that the received rows fill, grouped
    by source rank (``recv_counts``).
    """

    send_rows: torch.Tensor
    send_counts: list[int]
    recv_rows: torch.Tensor
    recv_counts: list[int]
    length: int


def routes(perm: torch.Tensor | None, batch: int, heads: int, caller: list[int], attention: list[int],
           rank: int, device) -> Routes:
    """The tables of ``rank`` for a permutation known to every rank (no indices travel).

    Args:
        perm: None (identity) or (B or 1, H or 1, N) int64, the caller index of the token at each
            attention position (a MaskPlan's ``perm`` or ``k_perm``).
        caller, attention: P + 1 boundaries of the caller-order chunks (rank j holds caller tokens
            [caller[j], caller[j + 1])) and of the attention-order chunks.
    Entries are listed per (b, h, attention position), ascending, on both sides, so a receiver
    knows where each row goes from the same plan the sender used.
    """
    n = caller[-1]
    p = torch.arange(n, device=device)[None, None] if perm is None else perm.contiguous()
    owner = torch.bucketize(p, torch.tensor(caller[1:-1], device=p.device), right=True)  # rank holding each token
    p, owner = p.expand(batch, heads, n), owner.expand(batch, heads, n)
    seq = caller[rank + 1] - caller[rank]
    mine = owner == rank
    send, send_counts = [], []
    for lo, hi in zip(attention[:-1], attention[1:]):
        b, h, i = mine[:, :, lo:hi].nonzero(as_tuple=True)
        send.append((b * seq + p[b, h, i + lo] - caller[rank]) * heads + h)
        send_counts.append(b.numel())
    lo, hi = attention[rank], attention[rank + 1]
    own = owner[:, :, lo:hi]
    recv, recv_counts = [], []
    for src in range(len(caller) - 1):
        b, h, i = (own == src).nonzero(as_tuple=True)
        recv.append((b * heads + h) * (hi - lo) + i)
        recv_counts.append(b.numel())
    return Routes(torch.cat(send), send_counts, torch.cat(recv), recv_counts, hi - lo)


def _exchange_rows(x: torch.Tensor, out_counts: list[int], in_counts: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(out_counts), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_counts, in_counts, group=group)
    return out


def to_attention_order(x: torch.Tensor, r: Routes, axis: Axis) -> torch.Tensor:
    """(B, S_r, H, D) caller-order chunk -> (B, H, r.length, D) this rank's attention-order chunk."""
    b, _, h, d = x.shape
    rows = _exchange_rows(x.reshape(-1, d).index_select(0, r.send_rows), r.recv_counts, r.send_counts, axis.group)
    return x.new_empty(b * h * r.length, d).index_copy_(0, r.recv_rows, rows).view(b, h, r.length, d)


def to_caller_order(y: torch.Tensor, r: Routes, axis: Axis, seq: int) -> torch.Tensor:
    """Inverse of :func:`to_attention_order`: (B, H, r.length, D) -> (B, seq, H, D)."""
    b, h, _, d = y.shape
    rows = _exchange_rows(y.reshape(-1, d).index_select(0, r.recv_rows), r.send_counts, r.recv_counts, axis.group)
    return y.new_empty(b * seq * h, d).index_copy_(0, r.send_rows, rows).view(b, seq, h, d)


# ------------------------------------------------------------------------------ ring: the loop
def merge_partial(o: torch.Tensor, lse: torch.Tensor, o_part: torch.Tensor, lse_part: torch.Tensor):
    """Merge attention over two disjoint key sets by their log-sum-exp.

    Args:
        o, o_part: (B, H, L, D); lse, lse_part: (B, H, L), -inf for a row that kept no key.
    Returns:
        (o, lse) over the union, in o's and lse's dtypes.
    """
    new = torch.logaddexp(lse, lse_part)
    base = torch.where(torch.isneginf(new), torch.zeros_like(new), new)  # -inf - -inf would be NaN
    w_old, w_new = torch.exp(lse - base)[..., None], torch.exp(lse_part - base)[..., None]
    return o * w_old + o_part.to(o.dtype) * w_new, new


def _pass_on(k: torch.Tensor, v: torch.Tensor, length: int, axis: Axis):
    """Start sending (k, v) to the next rank and receiving the previous rank's (``length`` tokens)."""
    b, h, _, d = k.shape
    k_in, v_in = k.new_empty(b, h, length, d), v.new_empty(b, h, length, d)
    nxt, prv = axis.global_rank((axis.rank + 1) % axis.size), axis.global_rank((axis.rank - 1) % axis.size)
    ops = [dist.P2POp(dist.isend, t, nxt, axis.group) for t in (k, v)]
    ops += [dist.P2POp(dist.irecv, t, prv, axis.group) for t in (k_in, v_in)]
    return k_in, v_in, dist.batch_isend_irecv(ops)


def ring_attention(q, k, v, lengths: list[int], chunk_mask, axis: Axis, backend: str) -> torch.Tensor:
    """This rank's queries attend the key/value chunks of every rank of the ring.

    Args:
        q: (B, H, Lq, D); k, v: (B, H, lengths[axis.rank], D), this rank's chunk, contiguous.
        lengths: every rank's chunk length.
        chunk_mask: j -> the BlockMask over (Lq, lengths[j]) for chunk j, or None when it keeps
            nothing there (the step then only passes the chunk on).
    Returns:
        o: (B, H, Lq, D) in q's dtype; rows are merged in float32 (float64 for float64 inputs).
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=cdt, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=cdt, device=q.device)
    src = axis.rank
    for step in range(axis.size):
        incoming = None
        if step < axis.size - 1:
            incoming = _pass_on(k, v, lengths[(src - 1) % axis.size], axis)
        mask = chunk_mask(src)
        if mask is not None:
            o_part, lse_part = block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
            o, lse = merge_partial(o, lse, o_part, lse_part)
        if incoming is not None:
            k, v, works = incoming
            for work in works:
                work.wait()
            src = (src - 1) % axis.size
    return o.to(q.dtype)


def chunk_masks(rows: torch.Tensor, bounds: list[int], q_len: int, block_q: int, block_k: int):
    """j -> BlockMask of ``rows`` (B, H, NQB_r, NKB) over key chunk j, None when it keeps no block there."""
    spans = [(lo // block_k, num_blocks(hi, block_k)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    kept = torch.stack([rows[..., a:z].any() for a, z in spans]).tolist()  # one host sync per call

    def mask(j: int) -> BlockMask | None:
        if not kept[j]:
            return None
        a, z = spans[j]
        return BlockMask.from_dense(rows[..., a:z], block_q=block_q, block_k=block_k, q_len=q_len,
                                    k_len=bounds[j + 1] - bounds[j])

    return mask


# ------------------------------------------------------------------------- ring: the plans
def hybrid_rows(q_means: torch.Tensor, k_means: torch.Tensor, *, first_block: int, tokens: int, block_q: int,
                block_k: int, topk, topp, keep_sink: bool = False, keep_diagonal: bool = False) -> torch.Tensor:
    """SpargeAttention2's hybrid rule (:mod:`vidsparse.maskers.hybrid`) for a run of query blocks.

    Args:
        q_means: (B, H, R, D) float32 means of the query blocks ``first_block`` .. + R - 1 (attention
            order, a partial tail block averaged over its real tokens, as ``block_mean`` does).
        k_means: (B, H, NKB, D) float32 means of every key block.
        tokens: the sequence length N; topk, topp, keep_sink, keep_diagonal: the masker's options
            (its native priors, in attention order).
    Returns:
        (B, H, R, NKB) bool: those rows of the mask the hybrid masker builds from the whole q, k.
    """
    probs = torch.softmax(q_means @ k_means.transpose(-1, -2) * q_means.shape[-1] ** -0.5, dim=-1)
    rows = select_hybrid(probs, topk=topk, topp=topp)
    if keep_diagonal:  # key blocks whose token span overlaps the query block's
        qi = torch.arange(first_block, first_block + rows.shape[2], device=rows.device)
        kj = torch.arange(rows.shape[3], device=rows.device)
        q_end, k_end = (qi + 1).mul(block_q).clamp(max=tokens), (kj + 1).mul(block_k).clamp(max=tokens)
        rows = rows | ((kj * block_k)[None, :] < q_end[:, None]) & (k_end[None, :] > (qi * block_q)[:, None])
    if keep_sink:
        rows[..., 0] = True
    return rows


def _gather_dim(x: torch.Tensor, sizes: list[int], dim: int, axis: Axis) -> torch.Tensor:
    """Concatenate every rank's x along ``dim`` (rank j's holds ``sizes[j]`` entries there)."""
    pad = max(sizes) - x.shape[dim]
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(axis.size)]
    dist.all_gather(parts, x.contiguous(), group=axis.group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)


def _hybrid_order(layer, options: dict, device) -> torch.Tensor | None:
    """The hybrid masker's token order (N,) for this call (None: raster), as Masker.plan picks it."""
    order = options["token_order"]
    if order == "auto":
        order = "tiled"  # the grid is always known under context parallelism
    return token_permutation(order, layer.state.grid, layer.state.config.block_q, options["tile"], device)


def _pooled_hybrid_rows(layer, qa, ka, heads, bounds, axis, order) -> torch.Tensor:
    """Mask rows of this rank's query blocks, (B, h, NQB_r, NKB), from pooled blocks.

    qa, ka: (B, h, L_r, D) this rank's attention-order chunk; the key block means are all-gathered.
    """
    cfg, n = layer.state.config, bounds[-1]
    opts = layer.options_on(qa.device, heads)
    counts = [num_blocks(hi, cfg.block_k) - lo // cfg.block_k for lo, hi in zip(bounds[:-1], bounds[1:])]
    k_means = _gather_dim(block_mean(ka, cfg.block_k), counts, 2, axis)
    first = bounds[axis.rank] // cfg.block_q
    rows = hybrid_rows(block_mean(qa, cfg.block_q), k_means, first_block=first, tokens=n, block_q=cfg.block_q,
                       block_k=cfg.block_k, topk=opts["topk"], topp=opts["topp"], keep_sink=opts["keep_sink"],
                       keep_diagonal=opts["keep_diagonal"])
    if opts["window"] is not None:  # the generic prior, as the masker applies it after its rule
        nqb, nkb = num_blocks(n, cfg.block_q), num_blocks(n, cfg.block_k)
        zero = BlockMask.from_dense(torch.zeros(1, 1, nqb, nkb, dtype=torch.bool, device=qa.device),
                                    block_q=cfg.block_q, block_k=cfg.block_k, q_len=n, k_len=n)
        perm = None if order is None else order[None, None]
        extra = apply_priors(MaskPlan(zero, perm, _checked=True), grid=layer.state.grid, window=opts["window"])
        rows = rows | extra.mask.dense[..., first:first + rows.shape[2], :]
    return rows


def _broadcast_index(perm: torch.Tensor | None, src: int, axis: Axis) -> torch.Tensor | None:
    if perm is None:
        return None
    perm = perm.contiguous().clone()
    dist.broadcast(perm, src, group=axis.group)
    return perm


def _broadcast_plan(plan: MaskPlan, axis: Axis) -> MaskPlan:
    """Ring rank 0's plan on every rank (the plans share one structure; their values may differ by
    GPU nondeterminism, and the exchange needs one plan)."""
    src = axis.global_rank(0)
    dense = plan.mask.dense.to(torch.uint8).contiguous()  # gloo has no bool
    dist.broadcast(dense, src, group=axis.group)
    perm = _broadcast_index(plan.perm, src, axis)
    k_perm = perm if plan.k_perm is plan.perm else _broadcast_index(plan.k_perm, src, axis)
    m = plan.mask
    mask = BlockMask.from_dense(dense.bool(), block_q=m.block_q, block_k=m.block_k, q_len=m.q_len, k_len=m.k_len)
    return MaskPlan(mask, perm, k_perm=k_perm, _checked=True)


def _global_plan(layer, q, k, heads, sizes, axis) -> MaskPlan:
    """The layer's plan over all N tokens, one for the whole ring. q, k: (B, S_r, h, D) caller chunk."""
    if type(layer.masker) is RadialMasker:
        # radial's mask depends on the grid alone: zero-width stand-ins, and every rank builds the same
        stand_in = q.new_empty(q.shape[0], sum(sizes), q.shape[2], 0)
        return layer.plan(stand_in, stand_in, heads=heads)
    # token-level q and k for prediction only: freed when the plan is built
    plan = layer.plan(_gather_dim(q, sizes, 1, axis), _gather_dim(k, sizes, 1, axis), heads=heads)
    return _broadcast_plan(plan, axis)


def _static_routes(layer, order, batch, heads, caller, bounds, rank, device) -> Routes:
    """:func:`routes` of a token order that depends on the grid alone, cached on the run state
    (shared by the layers; a few entries)."""
    cache = layer.state.routes
    key = (None if order is None else id(order), batch, heads, tuple(caller), tuple(bounds), rank, str(device))
    hit = cache.get(key)
    if hit is not None and hit[0] is order:
        return hit[1]
    r = routes(None if order is None else order[None, None], batch, heads, caller, bounds, rank, device)
    if len(cache) >= 8:
        cache.clear()
    cache[key] = (order, r)
    return r


# ----------------------------------------------------------------------------------- drivers
def attend_parallel(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topo: Topology, *,
                    dense: bool = False) -> torch.Tensor:
    """The layer's sparse self-attention of this rank's chunk under context parallelism.

    Args:
        layer: the :class:`~vidsparse.integrations._core.SparseLayer`.
        q, k, v: (B, S_r, H, D) after projections, norms and RoPE: this rank's chunk of the video
            tokens (no text), as diffusers' split hands it to the processor.
        topo: :func:`topology` of the processor's ``_parallel_config``.
        dense: a dense warm-up call under ring (every block kept).
    Returns:
        o: (B, S_r, H, D) in q's dtype: this rank's chunk of what one process computes.
    """
    n = _tokens(layer)
    sizes = split_sizes(n, topo.degree)
    if q.shape[1] != sizes[topo.chunk]:
        raise RuntimeError(
            f"vidsparse: this rank holds {q.shape[1]} tokens, but splitting the {n} video tokens over {topo.degree} "
            f"ranks gives chunk {topo.chunk} {sizes[topo.chunk]}; vidsparse expects WanTransformer3DModel's _cp_plan")
    if topo.ring.size > 1 and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("vidsparse: ring context parallelism runs forward only; train with ulysses_degree "
                                  "(differentiable) or run under torch.no_grad()")
    if dense and topo.ring.size == 1:
        raise ValueError("vidsparse: a dense call under Ulysses alone belongs to the stock processor")
    heads, span = q.shape[2], (0, q.shape[2])
    u = topo.ulysses
    if u.size > 1:
        seq, head_sizes = topo.ulysses_sizes(n), split_sizes(heads, u.size)
        lo = sum(head_sizes[:u.rank])
        span = (lo, lo + head_sizes[u.rank])
        q, k, v = (sequence_to_heads(t, seq, head_sizes, u) for t in (q, k, v))
    extra = {"cp": topo.mode, "cp_rank": topo.chunk, "cp_heads": list(span)}
    if topo.ring.size > 1:
        o = _ring(layer, q, k, v, topo, span, dense, extra)
    else:
        o = layer.attend(q, k, v, heads=span, extra=extra)
    return heads_to_sequence(o, seq, head_sizes, u) if u.size > 1 else o


def _ring(layer, q, k, v, topo: Topology, heads: tuple[int, int], dense: bool, extra: dict) -> torch.Tensor:
    """(B, S_r, h, D) q, k, v of this ring rank's caller-order chunk -> o of the same shape."""
    ring, cfg, n = topo.ring, layer.state.config, _tokens(layer)
    sizes = topo.ring_sizes(n)
    if dense:
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        full = lambda j: BlockMask.full(block_q=cfg.block_q, block_k=cfg.block_k, q_len=q.shape[1],  # noqa: E731
                                        k_len=sizes[j], device=q.device)
        return ring_attention(qt, kt, vt, sizes, full, ring, cfg.backend).transpose(1, 2)
    timer = Timer(q.device) if cfg.collect_stats else None
    m0 = timer.mark() if timer else None
    caller, bounds = _bounds(sizes), attention_bounds(n, ring.size, max(cfg.block_q, cfg.block_k))
    with torch.no_grad():
        layout = _hybrid_layout if type(layer.masker) is HybridMasker else _plan_layout
        qa, ka, va, rows, rq, perms = layout(layer, q, k, v, heads, caller, bounds, ring)
        m1 = timer.mark() if timer else None
        masks = chunk_masks(rows, bounds, rq.length, cfg.block_q, cfg.block_k)
        o = ring_attention(qa, ka, va, _lengths(bounds), masks, ring, cfg.backend)
        o = to_caller_order(o, rq, ring, q.shape[1])
    extra = extra | {"cp_queries": [bounds[ring.rank], bounds[ring.rank + 1]]}
    marks = (m0, m1, timer.mark()) if timer else None
    _report(layer, rows, (q.shape[0], q.shape[2], rq.length, n), perms, extra, marks)
    return o


def _hybrid_layout(layer, q, k, v, heads, caller, bounds, ring):
    """The hybrid masker: q, k, v into its grid-only token order, then the rows from pooled blocks.

    Returns (qa, ka, va) (B, h, L_r, D), the rows (B, h, NQB_r, NKB), q's routes and (perm, k_perm).
    """
    order = _hybrid_order(layer, layer.options_on(q.device, heads), q.device)
    r = _static_routes(layer, order, q.shape[0], q.shape[2], caller, bounds, ring.rank, q.device)
    qa, ka, va = (to_attention_order(t, r, ring) for t in (q, k, v))
    perm = None if order is None else order[None, None]
    return qa, ka, va, _pooled_hybrid_rows(layer, qa, ka, heads, bounds, ring, order), r, (perm, perm)


def _plan_layout(layer, q, k, v, heads, caller, bounds, ring):
    """Any other masker: one global plan, q by its ``perm`` and k, v by its ``k_perm``; as :func:`_hybrid_layout`."""
    cfg, (b, _, h, _) = layer.state.config, q.shape
    plan = _global_plan(layer, q, k, heads, _lengths(caller), ring)
    rq = routes(plan.perm, b, h, caller, bounds, ring.rank, q.device)
    rk = rq if plan.k_perm is plan.perm else routes(plan.k_perm, b, h, caller, bounds, ring.rank, q.device)
    qa, ka, va = to_attention_order(q, rq, ring), to_attention_order(k, rk, ring), to_attention_order(v, rk, ring)
    first = bounds[ring.rank] // cfg.block_q
    rows = plan.mask.dense[..., first:first + num_blocks(rq.length, cfg.block_q), :]
    return qa, ka, va, rows, rq, (plan.perm, plan.k_perm)


def _report(layer, rows, shape, perms, extra, marks) -> None:
    """Statistics and the mask callback for a ring call: the rank's mask rows over all key blocks."""
    cfg, st = layer.state.config, layer.state
    b, h, q_len, n = shape
    if marks is not None:
        sparsity = 1.0 - rows.float().mean()
        layer.record(extra | {
            "batch": b, "heads": h, "q_len": q_len, "k_len": n, "n_video": n, "n_text": 0,
            "block_q": cfg.block_q, "block_k": cfg.block_k, "sparsity": sparsity, "video_sparsity": sparsity,
            "head_sparsity": 1.0 - rows.float().mean(dim=(0, 2, 3)),
        }, marks)
    if st.mask_callback is not None:
        mask = BlockMask.from_dense(rows, block_q=cfg.block_q, block_k=cfg.block_k, q_len=q_len, k_len=n)
        plan = MaskPlan(mask, _checked=True)
        layer.notify(extra | {"n_video": n, "n_text": 0, "text_first": False, "q_len": q_len, "k_len": n,
                              "video_plan": plan, "perm": perms[0], "k_perm": perms[1]}, plan)
