"""The masker registry and the base every masker shares.

A masker is called as ``get(name)(q, k, *, grid=None, state=None, block_q=128, block_k=64,
**options)`` with q, k of shape (B, H, N, D) and returns a :class:`~vidsparse.MaskPlan`. The base
class does what every method needs, once:

* checks q, k, the grid and the options (unknown options and bad values raise ``ValueError``
  naming the method and the option);
* the ``token_order`` option: ``"raster"`` (the model's order), ``"tiled"`` (compact 3-D tiles of
  the grid, ``tile`` to choose the shape) or ``"auto"`` (tiled when the grid is known, raster
  otherwise): the method sees the permuted tokens and its plan is composed with the order's
  permutation. Each method sets its own default (``Masker.default_token_order``);
* the priors, for any method: ``keep_sink`` (the key block holding the first token),
  ``keep_diagonal`` (the key blocks holding each query block's own tokens) and ``window``
  ((t, h, w) radii: keys within that distance in the grid of the query block's bounding box).

A method implements :meth:`Masker.build` (the eager reference, and a GPU path where it has one)
and declares its options with defaults. State kept between calls (cached centroids, profiles)
lives in the ``state`` dict the caller owns per layer (:meth:`Masker.new_state`), not in globals;
the diffusers integration puts the layer index in it under ``"layer"``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..mask import BlockMask, check_block_size
from ..plan import MaskPlan
from .token_order import TOKEN_ORDERS, check_grid, token_permutation

__all__ = ["Masker", "register", "unregister", "get", "available", "COMMON_OPTIONS"]

#: Options every masker takes (handled here), with their defaults.
COMMON_OPTIONS: dict[str, Any] = {
    "token_order": "raster", "tile": None, "keep_sink": False, "keep_diagonal": False, "window": None,
}

_REGISTRY: dict[str, "Masker"] = {}


class Masker:
    """Base of every masker. Subclasses set :attr:`name`, :attr:`defaults` and implement :meth:`build`.

    Attributes:
        name: the registry name.
        defaults: the method's own options and their default values.
        needs_grid: the method cannot run without the latent grid (T, H, W).
        native_priors: common options :meth:`build` applies itself (faster than the generic path).
        default_token_order: the ``token_order`` used when the option is not given.
        density_option: the option that sets how much is kept (larger keeps more), with
            ``density_bounds`` its range and ``density_fixed`` the other options that make it the
            only control; used to reach a target sparsity (``vidsparse compare``). None: static.
    """

    name: str = ""
    defaults: dict[str, Any] = {}
    needs_grid: bool = False
    native_priors: tuple[str, ...] = ()
    default_token_order: str = "raster"
    density_option: str | None = None
    density_bounds: tuple[float, float] = (0.0, 1.0)
    density_fixed: dict[str, Any] = {}

    # --------------------------------------------------------------------------- to override
    def build(self, q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_k: int, grid, positions,
              state: dict | None, **options) -> MaskPlan:
        """The method itself, on q, k (B, H, N, D) already in the token order.

        ``positions`` is None (raster) or (N,) int64: the raster index of each token seen, so
        ``grid_coords(grid)[positions]`` gives their (t, h, w). Returns a plan over this order.
        """
        raise NotImplementedError

    def validate(self, options: dict[str, Any], heads: int | None) -> dict[str, Any]:
        """Check the method's option values (all present); return them, possibly normalised."""
        return options

    def new_state(self) -> dict | None:
        """A fresh per-layer state for methods that keep one between calls (None: stateless)."""
        return None

    # ----------------------------------------------------------------------------- the call
    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(self.defaults) + tuple(COMMON_OPTIONS)

    def grid_needed(self, options: dict[str, Any]) -> bool:
        """Whether a call with these options needs the latent grid."""
        return (self.needs_grid or options.get("token_order", self.default_token_order) == "tiled"
                or options.get("window") is not None)

    def check_options(self, options: dict[str, Any], heads: int | None = None) -> dict[str, Any]:
        """All options (defaults filled in) validated; raises ValueError / TypeError naming them."""
        unknown = [k for k in options if k not in self.defaults and k not in COMMON_OPTIONS]
        if unknown:
            raise ValueError(f"masker {self.name!r}: unknown option {unknown[0]!r}; it takes "
                             f"{', '.join(self.option_names)}")
        common = {k: options.get(k, v) for k, v in {**COMMON_OPTIONS, "token_order": self.default_token_order}.items()}
        _check_common(self.name, common)
        own = self.validate({k: options.get(k, v) for k, v in self.defaults.items()}, heads)
        return {**own, **common}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, *, grid=None, state: dict | None = None,
                 block_q: int = 128, block_k: int = 64, **options) -> MaskPlan:
        """Predict a plan for q, k of shape (B, H, N, D) (any float dtype; read only, no gradient)."""
        _check_qk(self.name, q, k)
        check_block_size("block_q", block_q)
        check_block_size("block_k", block_k)
        return self.plan(q, k, grid=grid, state=state, block_q=block_q, block_k=block_k,
                         options=self.check_options(options, q.shape[1]))

    def plan(self, q: torch.Tensor, k: torch.Tensor, *, grid, state: dict | None, block_q: int, block_k: int,
             options: dict[str, Any]) -> MaskPlan:
        """The call for options already checked: ``options`` as :meth:`check_options` returns them
        (every option present). The diffusers integration validates once, at ``patch``, and calls this
        per layer and step, so the hot path does not re-check its settings."""
        opts = dict(options)
        order, tile = opts.pop("token_order"), opts.pop("tile")
        if order == "auto":
            order = "tiled" if grid is not None else "raster"
        priors = {name: opts.pop(name) for name in ("keep_sink", "keep_diagonal", "window")}
        needs = self.grid_needed({"token_order": order, **priors})
        if grid is not None:
            grid = check_grid(grid, k.shape[2], who=f"masker {self.name!r}")
            if q.shape[2] != k.shape[2]:
                raise ValueError(f"masker {self.name!r}: a grid needs self-attention (q_len == k_len)")
        elif needs:
            why = "the method" if self.needs_grid else ("token_order='tiled'" if order != "raster" else "window")
            raise ValueError(f"masker {self.name!r}: {why} needs the latent grid (T, H, W); pass grid=")
        with torch.no_grad():
            base = token_permutation(order, grid, block_q, tile, q.device)
            if base is not None:
                q, k = q.detach().index_select(2, base), k.detach().index_select(2, base)
            native = {n: v for n, v in priors.items() if n in self.native_priors}
            plan = self.build(q.detach(), k.detach(), block_q=block_q, block_k=block_k, grid=grid,
                              positions=base, state=state, **opts, **native)
            plan = _compose(plan, base)
            rest = {n: v for n, v in priors.items() if n not in self.native_priors}
            return apply_priors(plan, grid=grid, **rest)

    def __repr__(self) -> str:
        return f"<masker {self.name!r} options={self.defaults}>"


