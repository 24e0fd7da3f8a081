"""`vidsparse compare`: every masker, brought to the same sparsities, on the embedded tiny model.

Training-free: the dense model with each method's plans patched in. For each method and each
target block sparsity the method's density option (``Masker.density_option``) is set by bisection
on queries and keys captured from the dense model, then measured in use. Reported per point:

* **velocity error** (the primary measure, also the distillation loss): mean((v_sparse -
  v_dense)^2) over validation clips x times, one network call each, same x_t for both;
* **validation loss**: mean((v_sparse - (noise - x0))^2) on the same items (dense: its own);
* **kept mass**: the share of exact attention mass the plan keeps, next to the token-level bound
  (each query's best keys at the same density), on captured queries and keys;
* **PSNR / SSIM** of samples against the dense samples from the same noise, and the shape
  classifier's accuracy on single-object samples (PSNR rewards blur: rank by velocity error and
  look at the frame strip);
* the achieved sparsity (block-level, as run) and, on a GPU, the time of each method at the
  Wan2.1-1.3B 480p shape (plan + kernel) next to cuDNN dense.

Outputs in ``--out``: ``compare.json``, ``pareto.png`` (velocity error against sparsity, one line
per method; speed in a second panel on a GPU), ``frames.png`` (sample 0, dense and every method
at the middle sparsity) and the printed table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import maskers
from . import oracle
from ..cli_options import int_at_least
from ..config import SparseConfig
from ..mask import BlockMask, num_blocks
from ..plan import MaskPlan
from ..utils import check_output_dir, device_name, hash_seed, jsonable, resolve_device, versions

__all__ = ["Variant", "default_variants", "oracle_variants", "compare", "main"]

DEFAULT_SPARSITIES = (0.8, 0.9, 0.95)
#: the issue's targets: (block sparsity, one-step velocity error) to reach or beat
TARGETS = ((0.9, 0.015), (0.95, 0.030))
#: how the oracle's rows are marked in the table and the JSON
ORACLE_KIND = "oracle (not a method)"
_STREAM_NOISE = 11


@dataclass
class Variant:
    """One line of the comparison: a method with fixed options; its density option is calibrated."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def masker(self) -> maskers.Masker:
        return maskers.get(self.method)

    @property
    def is_oracle(self) -> bool:
        """The best-mass blocks from exact attention (:mod:`.oracle`): a bound, not a method."""
        return self.method == oracle.ORACLE

    def config(self, density: float | None, **fields) -> SparseConfig:
        opts = {**self.masker.density_fixed, **self.options}
        if density is not None:
            opts[self.masker.density_option] = density
        return SparseConfig(self.method, opts, **fields)


def default_variants(methods: Sequence[str], n_tokens: int) -> list[Variant]:
    """Each method with its defaults; "hybrid" in both the paper's frame-major order and tiles (its
    default inside a model); svg2's cluster counts scaled to ``n_tokens`` as its defaults are to
    Wan's 32,760 tokens (about 110 tokens per query cluster and 33 per key cluster)."""
    out = []
    for name in methods:
        maskers.get(name)  # clear error for an unknown name
        if name == "hybrid":
            out += [Variant("hybrid/raster", "hybrid", {"token_order": "raster"}),
                    Variant("hybrid/tiled", "hybrid", {"token_order": "tiled"})]
            continue
        options = {}
        if name == "svg2":
            options = {"q_clusters": max(8, round(n_tokens / 110)), "k_clusters": max(16, round(n_tokens / 33))}
        out.append(Variant(name, name, options))
    return out


def oracle_variants(layouts: Sequence[str]) -> list[Variant]:
    """The best-mass oracle in each layout ("tiled", "raster"); used inside :func:`oracle.registered`."""
    return [Variant(f"oracle/{layout}", oracle.ORACLE, {"token_order": layout}) for layout in layouts]


# ------------------------------------------------------------------------------------- capture
class _Capture(maskers.Masker):
    """Dense plan that records the (q, k) each layer hands to its masker (test harness only)."""

    sink: list = []

    def build(self, q, k, *, block_q, block_k, grid, positions, state):
        _Capture.sink.append((q.float().cpu(), k.float().cpu()))
        b, h, n, _ = q.shape
        return MaskPlan(BlockMask.full(block_q=block_q, block_k=block_k, q_len=n, k_len=k.shape[2],
                                       device=q.device), _checked=True)


