"""Launch-config sweep of the Triton backward kernels at the Wan2.1-1.3B shape.

What it measures, on one GPU (bf16, B=1 H=12 N=32760 D=128, mask block 128x64):

* every candidate (SUB_M, num_warps, num_stages) of ``_bwd_dkdv_kernel`` and ``_bwd_dq_kernel``:
  the library's autotune options (marked ``*``) plus SUB_M {32, 64, 128} x warps {4, 8} x
  stages {1, 2, 3, 4}. Each is launched alone (the Autotuner's JIT function called directly, with
  the exact arguments ``_backward`` passes), checked once against the autotuned ``_backward``
  (max |diff| / max |ref| < 1e-2, else "wrong") and timed; one that does not compile or load
  (e.g. out of shared memory) is recorded as "failed: <reason>";
* the whole autotuned ``_backward``, its three parts as the autotuner runs them (delta, dK/dV,
  dQ), and the forward ``_forward`` for scale.

Masks come from the library's fused predictor with Top-k only at k = 1 - sparsity on random
inputs, as ``vidsparse bench attention`` builds them. The library's autotune key ignores the
sparsity, so its autotune caches are cleared before each sparsity: the "autotuned" numbers are
what a process that saw only that sparsity would pick. Times are ``triton.testing.do_bench``
medians in ms.

Run on a GPU (3-4 minutes cold; Triton compiles each config once, in parallel threads first):

    python benchmarks/bwd_sweep.py [--quick]

``--quick`` sweeps sparsity 0.95 only. Prints a table; JSON goes to $OUT/bwd_sweep.json (OUT
defaults to ./out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

B, H, N, D = 1, 12, 32760, 128
BLOCK_Q, BLOCK_K = 128, 64
GRID = [(sm, w, st) for sm in (32, 64, 128) for w in (4, 8) for st in (1, 2, 3, 4)]
TOL = 1e-2  # max |config - autotuned| / max |autotuned|
MATMULS = {"dkdv": 4, "dq": 3}  # GEMMs per kept block pair: S, dV, dP, dK / S, dP, dQ
OUTPUTS = {"dkdv": ("dk", "dv"), "dq": ("dq",)}


def candidates(options) -> tuple[list[tuple[int, int, int]], set]:
    """The library's options (its order) then the rest of GRID, as (SUB_M, num_warps, num_stages)."""
    own = [(meta["SUB_M"], w, st) for meta, w, st in options]
    return own + [c for c in GRID if c not in own], set(own)


def short(exc: BaseException) -> str:
    """One line: Triton's compile errors put the cause last, everything else first."""
    if type(exc).__name__ == "OutOfResources":
        return f"out of {exc.name} ({exc.required} > {exc.limit})"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = (lines[-1] if type(exc).__name__ == "CompilationError" else lines[0]) if lines else ""
    return f"{type(exc).__name__}: {line}"[:120]


def label(cfg) -> str:
    return f"SUB_M={cfg[0]:<3} w{cfg[1]} s{cfg[2]}"


def config_of(c) -> tuple[int, int, int]:
    return c.kwargs["SUB_M"], c.num_warps, c.num_stages


