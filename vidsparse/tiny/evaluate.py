"""`vidsparse eval`: the quality yardstick for sparse attention on a video diffusion transformer.

Two numbers per attention setting (dense, or a :class:`vidsparse.SparseConfig`):

* **validation flow-matching loss**: the mean squared error between the model's velocity and
  the ground truth ``noise - x0`` on clips ``0 .. clips-1`` of a held-out split, each clip at
  ``num_t`` fixed times ``t = (i + 0.5) / num_t`` with fixed noise. Nothing is random between
  runs, so two settings (or two runs) differ only by what the attention does. Lower is better;
  the sparse rows are reported relative to dense.
* **PSNR / SSIM of samples against dense samples**: the same conditions (the first ``samples``
  clips of the split) and the same initial noise are sampled with the setting and with the dense
  *reference* model; identical videos give PSNR = inf and SSIM = 1. For a distilled student the
  reference is the original dense model (``--reference``).
* optionally, **shape accuracy** (``shape_samples``): single-object conditions are sampled and
  :mod:`vidsparse.tiny.classifier` judges whether each video shows the conditioned shape
  (chance 0.25), a measure of whether the model draws recognisable objects at all.

    >>> from vidsparse import SparseConfig
    >>> from vidsparse.tiny import load_tiny_wan
    >>> from vidsparse.evaluate import validation_loss, evaluate_variant
    >>> model = load_tiny_wan()
    >>> validation_loss(model, SparseConfig(topk=0.03, topp=0.1), clips=8, num_t=4)["val_loss"]
    >>> evaluate_variant(model, SparseConfig(topk=0.03, topp=0.1), clips=8, samples=2)

Precision: bf16 autocast on CUDA, float32 on the CPU (where sparse attention runs the exact
reference backend: correct, but slower than dense). Run ``vidsparse eval --help`` for the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .data import ShapesConfig
    from ..config import SparseConfig

__all__ = ["validation_loss", "sample_videos", "sample_shape_accuracy", "evaluate_variant", "main", "DEFAULT_TOPK", "DEFAULT_TOPP"]

#: The default sparse setting of `vidsparse eval`: about 95% block sparsity (128 x 64 blocks) on
#: the shipped tiny model (measured 95.1% over the val split; Top-k alone keeps 1 of 64 key blocks).
DEFAULT_TOPK = 0.03
DEFAULT_TOPP = 0.1

# random-stream tags of the fixed noise (validation items, sampler initial noise)
_STREAM_VAL, _STREAM_SAMPLES = 1, 2


# ----------------------------------------------------------------------------------------------
# helpers


def _noise(shape: Sequence[int], *parts: int) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from a generator seeded by ``parts``.

    Drawn on the CPU so the numbers are the same on every device, and per item so they do not
    depend on the batch size or on how many clips are evaluated.
    """
    from ..utils import hash_seed as _hash_seed

    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_hash_seed(*(int(p) for p in parts))))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _resolve_device(model: torch.nn.Module, device) -> torch.device:
    """``device`` (moving the model there) or, for None, the model's device."""
    if device is None:
        return _model_device(model)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    if _model_device(model) != device:
        model.to(device)
    return device


