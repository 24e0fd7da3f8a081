"""``vidsparse demo --synthetic``: the hybrid mask and block-sparse attention on synthetic
video-like queries and keys, no model. Writes ``mask_head0.png`` and ``demo.json``."""

from __future__ import annotations

import json
import math
import os
import time

from ..utils import sync
from .demo_media import save_mask_png

__all__ = ["video_like_qkv", "synthetic_main"]


def video_like_qkv(frames: int, height: int, width: int, heads: int, head_dim: int, *, seed: int, device, dtype):
    """(1, H, N, D) q, k, v for N = frames*height*width tokens in raster (t, h, w) order.

    Queries and keys are noisy random Fourier features of the token position, so attention
    concentrates on tokens near in space and time: the locality real video DiTs show.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    t, y, x = torch.meshgrid(
        torch.linspace(0, 1, frames), torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij"
    )
    coords = torch.stack([t, y, x], -1).reshape(-1, 3)  # (N, 3)

    # random Fourier features of the position: q_i . k_j = sum cos(w . (p_i - p_j)), a kernel that
    # peaks when tokens are close in space and time, as attention in video DiTs tends to
    half = head_dim // 2
    freqs = torch.randn(heads, half, 3, generator=g) * torch.tensor([6.0, 8.0, 8.0])
    ang = torch.einsum("nc,hfc->hnf", coords, freqs)  # (H, N, D/2)
    feats = torch.cat([torch.cos(ang), torch.sin(ang)], -1)
    peak = 12.0  # logit of a token with itself, before noise
    amp = math.sqrt(peak * math.sqrt(head_dim) / half)

    def noisy(x):
        return amp * (x + 0.3 * torch.randn(x.shape, generator=g))

    q, k, v = noisy(feats), noisy(feats), torch.randn(heads, coords.shape[0], head_dim, generator=g)
    return tuple(z[None].to(device=device, dtype=dtype).contiguous() for z in (q, k, v))


def _timed(fn, device, repeats: int = 3):
    """(fn()'s result, median milliseconds of ``repeats`` calls after a warm-up call)."""
    fn()  # warm-up (kernel compilation, autotuning)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2] * 1e3


def synthetic_main(args, device, *, topk: float | None, topp: float | None) -> dict:
    """Run the synthetic demo with the parsed flags of ``vidsparse demo --synthetic`` on ``device``
    (the output folder ``args.out`` already checked); returns the summary written to demo.json."""
    import torch

    import vidsparse
    from vidsparse import BlockMask, maskers

    frames = args.frames if args.frames is not None else 16
    height = args.height if args.height is not None else 16
    width = args.width if args.width is not None else 24
    heads = args.heads if args.heads is not None else 4
    head_dim = args.head_dim if args.head_dim is not None else 64
    args.block_q = args.block_q or 128
    args.block_k = args.block_k or 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = video_like_qkv(frames, height, width, heads, head_dim, seed=args.seed, device=device, dtype=dtype)
    n = q.shape[2]
    print(f"vidsparse demo --synthetic: {n} tokens ({frames}x{height}x{width} grid), {heads} heads x "
          f"{head_dim}, {str(dtype).replace('torch.', '')} on {device}")
    print(f"hybrid mask: topk={topk}, topp={topp}, blocks {args.block_q}x{args.block_k}")

    full = BlockMask.full(block_q=args.block_q, block_k=args.block_k, q_len=n, k_len=n, device=device)
    dense_out, dense_ms = _timed(lambda: vidsparse.block_sparse_attention(q, k, v, full), device)

    def sparse():
        mask = maskers.get("hybrid")(q, k, topk=topk, topp=topp, block_q=args.block_q, block_k=args.block_k).mask
        return vidsparse.block_sparse_attention(q, k, v, mask), mask

    (sparse_out, mask), sparse_ms = _timed(sparse, device)
    ref = dense_out.float()
    err = (sparse_out.float() - ref).norm() / ref.norm()
    cos = torch.nn.functional.cosine_similarity(sparse_out.float().flatten(), ref.flatten(), dim=0)
    # what the same sparsity costs with blocks chosen at random instead of by pooled scores
    rand_mask = BlockMask.from_dense(torch.rand(mask.dense.shape, device=device) < mask.density(),
                                     block_q=args.block_q, block_k=args.block_k, q_len=n, k_len=n)
    rand_out = vidsparse.block_sparse_attention(q, k, v, rand_mask).float()
    rand_err = (rand_out - ref).norm() / ref.norm()

    rows = [
        ("dense attention", 0.0, dense_ms, 0.0, 1.0),
        ("vidsparse hybrid mask", mask.sparsity(), sparse_ms, float(err), float(cos)),
        ("random mask, same density", rand_mask.sparsity(), None, float(rand_err),
         float(torch.nn.functional.cosine_similarity(rand_out.flatten(), ref.flatten(), dim=0))),
    ]
    print(f"\n{'':<28}{'sparsity':>9}{'time ms':>10}{'rel err':>10}{'cosine':>9}")
    for name, sp, ms, e, c in rows:
        print(f"{name:<28}{sp:>9.3f}{('-' if ms is None else f'{ms:.1f}'):>10}{e:>10.4f}{c:>9.4f}")
    backend = "triton" if device.type == "cuda" else "gather (eager PyTorch over the kept blocks)"
    print(f"\nbackend: {backend}; times are medians of 3 runs after a warm-up, mask prediction included")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "mask_head0.png")
    save_mask_png(mask, png, title=f"hybrid mask, head 0 (k={topk}, p={topp}), sparsity {mask.sparsity():.3f}")
    summary = {
        "tokens": n, "heads": heads, "head_dim": head_dim, "device": str(device),
        "topk": topk, "topp": topp, "block": [args.block_q, args.block_k],
        "rows": [dict(zip(("method", "sparsity", "time_ms", "rel_err", "cosine"), r)) for r in rows],
    }
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {png} and {os.path.join(args.out, 'demo.json')}")
    return summary
