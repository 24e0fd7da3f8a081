"""Where the time goes at the Wan2.1-1.3B shape (B=1, H=12, N=32760, D=128, bf16) on one GPU.

Stage timings of the fused mask predictor (pooling, pooled-score matmul, selection kernel at
several warp counts), the forward kernel (and, if present, an A/B copy of it saved as
``vidsparse/kernels/_ab_old_attention.py``, same run), and the
bytes/FLOPs each stage must move, against the card's measured copy bandwidth. Prints a table;
JSON to --out. Run under ncu separately for hardware counters (see benchmarks/gpu_profile.sh).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.testing

from vidsparse.kernels import triton_attention as new_attn
from vidsparse.maskers.hybrid_triton import _row_params, _select_kernel, fused_hybrid_block_mask, pool_blocks


def bench(fn, rep=200):
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--layout", choices=("bhnd", "bnhd"), default="bhnd")
    args = ap.parse_args(argv)
    dev = "cuda"
    b, h, n, d = 1, 12, 32760, 128
    g = torch.Generator(device=dev).manual_seed(0)
    if args.layout == "bhnd":
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    else:
        q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2) for _ in range(3))
    rows = {}
    # memory ceiling: a device-to-device copy of Q
    buf = torch.empty_like(q)
    t_copy = bench(lambda: buf.copy_(q))
    copy_bw = 2 * q.numel() * 2 / t_copy / 1e9  # TB/s, read + write
    rows["copy Q (read+write)"] = (t_copy, f"{copy_bw:.2f} TB/s")
    t_pq = bench(lambda: pool_blocks(q, 128))
    t_pk = bench(lambda: pool_blocks(k, 64))
    read_bw = q.numel() * 2 / t_pq / 1e9
    rows["pool Q (128)"] = (t_pq, f"{read_bw:.2f} TB/s read")
    rows["pool K (64)"] = (t_pk, f"{k.numel() * 2 / t_pk / 1e9:.2f} TB/s read")
    pq, pk = pool_blocks(q, 128), pool_blocks(k, 64)
    t_mm = bench(lambda: torch.matmul(pq, pk.transpose(-1, -2)))
    rows["scores matmul"] = (t_mm, "")
    scores = torch.matmul(pq, pk.transpose(-1, -2))
    nqb, nkb = scores.shape[-2:]
    dense = torch.empty(b, h, nqb, nkb, dtype=torch.int8, device=dev)
    idx = torch.empty(b, h, nqb, nkb, dtype=torch.int32, device=dev)
    cnt = torch.empty(b, h, nqb, dtype=torch.int32, device=dev)
    for topp in (None, 0.2):
        nk, tp = _row_params(0.05, topp, h, nkb, dev)
        for w in (1, 2, 4, 8):
            def sel(w=w, nk=nk, tp=tp):
                _select_kernel[(nqb, b * h)](scores, dense, idx, cnt, nk, tp, h, nqb, nkb, n, 128, 64, d ** -0.5,
                                             NKB_P2=triton.next_power_of_2(nkb), KEEP_SINK=False, KEEP_DIAG=False,
                                             HAS_TOPK=True, HAS_TOPP=topp is not None, num_warps=w)
            rows[f"select topk=0.05 topp={topp} warps={w}"] = (bench(sel), "")
    pred = lambda: fused_hybrid_block_mask(q, k, topk=0.05, topp=None)  # noqa: E731
    rows["predictor total (do_bench)"] = (bench(pred), "")
    rows["predictor total (graph)"] = (float(triton.testing.do_bench_cudagraph(pred, rep=200, return_mode="median")), "")
    # forward kernels, same masks
    try:
        from vidsparse.kernels import _ab_old_attention as old_attn
    except ImportError:
        old_attn = None
    for keep in (1.0, 0.05):
        mask = fused_hybrid_block_mask(q, k, topk=keep, topp=None)
        sp = mask.sparsity()
        flops = 4.0 * b * h * n * n * d * (1 - sp)
        o_new, l_new = new_attn.attention(q, k, v, mask, d ** -0.5)
        t_new = bench(lambda: new_attn.attention(q, k, v, mask, d ** -0.5))
        rows[f"fwd new sparsity {sp:.3f}"] = (t_new, f"{flops / t_new / 1e9:.0f} TFLOP/s")
        if old_attn is not None:
            o_old, l_old = old_attn.attention(q, k, v, mask, d ** -0.5)
            diff = (o_new.float() - o_old.float()).abs().max().item()
            t_old = bench(lambda: old_attn.attention(q, k, v, mask, d ** -0.5))
            rows[f"fwd old sparsity {sp:.3f}"] = (t_old, f"{flops / t_old / 1e9:.0f} TFLOP/s; max|new-old| {diff:.2e}")
    for name in ("fwd", "dkdv", "dq"):
        kern = {"fwd": new_attn._fwd_kernel, "dkdv": new_attn._bwd_dkdv_kernel, "dq": new_attn._bwd_dq_kernel}[name]
        best = getattr(kern, "best_config", None)
        if best is not None:
            rows[f"autotuned {name}"] = (float("nan"), str(best))
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} layout {args.layout}")
    for name, (ms, note) in rows.items():
        print(f"  {name:<40} {ms:9.4f} ms  {note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "layout": args.layout, "rows": {k_: {"ms": v_[0], "note": v_[1]} for k_, v_ in rows.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