class Backward:
    """``_backward``'s three launches, argument for argument, each callable on its own."""

    def __init__(self, ta, do, q, k, v, o, lse, mask, scale):
        b, h, lq, d = q.shape
        lk = k.shape[2]
        bq, bk = mask.block_q, mask.block_k
        _, bn, bd = ta._tiles(bq, bk, d, backward=True)
        s4 = ta._strides4
        self.ta = ta
        self.delta = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
        self.delta_launch = ((triton.cdiv(lq, 64), b * h),
                             (o, do, self.delta, *s4(o), *s4(do), h, lq, d), dict(BLOCK=64, BLOCK_D=bd))
        self.run_delta()  # the kernels below read it
        lse = lse.contiguous()
        q_idx, q_cnt = ta._table(mask.q_indices, mask.q_counts, b, h)
        kv_idx, kv_cnt = ta._table(mask.kv_indices, mask.kv_counts, b, h)
        self.dq, self.dk, self.dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self.common = dict(BLOCK_Q=bq, BLOCK_K=bk, BLOCK_N=bn, BLOCK_D=bd, IEEE=q.dtype == torch.float32)
        tail = (h, lq, lk, d, scale * ta._LOG2E, scale)
        strides = (*s4(q), *s4(k), *s4(v), *s4(do))
        # name: (autotuner, grid, positional args, extra meta); the dQ grid depends on SUB_M, as in
        # _backward (the pointer kernels; the sweep predates the TMA dK/dV pass)
        self.kernels = {
            "dkdv": (ta._bwd_dkdv_kernel, (triton.cdiv(lk, bn), b * h),
                     (q, k, v, do, lse, self.delta, self.dk, self.dv, q_idx, q_cnt,
                      *strides, *s4(q_idx), *q_cnt.stride(), *tail), {}),
            "dq": (ta._bwd_dq_kernel, lambda meta: (triton.cdiv(lq, min(meta["SUB_M"], bq)), b * h),
                   (q, k, v, do, lse, self.delta, self.dq, kv_idx, kv_cnt,
                    *strides, *s4(kv_idx), *kv_cnt.stride(), *tail), {}),
        }

    def run_delta(self):
        grid, args, meta = self.delta_launch
        self.ta._bwd_delta_kernel[grid](*args, **meta)

    def autotuned(self, name):
        tuner, grid, args, extra = self.kernels[name]
        tuner[grid](*args, **self.common, **extra)

    def forced(self, name, sub_m, warps, stages, *, warmup=False):
        """One config, bypassing the Autotuner: its JIT function with meta and launch options."""
        tuner, grid, args, extra = self.kernels[name]
        kw = dict(self.common, **extra, SUB_M=sub_m, num_warps=warps, num_stages=stages)
        if warmup:
            return tuner.fn.warmup(*args, grid=grid, **kw)
        return tuner.fn[grid](*args, **kw)

    def check(self, name, cfg, ref) -> float:
        """Worst relative max-abs error of this config's outputs against the reference."""
        outs = [getattr(self, o) for o in OUTPUTS[name]]
        for t in outs:
            t.fill_(float("nan"))  # an unwritten tile shows up as NaN -> "wrong"
        self.forced(name, *cfg)
        torch.cuda.synchronize()
        errs = [((t.float() - ref[o].float()).abs().max() / ref[o].float().abs().max()).item()
                for t, o in zip(outs, OUTPUTS[name])]
        return float("nan") if any(math.isnan(e) for e in errs) else max(errs)


def precompile(bw: Backward, cands: dict, threads: int) -> None:
    """Compile every candidate in parallel threads; errors are ignored here and surface at launch."""
    t0 = time.time()
    n = sum(len(order) for order, _ in cands.values())
    try:
        with ThreadPoolExecutor(threads) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
            for name, (order, _) in cands.items():
                for cfg in order:
                    bw.forced(name, *cfg, warmup=True)
    except Exception as exc:  # noqa: BLE001 - fall back to compiling at first launch
        print(f"parallel pre-compile stopped ({short(exc)}); the rest compile at first launch")
    print(f"pre-compiled {n} configs with {threads} threads in {time.time() - t0:.1f} s", flush=True)


