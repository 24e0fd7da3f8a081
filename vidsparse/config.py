"""``SparseConfig``: the one place mask settings live.

What :func:`vidsparse.patch` installs, what ``vidsparse eval`` / ``demo`` / ``distill`` take and
what a distilled student is saved with. It imports only torch and vidsparse, so a config can be
built, checked, saved and loaded without diffusers. Every error names the field (and, for an
option, the method and the option).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import maskers
from .dispatch import BACKENDS
from .mask import check_block_size

__all__ = ["SparseConfig", "CONFIG_FILE"]

#: File name :meth:`SparseConfig.save` writes inside a folder.
CONFIG_FILE = "sparse_config.json"
_FORMAT = 1


@dataclass(frozen=True, eq=False, init=False)
class SparseConfig:
    """How :func:`vidsparse.patch` sparsifies a video transformer's self-attention.

    Attributes:
        method: registered masker name (``vidsparse.maskers.available()``); default "hybrid"
            (SpargeAttention2's Top-k + Top-p rule).
        options: the masker's options, plus those every masker takes (``token_order`` "raster" /
            "tiled" / "auto", ``tile``, ``keep_sink``, ``keep_diagonal``, ``window``). Options not
            given take the masker's defaults; for "hybrid" ``topk=0.03, topp=0.2`` (the paper's
            Wan2.1-1.3B setting) in ``token_order="auto"``: compact 3-D tiles inside a patched
            model, where the grid is known (on the embedded model tiled Top-k had 2.5x lower
            velocity error than the paper's frame-major order at 80, 90 and 95% sparsity;
            ``token_order="raster"`` for the paper's layout). Option keywords may also be passed
            directly: ``SparseConfig(topk=0.05, topp=None)``.
        layer_options: ``{layer_index: {option: value}}`` overriding ``options`` per layer.
        block_q, block_k: tokens per query / key block (powers of two >= 16; paper: 128 x 64).
        dense_steps: the first ``dense_steps`` denoising steps of each generation run dense
            (counted from the transformer's ``timestep`` input).
        dense_layers: self-attention layer indices that keep their stock processor (for
            HunyuanVideo the dual-stream blocks come first, then the single-stream blocks).
        backend: attention backend, "auto" or one of ``vidsparse.dispatch.BACKENDS``.
        collect_stats: record per-layer, per-step sparsity and timings (:func:`vidsparse.stats`).

    Example:
        >>> cfg = SparseConfig(method="hybrid", options={"topk": 0.03, "topp": 0.2, "token_order": "tiled"})
        >>> cfg.save("student/"); SparseConfig.load("student/") == cfg
        True
    """

    method: str
    options: Mapping[str, Any]
    layer_options: Mapping[int, Mapping[str, Any]]
    block_q: int
    block_k: int
    dense_steps: int
    dense_layers: tuple[int, ...]
    backend: str
    collect_stats: bool

    def __init__(self, method: str = "hybrid", options: Mapping[str, Any] | None = None, *,
                 layer_options: Mapping[int, Mapping[str, Any]] | None = None, block_q: int = 128,
                 block_k: int = 64, dense_steps: int = 0, dense_layers: Sequence[int] = (),
                 backend: str = "auto", collect_stats: bool = False, **option_kwargs: Any):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"SparseConfig.options must be a dict of option values, got {type(options).__name__}")
        masker = _masker(method)
        opts = {**(options or {}), **option_kwargs}
        set_("method", method)
        set_("options", _checked_options(masker, opts, "SparseConfig.options"))
        set_("layer_options", _checked_layer_options(masker, opts, layer_options))
        for name, value in (("block_q", block_q), ("block_k", block_k)):
            check_block_size(f"SparseConfig.{name}", value)
            set_(name, value)
        if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
            raise ValueError(f"SparseConfig.dense_steps must be an int >= 0, got {dense_steps!r}")
        set_("dense_steps", dense_steps)
        set_("dense_layers", _checked_layers(dense_layers))
        if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
            raise ValueError(f"SparseConfig.backend must be 'auto' or one of {tuple(BACKENDS)}, got {backend!r}")
        set_("backend", backend)
        if not isinstance(collect_stats, bool):
            raise TypeError(f"SparseConfig.collect_stats must be a bool, got {collect_stats!r}")
        set_("collect_stats", collect_stats)

    # ------------------------------------------------------------------------------ resolution
    @property
    def masker(self) -> maskers.Masker:
        return maskers.get(self.method)

    def resolved_options(self, layer: int | None = None, heads: int | None = None) -> dict[str, Any]:
        """Every option of the masker for ``layer`` (defaults filled in), validated for ``heads``."""
        opts = dict(self.options)
        if layer is not None:
            opts.update(self.layer_options.get(layer, {}))
        where = "SparseConfig.options" if layer is None else f"SparseConfig (layer {layer})"
        return _checked_options(self.masker, opts, where, heads, fill=True)

    def check_layers(self, num_layers: int) -> None:
        """Validate the layer-indexed fields against a model depth (called by ``patch``)."""
        for name, layers in (("dense_layers", self.dense_layers), ("layer_options", tuple(self.layer_options))):
            bad = [i for i in layers if i >= num_layers]
            if bad:
                raise ValueError(f"SparseConfig.{name} {bad} out of range for a model with {num_layers} layers")

    def replace(self, **changes: Any) -> "SparseConfig":
        """A copy with some fields (or options, by name) changed, validated again."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        opts = dict(fields.pop("options"))
        if "method" in changes and changes["method"] != self.method and "options" not in changes:
            opts = {k: v for k, v in opts.items() if k in maskers.COMMON_OPTIONS}
        for key in list(changes):
            if key not in fields and key != "options":
                opts[key] = changes.pop(key)
        opts.update(changes.pop("options", {}))
        return SparseConfig(options=opts, **{**fields, **changes})

    def describe(self) -> str:
        """One line for tables and logs, e.g. ``hybrid(topk=0.03, topp=0.2) 128x64``."""
        common = {**maskers.COMMON_OPTIONS, "token_order": self.masker.default_token_order}
        opts = ", ".join(f"{k}={_short(v)}" for k, v in self.resolved_options().items()
                         if k in self.masker.defaults or v != common.get(k))
        return f"{self.method}({opts}) {self.block_q}x{self.block_k}"

    # --------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        """JSON-ready dict (options resolved, so a saved config does not depend on later defaults)."""
        return {
            "format": _FORMAT, "method": self.method,
            "options": _to_json(self.resolved_options()),
            "layer_options": {str(k): _to_json(dict(v)) for k, v in self.layer_options.items()},
            "block_q": self.block_q, "block_k": self.block_k, "dense_steps": self.dense_steps,
            "dense_layers": list(self.dense_layers), "backend": self.backend, "collect_stats": self.collect_stats,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SparseConfig":
        """Inverse of :meth:`to_dict`; unknown keys or bad values raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"SparseConfig.from_dict needs a dict, got {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"SparseConfig.from_dict: unsupported format {fmt!r} (this vidsparse reads {_FORMAT})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SparseConfig.from_dict: unknown keys {unknown}; expected {sorted(known)}")
        if "options" in data:
            data["options"] = _from_json(data["options"])
        if "layer_options" in data:
            lo = data["layer_options"]
            if not isinstance(lo, Mapping):
                raise ValueError("SparseConfig.from_dict: layer_options must be a dict")
            try:
                data["layer_options"] = {int(k): _from_json(v) for k, v in lo.items()}
            except ValueError:
                raise ValueError(f"SparseConfig.from_dict: layer_options keys must be layer indices, got {list(lo)}") from None
        if "dense_layers" in data and isinstance(data["dense_layers"], list):
            data["dense_layers"] = tuple(data["dense_layers"])
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``sparse_config.json`` into ``directory`` (created if needed); returns its path."""
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparseConfig":
        """Read a config written by :meth:`save`: a folder holding ``sparse_config.json``, or the file."""
        p = Path(path)
        if p.is_dir():
            p = p / CONFIG_FILE
        if not p.is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} at {path} (write one with SparseConfig.save)")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{p} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def __eq__(self, other) -> bool:
        return isinstance(other, SparseConfig) and json.dumps(self.to_dict()) == json.dumps(other.to_dict())

    __hash__ = None

    def __repr__(self) -> str:
        extras = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                  if f.name not in ("method", "options") and getattr(self, f.name) != _DEFAULTS[f.name]]
        return f"SparseConfig(method={self.method!r}, options={dict(self.options)!r}{''.join(', ' + e for e in extras)})"


_DEFAULTS = {"layer_options": {}, "block_q": 128, "block_k": 64, "dense_steps": 0, "dense_layers": (),
             "backend": "auto", "collect_stats": False}


def _masker(method) -> maskers.Masker:
    try:
        return maskers.get(method)
    except ValueError as exc:
        raise ValueError(f"SparseConfig.method: {exc}") from None


def _checked_options(masker, opts: Mapping, where: str, heads: int | None = None, *, fill: bool = False) -> dict:
    """Validate ``opts`` with the masker; return the given ones normalised (all of them with ``fill``)."""
    try:
        full = masker.check_options(dict(opts), heads)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if fill:
        return full
    return {k: (v.detach().float().cpu() if isinstance(v, torch.Tensor) else v) for k, v in full.items() if k in opts}


def _checked_layer_options(masker, base: Mapping, layer_options) -> dict:
    if layer_options is None:
        return {}
    if not isinstance(layer_options, Mapping):
        raise TypeError(f"SparseConfig.layer_options must be a dict {{layer: {{option: value}}}}, got {type(layer_options).__name__}")
    out = {}
    for layer, opts in layer_options.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"SparseConfig.layer_options keys must be layer indices (ints >= 0), got {layer!r}")
        if not isinstance(opts, Mapping):
            raise TypeError(f"SparseConfig.layer_options[{layer}] must be a dict of options, got {type(opts).__name__}")
        _checked_options(masker, {**base, **opts}, f"SparseConfig.layer_options[{layer}]")
        out[layer] = _checked_options(masker, dict(opts), f"SparseConfig.layer_options[{layer}]")
    return out


def _checked_layers(layers) -> tuple[int, ...]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, set, frozenset)):
        raise TypeError(f"SparseConfig.dense_layers must be a list/tuple/set of layer indices, got {layers!r}")
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"SparseConfig.dense_layers entries must be ints >= 0, got {x!r}")
    return tuple(sorted(set(layers)))


def _to_json(opts: Mapping) -> dict:
    def conv(v):
        if isinstance(v, torch.Tensor):
            return {"tensor": v.tolist()}
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"cannot save a non-finite option value {v}")
        return v

    return {k: conv(v) for k, v in opts.items()}


def _from_json(opts) -> dict:
    if not isinstance(opts, Mapping):
        raise ValueError(f"SparseConfig.from_dict: options must be a dict, got {type(opts).__name__}")
    conv = lambda v: torch.tensor(v["tensor"], dtype=torch.float32) if isinstance(v, Mapping) and "tensor" in v else v  # noqa: E731
    return {k: conv(v) for k, v in opts.items()}


def _short(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"per-head{tuple(v.shape)}"
    if isinstance(v, float):
        return f"{v:g}"
    return repr(v) if isinstance(v, str) else str(v)
