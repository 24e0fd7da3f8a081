"""Model families: everything that differs between Wan, CogVideoX and HunyuanVideo in training.

One small class per family, behind one interface (:class:`Family`), chosen from the transformer
class (:func:`family_class`). A family knows

* the **diffusion convention** of its scheduler: the noisy input ``noisy(x0, noise, t)``, the
  network's training target ``target(x0, noise, t)`` and the ``timestep`` the transformer
  receives, for a training time t in (0, 1) (t = 0 data, t = 1 noise);
* how to **call the transformer** (:meth:`Family.forward`) with its own condition tensors, latent
  layout and extra inputs (CogVideoX's rotary embeddings, HunyuanVideo's guidance);
* the **token grid**, channels and condition widths of a model config (to check data against it);
* how to use the **pipeline**: encode prompts (``pipe.encode_prompt``) into the condition tensors,
  encode and normalise pixel video with its VAE, and sample clean latents.

Conventions (all latents are (B, C, F, H, W) here, whatever the transformer's own layout):

============  ===============================================  ===============================
family        x_t and target                                   timestep; extra inputs
============  ===============================================  ===============================
Wan           x_t = (1 - t) x0 + t noise, v = noise - x0       1000 t; encoder_hidden_states
HunyuanVideo  same (flow matching)                             1000 t; + encoder_attention_mask,
                                                               pooled_projections, guidance
CogVideoX     x_t = sqrt(a) x0 + sqrt(1 - a) noise,            integer n = floor(1000 t),
              v = sqrt(a) noise - sqrt(1 - a) x0,              a = alphas_cumprod[n] of its DDIM
              (v-prediction)                                   scheduler; latents (B, F, C, H, W)
============  ===============================================  ===============================

Flow families take their default time shift from the scheduler config (``flow_shift`` of UniPC /
DPM-Solver with flow sigmas, ``shift`` of FlowMatchEulerDiscreteScheduler). A Wan 2.2 pipeline
has two experts: ``transformer`` denoises t >= ``boundary_ratio``, ``transformer_2`` the rest;
the family of one expert carries its ``component`` and restricts t to its range (:meth:`restrict`).
VAE latents: Wan ``(z - latents_mean) / latents_std``; CogVideoX and HunyuanVideo
``z * scaling_factor``, with z the posterior mean (deterministic).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import ClassVar

import torch

from .flow import model_timestep, noisy_sample, velocity_target

__all__ = ["Family", "WanFamily", "CogVideoXFamily", "HunyuanVideoFamily", "FAMILIES", "EXPERTS",
           "family_class", "family_for_model", "ModelSpec", "resolve_model", "call_default"]

#: what ``--expert`` may name (Wan 2.2 pipelines)
EXPERTS = ("high", "low")


def call_default(pipe, name: str):
    """The default of the ``__call__`` argument ``name`` of a pipeline (object or class); None if none."""
    cls = pipe if isinstance(pipe, type) else type(pipe)
    param = inspect.signature(cls.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    # diffusers keeps norms and embedders in fp32 under half precision; the output projection shows the real dtype
    inner = getattr(model, "module", model)
    proj = getattr(inner, "proj_out", None)
    return proj.weight.dtype if isinstance(proj, torch.nn.Linear) else next(model.parameters()).dtype


def _cast(cond: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}


class Family:
    """The conventions of one model family (one component of its pipeline).

    Args:
        scheduler_config: the pipeline scheduler's config dict (``scheduler_config.json``, with its
            ``_class_name``); None when there is no pipeline (flow families then use shift 1).
        component: the pipeline component trained ("transformer", or "transformer_2" for the
            low-noise expert of Wan 2.2).
        t_range: (lo, hi): training times are mapped into this range (an expert's share of t).
        guidance: HunyuanVideo's embedded guidance scale (others ignore it).
    """

    name: ClassVar[str]
    transformer_class: ClassVar[str]
    #: condition tensors in the latents format, in order
    conditions: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)

    def __init__(self, scheduler_config: dict | None = None, *, component: str = "transformer",
                 t_range: tuple[float, float] = (0.0, 1.0), guidance: float | None = None):
        lo, hi = t_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1, got {t_range}")
        self.scheduler_config = dict(scheduler_config or {})
        self.component, self.t_range, self.guidance = component, (float(lo), float(hi)), guidance

    def __repr__(self) -> str:
        return f"{type(self).__name__}(component={self.component!r}, t_range={self.t_range}, shift={self.shift:g})"

    # ------------------------------------------------------------------ diffusion convention
    @property
    def shift(self) -> float:
        """Default time shift for training times (1 = none)."""
        return 1.0

    def restrict(self, t: torch.Tensor) -> torch.Tensor:
        """Map times t in (0, 1) linearly into ``t_range`` (identity for the full range)."""
        lo, hi = self.t_range
        return t if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * t

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) times in (0, 1) -> the transformer's ``timestep`` argument."""
        return model_timestep(t)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, F, H, W) from clean latents, noise (same shape) and t (B,)."""
        return noisy_sample(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at x_t (the diffusion loss's target)."""
        return velocity_target(x0, noise)

    def forward(self, model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """One network call: x_t (B, C, F, H, W), t (B,), condition tensors -> output like x_t.

        Floating inputs are cast to the model's dtype; the output comes back in x_t's dtype.
        """
        dtype = _model_dtype(model)
        out = model(hidden_states=x_t.to(dtype), timestep=self.timestep(t), **_cast(self.extra_inputs(cond, x_t), dtype))
        return out.sample.to(x_t.dtype)

    def extra_inputs(self, cond: dict, x_t: torch.Tensor) -> dict:
        """The forward's keyword arguments besides hidden_states and timestep."""
        return cond

    # ------------------------------------------------------------------ shapes
    @staticmethod
    def channels(config) -> int:
        return config["in_channels"]

    def condition_widths(self, config) -> dict[str, int]:
        """Last dimension of every condition tensor the model expects."""
        return {"encoder_hidden_states": config["text_dim"]}

    def grid(self, config, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Token grid (T, H, W) of one item of latents (C, F, H, W); ValueError if not divisible."""
        _, f, h, w = latent_shape
        pt, ph, pw = self.patch(config)
        for name, size, p in (("latent frames", f, pt), ("latent height", h, ph), ("latent width", w, pw)):
            if size % p:
                raise ValueError(f"{name} {size} is not divisible by the model's patch size {p}")
        return f // pt, h // ph, w // pw

    @staticmethod
    def patch(config) -> tuple[int, int, int]:
        return tuple(config["patch_size"])

    # ------------------------------------------------------------------ pipeline I/O
    def encode_text(self, pipe, prompts: list[str], device) -> dict[str, torch.Tensor]:
        """Condition tensors (batch first) of ``prompts``, as the pipeline's ``__call__`` makes them."""
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                       max_sequence_length=call_default(pipe, "max_sequence_length"))
        return {"encoder_hidden_states": embeds}

    def pipeline_inputs(self, cond: dict) -> dict:
        """Condition tensors -> the pipeline ``__call__``'s prompt-embedding arguments."""
        return {"prompt_embeds": cond["encoder_hidden_states"]}

    def sample(self, pipe, cond: dict, *, generators: list, steps: int, guidance: float,
               height: int, width: int, num_frames: int) -> torch.Tensor:
        """Clean latents (B, C, F, H, W) float32 sampled by the pipeline with its own scheduler."""
        out = pipe(**self.pipeline_inputs(cond), height=height, width=width, num_frames=num_frames,
                   num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="latent")
        return self.from_pipeline_layout(out.frames).float()

    def from_pipeline_layout(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def encode_video(self, pipe, video: torch.Tensor) -> torch.Tensor:
        """Pixel video (B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, F', H', W') float32."""
        vae = pipe.vae
        z = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode().float()
        return self.normalise(vae.config, z)

    def normalise(self, vae_config, z: torch.Tensor) -> torch.Tensor:
        return z * vae_config["scaling_factor"]

    @staticmethod
    def default_geometry(pipe) -> dict[str, int]:
        """height, width, num_frames the pipeline uses by default."""
        return {k: call_default(pipe, k) for k in ("height", "width", "num_frames")}


class _FlowShift:
    """Flow families: the time shift of the pipeline's scheduler."""

    @property
    def shift(self) -> float:
        cfg = self.scheduler_config
        value = cfg.get("flow_shift") if cfg.get("use_flow_sigmas", "flow_shift" in cfg) else None
        return float(value if value is not None else cfg.get("shift", 1.0))


class WanFamily(_FlowShift, Family):
    """Wan 2.1 / 2.2 (``WanTransformer3DModel``); also the embedded tiny model (no scheduler)."""

    name, transformer_class = "wan", "WanTransformer3DModel"

    def normalise(self, vae_config, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae_config["latents_mean"], dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(vae_config["latents_std"], dtype=z.dtype, device=z.device).view(shape)
        return (z - mean) / std


class HunyuanVideoFamily(_FlowShift, Family):
    """HunyuanVideo (``HunyuanVideoTransformer3DModel``): Llama text tokens with their mask, a
    pooled CLIP embedding and, for guidance-distilled models, the embedded guidance 1000 * g."""

    name, transformer_class = "hunyuan_video", "HunyuanVideoTransformer3DModel"
    conditions = ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections")
    #: the pipeline's default guidance_scale
    DEFAULT_GUIDANCE = 6.0

    def extra_inputs(self, cond: dict, x_t: torch.Tensor) -> dict:
        g = self.DEFAULT_GUIDANCE if self.guidance is None else self.guidance
        return {**cond, "guidance": torch.full((x_t.shape[0],), 1000.0 * g, device=x_t.device)}

    def condition_widths(self, config) -> dict[str, int]:
        return {"encoder_hidden_states": config["text_embed_dim"], "pooled_projections": config["pooled_projection_dim"]}

    @staticmethod
    def patch(config) -> tuple[int, int, int]:
        return config["patch_size_t"], config["patch_size"], config["patch_size"]

    def encode_text(self, pipe, prompts: list[str], device) -> dict[str, torch.Tensor]:
        embeds, pooled, mask = pipe.encode_prompt(prompts, device=device,
                                                  max_sequence_length=call_default(pipe, "max_sequence_length"))
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask.long(), "pooled_projections": pooled}

    def pipeline_inputs(self, cond: dict) -> dict:
        return {"prompt_embeds": cond["encoder_hidden_states"], "prompt_attention_mask": cond["encoder_attention_mask"],
                "pooled_prompt_embeds": cond["pooled_projections"]}


class CogVideoXFamily(Family):
    """CogVideoX (``CogVideoXTransformer3DModel``): v-prediction on its DDIM scheduler's
    ``alphas_cumprod`` at integer timesteps, latents (B, F, C, H, W) inside the transformer, and
    3-D rotary embeddings computed as ``CogVideoXPipeline`` does when the config uses them."""

    name, transformer_class = "cogvideox", "CogVideoXTransformer3DModel"

    def __init__(self, scheduler_config: dict | None = None, **kwargs):
        super().__init__(scheduler_config, **kwargs)
        if not self.scheduler_config:
            raise ValueError("CogVideoX needs its scheduler's config (alphas_cumprod): give a pipeline folder, "
                             "or latents written by vidsparse (their manifest records it)")
        if self.scheduler_config.get("prediction_type") != "v_prediction":
            raise ValueError(f"CogVideoX training expects a v_prediction scheduler, got "
                             f"{self.scheduler_config.get('prediction_type')!r}")
        import diffusers

        cls = getattr(diffusers, self.scheduler_config.get("_class_name", ""), diffusers.CogVideoXDDIMScheduler)
        scheduler = cls.from_config(self.scheduler_config)
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self._rotary_cache: dict = {}

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        n = self.num_train_timesteps
        return (t.double() * n).floor().long().clamp(0, n - 1)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        a = self.alphas_cumprod.to(like.device)[self.timestep(t).to(like.device)]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.sqrt().to(like.dtype).view(shape), (1 - a).sqrt().to(like.dtype).view(shape)

    def noisy(self, x0, noise, t):
        s, r = self._coefficients(t, x0)
        return s * x0 + r * noise

    def target(self, x0, noise, t):
        s, r = self._coefficients(t, x0)
        return s * noise - r * x0

    def forward(self, model, x_t, t, cond):
        dtype = _model_dtype(model)
        config = getattr(model, "module", model).config
        hidden = x_t.permute(0, 2, 1, 3, 4).to(dtype)  # (B, F, C, H, W)
        rotary = self._rotary(config, hidden.shape, x_t.device) if config.use_rotary_positional_embeddings else None
        out = model(hidden_states=hidden, timestep=self.timestep(t).to(x_t.device), image_rotary_emb=rotary,
                    **_cast(cond, dtype)).sample
        return out.permute(0, 2, 1, 3, 4).to(x_t.dtype)

    def _rotary(self, config, shape, device):
        """(cos, sin) of the 3-D rotary embedding for latents (B, F, C, H, W), as the pipeline builds them."""
        key = (tuple(shape[1:]), str(device))
        if key not in self._rotary_cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            p, p_t = config.patch_size, config.patch_size_t
            frames, grid_h, grid_w = shape[1], shape[3] // p, shape[4] // p
            base_w, base_h = config.sample_width // p, config.sample_height // p
            if p_t is None:  # CogVideoX 1.0
                crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
                freqs = get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops,
                                                grid_size=(grid_h, grid_w), temporal_size=frames, device=device)
            else:  # CogVideoX 1.5
                freqs = get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None,
                                                grid_size=(grid_h, grid_w), temporal_size=(frames + p_t - 1) // p_t,
                                                grid_type="slice", max_size=(base_h, base_w), device=device)
            self._rotary_cache[key] = freqs
        return self._rotary_cache[key]

    def condition_widths(self, config) -> dict[str, int]:
        return {"encoder_hidden_states": config["text_embed_dim"]}

    @staticmethod
    def patch(config) -> tuple[int, int, int]:
        return config.get("patch_size_t") or 1, config["patch_size"], config["patch_size"]

    def from_pipeline_layout(self, latents):
        return latents.permute(0, 2, 1, 3, 4)  # the pipeline's (B, F, C, H, W) -> (B, C, F, H, W)

    @staticmethod
    def default_geometry(pipe) -> dict[str, int]:
        cfg, s = pipe.transformer.config, pipe.vae_scale_factor_spatial
        return {"height": cfg.sample_height * s, "width": cfg.sample_width * s, "num_frames": cfg.sample_frames}