def format_table(result: dict) -> str:
    lines = [result["header"], "",
             f"{'kernel':<6} {'sparsity':>8}  {'config':<19} {'ms':>8} {'TFLOP/s':>8}  status"]
    for name in ("dkdv", "dq"):
        for s in result["sparsities"]:
            group = [r for r in result["rows"] if r["kernel"] == name and r["sparsity"] == s["target"]]
            group.sort(key=lambda r: (r["status"] != "ok", r["ms"] if r["ms"] is not None else math.inf))
            for r in group:
                cfg = label((r["sub_m"], r["num_warps"], r["num_stages"])) + (" *" if r["library_option"] else "")
                ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
                tf = "-" if r["tflops"] is None else f"{r['tflops']:.1f}"
                lines.append(f"{name:<6} {s['achieved']:>8.3f}  {cfg:<19} {ms:>8} {tf:>8}  {r['status']}")
            lines.append("")
    lines.append("* = in the library's autotune options")
    lines.append("")
    for s in result["sparsities"]:
        parts = s["delta_ms"] + s["dkdv_autotuned_ms"] + s["dq_autotuned_ms"]
        lines.append(
            f"sparsity {s['achieved']:.3f}: fwd {s['fwd_ms']:.3f} ms | bwd {s['bwd_ms']:.3f} ms | parts: "
            f"delta {s['delta_ms']:.3f} ({100 * s['delta_ms'] / parts:.0f}%) + "
            f"dK/dV {s['dkdv_autotuned_ms']:.3f} ({100 * s['dkdv_autotuned_ms'] / parts:.0f}%) + "
            f"dQ {s['dq_autotuned_ms']:.3f} ({100 * s['dq_autotuned_ms'] / parts:.0f}%) "
            f"= {parts:.3f} ms")
        for name in ("dkdv", "dq"):
            best, pick = s["best"][name], s["autotune_pick"][name]
            if best is None:
                lines.append(f"  best {name:<4}: none ran correctly")
                continue
            lines.append(
                f"  best {name:<4}: {label(best['config'])} {best['ms']:.3f} ms | autotune picked "
                f"{label(pick)} {s[name + '_autotuned_ms']:.3f} ms "
                f"({s[name + '_autotuned_ms'] / best['ms']:.2f}x the best)")
    return "\n".join(lines)


