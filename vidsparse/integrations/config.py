"""``SparseConfig``: what :func:`vidsparse.patch` installs, validated up front.

This module imports only torch and vidsparse, so a config can be built (and checked) without
diffusers. Every error names the offending field as ``SparseConfig.<field>``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from .._validation import check_fraction
from ..dispatch import BACKENDS
from ..mask import check_block_size

__all__ = ["SparseConfig", "TOKEN_ORDERS"]

TOKEN_ORDERS = ("raster", "tiled")

#: One layer's Top-k / Top-p value: a float in (0, 1], None (rule off) or an (H,) per-head tensor.
Fraction = Union[float, None, torch.Tensor]
#: What ``topk`` / ``topp`` accept: one value for every layer, an (L, H) tensor, a per-layer
#: list/tuple, or a dict ``{layer_index: value}`` with an optional ``"default"`` entry.
LayerFractions = Union[Fraction, Sequence, Mapping]

_DEFAULT_KEY = "default"


def _check_one(name: str, value) -> Fraction:
    """Validate one per-layer value (float, None, or 1-D per-head tensor); heads checked later."""
    if isinstance(value, torch.Tensor) and value.dim() > 1:
        raise ValueError(f"{name} must be a float, None or an (H,) per-head tensor, got shape {tuple(value.shape)}")
    return check_fraction(name, value)  # its errors start with ``name``


def _normalise_fractions(name: str, value) -> LayerFractions:
    """Validate ``topk``/``topp`` in any accepted form and return a canonical copy.

    Floats stay floats, tensors become float32 CPU tensors (moved to the device once, on first
    use), lists become tuples and dicts become plain dicts with int keys (plus ``"default"``).
    """
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return _check_one(name, value)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float in (0, 1], None, a tensor, a list or a dict, got bool")
    if isinstance(value, torch.Tensor):
        if value.dim() == 2:  # (num_layers, H): one row per layer
            if not torch.is_floating_point(value):
                raise TypeError(f"{name} tensor must be floating, got {value.dtype}")
            if bool(((value <= 0) | (value > 1) | value.isnan()).any()):
                raise ValueError(f"{name} values must lie in (0, 1]")
            return value.detach().float().cpu()
        checked = _check_one(name, value)
        return checked.detach().cpu() if isinstance(checked, torch.Tensor) else checked
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if key == _DEFAULT_KEY:
                out[key] = _check_one(f"{name}[{key!r}]", item)
                continue
            if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                raise TypeError(
                    f"{name} dict keys must be layer indices (ints >= 0) or {_DEFAULT_KEY!r}, got {key!r}"
                )
            out[key] = _check_one(f"{name}[{key}]", item)
        return out
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) == 0:
            raise ValueError(f"{name} as a per-layer list must not be empty")
        return tuple(_check_one(f"{name}[{i}]", item) for i, item in enumerate(value))
    raise TypeError(
        f"{name} must be a float in (0, 1], None, an (H,) or (num_layers, H) tensor, a per-layer list "
        f"or a dict {{layer: value}}, got {type(value).__name__}"
    )


def _layer_value(name: str, value: LayerFractions, layer: int, num_layers: int) -> tuple[bool, Fraction]:
    """(found, value) for one layer; ``found`` is False when a dict has neither the layer nor a default."""
    if isinstance(value, dict):
        if layer in value:
            return True, value[layer]
        if _DEFAULT_KEY in value:
            return True, value[_DEFAULT_KEY]
        return False, None
    if isinstance(value, tuple):
        if len(value) != num_layers:
            raise ValueError(f"{name} has {len(value)} per-layer entries but the model has {num_layers} layers")
        return True, value[layer]
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        if value.shape[0] != num_layers:
            raise ValueError(
                f"{name} as an (num_layers, H) tensor has {value.shape[0]} rows but the model has {num_layers} layers"
            )
        return True, value[layer]
    return True, value


@dataclass(frozen=True, eq=False)
class SparseConfig:
    """How :func:`vidsparse.patch` sparsifies a video transformer's self-attention.

    Attributes:
        topk: Top-k fraction of key blocks kept per query block, in (0, 1] (SpargeAttention2's k;
            rounded down, at least one block). One of: a float; None (Top-k off); an (H,) tensor
            of per-head values; an (num_layers, H) tensor; a list with one entry per layer; or a
            dict ``{layer_index: value}`` whose ``"default"`` entry covers the layers not listed.
            Default 0.03 (the paper's Wan2.1 setting).
        topp: Top-p pooled probability mass kept per query block, same forms as ``topk``. Default
            0.2 (Wan2.1-1.3B in the paper). ``topk = topp = 1.0`` is dense attention.
        block_q, block_k: tokens per query / key block (powers of two >= 16; paper: 128 x 64).
        keep_sink: also keep the first key block for every query block (attention-sink prior).
        keep_diagonal: also keep each query block's own key blocks (locality prior).
        dense_steps: the first ``dense_steps`` denoising steps of each generation run the stock
            dense processor (warm-up). Steps are counted from the transformer's ``timestep``
            input (see ``vidsparse.integrations.diffusers``).
        dense_layers: indices of self-attention layers that stay dense: no processor is installed
            on them at all. Layer indices follow the model's block order (for HunyuanVideo the
            dual-stream blocks come first, then the single-stream blocks).
        token_order: ``"raster"`` (the model's own frame-major order, as in the paper) or
            ``"tiled"``: video tokens are permuted so that each query block is a compact
            t x h x w tile of the latent grid, and the output is permuted back.
        tile_shape: (t, h, w) tile for ``token_order="tiled"``, in latent tokens after
            patchification. None picks one per grid (see
            :func:`vidsparse.integrations.tiling.choose_tile_shape`).
        backend: block-sparse attention backend, ``"auto"`` or one of
            ``vidsparse.dispatch.BACKENDS`` ("auto": Triton on CUDA, else the eager "gather" backend).
        collect_stats: record per-layer, per-step sparsity and timings (read them with
            :func:`vidsparse.stats`). Off by default: it adds CUDA events and keeps records.

    Example:
        >>> cfg = SparseConfig(topk=0.03, topp=0.2, dense_steps=2, dense_layers=(0,))
        >>> vidsparse.patch(pipe, cfg)
    """

    topk: LayerFractions = 0.03
    topp: LayerFractions = 0.2
    block_q: int = 128
    block_k: int = 64
    keep_sink: bool = False
    keep_diagonal: bool = False
    dense_steps: int = 0
    dense_layers: Sequence[int] = field(default=())
    token_order: str = "raster"
    tile_shape: tuple[int, int, int] | None = None
    backend: str = "auto"
    collect_stats: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("topk", _normalise_fractions("SparseConfig.topk", self.topk))
        set_("topp", _normalise_fractions("SparseConfig.topp", self.topp))
        if self.topk is None and self.topp is None:
            raise ValueError("SparseConfig.topk and SparseConfig.topp are both None: give at least one (1.0 = dense)")
        for name in ("block_q", "block_k"):
            check_block_size(f"SparseConfig.{name}", getattr(self, name))
        for name in ("keep_sink", "keep_diagonal", "collect_stats"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SparseConfig.{name} must be a bool, got {getattr(self, name)!r}")
        steps = self.dense_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"SparseConfig.dense_steps must be an int >= 0, got {steps!r}")
        set_("dense_layers", self._check_dense_layers(self.dense_layers))
        if self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"SparseConfig.token_order must be one of {TOKEN_ORDERS}, got {self.token_order!r}")
        if self.tile_shape is not None:
            if self.token_order != "tiled":
                raise ValueError("SparseConfig.tile_shape only applies to token_order='tiled'")
            tile = self.tile_shape
            if (
                not isinstance(tile, Sequence)
                or len(tile) != 3
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in tile)
            ):
                raise ValueError(f"SparseConfig.tile_shape must be three positive ints (t, h, w), got {tile!r}")
            set_("tile_shape", tuple(tile))
        if not isinstance(self.backend, str) or (self.backend != "auto" and self.backend not in BACKENDS):
            raise ValueError(f"SparseConfig.backend must be 'auto' or one of {tuple(BACKENDS)}, got {self.backend!r}")

    @staticmethod
    def _check_dense_layers(layers) -> tuple[int, ...]:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, set, frozenset)):
            raise TypeError(f"SparseConfig.dense_layers must be a list/tuple/set of layer indices, got {layers!r}")
        for x in layers:
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ValueError(f"SparseConfig.dense_layers entries must be ints >= 0, got {x!r}")
        return tuple(sorted(set(layers)))

    # ------------------------------------------------------------------------------ resolution
    def layer_fractions(self, layer: int, num_layers: int, heads: int) -> tuple[Fraction, Fraction]:
        """(topk, topp) for one layer of a model with ``num_layers`` layers and ``heads`` heads.

        Raises:
            ValueError: per-layer lists of the wrong length, a dict missing the layer (and no
                ``"default"``), per-head tensors of the wrong size, or a layer with both rules off.
        """
        out = []
        for name in ("topk", "topp"):
            found, value = _layer_value(f"SparseConfig.{name}", getattr(self, name), layer, num_layers)
            if not found:
                raise ValueError(
                    f"SparseConfig.{name} has no entry for layer {layer} and no {_DEFAULT_KEY!r} entry"
                )
            if isinstance(value, torch.Tensor) and value.shape != (heads,):
                raise ValueError(
                    f"SparseConfig.{name} for layer {layer}: a per-head tensor must have shape ({heads},), "
                    f"got {tuple(value.shape)}"
                )
            out.append(value)
        if out[0] is None and out[1] is None:
            raise ValueError(f"SparseConfig.topk and SparseConfig.topp are both None for layer {layer}")
        return out[0], out[1]

    def check_layers(self, num_layers: int) -> None:
        """Validate the layer-indexed fields against a model depth (called by ``patch``)."""
        bad = [i for i in self.dense_layers if i >= num_layers]
        if bad:
            raise ValueError(f"SparseConfig.dense_layers {bad} out of range for a model with {num_layers} layers")
        for name in ("topk", "topp"):
            value = getattr(self, name)
            if isinstance(value, dict):
                extra = [k for k in value if k != _DEFAULT_KEY and k >= num_layers]
                if extra:
                    raise ValueError(f"SparseConfig.{name} has entries for layers {extra} but the model has {num_layers}")

    def replace(self, **changes: Any) -> "SparseConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-friendly view (tensors become lists), e.g. for saving alongside statistics."""

        def conv(v):
            if isinstance(v, torch.Tensor):
                return v.tolist()
            if isinstance(v, dict):
                return {str(k): conv(x) for k, x in v.items()}
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            return v

        return {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)}
