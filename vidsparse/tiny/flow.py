"""The tiny harness's Euler sampler on the rectified-flow conventions of :mod:`vidsparse.training.flow`.

Time runs from data (t = 0) to noise (t = 1)::

    x_t = (1 - t) * x0 + t * noise          # noisy_sample
    v   = noise - x0                         # velocity_target, what the network predicts
    timestep = 1000 * t                      # what the diffusers transformer receives

Sampling integrates dx/dt = v from t = 1 down to t = 0 with Euler steps, optionally re-noising part
of each step (``eta``, the DDIM family: 0 is the deterministic ODE, 1 the ancestral sampler) and
applying classifier-free guidance only inside a time interval. The sampler works with
any diffusers video transformer whose ``forward(hidden_states, timestep, encoder_hidden_states)``
returns ``.sample`` (Wan, or Wan with vidsparse's sparse attention patched in).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..training.flow import (NUM_TRAIN_TIMESTEPS, TIMESTEP_SAMPLING, model_timestep, noisy_sample, predict_velocity,
                             sample_timesteps, shift_time, velocity_target)

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
    "check_sampler_settings",
    "resolve_sampler",
    "describe_sampler",
]


def time_grid(steps: int, *, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(steps + 1,) float32 times from 1 to 0 for the sampler.

    Uniform in t, then warped by :func:`shift_time`; shift > 1 spends more steps at high noise
    (as in SD3 / Wan). shift = 1 keeps the uniform grid. Use the shift the model was trained with.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return shift_time(t, shift).float()


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
    eta: float = 0.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
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
        eta: stochasticity in [0, 1]. Each step from t to t' predicts x0 and the noise from v,
            moves to t' and swaps a fraction of the predicted noise for fresh noise: standard
            deviation ``eta * t' * sqrt(1 - ((1 - t) t' / ((1 - t') t))^2)`` (DDIM's sigma for
            x_t = (1 - t) x0 + t noise). 0 (default) is exactly the Euler ODE step; 1 samples the
            posterior q(x_t' | x_t, x0) as an ancestral sampler does. Fresh noise comes from
            ``generator`` (a fixed seed-0 generator on the device when None), so equal calls give
            equal videos.
        guidance_interval: (t_lo, t_hi); guidance applies at steps whose t lies in [t_lo, t_hi],
            the conditional velocity alone elsewhere. (0, 1) (default) guides every step.
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
    lo, hi = check_sampler_settings(guidance_scale, guidance_interval, eta)
    if eta > 0 and generator is None:
        generator = torch.Generator(device=device).manual_seed(0)

    from tqdm.auto import tqdm

    guided = guidance_scale != 1.0
    cond = torch.cat([cond_embeds, torch.zeros_like(cond_embeds)]) if guided else cond_embeds
    grid = time_grid(steps, shift=shift, device=device)
    times = grid.tolist()  # host copies for the per-step decisions (no device sync inside the loop)
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t, t_next = grid[i], grid[i + 1]
        guide_now = guided and lo <= times[i] <= hi
        x_in = torch.cat([x, x]) if guide_now else x
        v = predict_velocity(model, x_in, t.expand(x_in.shape[0]), cond if guide_now else cond_embeds)
        if guide_now:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        sigma = _renoise_std(times[i], times[i + 1], eta)
        if sigma == 0.0:
            x = x + (t_next - t) * v
            continue
        # x = (1 - t) x0 + t eps and v = eps - x0 give both predictions
        x0_hat, eps_hat = x - t * v, x + (1 - t) * v
        fresh = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        x = (1 - t_next) * x0_hat + math.sqrt(times[i + 1] ** 2 - sigma**2) * eps_hat + sigma * fresh
    return x


def _renoise_std(t: float, t_next: float, eta: float) -> float:
    """DDIM's sigma for the step t -> t_next < t of x_t = (1 - t) x0 + t eps, scaled by eta."""
    if eta == 0.0 or t_next <= 0.0:
        return 0.0
    ratio = (1 - t) * t_next / ((1 - t_next) * t)
    return eta * t_next * math.sqrt(max(0.0, 1 - ratio**2))


def check_sampler_settings(guidance_scale: float, guidance_interval, eta: float) -> tuple[float, float]:
    """Raise ValueError naming the bad argument; returns the guidance interval as floats (t_lo, t_hi)."""
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    try:
        lo, hi = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be a pair (t_lo, t_hi), got {guidance_interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got {guidance_interval!r}")
    return lo, hi


def resolve_sampler(defaults, *, guidance_scale=None, guidance_interval=None, eta=None, shift=None) -> dict:
    """``defaults`` (e.g. :func:`vidsparse.tiny.load_sampling_defaults`) with every argument that is
    not None in its place, checked by :func:`check_sampler_settings`.

    Returns ``{"guidance_scale", "guidance_interval", "eta", "shift"}`` (floats, the interval a
    tuple): keyword arguments of :func:`sample` besides the steps.
    """
    given = dict(guidance_scale=guidance_scale, guidance_interval=guidance_interval, eta=eta, shift=shift)
    out = {k: defaults[k] if v is None else v for k, v in given.items()}
    out["guidance_interval"] = check_sampler_settings(out["guidance_scale"], out["guidance_interval"], out["eta"])
    out.update(guidance_scale=float(out["guidance_scale"]), eta=float(out["eta"]), shift=float(out["shift"]))
    return out


def describe_sampler(
    guidance_scale: float = 1.0, guidance_interval=(0.0, 1.0), eta: float = 0.0, shift: float = 1.0
) -> str:
    """One line for tables and titles, e.g. "guidance 4 for t in [0.1, 0.7], shift 1"."""
    lo, hi = (float(v) for v in guidance_interval)
    text = "no guidance" if guidance_scale == 1.0 else f"guidance {guidance_scale:g}"
    if guidance_scale != 1.0 and (lo, hi) != (0.0, 1.0):
        text += f" for t in [{lo:g}, {hi:g}]"
    if eta > 0:
        text += f", eta {eta:g}"
    return text + f", shift {shift:g}"
