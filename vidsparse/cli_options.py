"""The mask flags every vidsparse command shares, turned into one :class:`vidsparse.SparseConfig`.

``vidsparse distill``, the ablation, ``vidsparse eval`` and ``vidsparse demo`` take the same
flags for the sparse attention they run::

    --method NAME            registered masker (vidsparse.maskers.available())
    --topk K / --topp P      the hybrid rule's k and p; a float, or "none" to switch one off
    --block-q N / --block-k N
    --token-order ORDER      raster or tiled
    --keep-diagonal / --no-keep-diagonal, --keep-sink / --no-keep-sink
    --backend NAME           auto or one of vidsparse.dispatch.BACKENDS
    --option KEY=VALUE       any masker option (repeatable); VALUE is an int, a float, none,
                             true / false, a comma list of ints (tile=4,4,4) or a word

Usage::

    parser = argparse.ArgumentParser()
    add_mask_arguments(parser, SparseConfig(topk=0.03, topp=0.1))   # the command's defaults
    args = parser.parse_args(argv)
    sparse = sparse_config_from_args(args, parser)                   # exit 2 on a bad value

Flags left out of the command line keep the defaults' values (their ``args`` attribute holds
:data:`UNSET`; read the result of :func:`sparse_config_from_args`, not the attributes). ``--method`` switches the masker
and drops the defaults' method-specific options (the common ones, such as ``token_order``, stay).
The flags are applied in this order: ``--method``, ``--topk`` / ``--topp``, ``--token-order``
and the priors, ``--option`` (so a later ``--option`` overrides a named flag), then the block
sizes and ``--backend``. Every error is an argparse error that names the flag (exit code 2),
raised before the command does any work.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from .config import SparseConfig
from .dispatch import BACKENDS
from .maskers import available
from .maskers.token_order import TOKEN_ORDERS

__all__ = ["add_mask_arguments", "sparse_config_from_args", "parse_option_value", "parse_option",
           "optional_float", "int_at_least", "float_in", "MASK_DEST", "UNSET"]

#: the ``args`` attributes :func:`add_mask_arguments` defines
MASK_DEST = ("method", "topk", "topp", "block_q", "block_k", "token_order", "keep_diagonal", "keep_sink",
             "backend", "option")
_DEFAULTS_DEST = "_mask_defaults"
# ends every help text: ArgumentDefaultsHelpFormatter then adds nothing (the text already gives the
# command's default; the argparse default is UNSET), and "%(default).0s" itself prints nothing
_NO_DEFAULT = "%(default).0s"


class _Unset:
    """The default of every mask flag: "not on the command line" (``--topp none`` gives None)."""

    def __repr__(self) -> str:
        return "UNSET"


#: what ``args.<flag>`` holds when a mask flag was not given
UNSET = _Unset()


def optional_float(text: str) -> float | None:
    """argparse type: a finite float, or "none" for None."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number or 'none', got {text!r}")
    return value


def parse_option_value(text: str) -> Any:
    """A ``--option`` value: int, finite float, none, true / false, comma list of ints, else the word.

    >>> [parse_option_value(t) for t in ("3", "0.5", "none", "True", "4,4,4", "tiled")]
    [3, 0.5, None, True, (4, 4, 4), 'tiled']
    """
    t = text.strip()
    low = t.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            value = kind(t)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"value {text!r} is not a finite number")
        return value
    if "," in t:
        try:
            return tuple(int(x) for x in t.split(","))
        except ValueError:
            raise ValueError(f"a list value must be comma-separated ints, got {text!r}") from None
    if not t:
        raise ValueError("empty value")
    return t