@torch.no_grad()
def capture_qk(model, x_t, t, emb) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(q, k) of every self-attention layer for one batch, (B, H, N, D) float32 on the CPU."""
    from ..integrations.diffusers import patch, unpatch
    from ..training.flow import predict_velocity

    maskers.register("compare_capture", replace=True)(_Capture)
    _Capture.sink = []
    try:
        patch(model, SparseConfig("compare_capture", backend="reference"))  # exact dense, chunked
        try:
            predict_velocity(model, x_t, t, emb)
        finally:
            unpatch(model)
    finally:
        maskers.unregister("compare_capture")
    return list(_Capture.sink)


# --------------------------------------------------------------------------------- calibration
def _plans(variant: Variant, density, captured, grid, block_q, block_k, states=None):
    """The variant's plan for every captured layer; ``states`` (one per layer) carry warm starts
    between calls as in a pipeline (svg2 re-uses its centroids)."""
    opts = variant.config(density).resolved_options()
    states = states or layer_states(variant.masker, len(captured))
    for (q, k), state in zip(captured, states):
        yield q, k, variant.masker(q, k, grid=grid, state=state, block_q=block_q, block_k=block_k, **opts)


def layer_states(masker: maskers.Masker, layers: int) -> list:
    """One fresh masker state per captured layer, holding its layer index as the integration's do."""
    states = [masker.new_state() for _ in range(layers)]
    for i, state in enumerate(states):
        if isinstance(state, dict):
            state["layer"] = i
    return states


def _plan_sparsity(variant: Variant, density, captured, grid, block_q, block_k, states=None) -> float:
    values = [plan.sparsity() for _, _, plan in _plans(variant, density, captured, grid, block_q, block_k, states)]
    return sum(values) / len(values)


def calibrate(variant: Variant, target: float, captured, grid, *, block_q: int, block_k: int,
              iters: int = 14, states=None) -> tuple[float | None, float]:
    """Density option value whose plans on ``captured`` come closest to ``target`` sparsity.

    Bisection in log space (sparsity falls as the option grows). Returns (value, sparsity); the
    value is None for a method without a density option (its own sparsity is reported).
    """
    masker = variant.masker
    if variant.is_oracle:  # its kept count per row is exact: no search
        return oracle.oracle_density(target, num_blocks(captured[0][1].shape[2], block_k))
    states = states or layer_states(masker, len(captured))
    if masker.density_option is None:
        return None, _plan_sparsity(variant, None, captured, grid, block_q, block_k, states)
    lo, hi = (math.log(max(b, 1e-6)) for b in masker.density_bounds)
    best = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        s = _plan_sparsity(variant, math.exp(mid), captured, grid, block_q, block_k, states)
        if best is None or abs(s - target) < abs(best[1] - target):
            best = (math.exp(mid), s)
        lo, hi = (mid, hi) if s > target else (lo, mid)
    return best


