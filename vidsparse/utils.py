"""Small helpers shared by the trainer, the CLI and the tiny-model harness.

Only torch and the standard library are imported.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from typing import Any

import torch

__all__ = ["resolve_device", "device_name", "jsonable", "sync", "versions", "hash_seed"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA if available else CPU; otherwise ``torch.device(name)``, checked.

    Raises ValueError for a malformed name or a CUDA device on a machine without CUDA.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} requested but CUDA is not available")
    return device


def device_name(device: torch.device) -> str:
    """A readable name for logs and results: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU); for wall-clock timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def jsonable(obj: Any) -> Any:
    """Strict-JSON form: dataclasses -> dicts, dict keys -> str, tuples -> lists, tensors -> lists,
    non-finite floats -> strings ("inf", "nan")."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # SparseConfig and friends
        return jsonable(obj.to_dict())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def versions() -> dict[str, str | None]:
    """vidsparse, python, torch, diffusers and triton versions (None when not installed)."""
    from . import __version__

    out: dict[str, str | None] = {"vidsparse": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def hash_seed(*parts: int) -> int:
    """Mix integers into a 63-bit seed (stable across runs and platforms)."""
    h = 0xCBF29CE484222325
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF
