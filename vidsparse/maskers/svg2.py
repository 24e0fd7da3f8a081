"""SVG2's semantic-aware permutation (Sparse VideoGen2, arXiv 2505.18875) as a masker.

Per (batch, head), queries and keys are clustered separately by k-means; each sequence is
permuted so that the tokens of one cluster are contiguous (queries by their cluster, keys by
theirs, so ``perm`` and ``k_perm`` differ), and cluster pairs are selected from the centroids:

* score of (query cluster i, key cluster j) = ``c_q[i] . c_k[j] / sqrt(D)``;
* turned into probabilities by a softmax weighted by key-cluster size:
  ``P[i, j] = n_j exp(s_ij) / sum_j' n_j' exp(s_ij')`` (an empty cluster gets probability 0);
* per query cluster, key clusters are kept in descending order of P until the cumulative
  probability reaches ``top_p`` (the minimal such prefix), with at least
  ``max(1, floor(min_fraction * k_clusters))`` of them (ties: lower cluster index first).

Fixed-size blocks are then laid over the permuted sequences: a (query block, key block) pair is
kept when any (query cluster in the query block, key cluster in the key block) pair is kept, so a
block straddling two clusters is kept if either is (:func:`group_block_mask`, exact, computed
with prefix sums over clusters, no (N x N) intermediate).

k-means (Lloyd, squared Euclidean distance): ``iters`` iterations on the first call from
``q_clusters`` / ``k_clusters`` tokens at evenly spaced positions of the sequence (deterministic;
SVG2 samples random tokens), then ``warm_iters`` iterations per call started from the centroids
cached in ``state`` (per layer; reused when batch, heads and cluster counts match). Each
iteration assigns every token to its nearest centroid (ties: lower index) and moves every
centroid to the mean of its members (an empty cluster keeps its centroid), so every token has
exactly one cluster and the final centroids are the means of the final clusters. Cluster counts
above the sequence length are clamped to it. On CUDA, ``kmeans="auto"`` runs the iterations with
the optional ``flash-kmeans`` package when it is installed (the same Lloyd iterations in Triton;
the centroids are then recomputed here from its labels, in fp32); the torch path is the CPU path
and the oracle.

Departures from SVG2: deterministic initialisation; block-granular execution over fixed-size
blocks (SVG2 runs variable-size cluster blocks in a patched FlashInfer); batch > 1 works; the
``min_fraction`` floor is rounded down with a minimum of one cluster.

Options: ``q_clusters`` (300), ``k_clusters`` (1000), ``iters`` (20; SVG2 uses 50), ``warm_iters``
(2), ``top_p`` (0.9), ``min_fraction`` (0.1), ``kmeans`` ("auto" | "torch" | "flash"). Sparsity is
steered mostly by ``top_p`` and ``min_fraction`` (the floor dominates for flat heads).

The block map of the kept cluster pairs comes from :mod:`vidsparse.maskers.groups`, shared with
the ``svg`` and ``vmoba`` maskers.
"""

from __future__ import annotations

import math

import torch

from ..mask import BlockMask, num_blocks
from ..plan import MaskPlan
from .groups import group_block_mask, group_block_mask_reference, work_dtype
from .registry import Masker, register

__all__ = ["kmeans", "kmeans_reference", "select_clusters", "svg2_reference", "svg2_plan", "SVG2Masker"]


# ------------------------------------------------------------------------------------- k-means
def _init_centroids(x: torch.Tensor, n_clusters: int) -> torch.Tensor:
    idx = torch.linspace(0, x.shape[1] - 1, n_clusters, device=x.device).round().long()
    return x[:, idx]


def _assign(x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    # argmin ||x - c||^2 = argmin (||c||^2 - 2 x.c)
    dist = (cent * cent).sum(-1)[:, None, :] - 2 * torch.bmm(x, cent.transpose(1, 2))
    return dist.argmin(-1)


def _update(x: torch.Tensor, labels: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g, c, d = old.shape
    sums = torch.zeros(g, c, d, dtype=x.dtype, device=x.device).scatter_add_(1, labels[..., None].expand(-1, -1, d), x)
    counts = torch.zeros(g, c, dtype=x.dtype, device=x.device).scatter_add_(1, labels, torch.ones_like(x[..., 0]))
    cent = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], old)
    return cent, counts


