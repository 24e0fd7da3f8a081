"""`vidsparse demo`: the embedded tiny video model sampled with dense attention and with vidsparse.

The main job. It draws a few conditions of the procedural "moving shapes" validation split,
samples each with the embedded tiny Wan model (a diffusers ``WanTransformer3DModel``) twice from
the same noise: once with the stock dense attention, once with vidsparse's block-sparse attention
patched in (``vidsparse.patch``, hybrid Top-k + Top-p mask, by default k=0.03 and p=0.1: 95-97%
block sparsity on this model; ``--topk``/``--topp`` for others). It prints the measured
sparsity, the self-attention time, the total sampling time and the PSNR / SSIM of the sparse
frames against the dense ones, and writes to ``--out``:

* ``side_by_side.mp4`` and ``side_by_side.gif``: dense (left) and vidsparse (right), one row per
  sample, 4x nearest-neighbour upscaled, labelled and captioned;
* ``frames.png``: a frame strip per sample (dense, vidsparse, 4x amplified difference);
* ``mask_layer{L}_head{H}.png``: the block mask vidsparse predicted for one layer and head;
* ``results.json``: everything printed, and the settings.

It uses the GPU when there is one (bf16, Triton kernels). On a CPU it runs 1 sample and a few
Euler steps (it says so) so the whole command stays under ~3 minutes: on the CPU vidsparse runs
its exact eager reference backend, which is correct but not faster than dense attention.

``--distilled`` puts the distilled sparse student (``vidsparse/tiny/assets/tiny_wan_distilled`` or
``--distilled-path``) on the sparse side; the dense side stays the original model. ``--model``
takes another diffusers ``WanTransformer3DModel`` directory in the tiny model's format (pixel
space, conditioned on :func:`vidsparse.tiny.data.embed`). ``--synthetic`` runs the model-free demo:
the hybrid mask and block-sparse attention on synthetic video-like queries and keys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

#: what a CPU run does when --samples / --steps are not given (the GPU run uses the model's
#: sampling.json steps and GPU_SAMPLES). Sized so `vidsparse demo` takes <= 3 min on 2 cores.
#: the sparse side's default hybrid mask: SparseConfig's Top-k 0.03 with Top-p 0.1 instead of 0.2.
#: Measured on the embedded model (8-step trajectories of 2 val conditions), topp=0.2 keeps ~10% of
#: the blocks (sparsity 0.896, 0.82-0.94 by layer); topp=0.1 gives ~95% (0.946), the paper's regime.
#: (That was the model after pretraining run 2; after run 6 the CPU demo measures 0.968.)
DEMO_TOPK = 0.03
DEMO_TOPP = 0.1
CPU_SAMPLES = 1
CPU_STEPS = 10
GPU_SAMPLES = 4
#: pixel upscale of the frames in the mp4 / GIF / frame strip
UPSCALE = 4
FPS = 8
DEFAULT_OUT = "vidsparse_demo"

DESCRIPTION = """\
The main job: sample a few conditions of the embedded tiny video model (a diffusers Wan
transformer, 16 frames of 64x64 pixels, 4096 tokens) with dense attention and with vidsparse's
block-sparse attention, from the same noise. Prints sparsity, attention time, sampling time and
PSNR/SSIM of the sparse frames against the dense ones; writes side_by_side.mp4 / .gif,
frames.png, mask_layer{L}_head{H}.png and results.json to --out. Uses the GPU when there is one;
on a CPU it runs 1 sample and 3 steps (about 2 minutes) unless --samples / --steps say otherwise."""


# ----------------------------------------------------------------------------------------------
# The synthetic demo (`vidsparse demo --synthetic`): no model, random video-like q and k.


def video_like_qkv(frames: int, height: int, width: int, heads: int, head_dim: int, *, seed: int, device, dtype):
    """(1, H, N, D) q, k, v for N = frames*height*width tokens in raster (t, h, w) order.

    Queries and keys are noisy random Fourier features of the token position, so attention
    concentrates on tokens near in space and time: the locality real video DiTs show.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    t, y, x = torch.meshgrid(
        torch.linspace(0, 1, frames), torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij"
    )
    coords = torch.stack([t, y, x], -1).reshape(-1, 3)  # (N, 3)

    # random Fourier features of the position: q_i . k_j = sum cos(w . (p_i - p_j)), a kernel that
    # peaks when tokens are close in space and time, as attention in video DiTs tends to
    half = head_dim // 2
    freqs = torch.randn(heads, half, 3, generator=g) * torch.tensor([6.0, 8.0, 8.0])
    ang = torch.einsum("nc,hfc->hnf", coords, freqs)  # (H, N, D/2)
    feats = torch.cat([torch.cos(ang), torch.sin(ang)], -1)
    peak = 12.0  # logit of a token with itself, before noise
    amp = math.sqrt(peak * math.sqrt(head_dim) / half)

    def noisy(x):
        return amp * (x + 0.3 * torch.randn(x.shape, generator=g))

    q, k, v = noisy(feats), noisy(feats), torch.randn(heads, coords.shape[0], head_dim, generator=g)
    return tuple(z[None].to(device=device, dtype=dtype).contiguous() for z in (q, k, v))


