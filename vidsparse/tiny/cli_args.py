"""Command-line pieces shared by ``vidsparse demo`` and ``vidsparse eval``.

argparse types that name what they expect, the ``NAME:key=value,...`` setting syntax turned into
a :class:`vidsparse.SparseConfig`, and the checks that run before any work: model folders (via
:func:`vidsparse.utils.check_model_dir`), output paths, the video extra, the sampler settings.
Every check raises ``ValueError`` (or calls ``parser.error``) with one line naming the flag.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli_options import float_in, int_at_least

__all__ = [
    "int_at_least", "positive_int", "nonneg_int", "seed_int", "finite_float", "positive_float", "fraction_or_none",
    "block_size", "parse_setting", "setting_name", "or_exit", "load_model", "require_video_extra",
    "sampler_settings",
]


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2**32)."""
    value = nonneg_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be < 2**32, got {value}")
    return value


#: argparse type: a finite float (:func:`vidsparse.cli_options.float_in`)
finite_float = float_in()
#: argparse type: a finite float > 0
positive_float = float_in(0, low_open=True)


def fraction_or_none(text: str) -> float | None:
    """argparse type of --topk / --topp: a float in (0, 1], or 'none' to switch the rule off."""
    from .._validation import parse_fraction

    try:
        return parse_fraction(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def block_size(text: str) -> int:
    """argparse type: a block size (a power of two >= 16, :func:`vidsparse.mask.check_block_size`)."""
    from ..mask import check_block_size

    value = positive_int(text)
    try:
        check_block_size("the block size", value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


# ----------------------------------------------------------------------------------------------
# SparseConfig from text

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _setting_value(key: str, text: str, default: Any) -> Any:
    """A ``--setting`` ``key=value`` text value, typed after ``default`` (the option's or field's default).

    Not :func:`vidsparse.cli_options.parse_option_value` (``--option``'s): ``,`` separates the
    keys of a setting, so tuples are written ``AxBxC``, and a value takes its default's type
    (``yes`` for a bool, ``1`` for a float).

    "none" / "null" -> None; bools: true/false/yes/no/on/off/1/0; ints and floats as such;
    tuples (and list fields) as ``AxBxC`` (e.g. ``tile=2x4x4``); a default of None takes an int,
    a float, an ``AxB`` tuple or else the text. SparseConfig validates the result.

    Raises:
        ValueError: "KEY: expected ..., got 'TEXT'".
    """
    t = text.strip()
    if t.lower() in ("none", "null"):
        return None
    if isinstance(default, bool):
        if t.lower() in _TRUE + _FALSE:
            return t.lower() in _TRUE
        raise ValueError(f"{key}: expected true or false, got {text!r}")
    if isinstance(default, (tuple, list)) or (default is None and "x" in t and t.replace("x", "").isdigit()):
        try:
            return tuple(int(p) for p in t.split("x")) if t else ()
        except ValueError:
            raise ValueError(f"{key}: expected integers joined by 'x' (e.g. 2x4x4), got {text!r}") from None
    if isinstance(default, int) or default is None:
        try:
            return int(t)
        except ValueError:
            if isinstance(default, int):
                raise ValueError(f"{key}: expected an integer, got {text!r}") from None
    if isinstance(default, float) or default is None:
        try:
            return float(t)
        except ValueError:
            if isinstance(default, float):
                raise ValueError(f"{key}: expected a number or 'none', got {text!r}") from None
    return t


def _defaults(method: str) -> dict[str, Any]:
    """The defaults of ``method``'s options, the common options and SparseConfig's fields."""
    import dataclasses

    from .. import maskers
    from ..config import SparseConfig

    fields = {f.name: getattr(SparseConfig(), f.name) for f in dataclasses.fields(SparseConfig)}
    fields.pop("options")
    return {**fields, **maskers.COMMON_OPTIONS, **maskers.get(method).defaults}


def parse_setting(text: str, base: "SparseConfig") -> tuple[str, "SparseConfig"]:
    """``NAME:key=value,...`` -> (NAME, SparseConfig).

    Keys are ``method``, any option of that masker (or of every masker: ``token_order``, ``tile``,
    ``keep_sink``, ``keep_diagonal``, ``window``) and SparseConfig's fields (``block_q``,
    ``block_k``, ``dense_steps``, ``dense_layers``, ``backend``); ``-`` may stand for ``_``.
    Fields and common options not given come from ``base`` (the command's --block-q, --backend,
    ...); the masker's own options not given take its defaults (``SparseConfig()``'s: hybrid
    topk 0.03, topp 0.2).

    Raises:
        ValueError: one line starting with ``--setting 'TEXT':``.
    """
    from .. import maskers
    from ..config import SparseConfig

    name, sep, body = text.partition(":")
    name = name.strip()
    where = f"--setting {text!r}"
    if not sep or not name:
        raise ValueError(f"{where}: expected NAME:key=value,... (e.g. fast:topk=0.05,topp=none)")
    if name == "dense":
        raise ValueError(f"{where}: the name 'dense' is reserved for the dense baseline")
    given: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"{where}: expected key=value, got {part!r}")
        if key in given:
            raise ValueError(f"{where}: {key} given twice")
        given[key] = value
    method = given.pop("method", base.method).strip()
    try:
        defaults = _defaults(method)
    except ValueError as e:
        raise ValueError(f"{where}: method: {e}") from None
    known = set(defaults) - {"collect_stats", "layer_options", "method"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for method {method!r} (known: method, "
                         f"{', '.join(sorted(known))})")
    try:
        values = {k: _setting_value(k, v, defaults[k]) for k, v in given.items()}
        common = {k: v for k, v in base.options.items() if k in maskers.COMMON_OPTIONS}  # given, not defaults
        fields = {k: getattr(base, k) for k in ("block_q", "block_k", "dense_steps", "dense_layers", "backend")}
        return name, SparseConfig(method=method, options=common, **fields).replace(**values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def setting_name(cfg: "SparseConfig | None") -> str:
    """A row name: "dense", the method ("topk" / "topp" for hybrid with one rule off), and
    "+diagonal" / "+sink" for the priors that are on."""
    if cfg is None:
        return "dense"
    opts = cfg.resolved_options()
    name = cfg.method
    if name == "hybrid" and (opts["topk"] is None) != (opts["topp"] is None):
        name = "topk" if opts["topp"] is None else "topp"
    return name + "".join("+" + k.removeprefix("keep_") for k in ("keep_diagonal", "keep_sink") if opts.get(k))


# ----------------------------------------------------------------------------------------------
# Checks before any work


def or_exit(parser: argparse.ArgumentParser, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with a ValueError / TypeError / MissingDependencyError turned into
    ``parser.error`` (one line, exit code 2)."""
    from .._optional import MissingDependencyError

    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError, MissingDependencyError) as e:
        parser.error(str(e))


def load_model(parser: argparse.ArgumentParser, flag: str, path: Path, **kwargs):
    """:func:`vidsparse.tiny.model.load_tiny_wan` (safetensors only), a failure one parser error
    naming ``flag`` and the folder (the folder was checked by ``check_model_dir`` before)."""
    from .model import load_tiny_wan

    try:
        return load_tiny_wan(path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        parser.error(f"{flag} {path}: the model does not load ({first})")


def require_video_extra() -> None:
    """The packages the demo writes videos and computes SSIM with, or MissingDependencyError
    naming ``pip install 'vidsparse[video]'``."""
    from .._optional import require

    for module in ("torchmetrics", "imageio", "PIL", "matplotlib"):
        require(module, "video")


def sampler_settings(model_dir: Path, *, guidance_scale, guidance_interval, eta, shift) -> dict:
    """The sampler settings of ``model_dir``'s sampling.json with the flags given in their place
    (:func:`vidsparse.tiny.flow.resolve_sampler`); ValueError naming the flags."""
    from .flow import resolve_sampler
    from .model import load_sampling_defaults

    try:
        return resolve_sampler(load_sampling_defaults(model_dir), guidance_scale=guidance_scale,
                               guidance_interval=guidance_interval, eta=eta, shift=shift)
    except ValueError as e:
        raise ValueError(f"--guidance-scale / --guidance-interval / --eta (default: the model's sampling.json): {e}") \
            from None