def kmeans(x: torch.Tensor, n_clusters: int, iters: int, init: torch.Tensor | None = None, *,
           backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Lloyd k-means.

    Args:
        x: (G, N, D) float32/float64 points (G independent problems, e.g. batch x heads).
        n_clusters: C <= N.
        iters: Lloyd iterations (>= 0; 0 only assigns to ``init``).
        init: (G, C, D) starting centroids, default C tokens at evenly spaced positions.
        backend: "torch", or "flash" (the optional ``flash-kmeans`` package, CUDA).
    Returns:
        labels (G, N) int64, centroids (G, C, D) (the mean of each cluster's members; an empty
        cluster keeps its previous centroid), counts (G, C) in x's dtype.
    """
    cent = _init_centroids(x, n_clusters) if init is None else init.to(x.dtype)
    if iters == 0:
        labels = _assign(x, cent)
        counts = torch.zeros(cent.shape[:2], dtype=x.dtype, device=x.device)
        return labels, cent, counts.scatter_add_(1, labels, torch.ones_like(x[..., 0]))
    if backend == "flash":
        from flash_kmeans import batch_kmeans_Euclid

        xin = x.half() if x.dtype != torch.float64 else x.float()
        labels, fc, _ = batch_kmeans_Euclid(xin.contiguous(), n_clusters, max_iters=iters, tol=0.0,
                                            init_centroids=cent.to(xin.dtype).contiguous())
        labels = labels.long()
        cent, counts = _update(x, labels, fc.to(x.dtype))
        return labels, cent, counts
    for _ in range(iters):
        labels = _assign(x, cent)
        cent, counts = _update(x, labels, cent)
    return labels, cent, counts


def kmeans_reference(x: torch.Tensor, n_clusters: int, iters: int, init: torch.Tensor | None = None):
    """Oracle of :func:`kmeans` for one problem: x (N, D) -> labels (N,), centroids (C, D), counts (C,)."""
    n = x.shape[0]
    cent = x[torch.linspace(0, n - 1, n_clusters).round().long()].clone() if init is None else init.clone()
    labels = ((x[:, None, :] - cent[None]) ** 2).sum(-1).argmin(-1)
    for _ in range(iters):
        labels = ((x[:, None, :] - cent[None]) ** 2).sum(-1).argmin(-1)
        for c in range(n_clusters):
            members = x[labels == c]
            if len(members):
                cent[c] = members.mean(0)
    counts = torch.bincount(labels, minlength=n_clusters).to(x.dtype)
    return labels, cent, counts


# ----------------------------------------------------------------------------------- selection
def _min_clusters(min_fraction: float, n: int) -> int:
    return max(1, math.floor(min_fraction * n * (1 + 1e-9)))


def select_clusters(q_cent: torch.Tensor, k_cent: torch.Tensor, k_counts: torch.Tensor, *,
                    top_p: float, min_fraction: float) -> torch.Tensor:
    """Kept (query cluster, key cluster) pairs.

    Args:
        q_cent: (..., Cq, D), k_cent: (..., Ck, D), k_counts: (..., Ck) tokens per key cluster.
    Returns:
        (..., Cq, Ck) bool (see the module docstring for the rule).
    """
    ck = k_cent.shape[-2]
    logits = q_cent @ k_cent.transpose(-1, -2) / math.sqrt(q_cent.shape[-1]) + k_counts.log()[..., None, :]
    probs = torch.softmax(logits, dim=-1)
    vals, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    n_keep = 1 + (vals.cumsum(-1) < top_p).sum(-1)
    if top_p >= 1.0:
        n_keep = torch.full_like(n_keep, ck)
    n_keep = n_keep.clamp(min=_min_clusters(min_fraction, ck), max=ck)
    keep_sorted = torch.arange(ck, device=probs.device) < n_keep[..., None]
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


# ----------------------------------------------------------------------------------- the plans
def svg2_reference(q, k, *, q_clusters, k_clusters, iters, top_p, min_fraction, block_q, block_k,
                   q_init=None, k_init=None):
    """Eager oracle, one (batch, head) at a time. Returns (dense (B, H, NQB, NKB), perm, k_perm)."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    wd = work_dtype(q)
    cq, ck = min(q_clusters, lq), min(k_clusters, lk)
    dense = torch.zeros(b, h, num_blocks(lq, block_q), num_blocks(lk, block_k), dtype=torch.bool)
    perm = torch.empty(b, h, lq, dtype=torch.long)
    k_perm = torch.empty(b, h, lk, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            qi = None if q_init is None else q_init[bi, hi]
            ki = None if k_init is None else k_init[bi, hi]
            lq_, cent_q, _ = kmeans_reference(q[bi, hi].to(wd), cq, iters, qi)
            lk_, cent_k, cnt_k = kmeans_reference(k[bi, hi].to(wd), ck, iters, ki)
            keep = select_clusters(cent_q, cent_k, cnt_k, top_p=top_p, min_fraction=min_fraction)
            perm[bi, hi] = torch.sort(lq_, stable=True).indices
            k_perm[bi, hi] = torch.sort(lk_, stable=True).indices
            dense[bi, hi] = group_block_mask_reference(lq_[perm[bi, hi]], lk_[k_perm[bi, hi]], keep,
                                                       block_q=block_q, block_k=block_k)
    return dense, perm, k_perm


def svg2_plan(q, k, *, q_clusters, k_clusters, iters, warm_iters, top_p, min_fraction, block_q, block_k,
              state=None, kmeans_backend="torch") -> MaskPlan:
    """The batched path: all (batch, head) problems in one k-means, one selection, one block map."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    wd = work_dtype(q)
    cq, ck = min(q_clusters, lq), min(k_clusters, lk)
    xq, xk = q.to(wd).reshape(b * h, lq, d), k.to(wd).reshape(b * h, lk, d)
    init_q = init_k = None
    if state is not None:
        cq0, ck0 = state.get("q_centroids"), state.get("k_centroids")
        if (cq0 is not None and ck0 is not None and cq0.shape == (b * h, cq, d) and ck0.shape == (b * h, ck, d)
                and cq0.device == q.device):
            init_q, init_k = cq0, ck0
    n_iter = iters if init_q is None else warm_iters
    lab_q, cent_q, _ = kmeans(xq, cq, n_iter, init_q, backend=kmeans_backend)
    lab_k, cent_k, cnt_k = kmeans(xk, ck, n_iter, init_k, backend=kmeans_backend)
    if state is not None:
        state.update(q_centroids=cent_q, k_centroids=cent_k, last_iters=n_iter, warm=init_q is not None,
                     calls=state.get("calls", 0) + 1)
    keep = select_clusters(cent_q, cent_k, cnt_k, top_p=top_p, min_fraction=min_fraction)
    sq, perm = torch.sort(lab_q, dim=-1, stable=True)
    sk, k_perm = torch.sort(lab_k, dim=-1, stable=True)
    dense = group_block_mask(sq.view(b, h, lq), sk.view(b, h, lk), keep.view(b, h, cq, ck),
                             block_q=block_q, block_k=block_k)
    mask = BlockMask.from_dense(dense, block_q=block_q, block_k=block_k, q_len=lq, k_len=lk)
    return MaskPlan(mask, perm.view(b, h, lq), k_perm=k_perm.view(b, h, lk), _checked=True)


def _flash_kmeans_available() -> bool:
    try:
        import flash_kmeans  # noqa: F401
    except Exception:
        return False
    return True


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"masker 'svg2': option {name!r} must be an int >= {low}, got {value!r}")
    return value


def _check_unit(masker: str, name: str, value, *, low_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        rng = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"masker {masker!r}: option {name!r} must be a float in {rng}, got {value!r}")
    return float(value)


@register("svg2")
class SVG2Masker(Masker):
    """SVG2's k-means permutation with centroid Top-p and a floor (see the module docstring)."""

    defaults = {"q_clusters": 300, "k_clusters": 1000, "iters": 20, "warm_iters": 2, "top_p": 0.9,
                "min_fraction": 0.1, "kmeans": "auto"}
    # a target sparsity is reached with top_p; the floor is lowered so it does not pin flat heads
    density_option, density_bounds, density_fixed = "top_p", (1e-3, 1.0), {"min_fraction": 0.01}

    def validate(self, options, heads):
        o = dict(options)
        for name in ("q_clusters", "k_clusters", "iters"):
            o[name] = _check_int(name, o[name], 1)
        o["warm_iters"] = _check_int("warm_iters", o["warm_iters"], 0)
        o["top_p"] = _check_unit("svg2", "top_p", o["top_p"])
        o["min_fraction"] = _check_unit("svg2", "min_fraction", o["min_fraction"], low_open=False)
        if o["kmeans"] not in ("auto", "torch", "flash"):
            raise ValueError(f"masker 'svg2': option 'kmeans' must be 'auto', 'torch' or 'flash', got {o['kmeans']!r}")
        if o["kmeans"] == "flash" and not _flash_kmeans_available():
            raise ValueError("masker 'svg2': option 'kmeans'='flash' needs the flash-kmeans package "
                             "(pip install flash-kmeans)")
        return o

    def new_state(self) -> dict:
        return {}

    def build(self, q, k, *, block_q, block_k, grid, positions, state, q_clusters, k_clusters, iters,
              warm_iters, top_p, min_fraction, kmeans):
        backend = kmeans
        if backend == "auto":
            backend = "flash" if q.is_cuda and _flash_kmeans_available() else "torch"
        if backend == "flash" and not q.is_cuda:
            backend = "torch"
        return svg2_plan(q, k, q_clusters=q_clusters, k_clusters=k_clusters, iters=iters, warm_iters=warm_iters,
                         top_p=top_p, min_fraction=min_fraction, block_q=block_q, block_k=block_k, state=state,
                         kmeans_backend=backend)
