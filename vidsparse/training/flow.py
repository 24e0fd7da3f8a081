"""Rectified-flow maths of training: noisy samples, velocity targets, training times.

Time runs from data (t = 0) to noise (t = 1)::

    x_t = (1 - t) * x0 + t * noise          # noisy_sample
    v   = noise - x0                         # velocity_target, what the network predicts
    timestep = 1000 * t                      # what the diffusers transformer receives

These conventions are those of Wan and of the SpargeAttention2 distillation recipe. The model is
any diffusers video transformer whose ``forward(hidden_states, timestep, encoder_hidden_states)``
returns ``.sample``. Samplers (e.g. :mod:`vidsparse.tiny.flow`) build on these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "TIMESTEP_SAMPLING",
    "noisy_sample",
    "velocity_target",
    "model_timestep",
    "shift_time",
    "sample_timesteps",
    "predict_velocity",
    "velocity",
    "flow_matching_loss",
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


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    # diffusers keeps some modules in fp32 (norms, time embedder); the projections show the real dtype
    if hasattr(model, "proj_out"):
        return model.proj_out.weight.dtype
    return next(model.parameters()).dtype


def velocity(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """One network call with condition keyword arguments ``cond`` (floating tensors cast to the
    model's dtype, like ``x_t``); the result is returned in x_t's dtype."""
    dtype = _model_dtype(model)
    cond = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
    out = model(hidden_states=x_t.to(dtype), timestep=model_timestep(t), **cond).sample
    return out.to(x_t.dtype)


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


def flow_matching_loss(
    model: torch.nn.Module, x0: torch.Tensor, cond_embeds: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Rectified-flow loss: mean squared error between the predicted and true velocity.

    x0, noise: (B, C, T, H, W); cond_embeds: (B, L, D); t: (B,) in (0, 1). Returns a float32 scalar.
    """
    x_t = noisy_sample(x0, noise, t)
    pred = predict_velocity(model, x_t, t, cond_embeds)
    return F.mse_loss(pred.float(), velocity_target(x0, noise).float())
