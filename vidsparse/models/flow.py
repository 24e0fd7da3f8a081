"""Rectified-flow conventions used everywhere in vidsparse, and an Euler sampler.

Time runs from data (t = 0) to noise (t = 1)::

    x_t = (1 - t) * x0 + t * noise          # noisy_sample
    v   = noise - x0                         # velocity_target, what the network predicts
    timestep = 1000 * t                      # what the diffusers transformer receives

Sampling integrates dx/dt = v from t = 1 down to t = 0 with Euler steps. The sampler works with
any diffusers video transformer whose ``forward(hidden_states, timestep, encoder_hidden_states)``
returns ``.sample`` (Wan, or Wan with vidsparse's sparse attention patched in).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "TIMESTEP_SAMPLING",
    "noisy_sample",
    "velocity_target",
    "model_timestep",
    "shift_time",
    "sample_timesteps",
    "time_grid",
    "predict_velocity",
    "sample",
]

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLING = ("logit-normal", "uniform")


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching x's rank."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def noisy_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * x0 + t * noise. x0, noise: (B, ...); t: (B,) in [0, 1]."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    if t.dim() != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must be (B,) = ({x0.shape[0]},), got shape {tuple(t.shape)}")
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity d x_t / d t = noise - x0."""
    return noise - x0


def model_timestep(t: torch.Tensor) -> torch.Tensor:
    """Flow time t in [0, 1] -> the transformer's ``timestep`` argument (float32, 1000 * t)."""
    return t.float() * NUM_TRAIN_TIMESTEPS


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp times towards noise: ``t' = shift * t / (1 + (shift - 1) * t)`` (identity for shift = 1).

    The warp of SD3 / Wan: redundant signals (high resolution, many similar frames) keep their
    coarse layout until t is close to 1, so training and sampling should spend more time there.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    n: int,
    *,
    mode: str = "logit-normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training times t, (n,) float32 in (0, 1).

    ``"logit-normal"``: t = sigmoid(N(mean, std)), which concentrates training on mid-range noise
    (mean=0, std=1 as in SD3; mean=1.5, std=1.6 is TurboDiffusion's high-noise bias).
    ``"uniform"``: t ~ U(0, 1). Either is then warped by :func:`shift_time` with ``shift``.
    ``generator`` must live on ``device``.
    """
    if mode not in TIMESTEP_SAMPLING:
        raise ValueError(f"mode must be one of {TIMESTEP_SAMPLING}, got {mode!r}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    if mode == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    else:
        t = torch.sigmoid(torch.randn(n, generator=generator, device=device) * std + mean)
    t = shift_time(t, shift)
    # keep away from exactly 0 / 1 where x_t carries no information about one of the endpoints
    return t.clamp(1e-5, 1 - 1e-5)


def time_grid(steps: int, *, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(steps + 1,) float32 times from 1 to 0 for the sampler.

    Uniform in t, then warped by :func:`shift_time`; shift > 1 spends more steps at high noise
    (as in SD3 / Wan). shift = 1 keeps the uniform grid. Use the shift the model was trained with.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return shift_time(t, shift).float()


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    # diffusers keeps some modules in fp32 (norms, time embedder); the projections show the real dtype
    if hasattr(model, "proj_out"):
        return model.proj_out.weight.dtype
    return next(model.parameters()).dtype


def predict_velocity(
    model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond_embeds: torch.Tensor
) -> torch.Tensor:
    """One network call: x_t (B, C, T, H, W), t (B,) in [0, 1], cond (B, L, D) -> v (B, C, T, H, W).

    Inputs are cast to the model's dtype; the result is returned in x_t's dtype.
    """
    dtype = _model_dtype(model)
    out = model(
        hidden_states=x_t.to(dtype),
        timestep=model_timestep(t),
        encoder_hidden_states=cond_embeds.to(dtype),
    ).sample
    return out.to(x_t.dtype)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    cond_embeds: torch.Tensor,
    *,
    shape: Sequence[int] | None = None,
    steps: int = 30,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    progress: bool = True,
) -> torch.Tensor:
    """Generate videos with Euler steps from t = 1 (noise) to t = 0 (data).

    Args:
        model: a diffusers video transformer in eval mode (any dtype; latents stay float32).
        cond_embeds: (B, L, D) condition embedding on the model's device.
        shape: (C, T, H, W) or (B, C, T, H, W) of the output; may be omitted when ``noise`` is given.
        steps: number of Euler steps (network calls per sample, doubled with guidance).
        generator: for the initial noise; must be on the model's device.
        noise: (B, C, T, H, W) initial noise instead of drawing it (to compare models on the
            same noise, e.g. dense against sparse attention).
        guidance_scale: classifier-free guidance weight w; v = v_uncond + w * (v_cond - v_uncond)
            with the all-zero condition as the unconditional branch. 1.0 disables guidance.
        shift: time-grid warp, see :func:`time_grid`.
        progress: show a tqdm progress bar.

    Returns:
        (B, C, T, H, W) float32 samples (roughly in [-1, 1] for pixel-space models; not clamped).
    """
    if cond_embeds.dim() != 3:
        raise ValueError(f"cond_embeds must be (B, L, D), got shape {tuple(cond_embeds.shape)}")
    b = cond_embeds.shape[0]
    device = cond_embeds.device
    if noise is not None:
        if noise.dim() != 5 or noise.shape[0] != b:
            raise ValueError(f"noise must be (B={b}, C, T, H, W), got shape {tuple(noise.shape)}")
        if shape is not None and tuple(shape) not in (tuple(noise.shape), tuple(noise.shape[1:])):
            raise ValueError(f"shape {tuple(shape)} disagrees with noise shape {tuple(noise.shape)}")
        x = noise.to(device=device, dtype=torch.float32).clone()
    else:
        if shape is None:
            raise ValueError("pass shape=(C, T, H, W) or noise=")
        shape = tuple(int(s) for s in shape)
        if len(shape) == 4:
            shape = (b, *shape)
        if len(shape) != 5 or shape[0] != b:
            raise ValueError(f"shape must be (C, T, H, W) or (B={b}, C, T, H, W), got {shape}")
        x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")

    from tqdm.auto import tqdm

    guided = guidance_scale != 1.0
    cond = torch.cat([cond_embeds, torch.zeros_like(cond_embeds)]) if guided else cond_embeds
    grid = time_grid(steps, shift=shift, device=device)
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t, t_next = grid[i], grid[i + 1]
        x_in = torch.cat([x, x]) if guided else x
        v = predict_velocity(model, x_in, t.expand(x_in.shape[0]), cond)
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        x = x + (t_next - t) * v
    return x
