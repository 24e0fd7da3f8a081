"""Small helpers shared by the trainer, the CLI and the tiny-model harness.

Only torch and the standard library are imported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["resolve_device", "device_name", "jsonable", "sync", "versions", "hash_seed", "fmt", "read_text_lines",
           "check_output_dir", "check_output_file", "check_model_dir"]


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


def fmt(value: Any, spec: str, none: str = "-") -> str:
    """``format(value, spec)`` for table cells: ``none`` for None, "inf" / "-inf" / "nan" as words."""
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


# ----------------------------------------------------------------------------------------------
# Paths a command reads or writes, checked before any work. Each raises ValueError with one line
# that starts with the flag; command-line callers pass it to ``parser.error`` (exit code 2).


def read_text_lines(path: str | os.PathLike, flag: str) -> list[str]:
    """The lines of a UTF-8 text file given by ``flag``; ValueError naming the flag and the file
    when it is missing or unreadable."""
    where = Path(path)
    try:
        return where.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{flag} {where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag} {where}: cannot read it ({exc})") from None


def _writable(folder: Path, flag: str, what: Path) -> None:
    """``folder`` (existing) accepts a new file, else ValueError."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {what}: cannot write in {folder} (permission denied)")


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A folder a command will write into: created if missing, refused when it cannot hold files.

    Raises:
        ValueError: ``"{flag} {path}: ..."`` when ``path`` is a file, lies under a file, or is
            (or would be created in) a folder this process cannot write.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: exists and is a file, not a folder")
    parent = out
    while not parent.exists():  # the nearest existing ancestor decides whether mkdir can work
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {out}: {parent} is a file, not a folder")
    _writable(parent, flag, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {out}: cannot create the folder ({exc.strerror})") from None
    _writable(out, flag, out)
    try:  # what os.access cannot see (a read-only mount, root squash): write and remove a probe
        fd, probe = tempfile.mkstemp(prefix=".vidsparse_write_test", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {out}: cannot write in the folder ({exc.strerror})") from None
    return out


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file a command will write: its folder is created if missing; the file itself is not.

    Raises:
        ValueError: ``"{flag} {path}: ..."`` when ``path`` is a folder, an existing file that
            cannot be overwritten, or cannot be created (its folder is a file or not writable).
    """
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag} {out}: is a folder; give a file name (e.g. {out / 'results.json'})")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"{flag} {out}: the file exists and cannot be overwritten (permission denied)")
    check_output_dir(out.parent if str(out.parent) else Path("."), flag)
    return out


def _check_safetensors(path: Path, flag: str) -> None:
    """The safetensors header of ``path`` parses and its tensors fit in the file (no data read)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError("its header length exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) > size:
            raise ValueError("truncated (its tensors run past the end of the file)")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag} {path.parent}: {path.name} is not a valid safetensors file ({exc})") from None


def check_model_dir(path: str | os.PathLike, flag: str) -> Path:
    """A diffusers model folder that ``from_pretrained(..., use_safetensors=True)`` can load:
    a readable ``config.json`` holding a JSON object, and ``*.safetensors`` weights whose headers
    parse and whose tensors fit in the files. Only headers are read (fast on any model size).

    Raises:
        ValueError: ``"{flag} {path}: ..."`` naming the file at fault.
    """
    where = Path(path)
    if not where.is_dir():
        raise ValueError(f"{flag} {where}: no such folder")
    config = where / "config.json"
    if not config.is_file():
        hint = (f"; a full diffusers pipeline: pass its transformer folder ({where / 'transformer'})"
                if (where / "model_index.json").is_file() else "")
        raise ValueError(f"{flag} {where}: no config.json there (expected a diffusers model folder){hint}")
    try:
        cfg = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag} {where}: config.json is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{flag} {where}: config.json must hold a JSON object, got {type(cfg).__name__}")
    weights = sorted(where.glob("*.safetensors"))
    if not weights:
        found = ", ".join(p.name for p in where.glob("*.bin")) or "none"
        raise ValueError(f"{flag} {where}: no *.safetensors weights (vidsparse loads safetensors only; .bin: {found})")
    for w in weights:
        _check_safetensors(w, flag)
    return where
