"""Install SpargeAttention2 block-sparse self-attention on diffusers video transformers.

    >>> import vidsparse
    >>> vidsparse.patch(pipe, vidsparse.SparseConfig(topk=0.03, topp=0.2, dense_steps=2))
    >>> video = pipe(prompt_embeds=..., num_inference_steps=50).frames
    >>> vidsparse.unpatch(pipe)            # the exact original processor objects are back

Supported (diffusers 0.42.x): ``WanTransformer3DModel`` (Wan 2.1 and 2.2; both experts of a
Wan 2.2 pipeline), ``CogVideoXTransformer3DModel`` and ``HunyuanVideoTransformer3DModel``.

What is patched, and how
    * Only the video self-attention: Wan's ``blocks[i].attn1`` (cross-attention ``attn2`` stays
      dense and untouched), CogVideoX's ``transformer_blocks[i].attn1`` (joint text+video),
      HunyuanVideo's ``transformer_blocks[i].attn`` then ``single_transformer_blocks[j].attn``
      (joint video+text; the text refiner is untouched). Text tokens in a joint attention are
      always kept as queries and keys; only video->video blocks are sparsified.
    * Per module: each attention module gets its own processor instance, a subclass of the
      stock one that reproduces its projections, norms and RoPE and defers to the stock
      ``__call__`` for any call it does not sparsify. No global state: no monkey-patching, no
      ``set_attention_backend`` (which sets a process-wide default). Layers listed in
      ``SparseConfig.dense_layers`` keep their original processor.
    * One forward pre-hook on each transformer records the latent grid and the step (below).
    * :func:`unpatch` puts the original processor objects back and removes the hook.
    * The patch record travels with the model: ``copy.deepcopy(model)`` (or pickling it) gives
      a patched copy with its own processors, step state and statistics, which
      :func:`unpatch` restores independently of the original.

Step tracking (for ``dense_steps`` and statistics)
    Wan blocks do not pass ``attention_kwargs`` down, so the pre-hook reads the ``timestep``
    argument of every transformer forward: an equal timestep is the same denoising step (the
    second classifier-free-guidance call), a lower one the next step, a higher one a new
    generation (step 0). The two experts of a Wan 2.2 pipeline share one counter. This needs the
    transformer to be called as a module (``model(...)``, as pipelines do). Reading the timestep
    costs one host sync per forward, so it only happens when ``dense_steps > 0`` or
    ``collect_stats``. :func:`reset_steps` forces a new generation.

Changing the model while patched (``fuse_qkv_projections``, ``set_attn_processor``, loading
LoRA processors) replaces or bypasses our processors; patch after such changes.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .._optional import require

diffusers = require("diffusers", "diffusers")  # a clear MissingDependencyError on a base install

from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: E402
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0  # noqa: E402
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from ..config import SparseConfig  # noqa: E402
from ..plan import MaskPlan  # noqa: E402
from ._cogvideox import CogVideoXSparseAttnProcessor, FusedCogVideoXSparseAttnProcessor  # noqa: E402
from ._core import RunState, SparseLayer  # noqa: E402
from ._hunyuan_video import HunyuanVideoSparseAttnProcessor  # noqa: E402
from ._processor import adopt_backend_settings  # noqa: E402
from .context_parallel import check_model as check_context_parallel  # noqa: E402
from ._wan import WanSparseAttnProcessor  # noqa: E402
from .sparse_stats import SparseStats  # noqa: E402

__all__ = [
    "patch",
    "unpatch",
    "stats",
    "is_patched",
    "reset_steps",
    "set_mask_callback",
    "SparseStats",
    "SUPPORTED_MODELS",
]

_TESTED_DIFFUSERS = "0.42."


# ------------------------------------------------------------------------------ architectures
@dataclass(frozen=True)
class _Arch:
    """How to find the self-attention modules, the latent grid and the processor of one model."""

    name: str
    model_cls: type
    # original processor class -> sparse processor class (exact types only)
    processors: dict
    attention_modules: Callable  # model -> list[(layer_index, attention_module)]
    grid: Callable  # (model, hidden_states) -> (T, H, W) latent tokens

    def num_heads(self, attn) -> int:
        return attn.heads


def _wan_modules(model):
    return [(i, blk.attn1) for i, blk in enumerate(model.blocks)]


def _wan_grid(model, hs):
    pt, ph, pw = model.config.patch_size
    _, _, f, h, w = hs.shape  # (B, C, F, H, W)
    return (f // pt, h // ph, w // pw)


def _cog_modules(model):
    return [(i, blk.attn1) for i, blk in enumerate(model.transformer_blocks)]


def _cog_grid(model, hs):
    p, pt = model.config.patch_size, model.config.patch_size_t
    _, f, _, h, w = hs.shape  # (B, F, C, H, W)
    return (f // pt if pt else f, h // p, w // p)


def _hunyuan_modules(model):
    dual = [(i, blk.attn) for i, blk in enumerate(model.transformer_blocks)]
    n = len(dual)
    return dual + [(n + j, blk.attn) for j, blk in enumerate(model.single_transformer_blocks)]


def _hunyuan_grid(model, hs):
    p, pt = model.config.patch_size, model.config.patch_size_t
    _, _, f, h, w = hs.shape  # (B, C, F, H, W)
    return (f // pt, h // p, w // p)


_ARCHS = (
    _Arch("wan", WanTransformer3DModel, {WanAttnProcessor: WanSparseAttnProcessor}, _wan_modules, _wan_grid),
    _Arch(
        "cogvideox",
        CogVideoXTransformer3DModel,
        {
            CogVideoXAttnProcessor2_0: CogVideoXSparseAttnProcessor,
            FusedCogVideoXAttnProcessor2_0: FusedCogVideoXSparseAttnProcessor,
        },
        _cog_modules,
        _cog_grid,
    ),
    _Arch(
        "hunyuan_video",
        HunyuanVideoTransformer3DModel,
        {HunyuanVideoAttnProcessor2_0: HunyuanVideoSparseAttnProcessor},
        _hunyuan_modules,
        _hunyuan_grid,
    ),
)

#: The transformer classes :func:`patch` accepts.
SUPPORTED_MODELS = tuple(a.model_cls for a in _ARCHS)


def _arch_of(model) -> _Arch | None:
    for arch in _ARCHS:
        if isinstance(model, arch.model_cls):
            return arch
    return None


# ------------------------------------------------------------------------------ bookkeeping
@dataclass
class _Patch:
    """What one patched transformer needs to be restored."""

    name: str
    state: RunState
    # (attention module, original processor, installed processor)
    installed: list = field(default_factory=list)
    hook: Any = None


class _PreHook:
    """The forward pre-hook of a patched transformer; it also carries the model's :class:`_Patch`.

    The record lives in the model (in its hooks dict) rather than in a registry beside it, so
    ``copy.deepcopy`` and pickling carry it along, consistently: one deep copy maps the record's
    attention modules, original and installed processors, hook handle and :class:`RunState` to
    the copy's own objects. A copy is therefore patched on its own: it runs sparse with its own
    state and statistics and can be unpatched or re-patched without touching the original.
    """

    def __init__(self, arch_name: str, patch: _Patch):
        self.arch_name, self.patch = arch_name, patch
        self._sig = None

    def __getstate__(self) -> dict:
        return {"arch_name": self.arch_name, "patch": self.patch}  # the signature is rebuilt

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sig = None

    def __call__(self, module, args, kwargs):
        if self._sig is None:
            self._sig = inspect.signature(module.forward)
        try:
            bound = self._sig.bind_partial(*args, **kwargs).arguments
        except TypeError:  # a call the forward itself will reject; let it raise there
            bound = kwargs
        hs = bound.get("hidden_states")
        arch = next(a for a in _ARCHS if a.name == self.arch_name)
        grid = arch.grid(module, hs) if isinstance(hs, torch.Tensor) and hs.dim() == 5 else None
        check_context_parallel(self.arch_name, module, grid, self.patch.state.config)
        self.patch.state.begin_forward(bound.get("timestep"), grid)
        return None


def _patch_of(model: torch.nn.Module) -> _Patch | None:
    """The model's patch record (from its vidsparse pre-hook), or None when it is not patched."""
    for hook in getattr(model, "_forward_pre_hooks", {}).values():
        if isinstance(hook, _PreHook):
            return hook.patch
    return None


