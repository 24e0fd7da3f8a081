"""A/B of the forward kernel variants at the Wan2.1-1.3B shape, in one process on one GPU.

Variants (``vidsparse.kernels.triton_attention.TMA_MODE``):

* ``0``  - the default pointer-arithmetic kernel (``_fwd_kernel``);
* ``1``  - ``_fwd_tma_kernel``: Q/K/V/O through TMA tensor descriptors;
* ``ws`` - the same with Triton's warp specialisation of the key loop.

For each sparsity it builds one Top-k mask (k = 1 - sparsity, as ``vidsparse bench attention``
does), checks every variant's O and LSE against the pointer kernel's (bf16: relative error of O
< 1e-2), then times the forward given the mask with ``triton.testing.do_bench`` (median, ms) and
reports cuDNN's dense forward from the same process for scale. A variant that fails to compile
or run is reported with its error instead of a time.

    python benchmarks/fwd_variants.py [--sparsities 0,0.95] [--out $OUT/fwd_variants.json]
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

MODES = ("0", "1", "ws")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0,0.95")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "fwd_variants.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("fwd_variants.py needs a CUDA GPU", file=sys.stderr)
        return 1

    import vidsparse
    from vidsparse.kernels import triton_attention as ta
    from vidsparse.kernels.triton_masker import fused_hybrid_block_mask

    torch.manual_seed(0)
    b, h, n, d = 1, args.heads, args.tokens, 128
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = d ** -0.5
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    card = torch.cuda.get_device_name()
    rows = []
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        mask = fused_hybrid_block_mask(q, k, topk=max(1e-6, 1.0 - sparsity), topp=None, block_q=128, block_k=64)
        achieved = float(mask.sparsity())
        ta.TMA_MODE = "0"
        o_ref, lse_ref = vidsparse.block_sparse_attention(q, k, v, mask, backend="triton", return_lse=True)
        for mode in MODES:
            ta.TMA_MODE = mode
            row = {"sparsity": achieved, "mode": mode}
            try:
                o, lse = vidsparse.block_sparse_attention(q, k, v, mask, backend="triton", return_lse=True)
                torch.cuda.synchronize()
                err = ((o.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
                fin = torch.isfinite(lse_ref)
                lse_err = (lse[fin] - lse_ref[fin]).abs().max().item() if fin.any() else 0.0
                row.update(o_rel_err=err, lse_max_err=lse_err, ok=err < 1e-2 and lse_err < 1e-2)
                row["fwd_ms"] = triton.testing.do_bench(
                    lambda: vidsparse.block_sparse_attention(q, k, v, mask, backend="triton"))
            except Exception as e:  # noqa: BLE001 - a variant that does not build is a result too
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            rows.append(row)
            print(row, flush=True)
    ta.TMA_MODE = "0"

    print(f"\n{card} | torch {torch.__version__} | triton {triton.__version__} | bf16 B={b} H={h} N={n} D={d} "
          f"| 128x64 blocks | cuDNN dense fwd {cudnn_ms:.3f} ms")
    print(f"{'sparsity':>8}  {'variant':<8} {'fwd ms':>8}  {'vs mode 0':>9}  check")
    for row in rows:
        base = next(r for r in rows if r["sparsity"] == row["sparsity"] and r["mode"] == "0")
        ms = row.get("fwd_ms")
        rel = f"{base['fwd_ms'] / ms:.2f}x" if ms and base.get("fwd_ms") else "-"
        check = "ok" if row["ok"] else row.get("error", f"mismatch {row.get('o_rel_err')}")
        print(f"{row['sparsity']:8.3f}  {row['mode']:<8} {ms if ms else float('nan'):8.3f}  {rel:>9}  {check}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": card, "torch": torch.__version__, "triton": triton.__version__,
                               "date": time.strftime("%Y-%m-%d %H:%M"), "shape": [b, h, n, d],
                               "cudnn_dense_fwd_ms": cudnn_ms, "rows": rows}, indent=1) + "\n")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
