"""`vidsparse eval`: validation loss and sample PSNR / SSIM against dense, per attention setting.

The command line of :mod:`vidsparse.tiny.evaluate`. Every setting is a :class:`vidsparse.SparseConfig`:
the default one is the mask in ``--model``'s ``sparse_config.json`` (a distilled student's, read
with :meth:`SparseConfig.load`) or Top-k 0.03 with Top-p 0.1, changed by ``--topk`` / ``--topp`` /
``--block-q`` / ``--block-k`` / ``--token-order`` / ``--backend``; ``--setting NAME:KEY=VALUE,...``
adds others (:func:`vidsparse.tiny.cli_args.parse_setting`). On the CPU sparse attention runs the
``gather`` backend and the run is reduced (fewer clips, times, samples and steps; it says so).

Every flag, model folder and the ``--json`` path are checked before any model is loaded: a bad one
is one ``parser.error`` line naming the flag (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

from ..utils import check_model_dir, check_output_file, device_name, fmt, jsonable, resolve_device, versions
from .cli_args import (block_size, finite_float, fraction_or_none, load_model, nonneg_int, or_exit, parse_setting,
                       positive_float, positive_int, sampler_settings, seed_int, setting_name)
from .evaluate import DEFAULT_TOPK, DEFAULT_TOPP

__all__ = ["main"]

_GPU_DEFAULTS = {"clips": 64, "num_t": 8, "samples": 4, "steps": 20, "batch_size": 16, "shape_samples": 16}
# a default CPU run (dense + the default hybrid) stays at a few minutes on 2 cores
_CPU_DEFAULTS = {"clips": 4, "num_t": 4, "samples": 1, "steps": 6, "batch_size": 4, "shape_samples": 0}
_UNSET = object()  # --topk / --topp not given (None switches the rule off)


def _parser() -> argparse.ArgumentParser:
    from ..maskers.token_order import TOKEN_ORDERS

    p = argparse.ArgumentParser(
        prog="vidsparse eval",
        description="Validation flow-matching loss and sample PSNR/SSIM against dense, for dense and sparse "
        "attention settings. Prints a table and writes JSON.",
        epilog=f"Default settings: dense and 'hybrid' (topk {DEFAULT_TOPK}, topp {DEFAULT_TOPP}, not SparseConfig's "
        f"0.2: on the tiny model {DEFAULT_TOPP} reaches the ~95%% block sparsity the paper targets), or the mask in "
        f"--model's sparse_config.json. On CUDA: --clips {_GPU_DEFAULTS['clips']} --num-t {_GPU_DEFAULTS['num_t']} "
        f"--samples {_GPU_DEFAULTS['samples']} --steps {_GPU_DEFAULTS['steps']}; on the CPU reduced: --clips "
        f"{_CPU_DEFAULTS['clips']} --num-t {_CPU_DEFAULTS['num_t']} --samples {_CPU_DEFAULTS['samples']} "
        f"--steps {_CPU_DEFAULTS['steps']}.",
    )
    p.add_argument("--model", default=None, help="diffusers Wan model directory (default: the embedded tiny model)")
    p.add_argument("--reference", default=None, help="dense reference model for PSNR/SSIM (default: --model)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="a sparse setting to evaluate (repeatable), e.g. tiled:topk=0.05,topp=none,token_order=tiled "
                   "or s:method=svg,budget=0.05. Keys: method (vidsparse.maskers.available()), any option of that "
                   "masker, token_order, tile (AxBxC), keep_diagonal, keep_sink, window, and the SparseConfig fields "
                   "block_q, block_k, dense_steps, backend; 'none' switches an option off. The masker's options not "
                   "given take SparseConfig's defaults (hybrid: topk 0.03, topp 0.2); block sizes, backend and "
                   "token order come from the flags. Replaces the default hybrid setting unless --topk/--topp are given.")
    p.add_argument("--topk", type=fraction_or_none, default=_UNSET, help=f"Top-k of the default setting (default: the model directory's "
                   f"sparse_config.json if it has one, else {DEFAULT_TOPK}; 'none' = off)")
    p.add_argument("--topp", type=fraction_or_none, default=_UNSET, help=f"Top-p of the default setting (default: sparse_config.json, else "
                   f"{DEFAULT_TOPP}; 'none' = off)")
    p.add_argument("--block-q", type=block_size, default=None, help="query block size (default: sparse_config.json, else 128)")
    p.add_argument("--block-k", type=block_size, default=None, help="key block size (default: sparse_config.json, else 64)")
    p.add_argument("--backend", default=None, help="block-sparse backend: auto, triton, flex, gather or reference (default: sparse_config.json, else auto)")
    p.add_argument("--token-order", choices=TOKEN_ORDERS, default=None,
                   help="raster (the model's frame-major order), tiled (each query block a compact t x h x w "
                   "tile) or auto (tiled when the grid is known); default: the model directory's "
                   "sparse_config.json, else the masker's own (hybrid: auto, others: raster)")
    p.add_argument("--split", choices=("val", "shifted"), default="val", help="held-out clips to evaluate on")
    p.add_argument("--clips", type=positive_int, default=None, help="validation clips (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--num-t", type=positive_int, default=None, help="fixed times per clip (default 8 on CUDA, 4 on CPU)")
    p.add_argument("--samples", type=nonneg_int, default=None, help="sampled conditions for PSNR/SSIM, 0 = none "
                   "(default 4 on CUDA, 1 on CPU)")
    p.add_argument("--shape-samples", type=nonneg_int, default=None, help="single-object conditions sampled per setting "
                   "and judged by the shape classifier (shape accuracy; 25%% is chance); 0 = none (default 16 on "
                   "CUDA, 0 on CPU)")
    p.add_argument("--steps", type=positive_int, default=None, help="Euler steps per sample (default 20 on CUDA, 6 on CPU)")
    p.add_argument("--guidance-scale", type=finite_float, default=None, help="default: the model's sampling.json")
    p.add_argument("--shift", type=positive_float, default=None, help="default: the model's sampling.json")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                   help="guide only steps with t in [T_LO, T_HI] (default: the model's sampling.json)")
    p.add_argument("--eta", type=float, default=None,
                   help="sampler stochasticity in [0, 1], 0 = Euler ODE (default: the model's sampling.json)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="items per forward (default 16 on CUDA, 4 on CPU)")
    p.add_argument("--frames", type=positive_int, default=16, help="clip frames (the tiny model: 16)")
    p.add_argument("--size", type=positive_int, default=64, help="clip height = width in pixels (the tiny model: 64)")
    p.add_argument("--seed", type=seed_int, default=0, help="data and noise seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", default="out/eval/eval.json", help="where to write the JSON results")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p



# ----------------------------------------------------------------------------------------------
# Checks before any work


def _model_dirs(args, parser) -> tuple[Path, Path]:
    """--model (default: the embedded model) and --reference (default: --model), checked."""
    from .model import default_weights_dir

    model_dir = or_exit(parser, check_model_dir, args.model or default_weights_dir(), "--model")
    ref_dir = or_exit(parser, check_model_dir, args.reference, "--reference") if args.reference else model_dir
    return model_dir, ref_dir


def _base_config(args, parser, model_dir: Path):
    """The default sparse setting: --model's sparse_config.json, else Top-k DEFAULT_TOPK with Top-p
    DEFAULT_TOPP; the flags change it."""
    from ..config import CONFIG_FILE, SparseConfig

    base = SparseConfig(topk=DEFAULT_TOPK, topp=DEFAULT_TOPP)
    if (model_dir / CONFIG_FILE).is_file():
        try:
            base = SparseConfig.load(model_dir)
        except (ValueError, TypeError) as e:
            parser.error(f"--model {model_dir / CONFIG_FILE}: {e}")
    changes = {k: getattr(args, k) for k in ("topk", "topp") if getattr(args, k) is not _UNSET}
    changes.update({k: getattr(args, k) for k in ("block_q", "block_k", "token_order", "backend")
                    if getattr(args, k) is not None})
    if changes.get("topk", 1) is None and changes.get("topp", 1) is None:
        parser.error("--topk none --topp none leaves no rule: that is the dense baseline, always included")
    try:
        return base.replace(**changes)
    except (ValueError, TypeError) as e:
        parser.error(f"--topk/--topp/--block-q/--block-k/--token-order/--backend: {e}")


def _settings(args, parser, model_dir: Path) -> list[tuple[str, object]]:
    """(name, SparseConfig or None for dense) of every row: dense first, then the default setting
    (unless --setting replaces it and neither --topk nor --topp is given), then each --setting."""
    base = _base_config(args, parser, model_dir)
    settings: list[tuple[str, object]] = [("dense", None)]
    if args.topk is not _UNSET or args.topp is not _UNSET or not args.setting:
        settings.append((setting_name(base), base))
    for text in args.setting:
        settings.append(or_exit(parser, parse_setting, text, base))
    names = [n for n, _ in settings]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        parser.error(f"--setting: duplicate setting name(s) {dup}")
    return settings


def _sampler(args, parser, model_dir: Path, ref_dir: Path) -> dict:
    """Sampler settings: the first of --model / --reference with a sampling.json, the flags in place."""
    where = next((d for d in (model_dir, ref_dir) if (d / "sampling.json").is_file()), model_dir)
    return or_exit(parser, sampler_settings, where, guidance_scale=args.guidance_scale,
                   guidance_interval=args.guidance_interval, eta=args.eta, shift=args.shift)


def _geometry(args, parser, model_dir: Path) -> tuple[dict, int]:
    """The clip geometry (ShapesConfig keywords) and the tokens per clip, from config.json."""
    from .data import ShapesConfig
    from .model import token_grid

    geometry = dict(frames=args.frames, size=args.size)
    try:
        ShapesConfig(**geometry)
        config = json.loads((model_dir / "config.json").read_text())
        return geometry, math.prod(token_grid(config, args.frames, args.size, args.size))
    except (ValueError, KeyError, TypeError) as e:
        parser.error(f"--frames/--size: {e}")


def _run_config(args, device) -> tuple[dict, list[str]]:
    """The run's sizes (flags, else the device's defaults) and the CPU reductions that change what
    is measured (not the batch size; not the steps when nothing is sampled)."""
    defaults = _GPU_DEFAULTS if device.type == "cuda" else _CPU_DEFAULTS
    run = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    reduced = [k for k in defaults if getattr(args, k) is None and defaults[k] != _GPU_DEFAULTS[k]
               and k != "batch_size" and not (k == "steps" and run["samples"] == 0 and run["shape_samples"] == 0)]
    return run, reduced


# ----------------------------------------------------------------------------------------------
# The run


def _print_plan(args, run, reduced, sampler, model_dir, ref_dir, tokens, device) -> None:
    from .flow import describe_sampler

    print(f"vidsparse eval: {model_dir} ({tokens} tokens per clip) on {device_name(device)}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}")
    if ref_dir != model_dir:
        print(f"reference (dense) for PSNR/SSIM: {ref_dir}")
    sampler_text = describe_sampler(sampler["guidance_scale"], sampler["guidance_interval"], sampler["eta"],
                                    sampler["shift"])
    sampled = (f"PSNR/SSIM on {run['samples']} samples x {run['steps']} steps ({sampler_text})"
               if run["samples"] else "no samples (PSNR/SSIM skipped)")
    if run["shape_samples"]:
        sampled += f"; shape accuracy on {run['shape_samples']} single-object samples"
    print(f"split {args.split!r}: val loss on {run['clips']} clips x {run['num_t']} times; {sampled}; seed {args.seed}")
    if reduced:
        flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
        ours = ", ".join(f"{flag(k)} {run[k]}" for k in reduced)
        full = ", ".join(f"{flag(k)} {_GPU_DEFAULTS[k]}" for k in reduced)
        print(f"note: reduced CPU settings ({ours}; the CUDA defaults are {full}) to keep a CPU run to "
              "minutes. Pass the flags to override.")


def _evaluate_all(settings, model, reference, args, run, sampler, data, device) -> list[dict]:
    """:func:`vidsparse.tiny.evaluate.evaluate_variant` per setting (dense samples shared), with
    the loss change against dense."""
    from tqdm.auto import tqdm

    from .evaluate import evaluate_variant

    progress, cache, results = not args.no_progress, {}, []
    for name, cfg in tqdm(settings, desc="eval", unit="setting", disable=not progress):
        r = evaluate_variant(
            model, cfg, reference=reference, split=args.split, clips=run["clips"], batch_size=run["batch_size"],
            samples=run["samples"], sample_steps=run["steps"], seed=args.seed, device=device, progress=progress,
            num_t=run["num_t"], data=data, cache=cache, shape_samples=run["shape_samples"], **sampler)
        results.append({"setting": name, "method": "dense" if cfg is None else cfg.method,
                        "config": "dense" if cfg is None else cfg.describe(),
                        "sparse_config": None if cfg is None else cfg.to_dict()} | r)
    dense_loss = results[0]["val_loss"]
    for r in results:
        r["delta_vs_dense_pct"] = 100.0 * (r["val_loss"] - dense_loss) / dense_loss
    return results


def _print_table(results: list[dict]) -> None:
    from .classifier import per_shape_text

    width = max(24, *(len(r["config"]) + 2 for r in results))
    header = (f"{'setting':<16}{'config':<{width}}{'sparsity %':>11}{'val loss':>10}{'Δ vs dense %':>14}"
              f"{'PSNR':>8}{'SSIM':>8}{'shape acc':>10}{'seconds':>9}")
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        sp = None if r["sparsity"] is None else 100 * r["sparsity"]
        print(f"{r['setting'][:15]:<16}{r['config']:<{width}}{fmt(sp, '.1f'):>11}{r['val_loss']:>10.5f}"
              f"{r['delta_vs_dense_pct']:>+14.1f}{fmt(r['psnr'], '.2f'):>8}{fmt(r['ssim'], '.4f'):>8}"
              f"{fmt(r['shape_accuracy'], '.2f'):>10}{r['seconds']:>9.1f}")
    for r in results:
        if r["shape_per_shape"]:
            print(f"shape acc by shape, {r['setting']}: {per_shape_text(r['shape_per_shape'])}")
    print("\nval loss: velocity MSE vs noise - x0 (lower is better); PSNR (dB) / SSIM: samples vs the dense "
          "reference's samples on the same conditions and noise (dense vs itself: inf / 1); shape acc: fraction of "
          "single-object samples whose object the shape classifier names as conditioned (chance 0.25)")


def main(argv: Sequence[str] | None = None) -> int:
    """`vidsparse eval`; returns the exit code."""
    from .data import ShapesConfig

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(f"--device: {e}")
    model_dir, ref_dir = _model_dirs(args, parser)
    settings = _settings(args, parser, model_dir)
    geometry, tokens = _geometry(args, parser, model_dir)
    sampler = _sampler(args, parser, model_dir, ref_dir)
    out = or_exit(parser, check_output_file, args.json, "--json")
    run, reduced = _run_config(args, device)

    model = load_model(parser, "--model", model_dir, device=device)
    reference = model if ref_dir == model_dir else load_model(parser, "--reference", ref_dir, device=device)
    data = ShapesConfig(text_dim=int(model.config.text_dim), **geometry)
    _print_plan(args, run, reduced, sampler, model_dir, ref_dir, tokens, device)
    t_start = time.perf_counter()
    try:
        results = _evaluate_all(settings, model, reference, args, run, sampler, data, device)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    _print_table(results)
    payload = {
        "command": "vidsparse eval " + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "model": str(model_dir), "reference": str(ref_dir), "device": str(device), "device_name": device_name(device),
        "precision": "bf16 autocast" if device.type == "cuda" else "float32", "versions": versions(),
        "settings": {"split": args.split, **{k: run[k] for k in ("clips", "num_t", "samples", "shape_samples")},
                     "sample_steps": run["steps"], "batch_size": run["batch_size"], **sampler, "seed": args.seed,
                     "frames": data.frames, "size": data.size, "tokens": tokens, "reduced_cpu_settings": reduced},
        "results": results,
        "total_seconds": time.perf_counter() - t_start,
    }
    out.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
