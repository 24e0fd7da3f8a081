"""Time one Wan2.1 denoising step: dense SDPA (cuDNN, FlashAttention-2) against vidsparse.

Builds ``WanTransformer3DModel`` from the Wan2.1-T2V-1.3B config (or 14B with ``--config 14b``)
with random weights in bf16, and times one transformer forward (one denoising step, one CFG
branch) on 480p latents (1 x 16 x 21 x 60 x 104 = 32,760 video tokens; 14B: 720p,
1 x 16 x 21 x 90 x 160 = 75,600 tokens) with 512 text tokens, in one process:

* ``dense-cudnn``: stock processors, SDPA pinned to cuDNN attention;
* ``dense-flash2``: stock processors, SDPA pinned to FlashAttention-2;
* ``vidsparse-XX``: ``vidsparse.patch`` at XX% block sparsity of the self-attention (cross-
  attention stays stock, under the cuDNN pin, so only the self-attention differs from
  ``dense-cudnn``).

Random weights give flat pooled block scores, so Top-p would keep almost everything: the
sparse runs use ``topk = 1 - sparsity`` and ``topp = None`` to hit the target sparsity (a trained
model with the paper's k=0.03, p=0.2 reaches ~95% through both rules).

Besides the step time, each variant's self-attention is timed alone on one layer's shapes
(mask prediction included for vidsparse, and excluded in ``attn_only_ms``), and one extra
forward with ``collect_stats=True`` reports the achieved sparsity and mask/attention time per
layer. Times are medians over ``--repeats`` runs after ``--warmup`` runs, from CUDA events.

``--compile`` adds, in the same process, the step of the whole transformer under
``torch.compile`` (``--compile-mode``): ``dense-cudnn-compiled`` (stock processors, SDPA pinned to
cuDNN) and ``vidsparse-XX-compiled`` (patched, then compiled). Their rows also give the speedup
over ``dense-cudnn-compiled``, the first-call compile time and dynamo's graph and graph-break
counts (0 breaks expected: the masker and the kernels are custom ops).

Usage:
    python benchmarks/bench_wan_step.py --out wan13b.json
    python benchmarks/bench_wan_step.py --config 14b --layers 8 --out wan14b_8l.json
    python benchmarks/bench_wan_step.py --compile --out wan13b_compiled.json        # + compiled steps
    python benchmarks/bench_wan_step.py --compile --compile-mode max-autotune-no-cudagraphs --out wan13b_mat.json
    python benchmarks/bench_wan_step.py --config 14b --compile --sparsity 0.95 --out wan14b.json  # all 40 layers
    python benchmarks/bench_wan_step.py --smoke --out smoke.json      # tiny model on CPU (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import platform
import statistics
import sys
import time

import torch

WAN_2_1_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
WAN_2_1_14B = dict(WAN_2_1_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
TINY = dict(WAN_2_1_1_3B, num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)

CONFIGS = {
    # name: (model config, latent shape (B, C, F, H, W), text tokens)
    "1.3b": (WAN_2_1_1_3B, (1, 16, 21, 60, 104), 512),
    "14b": (WAN_2_1_14B, (1, 16, 21, 90, 160), 512),
    "smoke": (TINY, (1, 4, 5, 16, 16), 12),
}
NOTE = (
    "random weights give flat pooled block scores, so sparse runs use topk = 1 - sparsity and topp = None "
    "to reach the target sparsity"
)


def _check_config_names(model_cls, cfg: dict) -> None:
    """Fail early if a config key is not a WanTransformer3DModel.__init__ parameter."""
    params = set(inspect.signature(model_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg) - params)
    if unknown:
        raise SystemExit(f"config keys {unknown} are not WanTransformer3DModel parameters ({sorted(params)})")


def build_model(cfg: dict, layers: int | None, device, dtype):
    """Random-weight WanTransformer3DModel built directly in ``dtype`` on ``device``.

    Parameters are created in ``dtype`` (no fp32 copy, so the 14B model fits), then the modules
    diffusers keeps in fp32 when loading checkpoints (``_keep_in_fp32_modules``) are cast back to
    fp32, as ``from_pretrained`` would. The RoPE tables are fp32 whatever the default dtype.
    """
    from diffusers import WanTransformer3DModel

    cfg = dict(cfg)
    if layers is not None:
        cfg["num_layers"] = layers
    _check_config_names(WanTransformer3DModel, cfg)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():  # names in the list are modules ("norm2") or parameters ("scale_shift_table")
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and keep.intersection(name.split(".")):
                tensor.data = tensor.data.float()
    return model.eval().requires_grad_(False)


class _Clock:
    """Median wall time of a callable: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def time(self, fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), times