def _amp(device: torch.device):
    """bf16 autocast on CUDA, nothing (float32) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _data_config(model: torch.nn.Module, data: "ShapesConfig | None") -> "ShapesConfig":
    from .data import ShapesConfig

    text_dim = int(model.config.text_dim)
    if data is None:
        return ShapesConfig(text_dim=text_dim)
    if not isinstance(data, ShapesConfig):
        raise ValueError(f"data must be a vidsparse.tiny.data.ShapesConfig, got {type(data).__name__}")
    if data.text_dim != text_dim:
        raise ValueError(f"data.text_dim={data.text_dim} must equal the model's text_dim={text_dim}")
    return data


def _check_split(split: str) -> None:
    from .data import SPLITS

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_sparse(sparse) -> None:
    from ..config import SparseConfig

    if sparse is not None and not isinstance(sparse, SparseConfig):
        raise TypeError(f"sparse must be a vidsparse.SparseConfig or None (dense), got {type(sparse).__name__}")


@contextlib.contextmanager
def _attention(model: torch.nn.Module, sparse: "SparseConfig | None", stats_out: dict | None = None):
    """Run the body with ``model`` patched with ``sparse`` (None: dense), in eval mode.

    Always restores the original processors and the train/eval mode, also on error. With
    ``stats_out`` given and ``sparse`` set, the sparsity summary of the calls is stored there.
    """
    from ..integrations.diffusers import is_patched, patch, unpatch

    if is_patched(model):
        raise ValueError(
            "model is already patched by vidsparse; pass the unpatched model and the setting as `sparse=` "
            "(vidsparse.unpatch(model) first)"
        )
    was_training = model.training
    model.eval()
    patched = False
    try:
        if sparse is not None:
            patch(model, sparse.replace(collect_stats=True))
            patched = True
        yield
        if patched and stats_out is not None:
            from ..integrations.diffusers import stats

            stats_out.update(stats(model).summary())
    finally:
        if patched:
            unpatch(model)
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# validation loss


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    sparse: "SparseConfig | None" = None,
    *,
    split: str = "val",
    clips: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    num_t: int = 8,
    device=None,
    progress: bool = False,
    data: "ShapesConfig | None" = None,
) -> dict:
    """Velocity MSE against the ground truth ``noise - x0`` on fixed clips, times and noise.

    Clips ``0 .. clips-1`` of ``split`` (dataset seed ``seed``) are each evaluated at ``num_t``
    times ``t_i = (i + 0.5) / num_t`` with noise from a generator seeded by ``(seed, clip, i)``.

    Args:
        model: a diffusers Wan transformer (not patched). Temporarily put in eval mode and, with
            ``sparse``, patched; both are undone afterwards, also on error.
        sparse: the attention setting; None = dense. ``dense_steps`` does not apply here (a
            validation forward is no denoising step), every forward is sparse.
        split: "val" (held out, training distribution), "shifted" or "train".
        clips, num_t: the loss averages clips * num_t forward items.
        batch_size: items per forward (does not change the numbers beyond float rounding).
        seed: data and noise seed.
        device: where to run (the model is moved there); None = the model's device.
        progress: tqdm bar over the batches.
        data: clip geometry (:class:`vidsparse.tiny.data.ShapesConfig`); default 16 x 64 x 64 with the
            model's ``text_dim``.

    Returns:
        ``{"val_loss": float, "per_t": {t: loss}, "sparsity": float | None, "layer_sparsity":
        [per layer] | None}``. ``sparsity`` is the mean measured block sparsity of the masks that
        ran (None for dense). Deterministic: the same call gives the same numbers.
    """
    from tqdm.auto import tqdm

    from .data import make_batch
    from .flow import noisy_sample, predict_velocity, velocity_target

    _check_sparse(sparse)
    _check_split(split)
    _check_int("clips", clips, 1)
    _check_int("num_t", num_t, 1)
    _check_int("batch_size", batch_size, 1)
    data = _data_config(model, data)
    device = _resolve_device(model, device)

    x0_all, emb_all, _ = make_batch(clips, seed=seed, split=split, config=data, device=device)
    times = [(i + 0.5) / num_t for i in range(num_t)]
    items = [(j, c) for j in range(num_t) for c in range(clips)]  # t-major: one timestep per batch mostly
    sums = [0.0] * num_t
    if sparse is not None:
        sparse = sparse.replace(dense_steps=0)
    summary: dict = {}
    with _attention(model, sparse, summary):
        bar = tqdm(total=len(items), desc=f"val loss ({'dense' if sparse is None else 'sparse'})", unit="item",
                   disable=not progress, leave=False)
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            idx = torch.tensor([c for _, c in batch], device=device)
            x0, emb = x0_all[idx], emb_all[idx]
            noise = torch.stack([_noise(x0.shape[1:], _STREAM_VAL, seed, c, j) for j, c in batch]).to(device)
            t = torch.tensor([times[j] for j, _ in batch], device=device, dtype=torch.float32)
            with _amp(device):
                pred = predict_velocity(model, noisy_sample(x0, noise, t), t, emb)
            err = (pred.float() - velocity_target(x0, noise).float()).pow(2).flatten(1).mean(1).double().cpu()
            for (j, _), e in zip(batch, err.tolist()):
                sums[j] += e
            bar.update(len(batch))
        bar.close()
    per_t = {round(t, 6): s / clips for t, s in zip(times, sums)}
    out = {
        "val_loss": sum(sums) / len(items),
        "per_t": per_t,
        "sparsity": None,
        "layer_sparsity": None,
    }
    if sparse is not None:
        out["sparsity"] = summary.get("sparsity")
        out["layer_sparsity"] = [layer["sparsity"] for layer in summary.get("layers", [])]
    return out


# ----------------------------------------------------------------------------------------------
# samples


@torch.no_grad()
def sample_videos(
    model: torch.nn.Module,
    sparse: "SparseConfig | None",
    cond_embeds: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance_scale: float,
    shift: float,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    eta: float = 0.0,
    progress: bool = False,
    stats_out: dict | None = None,
) -> torch.Tensor:
    """Samples of ``model`` with ``sparse`` attention (None: dense) from the given noise
    (:func:`vidsparse.tiny.flow.sample` with these sampler settings).

    The model is patched for the call and unpatched afterwards (also on error); ``dense_steps``
    of ``sparse`` applies (counted from this generation's first step). Runs on the device of
    ``cond_embeds`` (bf16 autocast on CUDA). With ``stats_out``, the sparsity summary of the run
    is stored there.

    Returns:
        (B, 3, T, H, W) float32 samples clamped to [-1, 1].
    """
    from .flow import sample

    _check_sparse(sparse)
    with _attention(model, sparse, stats_out), _amp(cond_embeds.device):
        x = sample(model, cond_embeds, noise=noise.to(cond_embeds.device), steps=steps, guidance_scale=guidance_scale,
                   guidance_interval=guidance_interval, eta=eta, shift=shift, progress=progress)
    return x.float().clamp_(-1, 1)


def _inputs_for(cond, clip_ids, *, seed: int, data, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition embeddings of ``cond`` and the fixed initial noise of each clip index."""
    from .data import embed

    shape = (3, data.frames, data.size, data.size)
    noise = torch.stack([_noise(shape, _STREAM_SAMPLES, seed, int(c)) for c in clip_ids]).to(device)
    return embed(cond, config=data), noise


def _sample_inputs(n: int, *, split: str, seed: int, data, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition embeddings of clips 0..n-1 of ``split`` and the fixed initial noise per clip."""
    from .data import sample_conditions

    cond = sample_conditions(n, seed=seed, split=split, config=data, device=device)
    return _inputs_for(cond, range(n), seed=seed, data=data, device=device)


def _single_object_inputs(n: int, *, split: str, seed: int, data, device):
    """The first ``n`` single-object clips of ``split`` (their shape is unambiguous): conditions,
    embeddings and fixed initial noise (keyed by clip index, like :func:`_sample_inputs`)."""
    from .data import sample_conditions
    from .classifier import single_object

    pool = sample_conditions(max(16, 8 * n), seed=seed, split=split, config=data, device=device)
    idx = torch.nonzero(single_object(pool)).flatten()[:n]
    if len(idx) < n:
        raise ValueError(f"shape_samples={n}: only {len(idx)} single-object clips among the first {len(pool)}")
    cond = pool[idx]
    return (cond, *_inputs_for(cond, idx.tolist(), seed=seed, data=data, device=device))


@torch.no_grad()
def sample_shape_accuracy(
    model: torch.nn.Module,
    sparse: "SparseConfig | None",
    shape_samples: int,
    *,
    steps: int,
    guidance_scale: float,
    shift: float,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    eta: float = 0.0,
    split: str = "val",
    seed: int = 0,
    data: "ShapesConfig | None" = None,
    device=None,
    progress: bool = False,
) -> dict:
    """Sample the first ``shape_samples`` single-object conditions of ``split`` with ``sparse``
    attention (None: dense) and judge them with the shape classifier.

    Returns:
        :func:`vidsparse.tiny.classifier.shape_accuracy`'s dict: ``accuracy`` is the fraction
        of samples whose object is named as conditioned (chance 0.25), ``per_shape`` and ``confusion``
        break it down by conditioned shape.
    """
    from .classifier import shape_accuracy

    _check_int("shape_samples", shape_samples, 1)
    data = _data_config(model, data)
    device = _resolve_device(model, device)
    cond, emb, noise = _single_object_inputs(shape_samples, split=split, seed=seed, data=data, device=device)
    videos = sample_videos(model, sparse, emb, noise, steps=steps, guidance_scale=guidance_scale, shift=shift,
                           guidance_interval=guidance_interval, eta=eta,
                           progress=progress).cpu()
    return shape_accuracy(videos, cond.to("cpu"))


def _sampling_defaults(*models: torch.nn.Module) -> dict[str, float]:
    """sampling.json of the first model directory (``config._name_or_path``) that has one."""
    from .model import load_sampling_defaults

    for m in models:
        where = getattr(getattr(m, "config", None), "_name_or_path", None)
        if where and (Path(where) / "sampling.json").is_file():
            return load_sampling_defaults(where)
    return load_sampling_defaults()  # the shipped model's (or the built-in defaults)


def evaluate_variant(
    model: torch.nn.Module,
    sparse: "SparseConfig | None",
    *,
    reference: torch.nn.Module | None = None,
    split: str = "val",
    clips: int = 64,
    batch_size: int = 16,
    samples: int = 4,
    sample_steps: int = 20,
    guidance_scale: float | None = None,
    shift: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    eta: float | None = None,
    seed: int = 0,
    device=None,
    progress: bool = False,
    num_t: int = 8,
    data: "ShapesConfig | None" = None,
    cache: dict | None = None,
    shape_samples: int = 0,
) -> dict:
    """Validation loss, PSNR / SSIM of samples against the dense reference and, optionally, the
    shape accuracy of samples, for one setting.

    Args:
        model: the model to evaluate (unpatched), with attention setting ``sparse`` (None = dense).
        reference: the dense model whose samples are the target (default ``model``). For a
            distilled student pass the original dense model.
        split, clips, batch_size, seed, num_t, data: see :func:`validation_loss`.
        samples: conditions sampled (clips 0..samples-1 of ``split``; 0 skips the samples).
        sample_steps: Euler steps. guidance_scale, shift, guidance_interval, eta: sampler settings
            (:func:`vidsparse.tiny.flow.sample`); None = the model directory's ``sampling.json``
            (:func:`vidsparse.tiny.load_sampling_defaults`).
        device: where to run (models are moved there); None = the model's device.
        progress: tqdm bars.
        cache: a dict shared between calls to reuse the reference's dense samples (one CLI run
            evaluates several settings against the same dense samples).
        shape_samples: sample this many single-object conditions and judge each video's object
            with :func:`vidsparse.tiny.classifier.shape_accuracy` (0 = skip).

    Returns:
        ``{"val_loss", "per_t", "sparsity", "layer_sparsity", "psnr", "ssim", "samples",
        "seconds", "val_seconds", "sample_seconds", "sample_sparsity", "guidance_scale",
        "guidance_interval", "eta", "shift", "sample_steps", "shape_accuracy", "shape_per_shape", "shape_confusion",
        "shape_samples"}`` (the three ``shape_*`` results None without shape samples).
        ``psnr``/``ssim`` are means over the videos (None with ``samples=0``; ``inf``/1.0 for
        identical videos); ``seconds`` is this setting's own time
        (validation + its own sampling; reference samples taken from ``cache`` are not counted).
    """
    from ..metrics import video_psnr_ssim

    _check_sparse(sparse)
    _check_int("samples", samples, 0)
    _check_int("shape_samples", shape_samples, 0)
    _check_int("sample_steps", sample_steps, 1)
    reference = model if reference is None else reference
    data = _data_config(model, data)
    device = _resolve_device(model, device)
    _resolve_device(reference, device)
    from .flow import resolve_sampler

    resolved = resolve_sampler(_sampling_defaults(model, reference), guidance_scale=guidance_scale,
                               guidance_interval=guidance_interval, eta=eta, shift=shift)
    guidance_scale, guidance_interval, eta, shift = (resolved[k] for k in ("guidance_scale", "guidance_interval",
                                                                          "eta", "shift"))

    t0 = time.perf_counter()
    val = validation_loss(model, sparse, split=split, clips=clips, batch_size=batch_size, seed=seed, num_t=num_t,
                          device=device, progress=progress, data=data)
    val_seconds = time.perf_counter() - t0
    out: dict[str, Any] = dict(val)
    out.update(psnr=None, ssim=None, samples=samples, sample_seconds=0.0, sample_sparsity=None,
               guidance_scale=guidance_scale, guidance_interval=guidance_interval, eta=eta, shift=shift,
               sample_steps=sample_steps)
    if samples:
        cache = {} if cache is None else cache
        key = ("reference", id(reference), split, samples, sample_steps, guidance_scale, guidance_interval, eta, shift,
               seed, data, str(device))
        emb, noise = _sample_inputs(samples, split=split, seed=seed, data=data, device=device)
        sampler = dict(steps=sample_steps, guidance_scale=guidance_scale, guidance_interval=guidance_interval, eta=eta,
                       shift=shift, progress=progress)
        if key not in cache:
            t1 = time.perf_counter()
            ref = sample_videos(reference, None, emb, noise, **sampler).cpu()
            # keeps `reference` alive with its samples, so its id cannot be reused by another model
            cache[key] = (ref, time.perf_counter() - t1, reference)
        ref, ref_seconds, _ = cache[key]
        if sparse is None and reference is model:
            videos, sample_seconds = ref, ref_seconds  # the dense samples of the model are the reference
        else:
            t1 = time.perf_counter()
            sample_stats: dict = {}
            videos = sample_videos(model, sparse, emb, noise, stats_out=sample_stats, **sampler).cpu()
            sample_seconds = time.perf_counter() - t1
            out["sample_sparsity"] = sample_stats.get("sparsity")
        psnr, ssim = video_psnr_ssim(videos, ref)
        out.update(psnr=float(psnr.double().mean()), ssim=float(ssim.double().mean()), sample_seconds=sample_seconds)
    out.update(shape_accuracy=None, shape_per_shape=None, shape_confusion=None, shape_samples=shape_samples)
    if shape_samples:
        t1 = time.perf_counter()
        judged = sample_shape_accuracy(
            model, sparse, shape_samples, steps=sample_steps, guidance_scale=guidance_scale, shift=shift,
            guidance_interval=guidance_interval, eta=eta,
            split=split, seed=seed, data=data, device=device, progress=progress)
        out.update(shape_accuracy=judged["accuracy"], shape_per_shape=judged["per_shape"],
                   shape_confusion=judged["confusion"])
        out["sample_seconds"] += time.perf_counter() - t1
    out["val_seconds"] = val_seconds
    out["seconds"] = val_seconds + out["sample_seconds"]
    return out


# ----------------------------------------------------------------------------------------------
# command line

_GPU_DEFAULTS = {"clips": 64, "num_t": 8, "samples": 4, "steps": 20, "batch_size": 16, "shape_samples": 16}
# a default CPU run (dense + the default hybrid) stays at a few minutes on 2 cores
_CPU_DEFAULTS = {"clips": 4, "num_t": 4, "samples": 1, "steps": 6, "batch_size": 4, "shape_samples": 0}
_PRIORS = ("keep_diagonal", "keep_sink")
_SETTING_KEYS = ("topk", "topp", "block_q", "block_k") + _PRIORS


class _Setting:
    def __init__(self, name: str, topk, topp, block_q: int, block_k: int, *, keep_diagonal: bool = False,
                 keep_sink: bool = False):
        self.name, self.topk, self.topp, self.block_q, self.block_k = name, topk, topp, block_q, block_k
        self.keep_diagonal, self.keep_sink = keep_diagonal, keep_sink

    @property
    def method(self) -> str:
        if self.topk is None and self.topp is None:
            return "dense"
        if self.topk is not None and self.topp is not None:
            return "hybrid"
        return "topk" if self.topk is not None else "topp"

    def config(self, backend: str, token_order: str = "raster"):
        if self.method == "dense":
            return None
        from ..config import SparseConfig

        return SparseConfig(topk=self.topk, topp=self.topp, block_q=self.block_q, block_k=self.block_k,
                            token_order=token_order, backend=backend, keep_diagonal=self.keep_diagonal,
                            keep_sink=self.keep_sink)


def _fraction_arg(flag: str, text: str):
    """'none' -> None, else a float in (0, 1]; errors name ``flag``."""
    from .._validation import parse_fraction

    try:
        return parse_fraction(text)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def _block_arg(flag: str, text) -> int:
    from ..mask import check_block_size

    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag}: expected an int, got {text!r}") from None
    try:
        check_block_size(flag, value)
    except (ValueError, TypeError) as e:
        raise ValueError(str(e)) from None
    return value


def _bool_arg(flag: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{flag}: expected true or false, got {text!r}")


def _parse_setting(text: str, block_q: int, block_k: int) -> _Setting:
    """``NAME:topk=0.05,topp=none`` -> a setting; omitted rules are off, block sizes default to
    --block-q/-k; ``keep_diagonal=true`` / ``keep_sink=true`` add the locality / sink priors."""
    name, sep, body = text.partition(":")
    name = name.strip()
    where = f"--setting {text!r}"
    if not sep or not name:
        raise ValueError(f"{where}: expected NAME:topk=X,topp=Y (e.g. fast:topk=0.05,topp=none)")
    if name == "dense":
        raise ValueError(f"{where}: the name 'dense' is reserved for the dense baseline")
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"{where}: expected key=value, got {part!r}")
        if key not in _SETTING_KEYS:
            raise ValueError(f"{where}: unknown setting key {key!r} (known: {', '.join(_SETTING_KEYS)})")
        if key in values:
            raise ValueError(f"{where}: {key} given twice")
        if key in ("topk", "topp"):
            values[key] = _fraction_arg(f"{where} {key}", value)
        elif key in _PRIORS:
            values[key] = _bool_arg(f"{where} {key}", value)
        else:
            values[key] = _block_arg(f"{where} {key}", value.strip())
    topk, topp = values.get("topk"), values.get("topp")
    if topk is None and topp is None:
        raise ValueError(f"{where}: give topk and/or topp (a setting with neither is the dense baseline)")
    return _Setting(name, topk, topp, values.get("block_q", block_q), values.get("block_k", block_k),
                    **{k: values[k] for k in _PRIORS if k in values})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidsparse eval",
        description="Validation flow-matching loss and sample PSNR/SSIM against dense, for dense and sparse "
        "attention settings. Prints a table and writes JSON.",
        epilog=f"Default settings: dense and 'hybrid' (topk {DEFAULT_TOPK}, topp {DEFAULT_TOPP}: ~95%% block "
        f"sparsity on the tiny model). On CUDA: --clips {_GPU_DEFAULTS['clips']} --num-t {_GPU_DEFAULTS['num_t']} "
        f"--samples {_GPU_DEFAULTS['samples']} --steps {_GPU_DEFAULTS['steps']}; on the CPU reduced: --clips "
        f"{_CPU_DEFAULTS['clips']} --num-t {_CPU_DEFAULTS['num_t']} --samples {_CPU_DEFAULTS['samples']} "
        f"--steps {_CPU_DEFAULTS['steps']}.",
    )
    p.add_argument("--model", default=None, help="diffusers Wan model directory (default: the embedded tiny model)")
    p.add_argument("--reference", default=None, help="dense reference model for PSNR/SSIM (default: --model)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME:topk=X,topp=Y",
                   help="a sparse setting to evaluate (repeatable); keys topk, topp (a number in (0, 1] or "
                   "'none'), block_q, block_k, keep_diagonal, keep_sink (true/false: the locality and sink "
                   "priors); an omitted rule is off. Replaces the default hybrid setting.")
    p.add_argument("--topk", default=None, help=f"Top-k of the default setting (default: the model directory's "
                   f"sparse_config.json if it has one, else {DEFAULT_TOPK}; 'none' = off)")
    p.add_argument("--topp", default=None, help=f"Top-p of the default setting (default: sparse_config.json, else "
                   f"{DEFAULT_TOPP}; 'none' = off)")
    p.add_argument("--block-q", default=None, help="query block size (default: sparse_config.json, else 128)")
    p.add_argument("--block-k", default=None, help="key block size (default: sparse_config.json, else 64)")
    p.add_argument("--backend", default="auto", help="block-sparse backend: auto, triton, flex, gather or reference")
    p.add_argument("--token-order", choices=("raster", "tiled"), default=None,
                   help="raster (the model's frame-major order) or tiled (each query block a compact t x h x w "
                   "tile); default: the model directory's sparse_config.json, else raster")
    p.add_argument("--split", choices=("val", "shifted"), default="val", help="held-out clips to evaluate on")
    p.add_argument("--clips", type=int, default=None, help="validation clips (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--num-t", type=int, default=None, help="fixed times per clip (default 8 on CUDA, 4 on CPU)")
    p.add_argument("--samples", type=int, default=None, help="sampled conditions for PSNR/SSIM, 0 = none "
                   "(default 4 on CUDA, 1 on CPU)")
    p.add_argument("--shape-samples", type=int, default=None, help="single-object conditions sampled per setting "
                   "and judged by the shape classifier (shape accuracy; 25%% is chance); 0 = none (default 16 on "
                   "CUDA, 0 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps per sample (default 20 on CUDA, 8 on CPU)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's sampling.json")
    p.add_argument("--shift", type=float, default=None, help="default: the model's sampling.json")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                   help="guide only steps with t in [T_LO, T_HI] (default: the model's sampling.json)")
    p.add_argument("--eta", type=float, default=None,
                   help="sampler stochasticity in [0, 1], 0 = Euler ODE (default: the model's sampling.json)")
    p.add_argument("--batch-size", type=int, default=None, help="items per forward (default 16 on CUDA, 4 on CPU)")
    p.add_argument("--frames", type=int, default=16, help="clip frames (the tiny model: 16)")
    p.add_argument("--size", type=int, default=64, help="clip height = width in pixels (the tiny model: 64)")
    p.add_argument("--seed", type=int, default=0, help="data and noise seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", default="out/eval/eval.json", help="where to write the JSON results")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def read_sparse_setting(directory: str | Path) -> dict:
    """The ``sparse_config.json`` of a model directory (a distilled student's mask: topk, topp,
    block_q, block_k, token_order, keep_diagonal, keep_sink), or {} when there is none. Raises
    ValueError when it cannot be read."""
    path = Path(directory) / "sparse_config.json"
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable {path} ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"unreadable {path} (expected a JSON object)")
    if "format" in saved:  # written by SparseConfig.save
        from ..config import SparseConfig

        cfg = SparseConfig.from_dict(saved)
        saved = {**cfg.resolved_options(), "block_q": cfg.block_q, "block_k": cfg.block_k}
    return {k: saved[k] for k in _SETTING_KEYS + ("token_order",) if k in saved}


def _saved_setting(model: str | None, parser) -> dict:
    try:
        return {} if model is None else read_sparse_setting(model)
    except ValueError as e:
        parser.error(f"--model: {e}")


def _settings(args, parser) -> list[_Setting]:
    from ..dispatch import BACKENDS

    if args.backend != "auto" and args.backend not in BACKENDS:
        parser.error(f"--backend must be auto or one of {', '.join(BACKENDS)}, got {args.backend!r}")
    saved = _saved_setting(args.model, parser)
    if args.token_order is None:
        args.token_order = saved.get("token_order", "raster")
    try:
        block_q = _block_arg("--block-q", args.block_q if args.block_q is not None else saved.get("block_q", 128))
        block_k = _block_arg("--block-k", args.block_k if args.block_k is not None else saved.get("block_k", 64))
        settings = [_Setting("dense", None, None, block_q, block_k)]
        if args.topk is not None or args.topp is not None or not args.setting:
            topk = saved.get("topk", DEFAULT_TOPK) if args.topk is None else _fraction_arg("--topk", args.topk)
            topp = saved.get("topp", DEFAULT_TOPP) if args.topp is None else _fraction_arg("--topp", args.topp)
            if topk is None and topp is None:
                raise ValueError("--topk none --topp none leaves no rule: that is the dense baseline, always included")
            name = "hybrid" if topk is not None and topp is not None else ("topk" if topp is None else "topp")
            priors = {k: saved[k] for k in _PRIORS if k in saved}  # SparseConfig checks they are bools
            name += "".join("+" + k.removeprefix("keep_") for k, on in priors.items() if on is True)
            settings.append(_Setting(name, topk, topp, block_q, block_k, **priors))
        for text in args.setting:
            settings.append(_parse_setting(text, block_q, block_k))
        names = [s.name for s in settings]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"--setting: duplicate setting name(s) {dup}")
        for s in settings:
            s.config(args.backend, args.token_order)  # validates (backend name, block sizes) before any work
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return settings


def _model_dir(flag: str, path: str | None, parser) -> Path:
    from .model import default_weights_dir

    where = Path(path) if path is not None else default_weights_dir()
    if not (where / "config.json").is_file() or not any(where.glob("*.safetensors")):
        parser.error(f"{flag} {where}: no diffusers model there (expected config.json and *.safetensors)")
    return where


def _fmt(value, spec: str, none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _jsonable(obj):
    """Non-finite floats -> strings ("inf"), dict keys -> strings, tuples -> lists (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    return obj


def _versions() -> dict[str, str]:
    import platform

    from .. import __version__

    out = {"vidsparse": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: Sequence[str] | None = None) -> int:
    """`vidsparse eval`; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    settings = _settings(args, parser)
    for name in ("clips", "num_t", "steps", "batch_size", "frames", "size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("samples", "shape_samples"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.seed < 0 or args.seed >= 2**32:
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available")
    model_dir = _model_dir("--model", args.model, parser)
    ref_dir = _model_dir("--reference", args.reference, parser) if args.reference is not None else model_dir
    try:
        from .data import ShapesConfig

        data_geometry = dict(frames=args.frames, size=args.size)
        ShapesConfig(**data_geometry)
    except ValueError as e:
        parser.error(f"--frames/--size: {e}")

    defaults = _GPU_DEFAULTS if device.type == "cuda" else _CPU_DEFAULTS
    run = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    # the reductions that change what is measured (not the batch size; not the steps when nothing is sampled)
    reduced = [k for k in defaults if getattr(args, k) is None and defaults[k] != _GPU_DEFAULTS[k]
               and k != "batch_size" and not (k == "steps" and run["samples"] == 0 and run["shape_samples"] == 0)]

    from tqdm.auto import tqdm

    from .flow import describe_sampler, resolve_sampler
    from .model import load_tiny_wan, token_grid

    model = load_tiny_wan(model_dir, device=device)
    reference = model if ref_dir == model_dir else load_tiny_wan(ref_dir, device=device)
    data = ShapesConfig(text_dim=int(model.config.text_dim), **data_geometry)
    try:
        tokens = math.prod(token_grid(model.config, data.frames, data.size, data.size))
    except ValueError as e:
        parser.error(f"--frames/--size: {e}")
    try:
        sampler = resolve_sampler(_sampling_defaults(model, reference), guidance_scale=args.guidance_scale,
                                  guidance_interval=args.guidance_interval, eta=args.eta, shift=args.shift)
        guidance, interval, eta, shift = (sampler[k] for k in ("guidance_scale", "guidance_interval", "eta", "shift"))
    except ValueError as e:
        parser.error(f"--guidance-scale / --guidance-interval / --eta (default: the model's sampling.json): {e}")
    progress = not args.no_progress

    print(f"vidsparse eval: {model_dir} ({tokens} tokens per clip) on {_device_name(device)}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}")
    if ref_dir != model_dir:
        print(f"reference (dense) for PSNR/SSIM: {ref_dir}")
    sampler_text = describe_sampler(guidance, interval, eta, shift)
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

    cache: dict = {}
    results = []
    t_start = time.perf_counter()
    try:
        for s in tqdm(settings, desc="eval", unit="setting", disable=not progress):
            r = evaluate_variant(
                model, s.config(args.backend, args.token_order), reference=reference, split=args.split, clips=run["clips"],
                batch_size=run["batch_size"], samples=run["samples"], sample_steps=run["steps"],
                guidance_scale=guidance, shift=shift, guidance_interval=interval, eta=eta, seed=args.seed, device=device,
                progress=progress,
                num_t=run["num_t"], data=data, cache=cache, shape_samples=run["shape_samples"],
            )
            cfg = s.config(args.backend, args.token_order)
            results.append({"setting": s.name, "method": s.method, "topk": s.topk, "topp": s.topp,
                            "block_q": s.block_q, "block_k": s.block_k,
                            "sparse_config": None if cfg is None else cfg.to_dict()} | r)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    dense_loss = results[0]["val_loss"]
    for r in results:
        r["delta_vs_dense_pct"] = 100.0 * (r["val_loss"] - dense_loss) / dense_loss

    header = (f"{'setting':<14}{'method':<8}{'topk':>9}{'topp':>9}{'sparsity %':>12}{'val loss':>10}"
              f"{'Δ vs dense %':>14}{'PSNR':>8}{'SSIM':>8}{'shape acc':>10}{'seconds':>9}")
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        sp = None if r["sparsity"] is None else 100 * r["sparsity"]
        print(f"{r['setting'][:13]:<14}{r['method']:<8}{_fmt(r['topk'], '.4g'):>9}{_fmt(r['topp'], '.4g'):>9}"
              f"{_fmt(sp, '.1f'):>12}{r['val_loss']:>10.5f}{r['delta_vs_dense_pct']:>+14.1f}"
              f"{_fmt(r['psnr'], '.2f'):>8}{_fmt(r['ssim'], '.4f'):>8}{_fmt(r['shape_accuracy'], '.2f'):>10}"
              f"{r['seconds']:>9.1f}")
    from .classifier import per_shape_text

    for r in results:
        if r["shape_per_shape"]:
            print(f"shape acc by shape, {r['setting']}: {per_shape_text(r['shape_per_shape'])}")
    print("\nval loss: velocity MSE vs noise - x0 (lower is better); PSNR (dB) / SSIM: samples vs the dense "
          "reference's samples on the same conditions and noise (dense vs itself: inf / 1); shape acc: fraction of "
          "single-object samples whose object the shape classifier names as conditioned (chance 0.25)")

    payload = {
        "command": "vidsparse eval " + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "model": str(model_dir),
        "reference": str(ref_dir),
        "device": str(device),
        "device_name": _device_name(device),
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "versions": _versions(),
        "settings": {
            "split": args.split, "clips": run["clips"], "num_t": run["num_t"], "samples": run["samples"],
            "shape_samples": run["shape_samples"],
            "sample_steps": run["steps"], "batch_size": run["batch_size"], "guidance_scale": guidance,
            "guidance_interval": list(interval), "eta": eta, "shift": shift, "seed": args.seed,
            "frames": data.frames, "size": data.size, "tokens": tokens,
            "backend": args.backend, "reduced_cpu_settings": reduced,
        },
        "results": results,
        "total_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