def _timed(fn, device, repeats: int = 3):
    import torch

    fn()  # warm-up (kernel compilation, autotuning)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2] * 1e3


def save_mask_png(mask, path: str, *, head: int = 0, batch: int = 0, title: str = "",
                  tokens_per_frame: int | None = None) -> None:
    """Plot one (batch, head) of a :class:`vidsparse.BlockMask` to a PNG: kept block pairs black.

    ``tokens_per_frame`` draws a faint grid at video-frame boundaries.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = mask.dense[batch, head].float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(7, 7 * dense.shape[0] / max(dense.shape[1], 1) + 0.9))
    ax.imshow(dense, cmap="Greys", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
    ax.set_xlabel(f"key block ({mask.block_k} tokens)")
    ax.set_ylabel(f"query block ({mask.block_q} tokens)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if tokens_per_frame:
        per_frame = ((tokens_per_frame / mask.block_k, ax.axvline), (tokens_per_frame / mask.block_q, ax.axhline))
        for blocks, line in per_frame:
            if blocks >= 1:
                n = dense.shape[1] if line is ax.axvline else dense.shape[0]
                for i in range(1, int(math.ceil(n / blocks))):
                    line(i * blocks - 0.5, color="tab:blue", alpha=0.15, lw=0.6)
    ax.set_title(title or f"head {head}: kept blocks (black), sparsity {1 - dense.mean():.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def synthetic_main(args, parser) -> dict:
    import torch

    import vidsparse
    from vidsparse import BlockMask

    frames = args.frames if args.frames is not None else 16
    height = args.height if args.height is not None else 16
    width = args.width if args.width is not None else 24
    heads = args.heads if args.heads is not None else 4
    head_dim = args.head_dim if args.head_dim is not None else 64
    args.block_q = args.block_q or 128
    args.block_k = args.block_k or 64
    topk = 0.03 if args.topk is _UNSET else args.topk
    topp = 0.2 if args.topp is _UNSET else args.topp
    device = _device(args, parser)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = video_like_qkv(frames, height, width, heads, head_dim, seed=args.seed, device=device, dtype=dtype)
    n = q.shape[2]
    print(f"vidsparse demo --synthetic: {n} tokens ({frames}x{height}x{width} grid), {heads} heads x "
          f"{head_dim}, {str(dtype).replace('torch.', '')} on {device}")
    print(f"hybrid mask: topk={topk}, topp={topp}, blocks {args.block_q}x{args.block_k}")

    full = BlockMask.full(block_q=args.block_q, block_k=args.block_k, q_len=n, k_len=n, device=device)
    dense_out, dense_ms = _timed(lambda: vidsparse.block_sparse_attention(q, k, v, full), device)

    def sparse():
        mask = vidsparse.api.predict_mask(q, k, topk=topk, topp=topp, block_q=args.block_q, block_k=args.block_k)
        return vidsparse.block_sparse_attention(q, k, v, mask), mask

    (sparse_out, mask), sparse_ms = _timed(sparse, device)
    ref = dense_out.float()
    err = (sparse_out.float() - ref).norm() / ref.norm()
    cos = torch.nn.functional.cosine_similarity(sparse_out.float().flatten(), ref.flatten(), dim=0)
    # what the same sparsity costs with blocks chosen at random instead of by pooled scores
    rand_mask = BlockMask.from_dense(torch.rand(mask.dense.shape, device=device) < mask.density(),
                                     block_q=args.block_q, block_k=args.block_k, q_len=n, k_len=n)
    rand_out = vidsparse.block_sparse_attention(q, k, v, rand_mask).float()
    rand_err = (rand_out - ref).norm() / ref.norm()

    rows = [
        ("dense attention", 0.0, dense_ms, 0.0, 1.0),
        ("vidsparse hybrid mask", mask.sparsity(), sparse_ms, float(err), float(cos)),
        ("random mask, same density", rand_mask.sparsity(), None, float(rand_err),
         float(torch.nn.functional.cosine_similarity(rand_out.flatten(), ref.flatten(), dim=0))),
    ]
    print(f"\n{'':<28}{'sparsity':>9}{'time ms':>10}{'rel err':>10}{'cosine':>9}")
    for name, sp, ms, e, c in rows:
        print(f"{name:<28}{sp:>9.3f}{('-' if ms is None else f'{ms:.1f}'):>10}{e:>10.4f}{c:>9.4f}")
    backend = "triton" if device.type == "cuda" else "gather (eager PyTorch over the kept blocks)"
    print(f"\nbackend: {backend}; times are medians of 3 runs after a warm-up, mask prediction included")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "mask_head0.png")
    save_mask_png(mask, png, title=f"hybrid mask, head 0 (k={topk}, p={topp}), sparsity {mask.sparsity():.3f}")
    summary = {
        "tokens": n, "heads": heads, "head_dim": head_dim, "device": str(device),
        "topk": topk, "topp": topp, "block": [args.block_q, args.block_k],
        "rows": [dict(zip(("method", "sparsity", "time_ms", "rel_err", "cosine"), r)) for r in rows],
    }
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {png} and {os.path.join(args.out, 'demo.json')}")
    return summary


# ----------------------------------------------------------------------------------------------
# Argument parsing

_UNSET = object()  # --topk / --topp not given (None means "rule off")
_SYNTHETIC_ONLY = ("height", "width", "heads", "head_dim")


def _fraction(text: str):
    """A --topk / --topp value: a float in (0, 1], or 'none' to switch the rule off."""
    from vidsparse._validation import parse_fraction

    try:
        return parse_fraction(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(minimum: int):
    """argparse type: an int >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _block(text: str) -> int:
    from vidsparse.mask import check_block_size

    value = _positive_int(text)
    try:
        check_block_size("the block size", value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _seed(text: str) -> int:
    value = _nonneg_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be < 2**32, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--topk", type=_fraction, default=_UNSET,
                        help=f"Top-k fraction of key blocks kept per query block, or 'none' (default {DEMO_TOPK})")
    parser.add_argument("--token-order", choices=("raster", "tiled"), default=None,
                        help="raster (the model's frame-major order) or tiled (each query block a compact "
                        "t x h x w tile of the token grid); default: the distilled student's sparse_config.json, "
                        "else raster")
    parser.add_argument("--topp", type=_fraction, default=_UNSET,
                        help=f"Top-p pooled probability mass kept per query block, or 'none' (default "
                             f"{DEMO_TOPP}: ~95%% sparsity on the embedded model; SparseConfig's 0.2 gives ~90%%)")
    parser.add_argument("--block-q", type=_block, default=None, help="tokens per query block (default 128)")
    parser.add_argument("--block-k", type=_block, default=None, help="tokens per key block (default 64)")
    parser.add_argument("--keep-diagonal", action="store_true", default=None,
                        help="also keep each query block's own key blocks (default: the distilled student's "
                             "sparse_config.json, else off)")
    parser.add_argument("--keep-sink", action="store_true", default=None,
                        help="also keep the first key block (default: sparse_config.json, else off)")
    parser.add_argument("--samples", type=_positive_int, default=None,
                        help=f"conditions to sample (default {GPU_SAMPLES} on GPU, {CPU_SAMPLES} on CPU)")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help=f"Euler steps (default: the model's sampling.json on GPU, {CPU_STEPS} on CPU)")
    parser.add_argument("--guidance-scale", type=_finite_float, default=None,
                        help="classifier-free guidance weight (default: the model's sampling.json; 1 disables)")
    parser.add_argument("--shift", type=_positive_float, default=None,
                        help="time-grid shift (default: sampling.json)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                        help="guide only the steps with t in [T_LO, T_HI] (default: sampling.json)")
    parser.add_argument("--eta", type=float, default=None,
                        help="sampler stochasticity in [0, 1]; 0 = Euler ODE (default: sampling.json)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the conditions and of the shared noise")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--layer", type=_nonneg_int, default=None,
                        help="self-attention layer whose mask is plotted (default: the middle layer)")
    parser.add_argument("--head", type=_nonneg_int, default=0,
                        help="attention head whose mask is plotted (default 0)")
    parser.add_argument("--frames", type=_positive_int, default=None,
                        help="frames per clip (default: 16); with --synthetic: frames of the token grid")
    parser.add_argument("--size", type=_positive_int, default=None, help="clip height = width in pixels (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    syn = parser.add_argument_group("--synthetic", "the model-free demo: hybrid mask + block-sparse attention on "
                                                   "synthetic video-like q/k (writes mask_head0.png, demo.json)")
    syn.add_argument("--synthetic", action="store_true", help="run the synthetic demo instead of the model")
    syn.add_argument("--height", type=_positive_int, default=None, help="token-grid height (default 16)")
    syn.add_argument("--width", type=_positive_int, default=None, help="token-grid width (default 24)")
    syn.add_argument("--heads", type=_positive_int, default=None, help="attention heads (default 4)")
    syn.add_argument("--head-dim", type=_positive_int, default=None, help="head dimension (default 64)")
    return parser