# ------------------------------------------------------------------------------------ measures
@dataclass
class Items:
    """Fixed validation items: clean clips, noise, times and embeddings (``clips * times``)."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    emb: torch.Tensor

    @property
    def x_t(self) -> torch.Tensor:
        from ..training.flow import noisy_sample

        return noisy_sample(self.x0, self.noise, self.t)


def make_items(model, clips: int, num_t: int, *, seed: int, device) -> Items:
    from .data import ShapesConfig, make_batch

    data = ShapesConfig(text_dim=int(model.config.text_dim))
    x0, emb, _ = make_batch(clips, seed=seed, split="val", config=data, device="cpu")
    times = [(i + 0.5) / num_t for i in range(num_t)]
    x0_rep = x0.repeat(num_t, 1, 1, 1, 1)
    emb_rep = emb.repeat(num_t, 1, 1)
    t = torch.tensor([times[i // clips] for i in range(clips * num_t)])
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
        hash_seed(_STREAM_NOISE, seed, i))) for i in range(clips * num_t)])
    return Items(*(x.to(device) for x in (x0_rep, noise, t, emb_rep)))


@torch.no_grad()
def predictions(model, items: Items, sparse: SparseConfig | None, *, batch_size: int, amp) -> tuple[torch.Tensor, dict]:
    """Velocities of every item (CPU float32) with ``sparse`` patched in (None: dense), and the
    sparsity summary of the calls that ran."""
    from ..integrations.diffusers import patch, stats, unpatch
    from ..training.flow import predict_velocity

    summary: dict = {}
    if sparse is not None:
        patch(model, sparse.replace(collect_stats=True))
    try:
        out = []
        x_t = items.x_t
        for s in range(0, len(items.t), batch_size):
            sl = slice(s, s + batch_size)
            with amp():
                out.append(predict_velocity(model, x_t[sl], items.t[sl], items.emb[sl]).float().cpu())
        if sparse is not None:
            summary = stats(model).summary()
    finally:
        if sparse is not None:
            unpatch(model)
    return torch.cat(out), summary


def kept_mass(variant: Variant, density, captured, grid, *, block_q, block_k, rows: int = 512,
              states=None) -> tuple[float, float]:
    """(mass the plans keep, token-level bound at the same density) on ``rows`` evenly spaced
    queries of every captured layer, averaged."""
    kept, bound = [], []
    for q, k, plan in _plans(variant, density, captured, grid, block_q, block_k, states):
        idx = torch.linspace(0, q.shape[2] - 1, min(rows, q.shape[2])).long()
        p = torch.softmax(q[:, :, idx] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        tm = plan.token_mask(idx)
        kept.append(float((p * tm).sum(-1).mean()))
        m = max(1, round(plan.density() * k.shape[2]))
        bound.append(float(p.topk(m, dim=-1).values.sum(-1).mean()))
    return sum(kept) / len(kept), sum(bound) / len(bound)


# ------------------------------------------------------------------------------------- running
@dataclass
class Settings:
    clips: int
    num_t: int
    samples: int
    steps: int
    batch_size: int
    seed: int
    capture_clips: int = 2
    block_q: int = 128  # every method's blocks (SparseConfig's defaults: the paper's 128 x 64)
    block_k: int = 64


def _amp(device):
    import contextlib

    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def compare(model, variants: Sequence[Variant], sparsities: Sequence[float], settings: Settings, *,
            device, progress: bool = True, frames_path: Path | None = None) -> dict:
    """Run the comparison; returns the JSON-ready result (see the module docstring). With
    ``frames_path`` and samples, writes the frame strip of sample 0 at the middle sparsity."""
    from tqdm.auto import tqdm

    from .model import token_grid

    grid = token_grid(dict(model.config))
    amp = _amp(device)
    items = make_items(model, settings.clips, settings.num_t, seed=settings.seed, device=device)
    v_dense, _ = predictions(model, items, None, batch_size=settings.batch_size, amp=amp)
    target = (items.noise - items.x0).float().cpu()
    dense_loss = float((v_dense - target).pow(2).mean())
    # captured items spread over the times (items are time-major), different clips
    n_cap = min(settings.capture_clips, settings.num_t * settings.clips)
    times = torch.linspace(0, settings.num_t - 1, n_cap).round().long()
    cap = (times * settings.clips + torch.arange(n_cap) % settings.clips).to(items.t.device)
    captured = capture_qk(model, items.x_t[cap], items.t[cap], items.emb[cap])
    samples = _Samples(model, settings, device) if settings.samples else None
    rows = []
    bar = tqdm(total=len(variants) * len(sparsities), desc="compare", unit="point", disable=not progress)
    with oracle.registered():
        for variant in variants:
            for goal in sparsities:
                rows.append(_point(model, variant, goal, captured, grid, items, v_dense, target,
                                   None if variant.is_oracle else samples, settings, amp=amp))
                bar.update(1)
    bar.close()
    if samples is not None and frames_path is not None:
        frame_strip(samples, sorted(sparsities)[len(sparsities) // 2], frames_path)
    return {
        "model": str(getattr(model.config, "_name_or_path", "")), "grid": list(grid), "device": device_name(device),
        "versions": versions(), "settings": vars(settings), "dense": {"val_loss": dense_loss},
        "rows": rows, "samples_dense": None if samples is None else samples.dense_summary(),
    }


def _point(model, variant, goal, captured, grid, items, v_dense, target, samples, settings, *, amp) -> dict:
    t0 = time.perf_counter()
    states = layer_states(variant.masker, len(captured))  # warm starts carry over, as in a pipeline
    blocks = dict(block_q=settings.block_q, block_k=settings.block_k)
    density, planned = calibrate(variant, goal, captured, grid, **blocks, states=states)
    cfg = variant.config(density, backend="auto", **blocks)
    v, summary = predictions(model, items, cfg, batch_size=settings.batch_size, amp=amp)
    mass, bound = kept_mass(variant, density, captured, grid, **blocks, states=states)
    row = {
        "label": variant.label, "method": variant.method, "target": goal, "config": cfg.to_dict(),
        "kind": ORACLE_KIND if variant.is_oracle else "method",
        "density_option": variant.masker.density_option, "density_value": density,
        "planned_sparsity": planned, "sparsity": summary.get("sparsity"),
        "velocity_error": float((v - v_dense).pow(2).mean()),
        "val_loss": float((v - target).pow(2).mean()),
        "kept_mass": mass, "mass_bound": bound,
    }
    if samples is not None:
        row.update(samples.measure(cfg, key=(variant.label, goal)))
    row["seconds"] = time.perf_counter() - t0
    return row


class _Samples:
    """Samples from fixed noise (dense once, then each setting), PSNR/SSIM and shape accuracy."""

    def __init__(self, model, settings: Settings, device):
        from .data import ShapesConfig, embed, sample_conditions
        from .classifier import single_object
        from .model import load_sampling_defaults

        self.model, self.settings, self.device = model, settings, device
        data = ShapesConfig(text_dim=int(model.config.text_dim))
        pool = sample_conditions(max(16, 8 * settings.samples), seed=settings.seed, split="val", config=data)
        self.cond = pool[torch.nonzero(single_object(pool)).flatten()[: settings.samples]]
        self.emb = embed(self.cond, config=data).to(device)
        shape = (len(self.cond), 3, data.frames, data.size, data.size)
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(hash_seed(_STREAM_NOISE, 7)))
        self.sampler = _sampler_settings(load_sampling_defaults(), settings.steps)
        self.frames: dict = {}
        self.dense = self._sample(None)
        self.frames["dense"] = self.dense[:1]

    def _sample(self, sparse):
        from .evaluate import sample_videos

        return sample_videos(self.model, sparse, self.emb, self.noise.to(self.device), **self.sampler).cpu()

    def _shape(self, videos) -> float:
        from .classifier import shape_accuracy

        return float(shape_accuracy(videos, self.cond)["accuracy"])

    def dense_summary(self) -> dict:
        return {"shape_accuracy": self._shape(self.dense), "samples": len(self.cond), **self.sampler}

    def measure(self, sparse, *, key) -> dict:
        from ..metrics import video_psnr_ssim

        videos = self._sample(sparse)
        psnr, ssim = video_psnr_ssim(videos, self.dense)
        self.frames[key] = videos[:1]
        return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()), "shape_accuracy": self._shape(videos)}


def _sampler_settings(defaults: dict, steps: int) -> dict:
    from .flow import resolve_sampler

    s = resolve_sampler(defaults)
    return {"steps": steps, "guidance_scale": s["guidance_scale"], "shift": s["shift"],
            "guidance_interval": tuple(s["guidance_interval"]), "eta": s["eta"]}


# ------------------------------------------------------------------------------------- reports
def _blocks_text(result: dict) -> str:
    """"QxK" of a result's block shape (results written before the option: the default 128 x 64)."""
    st = result.get("settings", {})
    return f"{st.get('block_q', 128)}x{st.get('block_k', 64)}"