def _sdpa_pin(kind: str | None, device):
    """Context pinning SDPA to one kernel (GPU only; on CPU the default SDPA runs)."""
    if kind is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash2": SDPBackend.FLASH_ATTENTION}[kind])


def _compiled_step(model, call, clock, args, device) -> dict:
    """Compile ``model`` (as patched now) and time ``call(compiled_model)``; dynamo is reset first
    so every variant compiles from scratch. Returns the timing fields of a row."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)

    def step():
        return call(compiled)

    t0 = time.perf_counter()
    step()  # compiles
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    row = {"compile_s": time.perf_counter() - t0}
    row["step_ms"], row["step_runs_ms"] = clock.time(step, args.warmup, args.repeats)
    row["graph_breaks"] = sum(counters["graph_break"].values())
    row["graphs"] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return row


def _gpu_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def run(args) -> dict:
    import vidsparse
    from vidsparse import SparseConfig

    name = "smoke" if args.smoke else args.config
    cfg, latent_shape, text_len = CONFIGS[name]
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU smoke mode")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    layers = args.layers

    model = build_model(cfg, layers, device, dtype)
    n_layers = len(model.blocks)
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(latent_shape, generator=gen, device=device, dtype=dtype)
    text = torch.randn(latent_shape[0], text_len, cfg["text_dim"], generator=gen, device=device, dtype=dtype)
    timestep = torch.full((latent_shape[0],), 500.0, device=device)
    pt, ph, pw = cfg["patch_size"]
    n_tokens = (latent_shape[2] // pt) * (latent_shape[3] // ph) * (latent_shape[4] // pw)
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    clock = _Clock(device)

    def call(m):
        with torch.inference_mode():
            return m(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

    def step():
        return call(model)

    # one layer's self-attention inputs, for the attention-only timings
    qkv = [torch.randn(1, n_tokens, heads, head_dim, generator=gen, device=device, dtype=dtype) for _ in range(3)]

    def sdpa_only():
        q, k, v = (t.transpose(1, 2) for t in qkv)
        with torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(q, k, v)

    rows = []
    baseline = None
    for label, pin in (("dense-cudnn", "cudnn"), ("dense-flash2", "flash2")):
        row = {"variant": label, "sdpa": pin if device == "cuda" else "default (CPU smoke)"}
        try:
            with _sdpa_pin(pin, device):
                row["step_ms"], row["step_runs_ms"] = clock.time(step, args.warmup, args.repeats)
                row["attn_ms"], _ = clock.time(sdpa_only, args.warmup, args.repeats)
            row["sparsity"] = 0.0
        except RuntimeError as exc:  # e.g. no cuDNN attention for this GPU/dtype
            row["error"] = str(exc).splitlines()[0]
        if baseline is None and "step_ms" in row:
            baseline = row
        rows.append(row)
    compiled_baseline = None
    if args.compile:  # the compiled dense baseline: cuDNN, as the eager one
        row = {"variant": "dense-cudnn-compiled", "compile_mode": args.compile_mode, "sparsity": 0.0,
               "sdpa": "cudnn" if device == "cuda" else "default (CPU smoke)"}
        try:
            with _sdpa_pin("cudnn", device):
                row.update(_compiled_step(model, call, clock, args, device))
            compiled_baseline = row
        except RuntimeError as exc:  # dynamo and inductor errors are RuntimeErrors
            row["error"] = str(exc).splitlines()[0]
        rows.append(row)

    for sparsity in args.sparsity:
        topk = round(1.0 - sparsity, 6)
        common = dict(topk=topk, topp=None, block_q=args.block_q, block_k=args.block_k,
                      token_order=args.token_order, backend=args.backend)
        row = {"variant": f"vidsparse-{round(sparsity * 100):d}", "target_sparsity": sparsity, "topk": topk,
               "topp": None, "sdpa": "cudnn (cross-attention)" if device == "cuda" else "default (CPU smoke)"}
        q, k, v = qkv

        def sparse_only():
            with torch.inference_mode():
                vidsparse.sparse_attention(q, k, v, topk=topk, topp=None, block_q=args.block_q,
                                           block_k=args.block_k, layout="bnhd", backend=args.backend)

        mask = vidsparse.hybrid_block_mask(q, k, topk=topk, topp=None, block_q=args.block_q,
                                           block_k=args.block_k, layout="bnhd")

        def attn_only():
            with torch.inference_mode():
                vidsparse.block_sparse_attention(q, k, v, mask, layout="bnhd", backend=args.backend)

        try:
            with _sdpa_pin("cudnn", device):
                vidsparse.patch(model, SparseConfig(**common))
                try:
                    row["step_ms"], row["step_runs_ms"] = clock.time(step, args.warmup, args.repeats)
                finally:
                    vidsparse.unpatch(model)
                vidsparse.patch(model, SparseConfig(**common, collect_stats=True))
                try:
                    step()
                    summary = vidsparse.stats(model).summary()
                finally:
                    vidsparse.unpatch(model)
            row["sparsity"] = summary["sparsity"]
            row["mask_ms_per_layer"] = summary["mask_ms_total"] / max(1, summary["sparse_calls"])
            row["attn_ms_per_layer"] = summary["attn_ms_total"] / max(1, summary["sparse_calls"])
            row["attn_ms"], _ = clock.time(sparse_only, args.warmup, args.repeats)
            row["attn_only_ms"], _ = clock.time(attn_only, args.warmup, args.repeats)
        except (RuntimeError, NotImplementedError) as exc:
            row["error"] = str(exc).splitlines()[0]
        rows.append(row)
        if args.compile:
            crow = {k: row[k] for k in ("target_sparsity", "topk", "topp", "sdpa")}
            crow = {"variant": row["variant"] + "-compiled", "compile_mode": args.compile_mode, **crow}
            if "sparsity" in row:
                crow["sparsity"] = row["sparsity"]  # the same masks as the eager step (stats need eager)
            try:
                with _sdpa_pin("cudnn", device):
                    vidsparse.patch(model, SparseConfig(**common))
                    try:
                        crow.update(_compiled_step(model, call, clock, args, device))
                    finally:
                        vidsparse.unpatch(model)
                        torch._dynamo.reset()
            except (RuntimeError, NotImplementedError) as exc:
                crow["error"] = str(exc).splitlines()[0]
            rows.append(crow)

    if baseline is not None:
        for row in rows:
            if "step_ms" in row:
                row["step_speedup_vs_" + baseline["variant"]] = baseline["step_ms"] / row["step_ms"]
            if "attn_ms" in row and "attn_ms" in baseline:
                row["attn_speedup_vs_" + baseline["variant"]] = baseline["attn_ms"] / row["attn_ms"]
    if compiled_baseline is not None:
        for row in rows:
            if "step_ms" in row and row.get("compile_mode"):
                row["step_speedup_vs_dense-cudnn-compiled"] = compiled_baseline["step_ms"] / row["step_ms"]

    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    return {
        "device": _gpu_name(device),
        "config": name,
        "layers": n_layers,
        "latents": list(latent_shape),
        "video_tokens": n_tokens,
        "text_tokens": text_len,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": str(dtype).replace("torch.", ""),
        "block_q": args.block_q,
        "block_k": args.block_k,
        "token_order": args.token_order,
        "backend": args.backend,
        "compile_mode": args.compile_mode if args.compile else None,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "triton": triton_version, "diffusers": diffusers.__version__,
                     "vidsparse": vidsparse.__version__},
        "note": NOTE,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    """Plain-text table of a :func:`run` result."""
    base = next((r["variant"] for r in result["rows"] if "step_ms" in r), None)
    compiled = result.get("compile_mode") is not None
    w = 26 if compiled else 16
    lines = [
        f"Wan2.1 {result['config']} ({result['layers']} layers), {result['video_tokens']} video + "
        f"{result['text_tokens']} text tokens, {result['dtype']}, on {result['device']}",
        f"note: {result['note']}",
        f"{'variant':<{w}}{'step ms':>11}{'speedup':>9}{'attn ms':>10}{'attn x':>8}{'sparsity':>10}"
        f"{'mask ms/l':>11}{'attn ms/l':>11}" + (f"{'vs cmp':>9}{'compile s':>11}{'breaks':>8}" if compiled else ""),
    ]
    def fmt(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else "-".rjust(int(spec.split(".")[0]))

    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['variant']:<{w}}  error: {r['error']}")
            continue
        line = (
            f"{r['variant']:<{w}}{fmt(r.get('step_ms'), '11.2f')}{fmt(r.get(f'step_speedup_vs_{base}'), '8.2f')}x"
            f"{fmt(r.get('attn_ms'), '10.3f')}{fmt(r.get(f'attn_speedup_vs_{base}'), '7.2f')}x"
            f"{fmt(r.get('sparsity'), '10.3f')}{fmt(r.get('mask_ms_per_layer'), '11.3f')}"
            f"{fmt(r.get('attn_ms_per_layer'), '11.3f')}"
        )
        if compiled:
            line += (f"{fmt(r.get('step_speedup_vs_dense-cudnn-compiled'), '8.2f')}x"
                     f"{fmt(r.get('compile_s'), '11.1f')}{fmt(r.get('graph_breaks'), '8.0f')}")
        lines.append(line)
    lines.append("attn ms: one layer's self-attention alone (vidsparse: mask prediction + sparse attention); "
                 "mask/attn ms/l: per layer inside the step, from vidsparse.stats")
    if compiled:
        lines.append(f"*-compiled: torch.compile(transformer, mode={result['compile_mode']!r}); vs cmp: step speedup "
                     "over dense-cudnn-compiled; compile s: first call; breaks: dynamo graph breaks in the step")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("1.3b", "14b"), default="1.3b", help="Wan2.1-T2V model size (480p / 720p)")
    p.add_argument("--layers", type=int, default=None, help="build only N transformer blocks (default: all)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.90, 0.95], help="target block sparsities")
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--token-order", choices=("raster", "tiled"), default="raster")
    p.add_argument("--backend", default="auto", help="vidsparse backend (auto, triton, flex, reference)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--smoke", action="store_true", help="tiny Wan config on CPU (fp32) to test this script")
    p.add_argument("--compile", action="store_true",
                   help="also time the step under torch.compile: dense cuDNN compiled and each sparsity compiled")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
                   help="torch.compile mode for --compile (default: %(default)s)")
    args = p.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be >= 1")
    if any(not (0.0 < s < 1.0) for s in args.sparsity):
        p.error("--sparsity values must lie in (0, 1)")
    if args.smoke and (args.block_q, args.block_k) == (128, 64):
        args.block_q, args.block_k = 16, 32  # the tiny model has 320 tokens
    if args.warmup < 0 or args.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