#: family name -> class
FAMILIES: dict[str, type[Family]] = {c.name: c for c in (WanFamily, CogVideoXFamily, HunyuanVideoFamily)}


def family_class(transformer_class: str) -> type[Family]:
    """The family of a diffusers transformer class name; ValueError naming the supported ones."""
    for cls in FAMILIES.values():
        if cls.transformer_class == transformer_class:
            return cls
    supported = ", ".join(c.transformer_class for c in FAMILIES.values())
    raise ValueError(f"{transformer_class or 'this model'} is not a supported transformer (supported: {supported})")


def family_for_model(model: torch.nn.Module, scheduler_config: dict | None = None) -> Family:
    """The family of a model object (no pipeline: flow families use shift 1)."""
    inner = getattr(model, "module", model)  # DDP
    # FSDP2's fully_shard swaps in a subclass ("FSDP<Name>"): match the first known class of the MRO
    known = {c.transformer_class for c in FAMILIES.values()}
    name = next((c.__name__ for c in type(inner).__mro__ if c.__name__ in known), type(inner).__name__)
    return family_class(name)(scheduler_config)


# ---------------------------------------------------------------------------------------------- --model


class ModelSpec:
    """What ``--model`` names, resolved from its JSON files before any weight is loaded.

    Attributes:
        pipeline_dir: the pipeline folder (model_index.json), or None for a transformer folder.
        transformer_dir: the folder of the transformer to distil (``transformer`` or, for
            ``--expert low``, ``transformer_2`` of a pipeline).
        transformer_config: its config.json. family: its :class:`Family` (with the scheduler's
            conventions and the expert's time range). boundary_ratio: Wan 2.2's switch point, or None.
    """

    def __init__(self, pipeline_dir, transformer_dir, transformer_config, family, boundary_ratio):
        self.pipeline_dir, self.transformer_dir = pipeline_dir, transformer_dir
        self.transformer_config, self.family, self.boundary_ratio = transformer_config, family, boundary_ratio

    def pipeline_class(self):
        """The diffusers pipeline class named in model_index.json."""
        import diffusers

        name = _read_json(self.pipeline_dir / "model_index.json", "--model").get("_class_name", "")
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ValueError(f"--model {self.pipeline_dir}: model_index.json names no diffusers pipeline ({name!r})")
        return cls

    def default_geometry(self) -> dict[str, int]:
        """The pipeline's default height, width and num_frames, from its JSON files only."""
        cls = self.pipeline_class()
        if self.family.name == "cogvideox":  # its __call__ defaults come from the configs
            vae = _read_json(self.pipeline_dir / "vae" / "config.json", "--model")
            s, cfg = 2 ** (len(vae["block_out_channels"]) - 1), self.transformer_config
            return {"height": cfg["sample_height"] * s, "width": cfg["sample_width"] * s, "num_frames": cfg["sample_frames"]}
        return {k: call_default(cls, k) for k in ("height", "width", "num_frames")}