def parse_option(text: str) -> tuple[str, Any]:
    """argparse type of ``--option``: ``"KEY=VALUE"`` -> ``(key, value)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. topk=0.05 or tile=4,4,4), got {text!r}")
    try:
        return key, parse_option_value(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{key}: {exc}") from None


def int_at_least(minimum: int):
    """argparse type: an int >= ``minimum`` (the error says what was expected)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False, none: bool = False):
    """argparse type: a finite float in the range [low, high] (``low_open`` / ``high_open``
    exclude an end; None = unbounded), or "none" for None when ``none``."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (low is not None or high is not None) else ""
    expected = f"a finite number{where}" + (" or 'none'" if none else "")

    def parse(text: str) -> float | None:
        if none and text.strip().lower() == "none":
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        bad = (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
               or (high is not None and (value >= high if high_open else value > high)))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = int_at_least(1)


def add_mask_arguments(parser: argparse.ArgumentParser, defaults: SparseConfig | None = None, *,
                       title: str = "sparse attention") -> argparse._ArgumentGroup:
    """Add the mask flags (module docstring) to ``parser`` in an argument group named ``title``.

    ``defaults``: the command's :class:`SparseConfig` (default ``SparseConfig()``); the help
    text shows its values. Returns the group (to add command-specific mask flags to it).
    """
    d = SparseConfig() if defaults is None else defaults
    if not isinstance(d, SparseConfig):
        raise TypeError(f"defaults must be a SparseConfig, got {type(d).__name__}")
    opts = d.resolved_options()
    g = parser.add_argument_group(title, f"defaults: {d.describe()}, backend {d.backend}")
    g.add_argument("--method", default=UNSET, metavar="NAME",
                   help=f"masker: {', '.join(available())} (default {d.method})" + _NO_DEFAULT)
    g.add_argument("--topk", type=optional_float, default=UNSET, metavar="K",
                   help=f"Top-k fraction of key blocks, or 'none' (default {opts.get('topk', '-')})" + _NO_DEFAULT)
    g.add_argument("--topp", type=optional_float, default=UNSET, metavar="P",
                   help=f"Top-p attention mass, or 'none' for Top-k only (default {opts.get('topp', '-')})" + _NO_DEFAULT)
    g.add_argument("--block-q", type=_positive_int, default=UNSET, metavar="N",
                   help=f"tokens per query block, a power of two >= 16 (default {d.block_q})" + _NO_DEFAULT)
    g.add_argument("--block-k", type=_positive_int, default=UNSET, metavar="N",
                   help=f"tokens per key block, a power of two >= 16 (default {d.block_k})" + _NO_DEFAULT)
    g.add_argument("--token-order", choices=TOKEN_ORDERS, default=UNSET,
                   help="raster (the model's frame-major order) or tiled (each query block a compact "
                        f"t x h x w tile; default {opts.get('token_order', 'raster')})" + _NO_DEFAULT)
    g.add_argument("--keep-diagonal", action=argparse.BooleanOptionalAction, default=UNSET,
                   help=f"also keep each query block's own key blocks (default {opts.get('keep_diagonal', False)})" + _NO_DEFAULT)
    g.add_argument("--keep-sink", action=argparse.BooleanOptionalAction, default=UNSET,
                   help=f"also keep the first key block (default {opts.get('keep_sink', False)})" + _NO_DEFAULT)
    g.add_argument("--backend", choices=("auto", *BACKENDS), default=UNSET, help=f"attention backend (default {d.backend})" + _NO_DEFAULT)
    g.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any masker option, repeatable; VALUE: int, float, none, true/false, ints like 4,4,4, or a word" + _NO_DEFAULT)
    parser.set_defaults(**{_DEFAULTS_DEST: d})
    return g


def _apply(parser: argparse.ArgumentParser, flag: str, cfg: SparseConfig, **changes: Any) -> SparseConfig:
    try:
        return cfg.replace(**changes)
    except (ValueError, TypeError) as exc:
        message = str(exc).removeprefix("SparseConfig.options: ").removeprefix("SparseConfig.")
    parser.error(f"{flag}: {message}")  # exits with code 2


def sparse_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, *,
                            defaults: SparseConfig | None = None) -> SparseConfig:
    """The :class:`SparseConfig` of parsed mask flags (see the module docstring for the order).

    ``defaults`` replaces the config given to :func:`add_mask_arguments` (for a command whose
    defaults depend on another flag, such as a smoke mode). Calls ``parser.error`` (exit code 2)
    naming the flag for any value the masker or the config refuses.
    """
    cfg = defaults if defaults is not None else getattr(args, _DEFAULTS_DEST, None)
    if cfg is None:
        raise ValueError("sparse_config_from_args: call add_mask_arguments(parser, ...) before parse_args")
    if args.method is not UNSET:
        if args.method not in available():
            parser.error(f"--method: unknown masker {args.method!r}; available: {', '.join(available())}")
        cfg = _apply(parser, "--method", cfg, method=args.method)
    for flag, name in (("--topk", "topk"), ("--topp", "topp"), ("--token-order", "token_order"),
                       ("--keep-diagonal", "keep_diagonal"), ("--keep-sink", "keep_sink")):
        if getattr(args, name) is not UNSET:
            cfg = _apply(parser, flag, cfg, **{name: getattr(args, name)})
    for key, value in args.option:
        if key in _NOT_OPTIONS:
            hint = f" (use --{key.replace('_', '-')})" if key in ("method", "block_q", "block_k", "backend") else ""
            parser.error(f"--option {key}: {key} is a SparseConfig field, not a masker option{hint}")
        cfg = _apply(parser, f"--option {key}", cfg, **{key: value})
    for flag, name in (("--block-q", "block_q"), ("--block-k", "block_k"), ("--backend", "backend")):
        if getattr(args, name) is not UNSET:
            cfg = _apply(parser, flag, cfg, **{name: getattr(args, name)})
    return cfg


_NOT_OPTIONS = ("method", "options", "layer_options", "block_q", "block_k", "dense_steps", "dense_layers", "backend",
                "collect_stats")
