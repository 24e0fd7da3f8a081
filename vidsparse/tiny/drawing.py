"""Pure drawing functions of the procedural "moving shapes" clips (:mod:`vidsparse.tiny.data`).

Motion paths ``f(u, t, lim) -> (..., T, 2)`` of one object from its random numbers ``u``, the signed
distance of each shape, and animated backgrounds ``f(u, keys, t, x, y, size) -> (B, T, H, W, 3)``.
They read no global state: the clip's random numbers come in as arguments.
"""

from __future__ import annotations

import math

import torch

__all__ = ["PATHS", "bg_checkerboard", "bg_dots", "bg_gradient", "bg_ripples", "bg_stripes", "bg_waves", "dir", "fold", "path_bouncing", "path_hopping", "path_looping", "path_orbiting", "path_spiralling", "path_wandering", "path_zigzagging", "rotated", "scroll", "shape_sdf", "soft_sign", "triangle_wave"]


def fold(x: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Reflect x into [-limit, limit] (a continuous "bounce off the walls")."""
    span = 2 * limit
    y = torch.remainder(x + limit, 2 * span)
    return -limit + span - (y - span).abs()


def triangle_wave(x: torch.Tensor) -> torch.Tensor:
    """Period-1 triangle wave in [-1, 1]."""
    return 4 * (x - torch.floor(x) - 0.5).abs() - 1


def dir(angle: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def path_bouncing(u, t, lim):
    start = (2 * u[:, 6:8] - 1) * lim[:, None]
    vel = (0.05 + 0.08 * u[:, 9, None]) * dir(2 * math.pi * u[:, 8])
    return start[:, None] + vel[:, None] * t[None, :, None]


def path_orbiting(u, t, lim):
    centre = (2 * u[:, 6:8] - 1) * 0.25
    radius = torch.minimum(0.25 + 0.3 * u[:, 10], (lim - centre.abs().amax(1)).clamp(min=0.1))
    speed = torch.where(u[:, 11] < 0.5, -1.0, 1.0) * (0.12 + 0.2 * u[:, 12])
    angle = speed[:, None] * t[None] + 2 * math.pi * u[:, 13, None]
    return centre[:, None] + radius[:, None, None] * dir(angle)


def path_zigzagging(u, t, lim):
    speed = torch.where(u[:, 11] < 0.5, -1.0, 1.0) * (0.06 + 0.07 * u[:, 9])
    along = (2 * u[:, 6, None] - 1) * lim[:, None] + speed[:, None] * t[None]
    amp = 0.15 + 0.2 * u[:, 14]
    period = 4 + 6 * u[:, 15]
    across = (2 * u[:, 7] - 1) * (lim - amp).clamp(min=0)
    across = across[:, None] + amp[:, None] * triangle_wave(t[None] / period[:, None] + u[:, 16, None])
    swap = (u[:, 17] < 0.5)[:, None]
    return torch.stack([torch.where(swap, across, along), torch.where(swap, along, across)], dim=-1)


def path_wandering(u, t, lim):
    centre = (2 * u[:, 6:8] - 1) * 0.2
    amp1, amp2 = 0.2 + 0.2 * u[:, 18:20], 0.05 + 0.1 * u[:, 20:22]  # (B, 2) per axis
    w1, w2 = 0.08 + 0.12 * u[:, 22:24], 0.25 + 0.25 * u[:, 24:26]
    p1, p2 = 2 * math.pi * u[:, 26:28], 2 * math.pi * u[:, 28:30]
    tt = t[None, :, None]
    return centre[:, None] + amp1[:, None] * torch.sin(w1[:, None] * tt + p1[:, None]) + amp2[:, None] * torch.sin(
        w2[:, None] * tt + p2[:, None]
    )


def path_looping(u, t, lim):  # figure eight, randomly rotated
    centre = (2 * u[:, 6:8] - 1) * 0.2
    amp = 0.3 + 0.25 * u[:, 10]
    speed = torch.where(u[:, 11] < 0.5, -1.0, 1.0) * (0.12 + 0.15 * u[:, 12])
    phase = speed[:, None] * t[None] + 2 * math.pi * u[:, 13, None]
    local = torch.stack([torch.sin(phase), 0.5 * torch.sin(2 * phase)], dim=-1) * amp[:, None, None]
    rot = 2 * math.pi * u[:, 14]
    c, s = torch.cos(rot)[:, None], torch.sin(rot)[:, None]
    x = c * local[..., 0] - s * local[..., 1]
    y = s * local[..., 0] + c * local[..., 1]
    return centre[:, None] + torch.stack([x, y], dim=-1)


def path_hopping(u, t, lim):  # parabolic hops along the floor (y grows downwards)
    speed = torch.where(u[:, 11] < 0.5, -1.0, 1.0) * (0.04 + 0.06 * u[:, 9])
    x = (2 * u[:, 6, None] - 1) * lim[:, None] + speed[:, None] * t[None]
    period = 5 + 5 * u[:, 15]
    p = t[None] / period[:, None] + u[:, 16, None]
    p = p - torch.floor(p)
    height = torch.minimum(0.6 + 0.6 * u[:, 14], 2 * lim)
    y = lim[:, None] - height[:, None] * 4 * p * (1 - p)
    return torch.stack([x, y], dim=-1)


def path_spiralling(u, t, lim):
    centre = (2 * u[:, 6:8] - 1) * 0.15
    r_max = (lim - centre.abs().amax(1)).clamp(min=0.15)
    breathe = 0.5 + 0.5 * torch.cos((0.15 + 0.15 * u[:, 10, None]) * t[None] + 2 * math.pi * u[:, 12, None])
    radius = r_max[:, None] * (0.2 + 0.8 * breathe)
    speed = torch.where(u[:, 11] < 0.5, -1.0, 1.0) * (0.25 + 0.2 * u[:, 9])
    angle = speed[:, None] * t[None] + 2 * math.pi * u[:, 13, None]
    return centre[:, None] + radius[..., None] * dir(angle)


def shape_sdf(shape: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """Signed distance (in object units, < 0 inside) of each pixel to the object's outline.

    shape: (B, 1, 1, 1) ids; lx, ly: (B, T, H, W) object-frame coordinates. Sizes are chosen so
    the four shapes cover similar areas.
    """
    r = torch.hypot(lx, ly)
    sdf = r - 1.0  # disc
    sdf = torch.where(shape == 1, torch.maximum(lx.abs(), ly.abs()) - 0.86, sdf)
    # equilateral triangle with circumradius 1.3: three half-planes at inradius 0.65
    half = 0.5 * ly
    tri = torch.maximum(torch.maximum(ly, -0.866 * lx - half), 0.866 * lx - half) - 0.65
    sdf = torch.where(shape == 2, tri, sdf)
    return torch.where(shape == 3, (r - 0.72).abs() - 0.3, sdf)  # ring


def rotated(u, x, y):
    a = math.pi * u[:, 8, None, None, None]
    c, s = torch.cos(a), torch.sin(a)
    return c * x + s * y, c * y - s * x


def bg_gradient(u, keys, t, x, y, size):
    a, _ = rotated(u, x, y)
    sway = 0.35 * torch.sin((0.1 + 0.2 * u[:, 10, None, None, None]) * t + 2 * math.pi * u[:, 11, None, None, None])
    return (0.5 + 0.5 * (a + sway)).clamp(0, 1)


def soft_sign(v: torch.Tensor) -> torch.Tensor:
    return 0.5 + 0.5 * torch.tanh(4 * v)


def scroll(u, t):
    return torch.where(u[:, 12] < 0.5, -1.0, 1.0)[:, None, None, None] * (0.1 + 0.3 * u[:, 10, None, None, None]) * t


def bg_stripes(u, keys, t, x, y, size):
    a, _ = rotated(u, x, y)
    freq = 2 + 3 * u[:, 9, None, None, None]  # cycles per unit: 4..10 stripes across the frame
    return soft_sign(torch.sin(2 * math.pi * freq * a + scroll(u, t) + 2 * math.pi * u[:, 11, None, None, None]))


def bg_checkerboard(u, keys, t, x, y, size):
    a, b = rotated(u, x, y)
    freq = math.pi * (1.5 + 2.5 * u[:, 9, None, None, None])
    drift = scroll(u, t)
    return soft_sign(torch.sin(freq * a + drift) * torch.sin(freq * b + 0.5 * drift))


def bg_dots(u, keys, t, x, y, size):
    a, b = rotated(u, x, y)
    freq = 2 + 2 * u[:, 9, None, None, None]
    drift = scroll(u, t) / (2 * math.pi)
    ca, cb = freq * a + drift, freq * b + 2 * math.pi * u[:, 11, None, None, None]
    ca, cb = ca - torch.floor(ca) - 0.5, cb - torch.floor(cb) - 0.5
    dist = torch.sqrt(ca * ca + cb * cb)
    return ((0.3 - dist) * size / (2 * freq) + 0.5).clamp(0, 1)


def bg_ripples(u, keys, t, x, y, size):
    cx = (2 * u[:, 13, None, None, None] - 1) * 0.8
    cy = (2 * u[:, 14, None, None, None] - 1) * 0.8
    r = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    freq = 2 + 3 * u[:, 9, None, None, None]
    return soft_sign(torch.sin(2 * math.pi * freq * r - scroll(u, t).abs() * 2))


def bg_waves(u, keys, t, x, y, size):
    a, b = rotated(u, x, y)
    freq = 2 + 2 * u[:, 9, None, None, None]
    bend = 0.6 + 0.8 * u[:, 13, None, None, None]
    wobble = bend * torch.sin(2 * math.pi * (1 + u[:, 14, None, None, None]) * b + scroll(u, t))
    return soft_sign(torch.sin(2 * math.pi * freq * a + wobble))


PATHS = (path_bouncing, path_orbiting, path_zigzagging, path_wandering, path_looping, path_hopping, path_spiralling)