def _read_json(path: Path, flag: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{flag} {path.parent}: no {path.name} there") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag} {path.parent}: {path.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {path.parent}: {path.name} must hold a JSON object")
    return data


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _expert_choice(index: dict, path: Path, expert: str | None) -> tuple[str, tuple[float, float], float | None]:
    """(component, t_range, boundary_ratio) of a pipeline for ``--expert``."""
    boundary = index.get("boundary_ratio")
    two = boundary is not None and _present(index, "transformer") and _present(index, "transformer_2")
    if expert is not None and expert not in EXPERTS:
        raise ValueError(f"--expert must be one of {EXPERTS}, got {expert!r}")
    if not two:
        if expert is not None:
            raise ValueError(f"--expert {expert}: {path} is not a two-expert (Wan 2.2) pipeline "
                             "(its model_index.json has no transformer_2 and boundary_ratio)")
        if not _present(index, "transformer"):
            raise ValueError(f"--model {path}: the pipeline has no transformer")
        return "transformer", (0.0, 1.0), boundary
    if (expert or "high") == "high":
        return "transformer", (float(boundary), 1.0), float(boundary)
    return "transformer_2", (0.0, float(boundary)), float(boundary)


def resolve_model(path, *, expert: str | None = None, manifest: dict | None = None,
                  guidance: float | None = None) -> ModelSpec:
    """Resolve ``--model`` (a pipeline or a transformer folder) and ``--expert``.

    A pipeline folder gives the scheduler config and, for Wan 2.2, the experts (``expert`` None =
    "high", the ``transformer``). A transformer folder takes the scheduler config and
    boundary_ratio from ``manifest`` (a latents folder's manifest), if given.

    Raises:
        ValueError: naming ``--model`` / ``--expert`` and what is wrong, before any weight is read.
    """
    from ..utils import check_model_dir

    where = Path(path)
    if (where / "model_index.json").is_file():
        index = _read_json(where / "model_index.json", "--model")
        component, t_range, boundary = _expert_choice(index, where, expert)
        scheduler = _read_json(where / "scheduler" / "scheduler_config.json", "--model") if (where / "scheduler").is_dir() else {}
        pipeline_dir, transformer_dir = where, check_model_dir(where / component, "--model")
    else:
        transformer_dir, pipeline_dir = check_model_dir(where, "--model"), None
        scheduler = dict((manifest or {}).get("scheduler") or {})
        boundary = (manifest or {}).get("boundary_ratio")
        component, t_range = "transformer", (0.0, 1.0)
        if expert is not None:
            if boundary is None:
                raise ValueError(f"--expert {expert}: needs a Wan 2.2 pipeline folder as --model, or latents made from one")
            component, t_range = ("transformer", (boundary, 1.0)) if expert == "high" else ("transformer_2", (0.0, boundary))
    config = _read_json(transformer_dir / "config.json", "--model")
    try:
        cls = family_class(config.get("_class_name", ""))
        family = cls(scheduler, component=component, t_range=t_range, guidance=guidance)
    except ValueError as exc:
        raise ValueError(f"--model {where}: {exc}") from None
    return ModelSpec(pipeline_dir, transformer_dir, config, family, boundary)