def format_table(result: dict) -> str:
    head = (f"{'method':<14} {'target':>6} {'sparsity':>8} {'vel err':>9} {'val loss':>9} {'mass':>6} "
            f"{'bound':>6} {'PSNR':>6} {'SSIM':>6} {'shape':>6}")
    lines = [f"dense: val loss {result['dense']['val_loss']:.4f}; blocks {_blocks_text(result)}", head]
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for r in result["rows"]:
        label = r["label"] + ("*" if r.get("kind") == ORACLE_KIND else "")
        lines.append(
            f"{label:<14} {r['target']:>6.2f} {f(r['sparsity'], '.3f'):>8} {r['velocity_error']:>9.4f} "
            f"{r['val_loss']:>9.4f} {r['kept_mass']:>6.3f} {r['mass_bound']:>6.3f} {f(r.get('psnr'), '.2f'):>6} "
            f"{f(r.get('ssim'), '.3f'):>6} {f(r.get('shape_accuracy'), '.2f'):>6}")
    if any(r.get("kind") == ORACLE_KIND for r in result["rows"]):
        lines.append(f"* {ORACLE_KIND}: the best-mass blocks from exact attention, the same count in every "
                     "row; no block predictor keeps more mass in that layout")
    lines.append("targets: " + ", ".join(f"velocity error <= {e} at {s:.0%}" for s, e in TARGETS))
    return "\n".join(lines)