def _check_qk(name: str, q, k) -> None:
    for arg, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"masker {name!r}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"masker {name!r}: {arg} must be a 4-D (B, H, N, D) float tensor, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.device != k.device:
        raise ValueError(f"masker {name!r}: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, "
                         "heads, head_dim and device")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"masker {name!r}: empty sequence (q {tuple(q.shape)}, k {tuple(k.shape)})")


def _check_common(name: str, o: dict) -> None:
    if o["token_order"] not in TOKEN_ORDERS:
        raise ValueError(f"masker {name!r}: option 'token_order' must be one of {TOKEN_ORDERS}, got {o['token_order']!r}")
    for flag in ("keep_sink", "keep_diagonal"):
        if not isinstance(o[flag], bool):
            raise TypeError(f"masker {name!r}: option {flag!r} must be a bool, got {o[flag]!r}")
    for opt in ("tile", "window"):
        v = o[opt]
        if v is None:
            continue
        low = 1 if opt == "tile" else 0
        if (not isinstance(v, (tuple, list)) or len(v) != 3
                or any(isinstance(x, bool) or not isinstance(x, int) or x < low for x in v)):
            raise ValueError(f"masker {name!r}: option {opt!r} must be three ints >= {low} (t, h, w), got {v!r}")
        o[opt] = tuple(v)
    if o["tile"] is not None and o["token_order"] == "raster":
        raise ValueError(f"masker {name!r}: option 'tile' only applies to token_order='tiled' (or 'auto')")


def _compose(plan: MaskPlan, base: torch.Tensor | None) -> MaskPlan:
    """Plan over the token order -> plan over the caller's order."""
    if base is None:
        return plan
    lift = lambda p: base[None, None] if p is None else base[p]  # noqa: E731
    return MaskPlan(plan.mask, lift(plan.perm), k_perm=lift(plan.k_perm), _checked=True)