def _transformers(target) -> list[tuple[str, torch.nn.Module]]:
    """The (name, transformer) pairs of a transformer or a pipeline (transformer, transformer_2)."""
    if isinstance(target, torch.nn.Module):
        if _arch_of(target) is None:
            raise TypeError(
                f"vidsparse.patch supports {', '.join(c.__name__ for c in SUPPORTED_MODELS)} "
                f"(or a pipeline holding one), got {type(target).__name__}"
            )
        return [("transformer", target)]
    found = []
    for name in ("transformer", "transformer_2"):
        model = getattr(target, name, None)
        if model is None:
            continue
        if _arch_of(model) is None:
            raise TypeError(
                f"the pipeline's {name} is a {type(model).__name__}; vidsparse supports "
                f"{', '.join(c.__name__ for c in SUPPORTED_MODELS)}"
            )
        found.append((name, model))
    if not found:
        raise TypeError(
            f"expected a supported transformer or a pipeline with a .transformer, got {type(target).__name__}"
        )
    return found


def _make_config(config, overrides) -> SparseConfig:
    if config is None:
        return SparseConfig(**overrides)
    if not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a vidsparse.SparseConfig, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


# ---------------------------------------------------------------------------------- public API
def patch(target, config: SparseConfig | None = None, **overrides) -> Any:
    """Install block-sparse self-attention processors on a transformer or a pipeline.

    Args:
        target: a ``WanTransformer3DModel``, ``CogVideoXTransformer3DModel`` or
            ``HunyuanVideoTransformer3DModel``, or a pipeline holding one as ``.transformer``
            (and, for Wan 2.2, ``.transformer_2``: both are patched and share one step counter
            and one statistics log).
        config: a :class:`vidsparse.SparseConfig` (default ``SparseConfig()``: the hybrid masker
            with the paper's k=0.03, p=0.2).
        **overrides: fields or masker options that replace the config's, e.g. ``patch(pipe, topk=0.05)``.
    Returns:
        ``target`` (patched in place).
    Raises:
        TypeError: unsupported model, or an attention module whose processor is not the stock
            one (another library's processor is not silently replaced).
        ValueError: a config value that does not fit the model (per-layer lists, per-head
            tensors, ``dense_layers``); the message names the field.
        RuntimeError: the model is already patched.

    Nothing is changed unless every module can be patched.
    """
    config = _make_config(config, overrides)
    models = _transformers(target)
    for name, model in models:
        if _patch_of(model) is not None:
            raise RuntimeError(f"vidsparse: {name} is already patched; call vidsparse.unpatch first")
    if not diffusers.__version__.startswith(_TESTED_DIFFUSERS):
        warnings.warn(
            f"vidsparse's processors mirror diffusers {_TESTED_DIFFUSERS}x; found {diffusers.__version__}",
            stacklevel=2,
        )

    state = RunState(config)
    plans = []
    for name, model in models:
        arch = _arch_of(model)
        modules = arch.attention_modules(model)
        config.check_layers(len(modules))
        plan = _Patch(name=name, state=state)
        for layer_idx, attn in modules:
            if layer_idx in config.dense_layers:
                continue
            original = attn.processor
            sparse_cls = arch.processors.get(type(original))
            if sparse_cls is None:
                raise TypeError(
                    f"vidsparse: {name} layer {layer_idx} has processor {type(original).__name__}; expected "
                    f"one of {', '.join(c.__name__ for c in arch.processors)} (unpatch other integrations first)"
                )
            options = config.resolved_options(layer_idx, arch.num_heads(attn))
            layer = SparseLayer(state, name, layer_idx, options)
            plan.installed.append((attn, original, sparse_cls(layer, original)))
        plans.append((model, arch, plan))

    for model, arch, plan in plans:  # validated: now apply
        for attn, _original, new in plan.installed:
            attn.set_processor(new)
        plan.hook = model.register_forward_pre_hook(_PreHook(arch.name, plan), with_kwargs=True)
    return target