def pareto_plot(result: dict, path: Path) -> None:
    """Velocity error against achieved sparsity, one line per method (log y); timings if present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timings = result.get("timings") or {}
    fig, axes = plt.subplots(1, 2 if timings else 1, figsize=(11 if timings else 6.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    for label in dict.fromkeys(r["label"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["label"] == label]
        pts = sorted((r["sparsity"], r["velocity_error"]) for r in rows)
        bound = rows[0].get("kind") == ORACLE_KIND
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if bound else "o",
                linestyle="--" if bound else "-",
                label=f"{label} ({ORACLE_KIND})" if bound else label)
    ax.scatter([t[0] for t in TARGETS], [t[1] for t in TARGETS], marker="*", s=140, color="k", zorder=5,
               label="targets")
    ax.set_yscale("log")
    ax.set_xlabel("achieved block sparsity")
    ax.set_ylabel("one-step velocity error vs dense")
    st = result["settings"]
    ax.set_title(f"{result['device']}: {st['clips']} clips x {st['num_t']} times, {_blocks_text(result)} blocks",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if timings:
        bx = axes[0, 1]
        names = list(timings["methods"])
        bx.barh(names, [timings["methods"][n]["total_ms"] for n in names])
        bx.axvline(timings["dense_ms"], color="k", linestyle="--", label=f"cuDNN dense {timings['dense_ms']:.2f} ms")
        bx.set_xlabel(f"ms at {timings['shape']} (plan + kernel), {timings['target']:.0%} target")
        bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frame_strip(samples: "_Samples", sparsity: float, path: Path) -> None:
    from .plots import save_frame_strip

    keys = ["dense"] + [k for k in samples.frames if k != "dense" and k[1] == sparsity]
    videos = torch.cat([samples.frames[k] for k in keys])
    captions = ["dense"] + [f"{k[0]} @ {k[1]:.0%}" for k in keys[1:]]
    save_frame_strip(path, videos, captions, frames=8, title="sample 0, same noise")


# ------------------------------------------------------------------------------------------ CLI
def _floats(flag: str):
    def parse(text: str) -> list[float]:
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
        if not values or any(not 0.0 < v < 1.0 for v in values):
            raise argparse.ArgumentTypeError(f"{flag}: sparsities must lie in (0, 1), got {text!r}")
        return values

    return parse


def _methods(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in maskers.available()]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--methods: unknown {bad or text!r}; registered: {', '.join(maskers.available())}")
    return names


def _layouts(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if names == ["none"]:
        return []
    if not names or any(n not in ("tiled", "raster") for n in names):
        raise argparse.ArgumentTypeError(f"--oracle: expected tiled, raster (comma-separated) or none, got {text!r}")
    return list(dict.fromkeys(names))


def _block_size(flag: str):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 16 or n & (n - 1):
            raise argparse.ArgumentTypeError(f"{flag}: expected a power of two >= 16, got {text!r}")
        return n

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidsparse compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", type=_methods, default=None, help="comma-separated masker names (default: all registered)")
    p.add_argument("--sparsities", type=_floats("--sparsities"), default=list(DEFAULT_SPARSITIES),
                   help="comma-separated target block sparsities (default 0.8,0.9,0.95)")
    p.add_argument("--clips", type=int_at_least(1), default=None, help="validation clips (default: 32 GPU, 4 CPU)")
    p.add_argument("--times", type=int_at_least(1), default=None, help="times per clip (default: 4 GPU, 2 CPU)")
    p.add_argument("--samples", type=int_at_least(0), default=None,
                   help="sampled videos per point for PSNR/SSIM/shape accuracy (default: 8 GPU, 1 CPU; 0 = none)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="sampler steps (default: 40 GPU, 6 CPU)")
    p.add_argument("--oracle", type=_layouts, default=["tiled", "raster"],
                   help="layouts of the best-mass oracle line (not a method: the bound of block predictors "
                        "there, from exact attention): comma-separated tiled,raster, or none (default: both)")
    p.add_argument("--block-q", type=_block_size("--block-q"), default=128,
                   help="tokens per query block for every method, a power of two >= 16 (default 128)")
    p.add_argument("--block-k", type=_block_size("--block-k"), default=64,
                   help="tokens per key block for every method, a power of two >= 16 (default 64)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--no-timing", action="store_true", help="skip the GPU timing at the Wan2.1-1.3B shape")
    p.add_argument("--out", type=Path, default=Path("vidsparse_compare"), help="output folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    try:
        out = check_output_dir(args.out, "--out")
    except ValueError as exc:
        parser.error(str(exc))
    gpu = device.type == "cuda"
    # the CPU default is sized to finish within ~10 minutes on 2 cores; its numbers are noisier
    settings = Settings(clips=args.clips or (32 if gpu else 4), num_t=args.times or (4 if gpu else 2),
                        samples=(8 if gpu else 1) if args.samples is None else args.samples,
                        steps=args.steps or (40 if gpu else 6), batch_size=args.batch_size, seed=args.seed,
                        block_q=args.block_q, block_k=args.block_k)
    from .model import load_tiny_wan

    from .model import token_grid

    model = load_tiny_wan(device=device)
    variants = default_variants(args.methods or maskers.available(), math.prod(token_grid(dict(model.config))))
    variants += oracle_variants(args.oracle)
    t0 = time.perf_counter()
    result = compare(model, variants, args.sparsities, settings, device=device, frames_path=out / "frames.png")
    if gpu and not args.no_timing:
        result["timings"] = _gpu_timings(variants, result, target=max(args.sparsities))
    _write(result, out)
    print(format_table(result))
    written = [out / name for name in ("compare.json", "pareto.png", "frames.png") if (out / name).exists()]
    print(f"\nwrote {', '.join(map(str, written))} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _write(result: dict, out: Path) -> None:
    import json

    (out / "compare.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
    pareto_plot(result, out / "pareto.png")


def _gpu_timings(variants, result, *, target: float) -> dict:
    """Plan + kernel time of each variant at the Wan2.1-1.3B 480p shape, its options as
    calibrated for ``target`` on the tiny model, next to cuDNN dense (same process)."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..api import block_sparse_attention

    grid, shape = (21, 30, 52), (1, 12, 32760, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    methods = {}
    for variant in (v for v in variants if not v.is_oracle):  # the oracle reads full attention: no speed
        row = next(r for r in result["rows"] if r["label"] == variant.label and r["target"] == target)
        cfg = SparseConfig.from_dict(row["config"])
        opts = cfg.resolved_options()
        masker = variant.masker

        def plan():
            return masker(q, k, grid=grid, **opts)

        p = plan()
        plan_ms = triton.testing.do_bench(plan)
        attn_ms = triton.testing.do_bench(lambda: block_sparse_attention(q, k, v, p))
        methods[variant.label] = {"plan_ms": plan_ms, "attn_ms": attn_ms, "total_ms": plan_ms + attn_ms,
                                  "sparsity": p.sparsity()}
    return {"shape": "Wan2.1-1.3B 480p (B=1, H=12, N=32760, D=128, bf16)", "target": target,
            "dense_ms": dense, "methods": methods}


if __name__ == "__main__":
    sys.exit(main())
