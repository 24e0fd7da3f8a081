"""Cost of every registered masker's plan next to the sparse attention it feeds, and cuDNN dense.

On CUDA (default) at the Wan2.1-1.3B 480p shape: B=1, H=12, grid (21, 30, 52) = 32,760 tokens,
D=128, bf16, 128 x 64 blocks. For each masker and each target block sparsity (0.95, 0.90), the
method's own knob is set by bisection on these inputs (or a fixed setting for the static radial
mask) and the achieved sparsity is reported. Timed (``triton.testing.do_bench`` medians, one process):

* ``mask_ms``: the masker call (the plan: block mask and permutations);
* ``perm_ms``: gathering q, k, v into the plan's attention order and the output back
  (``perm_torch_ms``: the same with ``torch.gather``; ``copy_qkvo_ms`` in the metadata: one plain
  copy of the same bytes, the floor);
* ``kernel_ms``: ``block_sparse_attention`` on the already permuted tensors (Triton backend);
* ``total_ms``: ``mask_ms`` + ``block_sparse_attention(q, k, v, plan)`` (gathers, kernel, scatter);
* ``ratio``: (mask + permutation) / kernel; the target is <= 0.15 at 95%.

svg2 is timed cold (a fresh state: ``iters`` k-means iterations) and warm (``warm_iters`` from the
cached centroids); radial's first (uncached) build is reported as ``build_ms``; vmoba is timed on
its 3-D partition. The inputs are random with a per-frame and a per-pixel component (video-like
enough for the data-dependent maskers to differ by head; their sparsity at a given knob on a
real model differs, which is why the knob is calibrated here).

``--quick`` runs a small shape on the CPU (gather backend, perf_counter medians) as a smoke test.

    python benchmarks/bench_maskers.py --out masker_bench.json
    python benchmarks/bench_maskers.py --quick --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vidsparse  # noqa: E402
from vidsparse.kernels.permute import torch_permute_rows  # noqa: E402
from vidsparse.maskers import radial as radial_mod  # noqa: E402
from vidsparse.maskers.token_order import grid_coords  # noqa: E402

TARGETS = (0.95, 0.90)

# knob name, its range, whether a larger knob keeps more blocks, fixed options
KNOBS = {
    "hybrid": ("topk", (1e-3, 1.0), dict(topp=None)),
    "svg": ("budget", (1e-3, 1.0), {}),
    "svg2": ("top_p", (1e-3, 1.0), dict(min_fraction=0.0)),
    "xattention": ("threshold", (1e-3, 1.0), {}),
    "radial": ("decay", (0.0, 1.0), dict(dense_frames=0, sink_frames=0)),
    "vmoba": ("topk", (1e-3, 1.0), dict(partition="3d")),
}


def make_inputs(b, h, grid, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = grid_coords(grid)
    frame, pixel = c[:, 0], c[:, 1] * grid[2] + c[:, 2]
    n = math.prod(grid)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    sig_f = torch.randn(h, grid[0], d, generator=g)[:, frame]
    sig_p = torch.randn(h, grid[1] * grid[2], d, generator=g)[:, pixel]
    w = torch.rand(h, 1, 1, generator=g) * 2
    q, k = q + w * sig_f + (2 - w) * sig_p, k + w * sig_f + (2 - w) * sig_p
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def timer(device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))

    def cpu(fn, reps=3):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return cpu


def calibrate(method, target, q, k, call, steps):
    """Bisection on the method's knob for the block sparsity closest to ``target``."""
    knob, (lo, hi), fixed = KNOBS[method]
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        opts = {**fixed, knob: mid}
        s = call(opts).sparsity()
        if best is None or abs(s - target) < abs(best[1] - target):
            best = (opts, s)
        if s > target:
            lo = mid  # too sparse: keep more
        else:
            hi = mid
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shape on the CPU (smoke test)")
    p.add_argument("--out", default="masker_bench.json")
    p.add_argument("--methods", default=",".join(vidsparse.maskers.available()))
    a = p.parse_args(argv)

    if a.quick:
        dev, dtype, b, h, grid, d, bq, bk, backend = torch.device("cpu"), torch.float32, 1, 2, (4, 8, 8), 32, 32, 16, "gather"
        steps, extra = 4, {"svg2": dict(q_clusters=16, k_clusters=32, iters=5), "vmoba": dict(chunk_3d=(2, 4, 4))}
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (use --quick for the CPU smoke test)")
        dev, dtype, b, h, grid, d, bq, bk, backend = torch.device("cuda"), torch.bfloat16, 1, 12, (21, 30, 52), 128, 128, 64, "triton"
        steps, extra = 10, {}
    bench = timer(dev)
    q, k, v = make_inputs(b, h, grid, d, dtype, dev)
    n = math.prod(grid)

    if dev.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def dense():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    else:
        def dense():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    dense_ms = bench(dense)
    # the least a permutation can cost: reading and writing q, k, v and the output once
    copy_ms = bench(lambda: [x.clone() for x in (q, k, v, q)])

    rows = []
    for method in a.methods.split(","):
        masker = vidsparse.maskers.get(method)
        if method not in KNOBS:
            print(f"{method}: no sparsity knob known to this benchmark; skipped")
            continue
        base = dict(extra.get(method, {}))

        def call(opts, state=None, _m=masker, _base=base):
            return _m(q, k, grid=grid, block_q=bq, block_k=bk, state=state, **{**_base, **opts})

        for target in TARGETS:
            opts, achieved = calibrate(method, target, q, k, call, steps)
            variants = [("", None)]
            if method == "svg2":
                variants = [(" cold", "cold"), (" warm", "warm")]
            for suffix, mode in variants:
                row = {"method": method + suffix, "target": target, "options": {**base, **opts}}
                if mode == "cold":
                    mask_fn = lambda: call(opts, state=masker.new_state())  # noqa: E731
                elif mode == "warm":
                    st = masker.new_state()
                    call(opts, state=st)
                    mask_fn = lambda st=st: call(opts, state=st)  # noqa: E731
                else:
                    mask_fn = lambda: call(opts)  # noqa: E731
                if method == "radial":
                    radial_mod._CACHE.clear()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    call(opts)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    row["build_ms"] = (time.perf_counter() - t0) * 1e3
                plan = mask_fn()
                qa, ka, va = plan.to_attention_order(q, k, v)
                row["sparsity"] = plan.sparsity()
                row["mask_ms"] = bench(mask_fn)
                row["perm_ms"] = bench(lambda: (plan.to_attention_order(q, k, v), plan.to_caller_order(qa)))
                if plan.perm is not None:  # the torch.gather path the kernel replaced, same inputs
                    row["perm_torch_ms"] = bench(lambda: (
                        torch_permute_rows(q, plan.perm), [torch_permute_rows(x, plan.k_perm) for x in (k, v)],
                        torch_permute_rows(qa, plan.inverse)))
                row["kernel_ms"] = bench(lambda: vidsparse.block_sparse_attention(qa, ka, va, plan.mask, backend=backend))
                attn = bench(lambda: vidsparse.block_sparse_attention(q, k, v, plan, backend=backend))
                row["total_ms"] = row["mask_ms"] + attn
                row["ratio"] = (row["mask_ms"] + row["perm_ms"]) / row["kernel_ms"]
                row["dense_ms"] = dense_ms
                row["speedup_vs_dense"] = dense_ms / row["total_ms"]
                rows.append(row)
                print(f"{row['method']:<12} target {target:.2f}  sparsity {row['sparsity']:.3f}  mask {row['mask_ms']:8.3f} ms"
                      f"  perm {row['perm_ms']:7.3f}  kernel {row['kernel_ms']:7.3f}  total {row['total_ms']:8.3f}"
                      f"  (mask+perm)/kernel {row['ratio']:6.2f}  vs dense {row['speedup_vs_dense']:5.2f}x", flush=True)

    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "dtype": str(dtype),
            "shape": {"B": b, "H": h, "grid": grid, "N": n, "D": d, "block_q": bq, "block_k": bk},
            "backend": backend, "dense_ms": dense_ms, "copy_qkvo_ms": copy_ms, "torch": torch.__version__}
    print(f"dense SDPA ({'cuDNN' if dev.type == 'cuda' else 'CPU'}): {dense_ms:.3f} ms; "
          f"copying q, k, v and o once: {copy_ms:.3f} ms")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