# ----------------------------------------------------------------------------------- priors
def apply_priors(plan: MaskPlan, *, grid=None, keep_sink: bool = False, keep_diagonal: bool = False,
                 window=None) -> MaskPlan:
    """``plan`` with the prior blocks added (see the module docstring); the order is unchanged."""
    if not (keep_sink or keep_diagonal or window is not None):
        return plan
    m = plan.mask
    lq, lk, bq, bk = m.q_len, m.k_len, m.block_q, m.block_k
    dev = m.device
    q_perm = plan.perm if plan.perm is not None else torch.arange(lq, device=dev)[None, None]
    k_inv = plan.k_inverse if plan.k_inverse is not None else torch.arange(lk, device=dev)[None, None]
    b, h = (max(x, y, z) for x, y, z in zip(m.shape[:2], q_perm.shape[:2], k_inv.shape[:2]))
    extra = torch.zeros(b, h, m.num_q_blocks, m.num_k_blocks, dtype=torch.bool, device=dev)
    if keep_sink:
        extra |= _one_hot(k_inv[..., 0] // bk, m.num_k_blocks)[:, :, None, :]
    if keep_diagonal:
        if lq != lk:
            raise ValueError(f"keep_diagonal needs self-attention (q_len == k_len), got {lq} and {lk}")
        # attention position of each query's own token among the keys
        own = torch.gather(k_inv.expand(b, h, -1), -1, q_perm.expand(b, h, -1)) // bk
        rows = torch.arange(lq, device=dev) // bq
        flat = extra.view(b, h, -1)
        flat.scatter_(-1, rows * m.num_k_blocks + own, True)
    if window is not None:
        extra |= _window_blocks(plan, grid, window, b, h)
    dense = m.dense.expand(b, h, -1, -1) | extra
    mask = BlockMask.from_dense(dense, block_q=bq, block_k=bk, q_len=lq, k_len=lk)
    return MaskPlan(mask, plan.perm, k_perm=plan.k_perm, _checked=True)


def _one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, n).bool()


def _window_blocks(plan: MaskPlan, grid, window, b: int, h: int) -> torch.Tensor:
    """(b, h, NQB, NKB): key blocks with a token inside the dilated bounding box of each query block."""
    from .token_order import grid_coords

    m = plan.mask
    dev = m.device
    coords = grid_coords(grid, dev)  # (N, 3)
    q_perm = plan.perm if plan.perm is not None else torch.arange(m.q_len, device=dev)[None, None]
    k_perm = plan.k_perm if plan.k_perm is not None else torch.arange(m.k_len, device=dev)[None, None]
    win = torch.tensor(window, device=dev)
    nqb = m.num_q_blocks
    pad = nqb * m.block_q - m.q_len
    out = []
    for qp, kp in _pairs(q_perm, k_perm):  # one (Lq,), (Lk,) pair per distinct order
        qc = coords[qp]  # (Lq, 3) in attention order
        qc_pad = torch.cat([qc, qc[-1:].expand(pad, 3)]) if pad else qc
        blk = qc_pad.view(nqb, m.block_q, 3)
        lo, hi = blk.amin(1) - win, blk.amax(1) + win  # (NQB, 3)
        kc = coords[kp]  # (Lk, 3)
        inside = ((kc[None] >= lo[:, None]) & (kc[None] <= hi[:, None])).all(-1)  # (NQB, Lk)
        inside = torch.nn.functional.pad(inside, (0, m.num_k_blocks * m.block_k - m.k_len))
        out.append(inside.view(nqb, m.num_k_blocks, m.block_k).any(-1))
    pb, ph = max(q_perm.shape[0], k_perm.shape[0]), max(q_perm.shape[1], k_perm.shape[1])
    return torch.stack(out).view(pb, ph, nqb, m.num_k_blocks).expand(b, h, -1, -1)


def _pairs(q_perm: torch.Tensor, k_perm: torch.Tensor):
    pb, ph = max(q_perm.shape[0], k_perm.shape[0]), max(q_perm.shape[1], k_perm.shape[1])
    qp, kp = q_perm.expand(pb, ph, -1), k_perm.expand(pb, ph, -1)
    for i in range(pb):
        for j in range(ph):
            yield qp[i, j], kp[i, j]


# ---------------------------------------------------------------------------------- registry
def register(name: str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: register a :class:`Masker` subclass under ``name``.

    Example:
        >>> @vidsparse.maskers.register("my_method")
        ... class MyMasker(vidsparse.maskers.Masker):
        ...     defaults = {"fraction": 0.05}
        ...     def build(self, q, k, *, block_q, block_k, grid, positions, state, fraction): ...
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"masker name must be an identifier string, got {name!r}")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Masker)):
            raise TypeError(f"register({name!r}) needs a Masker subclass, got {cls!r}")
        if name in _REGISTRY and not replace:
            raise ValueError(f"a masker named {name!r} is already registered (pass replace=True)")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return deco


def unregister(name: str) -> None:
    """Remove a registered masker (e.g. one a test added)."""
    if name not in _REGISTRY:
        raise KeyError(f"no masker named {name!r}; registered: {', '.join(available())}")
    del _REGISTRY[name]


def get(name: str) -> Masker:
    """The masker registered as ``name``; the error lists the registered ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown masker {name!r}; registered: {', '.join(available())}")
    return _REGISTRY[name]


def available() -> list[str]:
    """Names of the registered maskers, sorted."""
    return sorted(_REGISTRY)