def parse_sparsities(text: str) -> list[float]:
    out = [float(x) for x in text.split(",") if x.strip()]
    if not out or not all(0.0 <= s < 1.0 for s in out):
        raise argparse.ArgumentTypeError(f"sparsities must lie in [0, 1), got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", type=parse_sparsities, default=[0.95, 0.0],
                    help="comma-separated target sparsities (default 0.95,0; 0 is dense)")
    ap.add_argument("--quick", action="store_true", help="sparsity 0.95 only")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    ap.add_argument("--compile-threads", type=int, default=min(8, os.cpu_count() or 1),
                    help="threads for the parallel pre-compile (0: compile at first launch)")
    args = ap.parse_args(argv)
    sparsities = [0.95] if args.quick else args.sparsities

    if not torch.cuda.is_available():
        sys.exit("bwd_sweep.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")

    import vidsparse
    from vidsparse.kernels import triton_attention as ta
    from vidsparse.maskers.hybrid_triton import fused_hybrid_block_mask

    t_start = time.time()
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=gen) for _ in range(4))
    scale = D ** -0.5
    dense_flops = 2.0 * B * H * N * N * D  # one dense N x N x D GEMM

    def bench(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))

    gpu = torch.cuda.get_device_name()
    header = (f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | bf16 B={B} H={H} N={N} D={D} "
              f"| mask block {BLOCK_Q}x{BLOCK_K} | do_bench median, warmup {args.warmup} ms, rep {args.rep} ms")
    print(header, flush=True)
    if not ta._AUTOTUNE:
        print("note: VIDSPARSE_AUTOTUNE=0, so the 'autotuned' path uses each kernel's first option only")

    cands = {"dkdv": candidates(ta._DKDV_OPTIONS), "dq": candidates(ta._DQ_OPTIONS)}
    out_path = Path(os.environ.get("OUT", "out")) / "bwd_sweep.json"
    result = {
        "benchmark": "bwd_sweep", "date": time.strftime("%Y-%m-%d %H:%M"), "gpu": gpu,
        "torch": torch.__version__, "triton": triton.__version__, "vidsparse": vidsparse.__version__,
        "header": header, "library_autotune": ta._AUTOTUNE,
        "shape": {"batch": B, "heads": H, "tokens": N, "head_dim": D}, "dtype": "bf16",
        "mask_block": [BLOCK_Q, BLOCK_K], "tolerance": TOL,
        "timing": f"triton.testing.do_bench median, ms (warmup {args.warmup} ms, rep {args.rep} ms)",
        "sparsities": [], "rows": [],
    }
    failed: dict = {}  # (kernel, config) -> status; a config that failed once is not retried
    precompiled = args.compile_threads <= 0

    for s in sparsities:
        mask = fused_hybrid_block_mask(q, k, topk=max(1e-6, 1.0 - s), topp=None, block_q=BLOCK_Q, block_k=BLOCK_K)
        achieved = mask.sparsity()
        density = 1.0 - achieved
        print(f"\n== sparsity {s} (achieved {achieved:.4f})", flush=True)
        for tuner in (ta._fwd_kernel, ta._bwd_dkdv_kernel, ta._bwd_dq_kernel):
            tuner.cache.clear()  # the autotune key ignores sparsity: tune afresh for this one

        # the tables attention() passes: kv_* always, the transposed q_* when a gradient is needed
        tables = (mask.kv_indices, mask.kv_counts, mask.q_indices, mask.q_counts)

        def fwd():
            return ta._forward(q, k, v, tables[0], tables[1], BLOCK_Q, BLOCK_K, scale)

        o, lse = fwd()

        def full_bwd():
            return ta._backward(do, q, k, v, o, lse, *tables, BLOCK_Q, BLOCK_K, scale)

        bw = Backward(ta, do, q, k, v, o, lse, mask, scale)
        if not precompiled:  # compile keys do not depend on the mask, so once is enough
            precompile(bw, cands, args.compile_threads)
            precompiled = True

        ref = dict(zip(("dq", "dk", "dv"), full_bwd()))  # autotunes both kernels on this first call
        torch.cuda.synchronize()
        summary = {
            "target": s, "achieved": achieved,
            "autotune_pick": {"dkdv": config_of(ta._bwd_dkdv_kernel.best_config),
                              "dq": config_of(ta._bwd_dq_kernel.best_config)},
            "fwd_ms": bench(fwd), "bwd_ms": bench(full_bwd), "delta_ms": bench(bw.run_delta),
            "dkdv_autotuned_ms": bench(lambda: bw.autotuned("dkdv")),
            "dq_autotuned_ms": bench(lambda: bw.autotuned("dq")),
        }
        print(f"fwd {summary['fwd_ms']:.3f} ms, bwd {summary['bwd_ms']:.3f} ms (delta {summary['delta_ms']:.3f}, "
              f"dK/dV {summary['dkdv_autotuned_ms']:.3f}, dQ {summary['dq_autotuned_ms']:.3f}); autotune picked "
              f"dK/dV {label(summary['autotune_pick']['dkdv'])}, dQ {label(summary['autotune_pick']['dq'])}", flush=True)

        summary["best"] = {}
        for name in ("dkdv", "dq"):
            order, own = cands[name]
            ok_rows = []
            for cfg in order:
                row = {"kernel": name, "sparsity": s, "sub_m": cfg[0], "num_warps": cfg[1], "num_stages": cfg[2],
                       "library_option": cfg in own, "ms": None, "tflops": None, "max_rel_err": None}
                if (name, cfg) in failed:
                    row["status"] = failed[name, cfg]
                else:
                    try:
                        err = bw.check(name, cfg, ref)
                        ms = bench(lambda: bw.forced(name, *cfg))
                    except Exception as exc:  # noqa: BLE001 - compile error, out of shared memory, ...
                        row["status"] = failed[name, cfg] = "failed: " + short(exc)
                        torch.cuda.synchronize()  # a broken CUDA context stops the run here
                    else:
                        row.update(ms=ms, max_rel_err=err, status="ok" if err < TOL else "wrong",
                                   tflops=MATMULS[name] * dense_flops * density / ms / 1e9)
                        if row["status"] == "ok":
                            ok_rows.append(row)
                result["rows"].append(row)
                ms_txt = "-" if row["ms"] is None else f"{row['ms']:.3f} ms"
                print(f"  {name:<4} {label(cfg)}{' *' if row['library_option'] else '  '} {ms_txt:>12}  {row['status']}",
                      flush=True)
            best = min(ok_rows, key=lambda r: r["ms"], default=None)
            summary["best"][name] = None if best is None else {
                "config": (best["sub_m"], best["num_warps"], best["num_stages"]), "ms": best["ms"]}
        result["sparsities"].append(summary)

    result["elapsed_s"] = round(time.time() - t_start, 1)
    table = format_table(result)
    result["table"] = table
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print("\n" + table)
    print(f"\n{result['elapsed_s']} s; JSON: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
