"""A/B of the kernel variants at the Wan2.1-1.3B shape, in one process on one GPU.

Variants (``vidsparse.kernels.triton_attention.TMA_MODE``):

* ``ptr`` - the pointer-arithmetic kernels (``VIDSPARSE_TMA=0``);
* ``tma`` - ``_fwd_tma_kernel`` and ``_bwd_dkdv_tma_kernel``: tensors through TMA descriptors (the
  default on sm_90+); the dQ pass is the pointer kernel in both.

For each sparsity it builds one Top-k mask (k = 1 - sparsity, as ``vidsparse bench attention``
does), checks every variant's O, LSE, dQ, dK and dV against the pointer kernels' (bf16: relative
error < 1e-2), then times the forward and forward+backward given the mask with
``triton.testing.do_bench`` (median, ms) and reports cuDNN's dense forward from the same process
for scale, and the launch configuration the autotuner picked for each kernel. A variant that
fails to compile or run is reported with its error instead of a time.

    python benchmarks/kernel_variants.py [--sparsities 0,0.95] [--out $OUT/kernel_variants.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

MODES = {"ptr": "0", "tma": "1"}
KERNELS = ("_fwd_kernel", "_fwd_tma_kernel", "_bwd_dkdv_kernel", "_bwd_dkdv_tma_kernel", "_bwd_dq_kernel")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0,0.95")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "kernel_variants.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("kernel_variants.py needs a CUDA GPU", file=sys.stderr)
        return 1

    import vidsparse
    from vidsparse.kernels import triton_attention as ta
    from vidsparse.maskers.hybrid_triton import fused_hybrid_block_mask

    torch.manual_seed(0)
    b, h, n, d = 1, args.heads, args.tokens, 128
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), torch.no_grad():
        cudnn_ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    def fwd_bwd(mask):
        o = vidsparse.block_sparse_attention(q, k, v, mask, backend="triton")
        return torch.autograd.grad(o, (q, k, v), do)

    card = torch.cuda.get_device_name()
    rows = []
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        mask = fused_hybrid_block_mask(q, k, topk=max(1e-6, 1.0 - sparsity), topp=None, block_q=128, block_k=64)
        achieved = float(mask.sparsity())
        ta.TMA_MODE = "0"
        with torch.no_grad():
            o_ref, lse_ref = vidsparse.block_sparse_attention(q, k, v, mask, backend="triton", return_lse=True)
        grads_ref = fwd_bwd(mask)
        for mode, tma in MODES.items():
            ta.TMA_MODE = tma
            row = {"sparsity": achieved, "mode": mode}
            try:
                with torch.no_grad():
                    o, lse = vidsparse.block_sparse_attention(q, k, v, mask, backend="triton", return_lse=True)
                grads = fwd_bwd(mask)
                torch.cuda.synchronize()
                fin = torch.isfinite(lse_ref)
                lse_err = (lse[fin] - lse_ref[fin]).abs().max().item() if fin.any() else 0.0
                errs = {"o": rel(o, o_ref), **{name: rel(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, grads_ref)}}
                row.update(rel_err=errs, lse_max_err=lse_err, ok=max(errs.values()) < 1e-2 and lse_err < 1e-2)
                with torch.no_grad():
                    row["fwd_ms"] = triton.testing.do_bench(
                        lambda: vidsparse.block_sparse_attention(q, k, v, mask, backend="triton"))
                row["fwd_bwd_ms"] = triton.testing.do_bench(lambda: fwd_bwd(mask))
                row["configs"] = {name: str(getattr(getattr(ta, name), "best_config", None)) for name in KERNELS}
            except Exception as e:  # noqa: BLE001 - a variant that does not build is a result too
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            rows.append(row)
            print(row, flush=True)
    ta.TMA_MODE = "auto"

    print(f"\n{card} | torch {torch.__version__} | triton {triton.__version__} | bf16 B={b} H={h} N={n} D={d} "
          f"| 128x64 blocks | cuDNN dense fwd {cudnn_ms:.3f} ms")
    print(f"{'sparsity':>8}  {'variant':<8} {'fwd ms':>8} {'speed-up':>8} {'fwd+bwd ms':>10} {'speed-up':>8}  check")
    for row in rows:
        base = next(r for r in rows if r["sparsity"] == row["sparsity"] and r["mode"] == "ptr")
        cells = []
        for key in ("fwd_ms", "fwd_bwd_ms"):
            ms, ms0 = row.get(key), base.get(key)
            cells += [f"{ms:.3f}" if ms else "-", f"{ms0 / ms:.2f}x" if ms and ms0 else "-"]
        check = "ok" if row["ok"] else row.get("error", f"mismatch {row.get('rel_err')}")
        print(f"{row['sparsity']:8.3f}  {row['mode']:<8} {cells[0]:>8} {cells[1]:>8} {cells[2]:>10} {cells[3]:>8}  {check}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": card, "torch": torch.__version__, "triton": triton.__version__,
                               "date": time.strftime("%Y-%m-%d %H:%M"), "shape": [b, h, n, d],
                               "cudnn_dense_fwd_ms": cudnn_ms, "rows": rows}, indent=1) + "\n")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