_MODEL_ONLY = ("model", "distilled", "distilled_path", "samples", "steps", "guidance_scale", "shift",
               "guidance_interval", "eta", "layer", "size", "token_order", "keep_diagonal", "keep_sink")


def _check_flags(args, parser) -> None:
    if args.synthetic:
        for name in _MODEL_ONLY:
            value = getattr(args, name)
            if value not in (None, False):
                flag = "--" + name.replace("_", "-")
                parser.error(f"{flag} does not apply to --synthetic (the synthetic demo runs no model)")
        if args.head != 0:
            parser.error("--head does not apply to --synthetic (its mask PNG shows head 0)")
        if args.topk is None and args.topp is None:
            parser.error("--topk and --topp are both 'none': give at least one")
        return
    for name in _SYNTHETIC_ONLY:
        if getattr(args, name) is not None:
            parser.error(f"--{name.replace('_', '-')} applies only to --synthetic")
    if args.distilled_path is not None:
        args.distilled = True
    if args.topk is None and args.topp is None:
        parser.error("--topk and --topp are both 'none': give at least one (1.0 is dense)")


def _device(args, parser):
    import torch

    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _checkpoint_dir(flag: str, path, parser, *, hint: str = "") -> Path:
    """A directory holding a diffusers WanTransformer3DModel, or a parser error naming ``flag``."""
    where = Path(path)
    if not where.is_dir():
        parser.error(f"{flag} {path}: no such directory{hint}")
    config = where / "config.json"
    if not config.is_file() or not any(where.glob("*.safetensors")) and not any(where.glob("*.bin")):
        if (where / "model_index.json").is_file():
            parser.error(f"{flag} {path}: a full diffusers pipeline; pass its transformer directory "
                         f"({where / 'transformer'}) in the tiny model's format "
                         "(pixel space, vidsparse.data conditions)")
        parser.error(f"{flag} {path}: no diffusers checkpoint there (expected config.json and "
                     f"diffusion_pytorch_model.safetensors){hint}")
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"{flag} {path}: unreadable config.json ({e})")
    if cfg.get("_class_name") != "WanTransformer3DModel":
        parser.error(f"{flag} {path}: a {cfg.get('_class_name')!r} checkpoint; the demo runs WanTransformer3DModel")
    from vidsparse.tiny.data import ShapesConfig

    text_dim = ShapesConfig().text_dim
    if cfg.get("in_channels") != 3 or cfg.get("out_channels", 3) != 3 or cfg.get("text_dim") != text_dim:
        parser.error(
            f"{flag} {path}: in_channels={cfg.get('in_channels')}, out_channels={cfg.get('out_channels')}, "
            f"text_dim={cfg.get('text_dim')}; the demo needs the tiny model's format: pixel-space RGB "
            f"(3 channels in and out, no VAE) conditioned on vidsparse.tiny.data.embed (text_dim={text_dim})"
        )
    return where