def unpatch(target) -> SparseStats:
    """Restore the original processor objects and remove the hooks.

    Args:
        target: what was passed to :func:`patch` (or one of its transformers).
    Returns:
        the statistics collected while patched (empty unless ``collect_stats``).
    Raises:
        ValueError: nothing in ``target`` is patched.
    """
    models = [(n, m, _patch_of(m)) for n, m in _transformers(target)]
    models = [x for x in models if x[2] is not None]
    if not models:
        raise ValueError(f"vidsparse: {type(target).__name__} is not patched")
    states = []
    for name, model, plan in models:
        plan.hook.remove()
        for attn, original, installed in plan.installed:
            if attn.processor is not installed:
                warnings.warn(
                    f"vidsparse: {name} layer processor was replaced while patched "
                    f"({type(attn.processor).__name__}); leaving it in place",
                    stacklevel=2,
                )
                continue
            adopt_backend_settings(original, installed)  # e.g. enable_parallelism called while patched
            attn.set_processor(original)
        if plan.state not in states:
            states.append(plan.state)
    return _merged(states)


def is_patched(target) -> bool:
    """Whether any transformer of ``target`` is currently patched by vidsparse."""
    try:
        return any(_patch_of(m) is not None for _, m in _transformers(target))
    except TypeError:
        return False


