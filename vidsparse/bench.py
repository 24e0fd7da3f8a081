"""`vidsparse bench attention`: block-sparse attention against what users run today, in one process.

Times (``triton.testing.do_bench`` medians, after warm-up) on one GPU:

* dense SDPA pinned to cuDNN and to FlashAttention-2, forward and forward+backward;
* FlexAttention (``torch.compile``d) with the *identical* block mask;
* vidsparse's Triton kernel at each requested sparsity, with mask prediction timed separately
  and included in the "with prediction" columns.

Random inputs give nearly flat pooled scores, so each sparsity s is produced with Top-k-only
prediction at k = 1 - s (the hybrid rule with p not binding); the table reports the sparsity the
mask actually achieved. Results go to stdout as a table and to JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

SHAPES = {
    # name: (batch, heads, tokens, head_dim)
    "wan1.3b-480p": (1, 12, 32760, 128),
    "wan14b-720p": (1, 40, 75600, 128),
}


def _bench(fn, *, grad_to_none=None, rep_ms: int = 300) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))


def _try(fn):
    try:
        return fn(), None
    except Exception as exc:  # a baseline that cannot run here is reported, not fatal
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        return None, msg


def bench_attention(
    *, shape: str, heads: int | None, sparsities: list[float], dtype_name: str, backward: bool,
    flex: bool, rep_ms: int, block_q: int, block_k: int, log=print,
) -> dict:
    """Time dense SDPA (cuDNN, FA2), vidsparse (given mask / incl. prediction) and FlexAttention on
    one (B, H, N, D) shape, forward and forward+backward, one row per method and sparsity.

    Longer than the house rule on purpose: every row must be timed in one process on the same
    tensors (q, k, v, dO and their gradient copies), which the timing closures share; split up, each
    part would need them all passed in.
    """
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ._optional import require

    require("triton.testing", "triton")  # MissingDependencyError naming the extra, not a traceback
    import triton.testing

    import vidsparse
    from vidsparse.maskers.hybrid_triton import fused_hybrid_block_mask

    if not torch.cuda.is_available():
        raise SystemExit("vidsparse bench attention needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    b, h, n, d = SHAPES[shape]
    h = heads or h
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=gen) for _ in range(3))
    do = torch.randn_like(q)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    flops_dense = 4.0 * b * h * n * n * d  # forward matmul flops of dense attention

    rows: list[dict] = []

    def add(name, fwd_ms, fb_ms=None, sparsity=0.0, note=None, **extra):
        row = {"method": name, "sparsity": sparsity, "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "note": note, **extra}
        if fwd_ms:
            row["fwd_tflops_effective"] = flops_dense * (1 - sparsity) / fwd_ms / 1e9
        rows.append(row)
        log(f"  {name:<34} sparsity {sparsity:5.3f}  fwd {fwd_ms if fwd_ms is None else round(fwd_ms, 3)} ms"
            f"  fwd+bwd {fb_ms if fb_ms is None else round(fb_ms, 3)} ms" + (f"  ({note})" if note else ""))

    def fwd_bwd(attn):
        def run():
            attn(qg, kg, vg).backward(do)
        return run

    # ---- dense baselines
    for label, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash2", SDPBackend.FLASH_ATTENTION)):
        def sdpa(q_, k_, v_, _be=backend):
            with sdpa_kernel(_be):
                return F.scaled_dot_product_attention(q_, k_, v_)
        fwd, err = _try(lambda: _bench(lambda: sdpa(q, k, v), rep_ms=rep_ms))
        fb, err_b = (None, None)
        if backward and err is None:
            fb, err_b = _try(lambda: _bench(fwd_bwd(sdpa), grad_to_none=[qg, kg, vg], rep_ms=rep_ms))
        add(label + " (dense)", fwd, fb, note=err or err_b)

    flex_attention = None
    if flex:
        from torch.nn.attention.flex_attention import flex_attention as _flex

        flex_attention = torch.compile(_flex, dynamic=False)

    # ---- sparse
    for s in sparsities:
        keep = max(1e-6, 1.0 - s)
        predict = lambda: fused_hybrid_block_mask(q, k, topk=keep, topp=None, block_q=block_q, block_k=block_k)  # noqa: E731
        mask = predict()
        achieved = mask.sparsity()
        t_mask = _bench(predict, rep_ms=rep_ms)
        # the same predictor replayed from a CUDA graph: GPU time without Python launch overhead
        t_mask_graph, _ = _try(lambda: float(triton.testing.do_bench_cudagraph(predict, rep=rep_ms, return_mode="median")))
        t_fwd = _bench(lambda: vidsparse.block_sparse_attention(q, k, v, mask, backend="triton"), rep_ms=rep_ms)
        t_fwd_pred = _bench(lambda: vidsparse.block_sparse_attention(q, k, v, predict(), backend="triton"), rep_ms=rep_ms)
        t_fb = t_fb_pred = None
        if backward:
            t_fb = _bench(fwd_bwd(lambda a, b_, c: vidsparse.block_sparse_attention(a, b_, c, mask, backend="triton")),
                          grad_to_none=[qg, kg, vg], rep_ms=rep_ms)
            t_fb_pred = _bench(
                fwd_bwd(lambda a, b_, c: vidsparse.block_sparse_attention(
                    a, b_, c, fused_hybrid_block_mask(a, b_, topk=keep, topp=None, block_q=block_q, block_k=block_k),
                    backend="triton")),
                grad_to_none=[qg, kg, vg], rep_ms=rep_ms)
        add("vidsparse (given mask)", t_fwd, t_fb, achieved)
        add("vidsparse (incl. prediction)", t_fwd_pred, t_fb_pred, achieved, mask_ms=t_mask, mask_ms_cudagraph=t_mask_graph)
        log(f"  {'mask prediction':<34} {t_mask:.4f} ms (CUDA graph replay: {t_mask_graph} ms)")
        if flex_attention is not None:
            from vidsparse.kernels.flex import kernel_options

            fm, err = _try(lambda: mask.to_flex())
            ko = kernel_options(mask)
            f_fwd = f_fb = None
            if err is None:
                f_fwd, err = _try(lambda: _bench(lambda: flex_attention(q, k, v, block_mask=fm, kernel_options=ko), rep_ms=rep_ms))
                if backward and err is None:
                    f_fb, err = _try(lambda: _bench(
                        fwd_bwd(lambda a, b_, c: flex_attention(a, b_, c, block_mask=fm, kernel_options=ko)),
                        grad_to_none=[qg, kg, vg], rep_ms=rep_ms))
            add("flex (same mask)", f_fwd, f_fb, achieved, note=err)

    props = torch.cuda.get_device_properties(0)
    import triton

    return {
        "benchmark": "attention",
        "date": time.strftime("%Y-%m-%d"),
        "gpu": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "vidsparse": vidsparse.__version__,
        "shape": {"name": shape, "batch": b, "heads": h, "tokens": n, "head_dim": d},
        "dtype": dtype_name,
        "mask_block": [block_q, block_k],
        "timing": "triton.testing.do_bench median, ms",
        "rows": rows,
    }


def format_table(result: dict) -> str:
    rows = result["rows"]
    dense = next((r for r in rows if r["method"].startswith("sdpa-cudnn") and r["fwd_ms"]), None)

    def fmt(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"

    lines = [
        f"{result['gpu']} | {result['dtype']} | B={result['shape']['batch']} H={result['shape']['heads']} "
        f"N={result['shape']['tokens']} D={result['shape']['head_dim']} | mask block {tuple(result['mask_block'])} | "
        f"torch {result['torch']}, triton {result['triton']} | {result['date']}",
        "| method | sparsity | fwd ms | fwd+bwd ms | fwd speedup vs cuDNN | fwd+bwd speedup vs cuDNN | mask ms (graph) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        su = dense["fwd_ms"] / r["fwd_ms"] if dense and r["fwd_ms"] else None
        sub = dense["fwd_bwd_ms"] / r["fwd_bwd_ms"] if dense and dense["fwd_bwd_ms"] and r["fwd_bwd_ms"] else None
        name = r["method"] + (f" [{r['note']}]" if r.get("note") else "")
        lines.append(
            f"| {name} | {r['sparsity']:.3f} | {fmt(r['fwd_ms'])} | {fmt(r['fwd_bwd_ms'])} | "
            f"{fmt(su, 2)}x | {fmt(sub, 2)}x | {fmt(r.get('mask_ms'), 4)} ({fmt(r.get('mask_ms_cudagraph'), 4)}) |"
        )
    return "\n".join(lines)


def _sparsity_list(text: str) -> list[float]:
    """argparse type of --sparsities: comma-separated fractions in [0, 1)."""
    values = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1), got {item.strip()!r}") from None
        if not 0.0 <= value < 1.0:
            raise argparse.ArgumentTypeError(f"values must lie in [0, 1), got {item.strip()}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("expected at least one sparsity")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vidsparse bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("attention", help="kernel benchmark against cuDNN, FlashAttention-2 and FlexAttention")
    p.add_argument("--shape", choices=sorted(SHAPES), default="wan1.3b-480p")
    p.add_argument("--heads", type=int, default=None, help="override the head count (e.g. fewer for the 14B shape)")
    p.add_argument("--sparsities", type=_sparsity_list, default="0,0.5,0.8,0.9,0.95,0.97",
                   help="comma-separated target sparsities (fractions of skipped blocks)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--rep-ms", type=int, default=300, help="do_bench repetition time per measurement")
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)

    for flag, value in (("--heads", args.heads), ("--rep-ms", args.rep_ms)):
        if value is not None and value < 1:
            p.error(f"argument {flag}: must be >= 1, got {value}")
    for flag, value in (("--block-q", args.block_q), ("--block-k", args.block_k)):
        if value < 16 or value & (value - 1):
            p.error(f"argument {flag}: must be a power of two >= 16, got {value}")
    if args.out:
        from .utils import check_output_file

        try:
            check_output_file(args.out, "--out")  # before minutes of benchmarking, not after
        except ValueError as exc:
            p.error(str(exc))
    sparsities = args.sparsities
    from ._optional import MissingDependencyError

    try:
        result = bench_attention(
            shape=args.shape, heads=args.heads, sparsities=sparsities, dtype_name=args.dtype,
            backward=not args.no_backward, flex=not args.no_flex, rep_ms=args.rep_ms,
            block_q=args.block_q, block_k=args.block_k,
        )
    except MissingDependencyError as exc:
        raise SystemExit(f"vidsparse bench attention: {exc}") from None
    table = format_table(result)
    result["table_markdown"] = table
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