def _distilled_dir() -> Path:
    return Path(__file__).resolve().parent / "assets" / "tiny_wan_distilled"


# ----------------------------------------------------------------------------------------------
# Timing of the dense self-attention (the stock Wan processor's attention call)


class _DenseAttentionTimer:
    """Times the stock Wan processor's self-attention calls (``dispatch_attention_fn`` with as
    many keys as queries; cross-attention to the 7 condition tokens is not counted).

    While active, ``diffusers.models.transformers.transformer_wan.dispatch_attention_fn`` is
    wrapped; the original is restored on exit. CUDA calls are timed with events, read at the end.
    """

    def __init__(self, device):
        self.device = device
        self.marks = []

    def __enter__(self):
        import diffusers.models.transformers.transformer_wan as tw

        from vidsparse.integrations.sparse_stats import Timer

        self._module, self._orig = tw, tw.dispatch_attention_fn
        timer = Timer(self.device)
        orig, marks = self._orig, self.marks

        def timed(query, key, *args, **kwargs):
            if query.shape[1] != key.shape[1]:  # (B, N, H, D): cross-attention
                return orig(query, key, *args, **kwargs)
            start = timer.mark()
            out = orig(query, key, *args, **kwargs)
            marks.append((start, timer.mark()))
            return out

        tw.dispatch_attention_fn = timed
        return self

    def __exit__(self, *exc):
        self._module.dispatch_attention_fn = self._orig
        return False

    def total_ms(self) -> float:
        from vidsparse.integrations.sparse_stats import Timer

        return sum(Timer.elapsed_ms(a, b) for a, b in self.marks)


# ----------------------------------------------------------------------------------------------
# Sampling


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(model, cond, noise, *, desc, progress, device, **sampler):
    """flow.sample(**sampler) with a progress bar over the network calls; returns (video clamped, seconds)."""
    from tqdm.auto import tqdm

    from vidsparse.tiny import flow

    bar = tqdm(total=sampler["steps"], desc=desc, unit="step", disable=not progress, dynamic_ncols=True, leave=True)

    def tick(*_):
        bar.update(1)  # returns None: the hook must not replace the output

    hook = model.register_forward_hook(tick)
    try:
        _sync(device)
        t0 = time.perf_counter()
        video = flow.sample(model, cond, noise=noise, progress=False, **sampler)
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        hook.remove()
        bar.close()
    return video.clamp(-1, 1), seconds


