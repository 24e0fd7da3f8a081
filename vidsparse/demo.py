"""`vidsparse demo`: SpargeAttention2's hybrid mask and block-sparse attention on a video-like input.

Builds queries and keys with the structure video attention has (tokens on a t x h x w grid,
features that vary smoothly in space and time, plus noise), predicts the hybrid Top-k + Top-p
mask, runs block-sparse attention, and compares with dense attention on the same inputs:
achieved sparsity, relative error, cosine similarity and time. Writes a PNG of one head's
block mask and a JSON summary to --out.

It runs on the CPU in well under a minute with its defaults and uses the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


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
    import torch

    fn()  # warm-up (kernel compilation, autotuning)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2] * 1e3


def save_mask_png(mask, path: str, *, head: int = 0, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = mask.dense[0, head].float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(7, 7 * dense.shape[0] / max(dense.shape[1], 1) + 0.8))
    ax.imshow(dense, cmap="Greys", interpolation="nearest", aspect="auto")
    ax.set_xlabel(f"key block ({mask.block_k} tokens)")
    ax.set_ylabel(f"query block ({mask.block_q} tokens)")
    ax.set_title(title or f"head {head}: kept blocks (black), sparsity {1 - dense.mean():.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vidsparse demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=16)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--topk", type=float, default=0.03, help="Top-k fraction of key blocks (paper: 0.03)")
    parser.add_argument("--topp", type=float, default=0.2, help="Top-p pooled mass (paper: 0.2 at 480p)")
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="out/demo", help="folder for the mask PNG and the JSON summary")
    args = parser.parse_args(argv)
    for name in ("frames", "height", "width", "heads", "head_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    import torch

    import vidsparse
    from vidsparse import BlockMask

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = video_like_qkv(args.frames, args.height, args.width, args.heads, args.head_dim,
                             seed=args.seed, device=device, dtype=dtype)
    n = q.shape[2]
    print(f"vidsparse demo: {n} tokens ({args.frames}x{args.height}x{args.width} grid), {args.heads} heads x "
          f"{args.head_dim}, {str(dtype).replace('torch.', '')} on {device}")
    print(f"hybrid mask: topk={args.topk}, topp={args.topp}, blocks {args.block_q}x{args.block_k}")

    full = BlockMask.full(block_q=args.block_q, block_k=args.block_k, q_len=n, k_len=n, device=device)
    dense_out, dense_ms = _timed(lambda: vidsparse.block_sparse_attention(q, k, v, full), device)

    def sparse():
        mask = vidsparse.api.predict_mask(q, k, topk=args.topk, topp=args.topp,
                                          block_q=args.block_q, block_k=args.block_k)
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
    backend = "triton" if device.type == "cuda" else "reference (exact eager PyTorch; no speed-up on CPU)"
    print(f"\nbackend: {backend}; times are medians of 3 runs after a warm-up, mask prediction included")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "mask_head0.png")
    save_mask_png(mask, png, title=f"hybrid mask, head 0 (k={args.topk}, p={args.topp}), sparsity {mask.sparsity():.3f}")
    summary = {
        "tokens": n, "heads": args.heads, "head_dim": args.head_dim, "device": str(device),
        "topk": args.topk, "topp": args.topp, "block": [args.block_q, args.block_k],
        "rows": [dict(zip(("method", "sparsity", "time_ms", "rel_err", "cosine"), r)) for r in rows],
    }
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {png} and {os.path.join(args.out, 'demo.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
