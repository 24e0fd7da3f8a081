"""What one rank of a context-parallel Wan2.1-14B 720p run computes and sends, measured on ONE GPU.

Shape: one Wan2.1-14B 720p self-attention, B=1, 40 heads x 128, grid (21, 45, 80) = 75,600 video
tokens, bf16, 128 x 64 blocks, the default masker (hybrid, tiled order since the grid is known)
at 95% block sparsity (Top-k at k = 0.05 on random inputs, as ``vidsparse bench attention``
does; the achieved sparsity is reported). For P = 1, 2, 4, 8 ranks it times what ONE rank of P
computes, at that rank's shape (``triton.testing.do_bench`` medians, ms):

Ulysses, all tokens and 40/P heads
    ``mask_ms``: the masker on the rank's heads; ``sparse_ms``: ``block_sparse_attention`` with that
    plan (gathers into the tiled order included); ``dense_ms``: SDPA pinned to cuDNN.
Ring, N/P queries against P chunks of N/P keys, 40 heads (the chunks are runs of whole 128-token
blocks of the attention order, as ``vidsparse.integrations.context_parallel`` cuts them)
    ``mask_ms``: pooling the rank's blocks and its mask rows over all key blocks (the all-gathered
    pooled keys are stood in for by the full tensor); ``sparse_ms``: the P steps, each the chunk's
    BlockMask, the kernel with LSE and the merge, for the slowest of the P ranks (all are timed);
    ``dense_ms``: P steps of cuDNN attention with LSE (``aten._scaled_dot_product_cudnn_attention``,
    as diffusers' ring uses it) and the merge. ``check``: rank 0's merged ring output against the
    kernel over all keys at once (max abs difference; bf16).

Communication cannot be timed on one GPU; it is counted: bytes one rank sends per attention call
(the largest over ranks) and per 40-layer forward (x40; classifier-free guidance doubles both):

* Ulysses: q, k, v all-to-all in and o back, 4 (P-1)/P * (N/P) * H * D * 2 bytes;
* ring: K and V passed on P-1 times; q, k, v moved into the tiled attention order and o moved
  back (the rows that leave the rank, counted exactly from the exchange tables); the pooled keys
  all-gathered (float32);
* ring with a token-level masker (svg, svg2, xattention, vmoba): the above plus all-gathering q
  and k for prediction (reported separately).

Not measured here: several GPUs, the overlap of the ring's communication with its compute, and
everything outside attention. A rank's time on P GPUs is at least its compute below and at
least its communication over the link.

    python benchmarks/cp_probe.py                                   # H200, < 3 minutes
    python benchmarks/cp_probe.py --tiny --out /tmp/cp_probe.json   # CPU smoke test (small shape)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vidsparse  # noqa: E402
from vidsparse import BlockMask  # noqa: E402
from vidsparse.integrations import context_parallel as cp  # noqa: E402
from vidsparse.maskers.hybrid import block_mean  # noqa: E402
from vidsparse.utils import versions  # noqa: E402

WAN14B_720P = dict(heads=40, head_dim=128, grid=(21, 45, 80), block_q=128, block_k=64, dtype="bf16", layers=40)
TINY = dict(heads=8, head_dim=32, grid=(4, 8, 16), block_q=32, block_k=16, dtype="fp32", layers=40)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_timer(device: torch.device):
    """ms medians: do_bench on CUDA, perf_counter medians of 3 on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median"))

    def cpu(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu


def dense(q, k, v):
    """Dense attention (B, H, L, D): SDPA pinned to cuDNN on CUDA, SDPA's default on the CPU."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def dense_with_lse(q, k, v):
    """Dense attention and its log-sum-exp (B, H, L): cuDNN on CUDA, explicit maths on the CPU."""
    if q.is_cuda:  # contiguous inputs only (diffusers notes wrong results otherwise)
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
        lse = out[1]
        return out[0], (lse.squeeze(-1) if lse.dim() == 4 else lse).float()
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype), lse


def ulysses_rank(P, q, k, v, shape, keep, backend, bench) -> dict:
    """One Ulysses rank: every token, heads 0 .. H/P - 1."""
    h = shape["heads"] // P
    qs, ks, vs = (t[:, :h].contiguous() for t in (q, k, v))
    masker = vidsparse.maskers.get("hybrid")
    options = masker.check_options({"topk": keep, "topp": None}, h)  # checked once, as a patched layer does

    def predict():
        return masker.plan(qs, ks, grid=shape["grid"], state=None, block_q=shape["block_q"],
                           block_k=shape["block_k"], options=options)

    plan = predict()
    return {
        "heads": h, "tokens": q.shape[2], "sparsity": plan.sparsity(), "mask_ms": bench(predict),
        "sparse_ms": bench(lambda: vidsparse.block_sparse_attention(qs, ks, vs, plan, backend=backend)),
        "dense_ms": bench(lambda: dense(qs, ks, vs)),
    }


def ring_steps(q, chunks, masks, backend):
    """One ring rank's compute: each (k, v) chunk with its mask, merged by LSE. Returns o (B, H, L, D) float."""
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
    for j, (k, v) in enumerate(chunks):
        mask = masks(j)
        if mask is not None:
            o_p, lse_p = vidsparse.block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
            o, lse = cp.merge_partial(o, lse, o_p, lse_p)
    return o


def ring_dense_steps(q, chunks):
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
    for k, v in chunks:
        o, lse = cp.merge_partial(o, lse, *dense_with_lse(q, k, v))
    return o


def ring_rank_rows(P, qa, ka, va, dense_map, shape, keep, backend, bench) -> dict:
    """Every ring rank of P: its queries in the attention order against all key chunks (each rank's
    tensors contiguous, as after the exchange)."""
    bq, bk, n = shape["block_q"], shape["block_k"], qa.shape[2]
    bounds = cp.attention_bounds(n, P, max(bq, bk))
    spans = list(zip(bounds[:-1], bounds[1:]))
    chunks = [(ka[:, :, lo:hi].contiguous(), va[:, :, lo:hi].contiguous()) for lo, hi in spans]

    def rank(r):
        lo, hi = spans[r]
        rows = dense_map[..., lo // bq:lo // bq + math.ceil((hi - lo) / bq), :]
        return qa[:, :, lo:hi].contiguous(), rows, lambda: cp.chunk_masks(rows, bounds, hi - lo, bq, bk)

    times = []
    for r in range(P):
        q_r, _, masks = rank(r)
        times.append(bench(lambda: ring_steps(q_r, chunks, masks(), backend)))
    q0, rows0, masks0 = rank(0)
    full = BlockMask.from_dense(rows0, block_q=bq, block_k=bk, q_len=q0.shape[2], k_len=n)
    want = vidsparse.block_sparse_attention(q0, ka, va, full, backend=backend).float()
    k_means = block_mean(ka, bk)  # what the all-gather of the pooled keys delivers
    predict = lambda: cp.hybrid_rows(block_mean(q0, bq), k_means, first_block=0, tokens=n, block_q=bq,  # noqa: E731
                                     block_k=bk, topk=keep, topp=None)
    return {"queries": q0.shape[2], "mask_ms": bench(predict), "sparse_ms": max(times), "sparse_ms_per_rank": times,
            "dense_ms": bench(lambda: ring_dense_steps(q0, chunks)),
            "check": (ring_steps(q0, chunks, masks0(), backend) - want).abs().max().item()}


def comm_bytes(P, shape, order) -> dict:
    """Bytes one rank sends per attention call (the rank that sends most)."""
    h, d, n = shape["heads"], shape["head_dim"], math.prod(shape["grid"])
    token = h * d * 2  # one token of one bf16 tensor, all heads
    sizes = cp.split_sizes(n, P)
    caller = [sum(sizes[:i]) for i in range(P + 1)]
    bounds = cp.attention_bounds(n, P, max(shape["block_q"], shape["block_k"]))
    lengths = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    per_rank = []
    for r in range(P):
        t = cp.routes(None if order is None else order[None, None], 1, 1, caller, bounds, r, "cpu")
        leaving = 3 * (sum(t.send_counts) - t.send_counts[r]) + sum(t.recv_counts) - t.recv_counts[r]  # q, k, v; o
        per_rank.append({
            "ring_kv": sum(lengths[(r - s) % P] for s in range(P - 1)) * 2 * token,
            "ring_reorder": leaving * token,
            "ring_pooled_keys": (P - 1) * math.ceil(lengths[r] / shape["block_k"]) * h * d * 4,  # float32 means
        })
    worst = max(per_rank, key=lambda x: sum(x.values()))
    return {"ulysses": 4 * max(sizes) * (h - h // P) * d * 2, **worst, "ring_total": sum(worst.values()),
            "ring_token_masker_extra": 2 * (P - 1) * max(sizes) * token}


def _mb(x: float) -> str:
    return f"{x / 2 ** 20:9.1f}"


def print_table(rows: list[dict], layers: int) -> None:
    print(f"{'P':>2} | {'Ulysses heads':>13} {'mask':>7} {'sparse':>8} {'dense':>8} {'MB/call':>9} {'MB/fwd':>9}"
          f" | {'ring queries':>12} {'mask':>7} {'sparse':>8} {'dense':>8} {'MB/call':>9} {'MB/fwd':>9}  (ms)")
    for row in rows:
        u, r, c = row["ulysses"], row["ring"], row["bytes"]
        print(f"{row['P']:>2} | {u['heads']:>13} {u['mask_ms']:7.3f} {u['sparse_ms']:8.3f} {u['dense_ms']:8.3f}"
              f" {_mb(c['ulysses'])} {_mb(c['ulysses'] * layers)} | {r['queries']:>12} {r['mask_ms']:7.3f}"
              f" {r['sparse_ms']:8.3f} {r['dense_ms']:8.3f} {_mb(c['ring_total'])} {_mb(c['ring_total'] * layers)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a small shape on the CPU (smoke test)")
    p.add_argument("--degrees", default="1,2,4,8", help="comma-separated rank counts P (default 1,2,4,8)")
    p.add_argument("--sparsity", type=float, default=0.95, help="target block sparsity in [0, 1) (default 0.95)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "cp_probe.json"))
    a = p.parse_args(argv)
    shape = TINY if a.tiny else WAN14B_720P
    try:
        degrees = [int(x) for x in a.degrees.split(",")]
    except ValueError:
        p.error(f"--degrees: expected comma-separated integers, got {a.degrees!r}")
    if any(P < 1 or shape["heads"] % P for P in degrees):
        p.error(f"--degrees: every degree must be >= 1 and divide the {shape['heads']} heads, got {a.degrees}")
    if not 0.0 <= a.sparsity < 1.0:
        p.error(f"--sparsity: expected a value in [0, 1), got {a.sparsity}")
    device = torch.device("cpu" if a.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use --tiny for the CPU smoke test)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run(shape, degrees, 1.0 - a.sparsity, device)
    print_table(result["rows"], shape["layers"])
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def run(shape: dict, degrees: list[int], keep: float, device: torch.device) -> dict:
    t0 = time.perf_counter()
    bench = make_timer(device)
    backend = "triton" if device.type == "cuda" else "gather"
    n, h, d = math.prod(shape["grid"]), shape["heads"], shape["head_dim"]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, device=device, dtype=DTYPES[shape["dtype"]], generator=gen) for _ in range(3))
    plan = vidsparse.maskers.get("hybrid")(q, k, grid=shape["grid"], block_q=shape["block_q"], block_k=shape["block_k"],
                                           topk=keep, topp=None)  # the whole sequence: the ring's global plan
    qa, ka, va = plan.to_attention_order(q, k, v)
    order = None if plan.perm is None else plan.perm[0, 0].cpu()
    rows = []
    for P in degrees:
        rows.append({"P": P, "ulysses": ulysses_rank(P, q, k, v, shape, keep, backend, bench),
                     "ring": ring_rank_rows(P, qa, ka, va, plan.mask.dense, shape, keep, backend, bench),
                     "bytes": comm_bytes(P, shape, order)})
        print(f"P={P} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {
        "benchmark": "cp_probe", "date": time.strftime("%Y-%m-%d"), "device": _device_name(device),
        "versions": versions(), "shape": {**shape, "tokens": n}, "target_sparsity": 1.0 - keep,
        "achieved_sparsity": plan.sparsity(), "backend": backend,
        "timing": "triton.testing.do_bench median, ms" if device.type == "cuda" else "perf_counter median of 3, ms",
        "bytes": "sent by one rank per attention call (largest over ranks); x layers per forward", "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