class _MaskCapture:
    """``set_mask_callback`` target: keeps, for one layer, the mask of sample 0 at every step.

    The masks stay on their device until :meth:`masks` is read (no GPU sync while sampling).
    """

    def __init__(self, layer: int):
        self.layer = layer
        self._by_step: dict[int, tuple] = {}  # step -> (dense (1, H, NQB, NKB) bool, geometry)

    def __call__(self, info, mask) -> None:
        if info.get("layer") != self.layer or info.get("call", 0) != 0:
            return
        video = info.get("video_mask")
        video = mask if video is None else video
        video = getattr(video, "mask", video)  # a MaskPlan: its BlockMask (the demo's masks are in raster order)
        step = info.get("step")
        step = len(self._by_step) if step is None else int(step)
        # sample 0: with classifier-free guidance the batch is [conditional; unconditional]
        self._by_step[step] = (video.dense[:1].clone(), (video.block_q, video.block_k, video.q_len, video.k_len))

    def masks(self) -> dict:
        """step -> BlockMask of sample 0 (all heads), on the CPU."""
        from vidsparse.mask import BlockMask

        out = {}
        for step, (dense, (bq, bk, lq, lk)) in sorted(self._by_step.items()):
            out[step] = BlockMask.from_dense(dense.cpu(), block_q=bq, block_k=bk, q_len=lq, k_len=lk)
        return out