def _states(target) -> list[RunState]:
    states = []
    for _, model in _transformers(target):
        plan = _patch_of(model)
        if plan is not None and plan.state not in states:
            states.append(plan.state)
    if not states:
        raise ValueError(f"vidsparse: {type(target).__name__} is not patched")
    return states


def _merged(states: list[RunState]) -> SparseStats:
    if len(states) == 1:
        return states[0].stats
    merged = SparseStats()
    for st in states:
        for rec in st.stats.records:
            merged._append(dict(rec))
    return merged


def stats(target) -> SparseStats:
    """Statistics of a patched transformer or pipeline (see :mod:`vidsparse.integrations.sparse_stats`).

    Records are collected only with ``SparseConfig(collect_stats=True)``. The returned object is
    live: it keeps growing while the model runs; ``.clear()`` empties it and
    ``.to_json(path)`` writes it.
    """
    return _merged(_states(target))


def reset_steps(target) -> None:
    """Start step counting afresh: the next forward is step 0 of a new generation."""
    for st in _states(target):
        st.reset_steps()


def set_mask_callback(target, fn: Callable[[dict, MaskPlan], None] | None) -> None:
    """Debug hook: call ``fn(info, plan)`` after every sparse plan is built (None removes it).

    ``plan`` is the :class:`~vidsparse.MaskPlan` that runs over the whole sequence (its
    ``plan.mask`` is in the attention order ``[video; text]``, text last even for CogVideoX;
    ``plan.perm`` maps it to the model's order). ``info`` holds model, layer, step, call,
    generation, n_video, n_text, q_len, k_len, text_first and ``video_plan`` (the masker's plan of
    the video part alone).
    """
    if fn is not None and not callable(fn):
        raise TypeError(f"fn must be callable or None, got {type(fn).__name__}")
    for st in _states(target):
        st.mask_callback = fn

