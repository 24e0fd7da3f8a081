"""`vidsparse demo`: the embedded tiny video model sampled with dense attention and with vidsparse.

The main job. It draws a few conditions of the procedural "moving shapes" validation split,
samples each with the embedded tiny Wan model (a diffusers ``WanTransformer3DModel``; videos are
(B, 3, T, H, W) in [-1, 1], 16 x 64 x 64 pixels = 4096 tokens by default) twice from the same
noise: once with the stock dense attention, once with vidsparse's block-sparse attention patched
in (``vidsparse.patch`` with a :class:`vidsparse.SparseConfig`). The default sparse side is the
``svg`` masker at about 80% block sparsity: on this 4,096-token model that is where the best
method of ``vidsparse compare`` still keeps the scene and its objects training-free (95% is the
distilled student's job, ``--distilled``). ``--topk``/``--topp`` switch to the hybrid masker.
It prints the measured sparsity, the self-attention time, the total sampling time and the PSNR /
SSIM of the sparse frames against the dense ones, and writes to ``--out``:

* ``side_by_side.mp4`` and ``side_by_side.gif``: dense (left) and vidsparse (right), one row per
  sample, 4x nearest-neighbour upscaled, labelled and captioned;
* ``frames.png``: a frame strip per sample (dense, vidsparse, 4x amplified difference);
* ``mask_layer{L}_head{H}.png``: the block mask vidsparse predicted for one layer and head;
* ``results.json``: everything printed, and the settings.

It uses the GPU when there is one (bf16, Triton kernels). On a CPU it runs 1 sample and 10 Euler
steps (it says so) so the whole command stays under ~3 minutes; sparse attention then runs the
``gather`` backend (eager PyTorch over the kept blocks only).

``--distilled`` puts the distilled sparse student (``vidsparse/tiny/assets/tiny_wan_distilled`` or
``--distilled-path``) on the sparse side with the mask of its ``sparse_config.json``; the dense
side stays the original model. ``--model`` takes another diffusers ``WanTransformer3DModel``
directory in the tiny model's format (pixel space, conditioned on :func:`vidsparse.tiny.data.embed`).
``--synthetic`` runs the model-free demo (:mod:`vidsparse.tiny.demo_synthetic`).

Every flag, path and model folder is checked before any work: a bad one is one ``parser.error``
line naming the flag (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils import check_model_dir, check_output_dir, fmt, jsonable, resolve_device
from .cli_args import (block_size, finite_float, fraction_or_none, load_model, nonneg_int, or_exit, positive_float,
                       positive_int, require_video_extra, sampler_settings, seed_int)

__all__ = ["DEMO_CONFIG", "DEMO_TOPK", "DEMO_TOPP", "CPU_SAMPLES", "CPU_STEPS", "GPU_SAMPLES", "build_parser", "run", "main",
           "distilled_dir"]

#: the sparse side's default: the svg masker (per-head spatial / temporal layouts) with budget 0.19,
#: about 80% block sparsity here. `vidsparse compare` on an H200 (32 clips x 4 times, training-free)
#: put it first at 80%: one-step velocity error 0.0076 (tiled Top-k 0.0125, frame-major Top-k
#: 0.0328), shape accuracy 8/8 like dense; at 90% every method's frames lose the objects.
DEMO_CONFIG = {"method": "svg", "budget": 0.19}
DEMO_MASK_WHY = ("svg at ~80% block sparsity, not SparseConfig's default hybrid: on this 4,096-token model it is "
                 "the sparsest training-free point of `vidsparse compare` that keeps the objects (95% needs "
                 "the distilled student)")
#: what --topk / --topp change when given alone: SparseConfig's hybrid defaults
DEMO_TOPK = 0.03
DEMO_TOPP = 0.2
#: what a CPU run does when --samples / --steps are not given (the GPU run uses the model's
#: sampling.json steps and GPU_SAMPLES). Sized so `vidsparse demo` takes <= 3 min on 2 cores.
CPU_SAMPLES = 1
CPU_STEPS = 10
GPU_SAMPLES = 4
#: pixel upscale of the frames in the mp4 / GIF / frame strip
UPSCALE = 4
DEFAULT_OUT = "vidsparse_demo"

DESCRIPTION = f"""\
The main job: sample a few conditions of the embedded tiny video model (a diffusers Wan
transformer, 16 frames of 64x64 pixels, 4096 tokens) with dense attention and with vidsparse's
block-sparse attention, from the same noise. Prints sparsity, attention time, sampling time and
PSNR/SSIM of the sparse frames against the dense ones; writes side_by_side.mp4 / .gif,
frames.png, mask_layer{{L}}_head{{H}}.png and results.json to --out. Uses the GPU when there is one;
on a CPU it runs {CPU_SAMPLES} sample and {CPU_STEPS} steps (about a minute on 2 cores; sparse attention
on the gather backend) unless --samples / --steps say otherwise. The mask is the {DEMO_CONFIG["method"]} masker
with budget {DEMO_CONFIG["budget"]} ({DEMO_MASK_WHY}); --topk / --topp switch to the hybrid masker."""

_UNSET = object()  # --topk / --topp not given (None means "rule off")
_SYNTHETIC_ONLY = ("height", "width", "heads", "head_dim")
_MODEL_ONLY = ("model", "distilled", "distilled_path", "samples", "steps", "guidance_scale", "shift",
               "guidance_interval", "eta", "layer", "size", "token_order", "keep_diagonal", "keep_sink")


def build_parser() -> argparse.ArgumentParser:
    from ..maskers.token_order import TOKEN_ORDERS

    parser = argparse.ArgumentParser(
        prog="vidsparse demo",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  vidsparse demo                         # embedded model, default sparsity, GPU if any\n"
               "  vidsparse demo --topk 0.05 --topp 0.3  # another sparsity\n"
               "  vidsparse demo --distilled             # the distilled sparse student on the sparse side\n"
               "  vidsparse demo --synthetic             # no model: mask + kernel on video-like q/k",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT}/)")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a diffusers WanTransformer3DModel directory in the tiny model's format "
                             "(default: the embedded vidsparse/tiny/assets/tiny_wan)")
    parser.add_argument("--distilled", action="store_true",
                        help="sparse side: the distilled sparse student (dense side: the original model)")
    parser.add_argument("--distilled-path", default=None, metavar="PATH",
                        help="the distilled student's directory (implies --distilled; "
                             "default: vidsparse/tiny/assets/tiny_wan_distilled)")
    parser.add_argument("--topk", type=fraction_or_none, default=_UNSET,
                        help=f"hybrid masker: Top-k fraction of key blocks kept per query block, or 'none' "
                             f"(default {DEMO_TOPK} once --topk or --topp is given)")
    parser.add_argument("--token-order", choices=TOKEN_ORDERS, default=None,
                        help="raster (the model's frame-major order), tiled (each query block a compact "
                        "t x h x w tile of the token grid) or auto (tiled when the grid is known); default: the "
                        "distilled student's sparse_config.json, else the masker's own (hybrid: auto, others: raster)")
    parser.add_argument("--topp", type=fraction_or_none, default=_UNSET,
                        help=f"hybrid masker: Top-p pooled probability mass kept per query block, or 'none' "
                             f"(default {DEMO_TOPP} once --topk or --topp is given)")
    parser.add_argument("--block-q", type=block_size, default=None, help="tokens per query block (default 128)")
    parser.add_argument("--block-k", type=block_size, default=None, help="tokens per key block (default 64)")
    parser.add_argument("--keep-diagonal", action="store_true", default=None,
                        help="also keep each query block's own key blocks (default: the distilled student's "
                             "sparse_config.json, else off)")
    parser.add_argument("--keep-sink", action="store_true", default=None,
                        help="also keep the first key block (default: sparse_config.json, else off)")
    parser.add_argument("--samples", type=positive_int, default=None,
                        help=f"conditions to sample (default {GPU_SAMPLES} on GPU, {CPU_SAMPLES} on CPU)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"Euler steps (default: the model's sampling.json on GPU, {CPU_STEPS} on CPU)")
    parser.add_argument("--guidance-scale", type=finite_float, default=None,
                        help="classifier-free guidance weight (default: the model's sampling.json; 1 disables)")
    parser.add_argument("--shift", type=positive_float, default=None,
                        help="time-grid shift (default: sampling.json)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                        help="guide only the steps with t in [T_LO, T_HI] (default: sampling.json)")
    parser.add_argument("--eta", type=float, default=None,
                        help="sampler stochasticity in [0, 1]; 0 = Euler ODE (default: sampling.json)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the conditions and of the shared noise")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--layer", type=nonneg_int, default=None,
                        help="self-attention layer whose mask is plotted (default: the middle layer)")
    parser.add_argument("--head", type=nonneg_int, default=0,
                        help="attention head whose mask is plotted (default 0)")
    parser.add_argument("--frames", type=positive_int, default=None,
                        help="frames per clip (default: 16); with --synthetic: frames of the token grid")
    parser.add_argument("--size", type=positive_int, default=None, help="clip height = width in pixels (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    syn = parser.add_argument_group("--synthetic", "the model-free demo: hybrid mask + block-sparse attention on "
                                                   "synthetic video-like q/k (writes mask_head0.png, demo.json)")
    syn.add_argument("--synthetic", action="store_true", help="run the synthetic demo instead of the model")
    syn.add_argument("--height", type=positive_int, default=None, help="token-grid height (default 16)")
    syn.add_argument("--width", type=positive_int, default=None, help="token-grid width (default 24)")
    syn.add_argument("--heads", type=positive_int, default=None, help="attention heads (default 4)")
    syn.add_argument("--head-dim", type=positive_int, default=None, help="head dimension (default 64)")
    return parser



# ----------------------------------------------------------------------------------------------
# Checks before any work


def distilled_dir() -> Path:
    """The shipped distilled student: ``vidsparse/tiny/assets/tiny_wan_distilled``."""
    return Path(__file__).resolve().parent / "assets" / "tiny_wan_distilled"


def _check_flags(args, parser) -> None:
    """Flags that do not apply to the chosen demo, and a mask with no rule; ``--distilled-path``
    implies ``--distilled``."""
    if args.synthetic:
        for name in _MODEL_ONLY:
            if getattr(args, name) not in (None, False):
                parser.error(f"--{name.replace('_', '-')} does not apply to --synthetic (the synthetic demo runs no model)")
        if args.head != 0:
            parser.error("--head does not apply to --synthetic (its mask PNG shows head 0)")
    else:
        for name in _SYNTHETIC_ONLY:
            if getattr(args, name) is not None:
                parser.error(f"--{name.replace('_', '-')} applies only to --synthetic")
    if args.distilled_path is not None:
        args.distilled = True
    if args.topk is None and args.topp is None:
        parser.error("--topk and --topp are both 'none': give at least one (1.0 is dense)")


def _device(args, parser):
    """--device (default: CUDA when available), checked against this machine."""
    import torch

    try:
        device = resolve_device(args.device or "auto")
    except ValueError as e:
        parser.error(f"--device: {e}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _model_folder(flag: str, path, parser, *, hint: str = "") -> tuple[Path, dict]:
    """A folder holding a pixel-space WanTransformer3DModel in the tiny model's format, and its
    config.json; else a parser error naming ``flag`` (nothing loaded)."""
    from .data import ShapesConfig

    where = Path(path)
    if not where.is_dir():
        parser.error(f"{flag} {path}: no such directory{hint}")
    if not (where / "config.json").is_file() or not any(where.glob("*.safetensors")):
        if (where / "model_index.json").is_file():
            parser.error(f"{flag} {path}: a full diffusers pipeline; pass its transformer directory "
                         f"({where / 'transformer'}) in the tiny model's format (pixel space, vidsparse.tiny.data conditions)")
        parser.error(f"{flag} {path}: no diffusers checkpoint there (expected config.json and "
                     f"diffusion_pytorch_model.safetensors){hint}")
    or_exit(parser, check_model_dir, where, flag)
    cfg = json.loads((where / "config.json").read_text())
    if cfg.get("_class_name") != "WanTransformer3DModel":
        parser.error(f"{flag} {path}: a {cfg.get('_class_name')!r} checkpoint; the demo runs WanTransformer3DModel")
    text_dim = ShapesConfig().text_dim
    if cfg.get("in_channels") != 3 or cfg.get("out_channels", 3) != 3 or cfg.get("text_dim") != text_dim:
        parser.error(
            f"{flag} {path}: in_channels={cfg.get('in_channels')}, out_channels={cfg.get('out_channels')}, "
            f"text_dim={cfg.get('text_dim')}; the demo needs the tiny model's format: pixel-space RGB "
            f"(3 channels in and out, no VAE) conditioned on vidsparse.tiny.data.embed (text_dim={text_dim})")
    return where, cfg


def _sparse_config(args, parser, student_dir: Path | None):
    """The sparse side's SparseConfig and why it is what it is.

    The flags (--topk, --topp, --block-q, --block-k, --token-order, --keep-diagonal, --keep-sink)
    change a base: the student's ``sparse_config.json`` (:meth:`SparseConfig.load`: the mask it was
    distilled with) when there is one, else DEMO_CONFIG; --topk / --topp switch a non-hybrid base to
    SparseConfig's hybrid defaults first.
    """
    from ..config import CONFIG_FILE, SparseConfig

    base, why = SparseConfig(DEMO_CONFIG["method"], {k: v for k, v in DEMO_CONFIG.items() if k != "method"}), DEMO_MASK_WHY
    if student_dir is not None and (student_dir / CONFIG_FILE).is_file():
        flag = "--distilled-path" if args.distilled_path else "--distilled"
        try:
            base = SparseConfig.load(student_dir)
        except (ValueError, TypeError) as e:
            parser.error(f"{flag} {student_dir / CONFIG_FILE}: {e}")
        why = f"the student's {CONFIG_FILE}: the mask it was distilled with"
    changes: dict[str, Any] = {k: getattr(args, k) for k in ("topk", "topp") if getattr(args, k) is not _UNSET}
    if changes and base.method != "hybrid":  # Top-k / Top-p are the hybrid masker's options
        base = SparseConfig(topk=DEMO_TOPK, topp=DEMO_TOPP)
    changes.update({k: getattr(args, k) for k in ("block_q", "block_k", "token_order", "keep_diagonal", "keep_sink")
                    if getattr(args, k) is not None})
    try:
        cfg = base.replace(**changes, collect_stats=True)
    except (TypeError, ValueError) as e:
        parser.error(f"--topk/--topp/--block-q/--block-k/--token-order: {e}")
    return cfg, ("the flags" if changes else why)


@dataclass
class _Run:
    """Everything the model demo decided before loading anything."""

    device: Any
    model_dir: Path
    student_dir: Path | None
    sparse_cfg: Any
    mask_why: str
    samples: int
    steps: int
    reduced: dict
    sampler: dict
    layer: int
    num_layers: int
    frames: int
    size: int
    grid: tuple
    out: Path
    extra: dict = field(default_factory=dict)


def _prepare(args, parser) -> _Run:
    """Check every flag, path and folder of the model demo, reading config files only (no model)."""
    from .._optional import require
    from .model import default_weights_dir, load_sampling_defaults

    device = _device(args, parser)
    or_exit(parser, require_video_extra)
    or_exit(parser, require, "diffusers", "diffusers")

    if args.model is None and not (default_weights_dir() / "config.json").is_file():
        parser.error(f"--model: no embedded model at {default_weights_dir()} (set $VIDSPARSE_TINY_WAN or pass --model PATH)")
    model_dir, cfg = _model_folder("--model", args.model or default_weights_dir(), parser)
    student_dir = None
    if args.distilled:
        path = args.distilled_path or distilled_dir()
        flag = "--distilled-path" if args.distilled_path else "--distilled"
        hint = "" if args.distilled_path else (
            " (the distilled tiny model is not shipped in this checkout yet; train one with "
            "`vidsparse distill --out runs/distill` and pass --distilled-path runs/distill/student)")
        student_dir, scfg = _model_folder(flag, path, parser, hint=hint)
        shape = lambda c: (c["num_layers"], c["num_attention_heads"], tuple(c["patch_size"]))  # noqa: E731
        if shape(scfg) != shape(cfg):
            parser.error(f"{flag} {student_dir}: the student (layers, heads, patch) {shape(scfg)} does not match "
                         f"the dense model's {shape(cfg)}")
    sparse_cfg, why = _sparse_config(args, parser, student_dir)
    num_layers, heads = cfg["num_layers"], cfg["num_attention_heads"]
    layer = num_layers // 2 if args.layer is None else args.layer
    if layer >= num_layers:
        parser.error(f"--layer {layer}: the model has {num_layers} self-attention layers (0..{num_layers - 1})")
    if args.head >= heads:
        parser.error(f"--head {args.head}: the model has {heads} attention heads (0..{heads - 1})")
    frames, size = args.frames or 16, args.size or 64
    pt, ph, pw = cfg["patch_size"]
    if frames % pt or size % ph or size % pw or size < 8:
        parser.error(f"--frames {frames} / --size {size}: must be divisible by the patch size "
                     f"{tuple(cfg['patch_size'])} (and size >= 8)")
    sampler = or_exit(parser, sampler_settings, model_dir, guidance_scale=args.guidance_scale,
                      guidance_interval=args.guidance_interval, eta=args.eta, shift=args.shift)
    samples, steps, reduced = _samples_and_steps(args, device, int(load_sampling_defaults(model_dir)["steps"]))
    out = or_exit(parser, check_output_dir, args.out, "--out")
    return _Run(device=device, model_dir=model_dir, student_dir=student_dir, sparse_cfg=sparse_cfg, mask_why=why,
                samples=samples, steps=steps, reduced=reduced, sampler=sampler, layer=layer, num_layers=num_layers,
                frames=frames, size=size, grid=(frames // pt, size // ph, size // pw), out=out)


def _samples_and_steps(args, device, model_steps: int) -> tuple[int, int, dict]:
    """--samples / --steps, or the defaults: GPU_SAMPLES and the model's steps on a GPU, fewer on
    a CPU (listed in ``reduced`` as {name: (GPU default, used)})."""
    cuda, reduced = device.type == "cuda", {}
    samples, steps = args.samples, args.steps
    if samples is None:
        samples = GPU_SAMPLES if cuda else CPU_SAMPLES
        if not cuda:
            reduced["samples"] = (GPU_SAMPLES, CPU_SAMPLES)
    if steps is None:
        steps = model_steps if cuda else min(CPU_STEPS, model_steps)
        if steps != model_steps:
            reduced["steps"] = (model_steps, steps)
    return samples, steps, reduced


# ----------------------------------------------------------------------------------------------
# The model demo


def _print_header(args, run: _Run, model, dtype) -> None:
    from . import flow
    from .model import describe_model

    s = run.sampler
    name = f"{run.model_dir}" if args.model else "embedded tiny Wan"
    print(f"vidsparse demo: {name}: {describe_model(model, run.frames, run.size)}")
    print(f"  {str(dtype).replace('torch.', '')} on {run.device}; {run.samples} sample(s) of the 'val' split, "
          f"{run.steps} steps, {flow.describe_sampler(s['guidance_scale'], s['guidance_interval'], s['eta'], s['shift'])}"
          f", seed {args.seed}")
    if run.reduced:
        what = " and ".join(f"{new} {k.rstrip('s') if new == 1 else k} instead of {old}"
                            for k, (old, new) in run.reduced.items())
        print(f"  CPU run: {what}, to finish in about 3 minutes (pass --samples / --steps to change; "
              f"fewer steps give blurrier videos)")
    backend = "Triton kernels" if run.device.type == "cuda" else "gather backend (eager PyTorch over the kept blocks only)"
    student = f"distilled student {run.student_dir}, " if run.student_dir is not None else ""
    print(f"  sparse side: {student}{run.sparse_cfg.describe()}, {backend}")
    print(f"  mask: {run.mask_why}")


def _inputs(args, run: _Run):
    """Captions, (B, 7, text_dim) condition embeddings and (B, 3, T, H, W) initial noise of the
    first ``run.samples`` conditions of the val split."""
    import torch

    from .data import ShapesConfig, describe, embed, sample_conditions

    shapes = ShapesConfig(frames=run.frames, size=run.size)
    cond = sample_conditions(run.samples, seed=args.seed, split="val", config=shapes, device=run.device)
    noise = torch.randn((run.samples, 3, run.frames, run.size, run.size), generator=torch.Generator().manual_seed(args.seed))
    return describe(cond), embed(cond, config=shapes), noise.to(run.device)


def _sample_both(model, sparse_model, embeds, noise, run: _Run, progress: bool, label: str) -> dict:
    """Dense samples of ``model`` and sparse samples of ``sparse_model`` from the same noise, with
    the attention times, the sparsity summary and the captured masks of ``run.layer``."""
    import torch

    from .. import integrations as integ
    from .demo_capture import DenseAttentionTimer, MaskCapture, timed_sample

    common = dict(steps=run.steps, device=run.device, **run.sampler)
    if run.device.type == "cuda":  # warm-up: cuDNN/SDPA selection, Triton compilation and autotuning are not timed
        with torch.no_grad():
            timed_sample(model, embeds, noise, **{**common, "steps": 1}, desc="warm-up dense", progress=False)
            integ.patch(sparse_model, run.sparse_cfg.replace(collect_stats=False))
            try:
                timed_sample(sparse_model, embeds, noise, **{**common, "steps": 1}, desc="warm-up sparse", progress=False)
            finally:
                integ.unpatch(sparse_model)
    with DenseAttentionTimer(run.device) as dense_timer:
        dense, dense_s = timed_sample(model, embeds, noise, **common, desc="dense attention", progress=progress)
    capture = MaskCapture(run.layer)
    integ.patch(sparse_model, run.sparse_cfg)
    try:
        integ.set_mask_callback(sparse_model, capture)
        sparse, sparse_s = timed_sample(sparse_model, embeds, noise, **common, desc=label, progress=progress)
        summary = integ.stats(sparse_model).summary()
    finally:
        integ.set_mask_callback(sparse_model, None)
        integ.unpatch(sparse_model)
    return {"dense": dense, "sparse": sparse, "dense_s": dense_s, "sparse_s": sparse_s,
            "dense_attn_ms": dense_timer.total_ms(), "summary": summary, "masks": capture.masks()}


def _write_mask_png(masks: dict, args, run: _Run, label: str) -> tuple[Path | None, dict | None]:
    """The plot of the last step's mask of ``run.layer`` / ``--head`` (sample 0), and its numbers;
    (None, None) when the layer ran no mask (e.g. one SparseConfig.dense_layers keeps dense)."""
    from .demo_media import save_mask_png

    if not masks:
        return None, None
    path = run.out / f"mask_layer{run.layer}_head{args.head}.png"
    step = max(masks)
    mask = masks[step]
    kept_by_step = {s: float(m.dense[0, args.head].float().mean()) for s, m in masks.items()}
    kept = kept_by_step[step]
    save_mask_png(
        mask, str(path), head=args.head, tokens_per_frame=run.grid[1] * run.grid[2],
        title=f"{label} mask, layer {run.layer}, head {args.head}, step {step + 1}/{run.steps}, sample 0\n"
              f"kept {kept:.1%} of {mask.num_q_blocks}x{mask.num_k_blocks} blocks "
              f"({mask.block_q}x{mask.block_k} tokens; black = kept; faint lines: frame boundaries)")
    return path, {"path": path.name, "layer": run.layer, "head": args.head, "step": step, "kept_fraction": kept,
                  "sparsity": 1 - kept, "kept_fraction_by_step": [kept_by_step[s] for s in sorted(kept_by_step)]}


def _print_table(r: dict, run: _Run, psnr, ssim, captions, sparse_label: str, distilled: bool) -> None:
    cuda = run.device.type == "cuda"
    summary = r["summary"]
    rows = [
        ("dense attention", 0.0, r["dense_attn_ms"] / 1e3, None, r["dense_s"], None, None),
        (sparse_label, summary["sparsity"], summary["attn_ms_total"] / 1e3, summary["mask_ms_total"] / 1e3,
         r["sparse_s"], float(psnr.mean()), float(ssim.mean())),
    ]
    print(f"\n{'':<26}{'sparsity':>9}{'attention s':>13}{'mask s':>8}{'sampling s':>12}{'PSNR dB':>9}{'SSIM':>7}")
    for rname, sp, att, msk, tot, p, s in rows:
        print(f"{rname:<26}{sp:>9.3f}{att:>13.2f}{fmt(msk, '.2f'):>8}{tot:>12.1f}{fmt(p, '.2f'):>9}{fmt(s, '.3f'):>7}")
    per_layer = {rec["layer"]: rec["sparsity"] for rec in summary["layers"]}
    print("  sparsity: block-level, mean over layers, steps and heads; per layer "
          + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(per_layer.items())))
    print(f"  attention s: self-attention only, {run.steps} steps x {run.num_layers} layers "
          f"(dense: diffusers' SDPA call; vidsparse: {'Triton' if cuda else 'gather'} block-sparse "
          f"attention, mask prediction in 'mask s'); sampling s: the whole sampler, same noise")
    if not cuda:
        print("  CPU timings: eager PyTorch on both sides (SDPA for dense, vidsparse's gather backend for "
              "sparse); on a GPU the Triton kernels run instead")
    print("  PSNR / SSIM: sparse frames against the dense frames of the same sample")
    for i, cap in enumerate(captions):
        print(f"  sample {i}: PSNR {float(psnr[i]):6.2f} dB  SSIM {float(ssim[i]):.3f}  {cap}")
    if not distilled and float(psnr.mean()) < 20.0:
        print(f"  note: the tiny model was trained with dense attention only; skipping {100 * summary['sparsity']:.0f}% "
              "of the attention blocks without fine-tuning changes its velocity predictions enough that the samples "
              "drift from the dense ones. `--distilled` shows a student fine-tuned for the sparse mask (`vidsparse "
              "distill`); milder masks stay closer (e.g. --topp 0.7)")


def _write_media(r: dict, run: _Run, captions, sparse_label: str) -> tuple[list[Path], dict]:
    """The videos and the frame strip; returns the files written and the video's geometry."""
    from .demo_media import FPS, compose_frames, frame_strip, write_videos

    dense_cpu, sparse_cpu = r["dense"].float().cpu(), r["sparse"].float().cpu()
    scale = UPSCALE if run.size <= 128 else 1
    frames_np = compose_frames(dense_cpu, sparse_cpu, captions, ("dense attention", sparse_label), scale=scale)
    mp4, gif = write_videos(frames_np, run.out)
    strip = run.out / "frames.png"
    frame_strip(dense_cpu, sparse_cpu, captions, ("dense", sparse_label), strip, every=max(1, run.frames // 8), scale=2)
    video = {"frames": int(frames_np.shape[0]), "height": int(frames_np.shape[1]),
             "width": int(frames_np.shape[2]), "fps": FPS, "upscale": scale}
    return ([mp4] if mp4 else []) + [gif, strip], video


def model_main(args, parser) -> dict:
    """The model demo with parsed flags; returns results.json's content plus ``"videos"``."""
    t_start = time.perf_counter()
    import torch

    from ..metrics import video_psnr_ssim

    run = _prepare(args, parser)
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    model = load_model(parser, "--model", run.model_dir, device=run.device, dtype=dtype)
    student = None
    if run.student_dir is not None:
        flag = "--distilled-path" if args.distilled_path else "--distilled"
        student = load_model(parser, flag, run.student_dir, device=run.device, dtype=dtype)
    captions, embeds, noise = _inputs(args, run)
    _print_header(args, run, model, dtype)
    label = "distilled vidsparse" if student is not None else "vidsparse"
    r = _sample_both(model, student if student is not None else model, embeds, noise, run,
                     progress=not args.no_progress, label=label)
    psnr, ssim = video_psnr_ssim(r["sparse"], r["dense"])
    sparse_label = f"{label} {100 * r['summary']['sparsity']:.0f}%"
    files, video = _write_media(r, run, captions, sparse_label)
    mask_png, mask_info = _write_mask_png(r["masks"], args, run, label)
    files += ([mask_png] if mask_png else []) + [run.out / "results.json"]
    _print_table(r, run, psnr, ssim, captions, sparse_label, distilled=student is not None)
    results = _results(args, run, r, psnr, ssim, captions, sparse_label, mask_info, video, files, dtype)
    results["total_s"] = time.perf_counter() - t_start
    with open(run.out / "results.json", "w") as f:
        json.dump(jsonable(results), f, indent=2)
    print(f"\nwrote {', '.join(str(p) for p in files)}")
    print(f"total {time.perf_counter() - t_start:.0f} s (model load, sampling, files)")
    results["videos"] = {"dense": r["dense"].float().cpu(), "sparse": r["sparse"].float().cpu()}  # not in the JSON
    return results


def _results(args, run: _Run, r, psnr, ssim, captions, sparse_label, mask_info, video, files, dtype) -> dict:
    """results.json's content (non-finite PSNRs as strings, like jsonable writes them)."""
    summary, s = r["summary"], run.sampler
    finite = lambda x: x if math.isfinite(x) else str(x)  # noqa: E731
    return {
        "model": str(run.model_dir), "distilled": str(run.student_dir) if run.student_dir else None,
        "device": str(run.device), "dtype": str(dtype).replace("torch.", ""),
        "backend": "triton" if run.device.type == "cuda" else "gather",
        "samples": run.samples, "steps": run.steps, "guidance_scale": s["guidance_scale"],
        "guidance_interval": list(s["guidance_interval"]), "eta": s["eta"], "shift": s["shift"], "seed": args.seed,
        "frames": run.frames, "size": run.size, "tokens": math.prod(run.grid),
        "reduced_for_cpu": {k: {"default": old, "used": new} for k, (old, new) in run.reduced.items()},
        "sparse_config": run.sparse_cfg.to_dict(), "sparse_config_why": run.mask_why,
        "captions": captions, "labels": {"dense": "dense attention", "sparse": sparse_label},
        "sparsity": summary["sparsity"],
        "sparsity_per_layer": {str(rec["layer"]): rec["sparsity"] for rec in sorted(summary["layers"], key=lambda x: x["layer"])},
        "attention_s": {"dense": r["dense_attn_ms"] / 1e3, "sparse": summary["attn_ms_total"] / 1e3,
                        "sparse_mask": summary["mask_ms_total"] / 1e3},
        "sampling_s": {"dense": r["dense_s"], "sparse": r["sparse_s"]},
        "psnr_db": [finite(float(x)) for x in psnr], "ssim": [float(x) for x in ssim],
        "psnr_db_mean": finite(float(psnr.mean())), "ssim_mean": float(ssim.mean()),
        "mask": mask_info, "video": video, "files": [p.name for p in files],
    }


def _synthetic(args, parser) -> dict:
    """The synthetic demo after its checks (matplotlib present, --out writable)."""
    from .._optional import require
    from .demo_synthetic import synthetic_main

    device = _device(args, parser)
    or_exit(parser, require, "matplotlib", "video")
    or_exit(parser, check_output_dir, args.out, "--out")
    topk = 0.03 if args.topk is _UNSET else args.topk
    topp = 0.2 if args.topp is _UNSET else args.topp  # SparseConfig's defaults
    return synthetic_main(args, device, topk=topk, topp=topp)


def run(argv: list[str] | None = None) -> dict:
    """Run the demo with command-line ``argv``; returns the summary (results.json's content plus
    ``"videos": {"dense", "sparse"}`` (B, 3, T, H, W) CPU tensors in [-1, 1] for the model demo).

    Raises:
        SystemExit: bad flags, paths or model folders (argparse's error naming the flag, code 2),
            before any model is loaded.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_flags(args, parser)
    if args.synthetic:
        return _synthetic(args, parser)
    return model_main(args, parser)


def main(argv: list[str] | None = None) -> int:
    """`vidsparse demo`; returns the exit code."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
