"""The embedded tiny video diffusion model: a diffusers ``WanTransformer3DModel`` in pixel space.

Default configuration (:func:`tiny_wan_config`):

* input / output (B, 3, 16, 64, 64) RGB video in [-1, 1] (no VAE);
* patch (1, 4, 4) -> a 16 x 16 x 16 token grid = 4096 tokens, frame-major (t, h, w) order;
* 5 blocks, 4 heads x head dim 64 (dim 256; our kernels need head dim 64), FFN 1024;
* cross-attention to the (B, 7, 128) attribute embedding of :mod:`vidsparse.tiny.data`;
* 5.9 M parameters, 11.9 MB as fp16 safetensors.

It follows the rectified-flow conventions of :mod:`vidsparse.tiny.flow` and is trained by
:mod:`vidsparse.tiny.pretrain`. diffusers is imported only inside the functions.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import WanTransformer3DModel

__all__ = [
    "PARAM_BUDGET_BYTES",
    "tiny_wan_config",
    "build_tiny_wan",
    "load_tiny_wan",
    "SAMPLING_DEFAULTS",
    "load_sampling_defaults",
    "default_weights_dir",
    "count_parameters",
    "fp16_bytes",
    "token_grid",
    "describe_model",
]

#: the shipped fp16 weights must fit in this many bytes (15 MB)
PARAM_BUDGET_BYTES = 15_000_000

_TINY_WAN = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=128,  # = ShapesConfig.text_dim
    freq_dim=256,
    ffn_dim=1024,
    num_layers=5,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=256,  # >= every post-patch grid side we use; RoPE tables are not saved
)


def _wan_class():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


def tiny_wan_config(**overrides: Any) -> dict[str, Any]:
    """The tiny model's ``WanTransformer3DModel`` keyword arguments, with ``overrides`` applied.

    Raises:
        ValueError: an override that is not a ``WanTransformer3DModel`` argument.
    """
    config = dict(_TINY_WAN)
    if overrides:
        valid = set(inspect.signature(_wan_class().__init__).parameters) - {"self"}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown WanTransformer3DModel argument(s) {unknown}; valid: {sorted(valid)}")
        config.update(overrides)
    return config


def token_grid(config: dict[str, Any], frames: int = 16, height: int = 64, width: int = 64) -> tuple[int, int, int]:
    """Post-patch (T', H', W') token grid of a clip; the sequence length is their product.

    Raises:
        ValueError: a clip dimension not divisible by the patch size.
    """
    pt, ph, pw = config["patch_size"]
    for name, size, p in (("frames", frames, pt), ("height", height, ph), ("width", width, pw)):
        if size % p:
            raise ValueError(f"{name}={size} is not divisible by the patch size {p}")
    return frames // pt, height // ph, width // pw


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (what an fp16 export stores at 2 bytes each)."""
    return sum(p.numel() for p in model.parameters())


def _init_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """DiT-style initialisation (ours; diffusers leaves PyTorch defaults).

    Xavier-uniform linear and patch weights with zero biases, N(0, 0.02) condition embedders, and a
    zero output projection so the untrained model predicts v = 0 and training starts stable.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                if name.startswith("condition_embedder."):
                    torch.nn.init.normal_(module.weight, std=0.02, generator=generator)
                else:
                    torch.nn.init.xavier_uniform_(module.weight, generator=generator)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        w = model.patch_embedding.weight
        torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1), generator=generator)
        torch.nn.init.zeros_(model.patch_embedding.bias)
        torch.nn.init.zeros_(model.proj_out.weight)
        torch.nn.init.zeros_(model.proj_out.bias)


def build_tiny_wan(*, seed: int = 0, **overrides: Any) -> "WanTransformer3DModel":
    """A freshly initialised tiny Wan transformer (float32, CPU, train mode).

    Initialisation is deterministic in ``seed`` and leaves the global RNG untouched.
    ``overrides`` change :func:`tiny_wan_config` entries (e.g. ``num_layers=1`` for tests).
    """
    config = tiny_wan_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the few parameters diffusers draws itself (scale_shift_table)
        model = _wan_class()(**config)
    _init_weights(model, torch.Generator().manual_seed(seed))
    return model


def default_weights_dir() -> Path:
    """Where the shipped weights live: ``vidsparse/tiny/assets/tiny_wan`` (override with $VIDSPARSE_TINY_WAN)."""
    env = os.environ.get("VIDSPARSE_TINY_WAN")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "assets" / "tiny_wan"


def load_tiny_wan(
    path: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> "WanTransformer3DModel":
    """Load a model saved with ``save_pretrained`` (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    Args:
        path: the directory; defaults to :func:`default_weights_dir`. Never downloads.
        device: where to put it.
        dtype: parameter dtype. diffusers keeps its norms, time embedder and modulation tables in
            float32 for half dtypes, as Wan intends.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: no saved model in ``path``.
    """
    path = Path(path) if path is not None else default_weights_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no diffusers model at {path} (expected config.json and diffusion_pytorch_model.safetensors); "
            "train one with `python -m vidsparse.tiny.pretrain` or set $VIDSPARSE_TINY_WAN"
        )
    model = _wan_class().from_pretrained(path, torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    return model.to(device).eval()


#: Sampler settings for the tiny model when its directory has no ``sampling.json`` (or lacks a key)
SAMPLING_DEFAULTS = {"steps": 40, "guidance_scale": 2.0, "guidance_interval": (0.0, 1.0), "eta": 0.0, "shift": 3.0}


def load_sampling_defaults(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Sampler settings saved beside the weights by the trainer (``sampling.json``).

    Returns a dict with ``steps``, ``guidance_scale``, ``guidance_interval`` (a (t_lo, t_hi) tuple),
    ``eta`` and ``shift``: keyword arguments of :func:`vidsparse.tiny.flow.sample`;
    :data:`SAMPLING_DEFAULTS` for missing entries. ``shift`` should match the time shift the model
    was trained with.
    """
    import json

    path = Path(path) if path is not None else default_weights_dir()
    out = dict(SAMPLING_DEFAULTS)
    file = path / "sampling.json"
    if file.is_file():
        saved = json.loads(file.read_text())
        out.update({k: saved[k] for k in SAMPLING_DEFAULTS if k in saved})
    out["guidance_interval"] = tuple(float(v) for v in out["guidance_interval"])
    return out


def fp16_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters stored as fp16 (the safetensors header adds a few KB)."""
    return 2 * count_parameters(model)


def describe_model(model: torch.nn.Module, frames: int = 16, size: int = 64) -> str:
    """One line: layers, heads x head dim, tokens, parameters and fp16 size."""
    cfg = model.config
    grid = token_grid(cfg, frames, size, size)
    return (
        f"WanTransformer3DModel: {cfg['num_layers']} layers, {cfg['num_attention_heads']} heads x "
        f"{cfg['attention_head_dim']}, FFN {cfg['ffn_dim']}, {math.prod(grid)} tokens {grid}, "
        f"{count_parameters(model) / 1e6:.2f} M params ({fp16_bytes(model) / 1e6:.1f} MB fp16)"
    )
