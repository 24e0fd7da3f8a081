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
    >>> from vidsparse.tiny.evaluate import validation_loss, evaluate_variant
    >>> model = load_tiny_wan()
    >>> validation_loss(model, SparseConfig(topk=0.03, topp=0.1), clips=8, num_t=4)["val_loss"]
    >>> evaluate_variant(model, SparseConfig(topk=0.03, topp=0.1), clips=8, samples=2)

Videos are (B, 3, T, H, W) float tensors in [-1, 1]; condition embeddings (B, 7, text_dim).
Precision: bf16 autocast on CUDA, float32 on the CPU (where sparse attention runs the ``gather``
backend: eager PyTorch over the kept blocks only). The command line is
:mod:`vidsparse.tiny.eval_cli` (``vidsparse eval --help``).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..utils import hash_seed

if TYPE_CHECKING:  # pragma: no cover
    from .data import ShapesConfig
    from ..config import SparseConfig

__all__ = ["validation_loss", "sample_videos", "sample_shape_accuracy", "evaluate_variant", "autocast",
           "single_object_inputs", "DEFAULT_TOPK", "DEFAULT_TOPP"]

#: The default sparse setting of `vidsparse eval` (Top-p 0.1, not SparseConfig's 0.2, as in the
#: demo): on the shipped tiny model it reaches the ~95% block sparsity the paper targets
#: (128 x 64 blocks; the CPU run measures 97.0%; Top-k alone keeps 1 of 64 key blocks).
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
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(hash_seed(*(int(p) for p in parts))))


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


def autocast(device: torch.device):
    """The evaluation's precision on ``device``: a bf16 autocast context on CUDA, a null context
    (float32) elsewhere."""
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
            with autocast(device):
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
    with _attention(model, sparse, stats_out), autocast(cond_embeds.device):
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


def single_object_inputs(n: int, *, split: str, seed: int, data: "ShapesConfig", device):
    """The first ``n`` single-object clips of ``split`` (their shape is unambiguous).

    Returns:
        (conditions (n, ...) of :func:`vidsparse.tiny.data.sample_conditions`, embeddings
        (n, 7, text_dim), fixed initial noise (n, 3, T, H, W) keyed by clip index like the PSNR
        samples' noise).

    Raises:
        ValueError: fewer than ``n`` single-object clips among the first ``max(16, 8 n)``.
    """
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
    cond, emb, noise = single_object_inputs(shape_samples, split=split, seed=seed, data=data, device=device)
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


# the names benchmarks/sampler_study.py imported before they became public (to go when it switches)
_amp, _single_object_inputs = autocast, single_object_inputs