def _sparse_config(args, parser, distilled_dir: Path | None):
    """The sparse side's SparseConfig: the flags, else the distilled directory's
    ``sparse_config.json`` (topk, topp, block_q, block_k, token_order, keep_diagonal, keep_sink;
    what the student was distilled with),
    else DEMO_TOPK / DEMO_TOPP and 128 x 64 blocks."""
    from vidsparse import SparseConfig

    fields = {"topk": DEMO_TOPK, "topp": DEMO_TOPP}
    source = "--topk/--topp/--block-q/--block-k"
    if distilled_dir is not None:
        from vidsparse.tiny.evaluate import read_sparse_setting

        try:
            saved = read_sparse_setting(distilled_dir)
        except ValueError as e:
            parser.error(f"--distilled-path: {e}")
        if saved:
            fields.update(saved)
            source = f"{distilled_dir / 'sparse_config.json'} or the flags"
    if args.topk is not _UNSET:
        fields["topk"] = args.topk
    if args.topp is not _UNSET:
        fields["topp"] = args.topp
    for name in ("block_q", "block_k", "token_order", "keep_diagonal", "keep_sink"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    try:
        return SparseConfig(**fields, collect_stats=True)
    except (TypeError, ValueError) as e:
        parser.error(f"sparse config from {source}: {e}")


def _fmt_frac(x) -> str:
    return "off" if x is None else f"{x:g}"


# ----------------------------------------------------------------------------------------------
# Outputs


def _to_uint8(video):
    """(C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8 numpy."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text(draw, xy, text, font, fill=(235, 235, 235), max_width=None):
    if max_width is not None:
        while len(text) > 4 and draw.textlength(text, font=font) > max_width:
            text = text[:-4] + "..."
    draw.text(xy, text, font=font, fill=fill)


def _compose_frames(dense, sparse, captions, labels, *, scale: int):
    """Labelled side-by-side frames: (T, H', W', 3) uint8, one row per sample, sizes divisible by 16."""
    import numpy as np
    from PIL import Image, ImageDraw

    b, _, t, h, w = dense.shape
    ph, pw, gap, head, foot = h * scale, w * scale, 8, 22, 20
    width = 2 * pw + 3 * gap
    row_h = head + ph + foot
    height = b * row_h + gap
    width16, height16 = -(-width // 16) * 16, -(-height // 16) * 16
    big = lambda v: np.repeat(np.repeat(_to_uint8(v), scale, 1), scale, 2)  # noqa: E731
    panels = [(big(dense[i]), big(sparse[i])) for i in range(b)]
    font, small = _font(15), _font(12)
    base = Image.new("RGB", (width16, height16), (24, 24, 28))
    draw = ImageDraw.Draw(base)
    for i in range(b):
        y0 = gap + i * row_h
        for j, label in enumerate(labels):
            _text(draw, (gap + j * (pw + gap) + 2, y0 + 2), label, font)
        _text(draw, (gap + 2, y0 + head + ph + 3), captions[i], small, fill=(180, 180, 190),
              max_width=width - 2 * gap)
    base = np.asarray(base).copy()
    frames = np.repeat(base[None], t, 0)
    for i, (dv, sv) in enumerate(panels):
        y0 = gap + i * row_h + head
        frames[:, y0:y0 + ph, gap:gap + pw] = dv
        frames[:, y0:y0 + ph, 2 * gap + pw:2 * gap + 2 * pw] = sv
    return frames


def _frame_strip(dense, sparse, captions, labels, path, *, every: int, scale: int) -> None:
    """PNG: per sample, rows dense / sparse / 4x |difference| of every ``every``-th frame."""
    import numpy as np
    from PIL import Image, ImageDraw

    b, _, t, h, w = dense.shape
    idx = list(range(0, t, every))
    ph, pw, gap, label_w, cap_h = h * scale, w * scale, 4, 130, 20
    rows = 3
    width = label_w + len(idx) * (pw + gap)
    block_h = cap_h + rows * (ph + gap) + 10
    img = Image.new("RGB", (width, b * block_h + 24), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(12)
    for j, f in enumerate(idx):
        _text(draw, (label_w + j * (pw + gap) + 2, 4), f"frame {f}", small, fill=(90, 90, 90))
    for i in range(b):
        y0 = 24 + i * block_h
        _text(draw, (4, y0 + 2), captions[i], font, fill=(0, 0, 0), max_width=width - 8)
        d, s = _to_uint8(dense[i]), _to_uint8(sparse[i])
        diff = np.clip(np.abs(d.astype(np.int16) - s.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
        for r, (name, vid) in enumerate(zip((*labels, "|difference| x4"), (d, s, diff))):
            yr = y0 + cap_h + r * (ph + gap)
            _text(draw, (4, yr + ph // 2 - 8), name, font, fill=(0, 0, 0), max_width=label_w - 8)
            for j, f in enumerate(idx):
                tile = Image.fromarray(vid[f]).resize((pw, ph), Image.NEAREST)
                img.paste(tile, (label_w + j * (pw + gap), yr))
    img.save(path)


def _write_videos(frames, out: Path) -> tuple[Path | None, Path]:
    """Write the mp4 (None without imageio-ffmpeg, with a warning) and the GIF."""
    import importlib.util

    import imageio.v2 as imageio

    mp4, gif = out / "side_by_side.mp4", out / "side_by_side.gif"
    # without imageio-ffmpeg, imageio would hand ".mp4" to another plugin and fail obscurely
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        print("warning: imageio-ffmpeg is not installed: skipping side_by_side.mp4 (pip install imageio-ffmpeg)",
              file=sys.stderr)
        mp4 = None
    else:
        with imageio.get_writer(mp4, format="FFMPEG", fps=FPS, codec="libx264", quality=8, macro_block_size=16,
                                ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)
    imageio.mimsave(gif, list(frames), format="GIF", duration=1000 / FPS, loop=0)
    return mp4, gif


def _json_float(x: float):
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


# ----------------------------------------------------------------------------------------------
# The model demo


def model_main(args, parser) -> dict:
    t_start = time.perf_counter()
    import torch

    from vidsparse import integrations as integ
    from vidsparse.tiny.data import ShapesConfig, describe, embed, sample_conditions
    from vidsparse.metrics import video_psnr_ssim
    from vidsparse.tiny import flow
    from vidsparse.tiny.model import default_weights_dir, describe_model, load_sampling_defaults, load_tiny_wan

    device = _device(args, parser)
    model_dir = _checkpoint_dir("--model", args.model, parser) if args.model else default_weights_dir()
    distilled_dir = None
    if args.distilled:
        path = args.distilled_path or _distilled_dir()
        flag = "--distilled-path" if args.distilled_path else "--distilled"
        hint = "" if args.distilled_path else (
            " (the distilled tiny model is not shipped in this checkout yet; train one with "
            "`vidsparse distill --out runs/distill` and pass --distilled-path runs/distill/student)")
        distilled_dir = _checkpoint_dir(flag, path, parser, hint=hint)
    if not (Path(model_dir) / "config.json").is_file():
        parser.error(f"--model: no embedded model at {model_dir} (set $VIDSPARSE_TINY_WAN or pass --model PATH)")

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sampling = load_sampling_defaults(model_dir)
    reduced = {}
    samples, steps = args.samples, args.steps
    if samples is None:
        samples = GPU_SAMPLES if cuda else CPU_SAMPLES
        if not cuda:
            reduced["samples"] = (GPU_SAMPLES, CPU_SAMPLES)
    if steps is None:
        steps = int(sampling["steps"]) if cuda else min(CPU_STEPS, int(sampling["steps"]))
        if not cuda and steps != int(sampling["steps"]):
            reduced["steps"] = (int(sampling["steps"]), steps)
    try:
        sampler = flow.resolve_sampler(sampling, guidance_scale=args.guidance_scale,
                                       guidance_interval=args.guidance_interval, eta=args.eta, shift=args.shift)
        guidance, interval, eta, shift = (sampler[k] for k in ("guidance_scale", "guidance_interval", "eta", "shift"))
    except ValueError as e:
        parser.error(f"--guidance-scale / --guidance-interval / --eta (default: the model's sampling.json): {e}")

    model = load_tiny_wan(model_dir, device=device, dtype=dtype)
    student = load_tiny_wan(distilled_dir, device=device, dtype=dtype) if distilled_dir else None
    cfg = model.config
    num_layers, heads = cfg["num_layers"], cfg["num_attention_heads"]
    if student is not None:
        scfg = student.config
        if (scfg["num_layers"], scfg["num_attention_heads"], tuple(scfg["patch_size"])) != (
                num_layers, heads, tuple(cfg["patch_size"])):
            parser.error(f"--distilled-path {distilled_dir}: the student ({scfg['num_layers']} layers, "
                         f"{scfg['num_attention_heads']} heads, patch {tuple(scfg['patch_size'])}) does not match "
                         f"the dense model ({num_layers} layers, {heads} heads, patch {tuple(cfg['patch_size'])})")
    layer = num_layers // 2 if args.layer is None else args.layer
    if layer >= num_layers:
        parser.error(f"--layer {layer}: the model has {num_layers} self-attention layers (0..{num_layers - 1})")
    if args.head >= heads:
        parser.error(f"--head {args.head}: the model has {heads} attention heads (0..{heads - 1})")
    frames = args.frames or 16
    size = args.size or 64
    pt, ph, pw = cfg["patch_size"]
    if frames % pt or size % ph or size % pw or size < 8:
        parser.error(f"--frames {frames} / --size {size}: must be divisible by the patch size "
                     f"{tuple(cfg['patch_size'])} (and size >= 8)")
    grid = (frames // pt, size // ph, size // pw)
    shapes = ShapesConfig(frames=frames, size=size)

    sparse_cfg = _sparse_config(args, parser, distilled_dir)
    cond = sample_conditions(samples, seed=args.seed, split="val", config=shapes, device=device)
    captions = describe(cond)
    embeds = embed(cond, config=shapes)
    noise = torch.randn((samples, 3, frames, size, size), generator=torch.Generator().manual_seed(args.seed))
    noise = noise.to(device)

    name = f"{model_dir}" if args.model else "embedded tiny Wan"
    print(f"vidsparse demo: {name}: {describe_model(model, frames, size)}")
    print(f"  {str(dtype).replace('torch.', '')} on {device}; {samples} sample(s) of the 'val' split, "
          f"{steps} steps, {flow.describe_sampler(guidance, interval, eta, shift)}, seed {args.seed}")
    if reduced:
        what = " and ".join(f"{new} {k.rstrip('s') if new == 1 else k} instead of {old}"
                            for k, (old, new) in reduced.items())
        print(f"  CPU run: {what}, to finish in about 3 minutes (pass --samples / --steps to change; "
              f"fewer steps give blurrier videos)")
    backend = "Triton kernels" if cuda else "gather backend (eager PyTorch over the kept blocks only)"
    print(f"  sparse side: {'distilled student ' + str(distilled_dir) + ', ' if student is not None else ''}"
          f"{sparse_cfg.describe()}, {backend}")
    progress = not args.no_progress
    common = dict(steps=steps, guidance_scale=guidance, guidance_interval=interval, eta=eta, shift=shift, device=device)
    sparse_model = student if student is not None else model

    if cuda:  # warm-up: cuDNN/SDPA selection, Triton compilation and autotuning are not timed
        with torch.no_grad():
            _run(model, embeds, noise, **{**common, "steps": 1}, desc="warm-up dense", progress=False)
            integ.patch(sparse_model, sparse_cfg.replace(collect_stats=False))
            try:
                _run(sparse_model, embeds, noise, **{**common, "steps": 1}, desc="warm-up sparse", progress=False)
            finally:
                integ.unpatch(sparse_model)

    with _DenseAttentionTimer(device) as dense_timer:
        dense, dense_s = _run(model, embeds, noise, **common, desc="dense attention", progress=progress)
    dense_attn_ms = dense_timer.total_ms()

    capture = _MaskCapture(layer)
    integ.patch(sparse_model, sparse_cfg)
    try:
        integ.set_mask_callback(sparse_model, capture)
        label = "distilled vidsparse" if student is not None else "vidsparse"
        sparse, sparse_s = _run(sparse_model, embeds, noise, **common, desc=label, progress=progress)
        summary = integ.stats(sparse_model).summary()
    finally:
        integ.set_mask_callback(sparse_model, None)
        integ.unpatch(sparse_model)

    psnr, ssim = video_psnr_ssim(sparse, dense)
    sparsity = summary["sparsity"]
    sparse_attn_ms, mask_ms = summary["attn_ms_total"], summary["mask_ms_total"]
    pct = f"{100 * sparsity:.0f}%"
    sparse_label = f"{label} {pct}"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense_cpu, sparse_cpu = dense.float().cpu(), sparse.float().cpu()
    scale = UPSCALE if size <= 128 else 1
    frames_np = _compose_frames(dense_cpu, sparse_cpu, captions, ("dense attention", sparse_label), scale=scale)
    mp4, gif = _write_videos(frames_np, out)
    strip = out / "frames.png"
    _frame_strip(dense_cpu, sparse_cpu, captions, ("dense", sparse_label), strip, every=max(1, frames // 8), scale=2)

    mask_png = out / f"mask_layer{layer}_head{args.head}.png"
    mask_info = None
    masks = capture.masks()
    if masks:
        step = max(masks)
        mask = masks[step]
        kept_by_step = {s: float(m.dense[0, args.head].float().mean()) for s, m in masks.items()}
        kept = kept_by_step[step]
        save_mask_png(
            mask, str(mask_png), head=args.head, tokens_per_frame=grid[1] * grid[2],
            title=f"{label} mask, layer {layer}, head {args.head}, step {step + 1}/{steps}, sample 0\n"
                  f"kept {kept:.1%} of {mask.num_q_blocks}x{mask.num_k_blocks} blocks "
                  f"({mask.block_q}x{mask.block_k} tokens; black = kept; faint lines: frame boundaries)",
        )
        mask_info = {"path": mask_png.name, "layer": layer, "head": args.head, "step": step,
                     "kept_fraction": kept, "sparsity": 1 - kept,
                     "kept_fraction_by_step": [kept_by_step[s] for s in sorted(kept_by_step)]}
    else:  # e.g. --layer names a layer SparseConfig.dense_layers leaves dense
        mask_png = None

    per_layer = {rec["layer"]: rec["sparsity"] for rec in summary["layers"]}
    total_s = time.perf_counter() - t_start
    rows = [
        ("dense attention", 0.0, dense_attn_ms / 1e3, None, dense_s, None, None),
        (sparse_label, sparsity, sparse_attn_ms / 1e3, mask_ms / 1e3, sparse_s,
         float(psnr.mean()), float(ssim.mean())),
    ]
    print(f"\n{'':<26}{'sparsity':>9}{'attention s':>13}{'mask s':>8}{'sampling s':>12}{'PSNR dB':>9}{'SSIM':>7}")
    for rname, sp, att, msk, tot, p, s in rows:
        print(f"{rname:<26}{sp:>9.3f}{att:>13.2f}{('-' if msk is None else f'{msk:.2f}'):>8}{tot:>12.1f}"
              f"{('-' if p is None else f'{p:.2f}'):>9}{('-' if s is None else f'{s:.3f}'):>7}")
    print("  sparsity: block-level, mean over layers, steps and heads; per layer "
          + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(per_layer.items())))
    print(f"  attention s: self-attention only, {steps} steps x {num_layers} layers "
          f"(dense: diffusers' SDPA call; vidsparse: {'Triton' if cuda else 'gather'} block-sparse "
          f"attention, mask prediction in 'mask s'); sampling s: the whole sampler, same noise")
    if not cuda:
        print("  CPU timings: eager PyTorch on both sides (SDPA for dense, vidsparse's gather backend for "
              "sparse); on a GPU the Triton kernels run instead")
    print("  PSNR / SSIM: sparse frames against the dense frames of the same sample")
    for i, cap in enumerate(captions):
        print(f"  sample {i}: PSNR {float(psnr[i]):6.2f} dB  SSIM {float(ssim[i]):.3f}  {cap}")
    if student is None and float(psnr.mean()) < 20.0:
        print(f"  note: the tiny model was trained with dense attention only; skipping {pct} of the attention "
              "blocks without fine-tuning changes its velocity predictions enough that the samples drift from "
              "the dense ones. `--distilled` shows a student fine-tuned for the sparse mask (`vidsparse "
              "distill`); milder masks stay closer (e.g. --topp 0.7)")

    files = ([mp4] if mp4 else []) + [gif, strip] + ([mask_png] if mask_png else []) + [out / "results.json"]
    results = {
        "model": str(model_dir), "distilled": str(distilled_dir) if distilled_dir else None,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "backend": "triton" if cuda else "gather",
        "samples": samples, "steps": steps, "guidance_scale": guidance, "guidance_interval": list(interval), "eta": eta,
        "shift": shift, "seed": args.seed,
        "frames": frames, "size": size, "tokens": math.prod(grid),
        "reduced_for_cpu": {k: {"default": old, "used": new} for k, (old, new) in reduced.items()},
        "sparse_config": sparse_cfg.to_dict(),
        "captions": captions, "labels": {"dense": "dense attention", "sparse": sparse_label},
        "sparsity": sparsity, "sparsity_per_layer": {str(k): v for k, v in sorted(per_layer.items())},
        "attention_s": {"dense": dense_attn_ms / 1e3, "sparse": sparse_attn_ms / 1e3, "sparse_mask": mask_ms / 1e3},
        "sampling_s": {"dense": dense_s, "sparse": sparse_s},
        "psnr_db": [_json_float(float(x)) for x in psnr], "ssim": [float(x) for x in ssim],
        "psnr_db_mean": _json_float(float(psnr.mean())), "ssim_mean": float(ssim.mean()),
        "mask": mask_info,
        "video": {"frames": int(frames_np.shape[0]), "height": int(frames_np.shape[1]),
                  "width": int(frames_np.shape[2]), "fps": FPS, "upscale": scale},
        "files": [p.name for p in files],
        "total_s": total_s,
    }
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {', '.join(str(p) for p in files)}")
    print(f"total {time.perf_counter() - t_start:.0f} s (model load, sampling, files)")
    results["videos"] = {"dense": dense_cpu, "sparse": sparse_cpu}  # not in the JSON
    return results


def run(argv: list[str] | None = None) -> dict:
    """Run the demo with command-line ``argv``; returns the summary (results.json's content plus
    ``"videos": {"dense", "sparse"}`` (B, 3, T, H, W) CPU tensors in [-1, 1] for the model demo).

    Raises:
        SystemExit: bad flags (argparse's error, naming the flag).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_flags(args, parser)
    if args.synthetic:
        return synthetic_main(args, parser)
    return model_main(args, parser)


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
