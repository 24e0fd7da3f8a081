"""Velocity-distillation fine-tuning of a sparse-attention student (SpargeAttention2 §4.2).

Run it as a module (one process, or several with ``torchrun``; the flags are in
:mod:`vidsparse.training.distill_cli`)::

    python -m vidsparse.training.distill --out runs/distill --steps 500 --topk 0.03 --topp 0.2
    torchrun --nproc_per_node 8 -m vidsparse.training.distill --out runs/distill --batch-size 64

The student is a copy of the model with vidsparse's block-sparse self-attention patched in (the
mask is predicted anew at every call, with no gradient through it); the teacher is a frozen copy
with dense attention. Both see the same ``(x_t, t, condition)`` and the loss is

    L = distill_weight * mean((v_student - v_teacher)^2) + diffusion_weight * mean((v_student - (noise - x0))^2)

with ``distill_weight = 1`` and ``diffusion_weight = 0`` by default, as in the paper: the data only
build ``x_t``. ``distill_weight = 0, diffusion_weight = 1`` is plain diffusion-loss fine-tuning of
the sparse model (the paper's ablation; the teacher is then never run).

What is trained (``--trainable``): "all" parameters, only the "attention" modules (attn1/attn2),
or "lora": low-rank adapters injected with ``peft`` (``--lora-rank``, ``--lora-alpha``,
``--lora-targets``) on the attention projections (optionally the FFN too) while the base weights
stay frozen; the exported student has the adapters merged into plain weights.
``--gradient-checkpointing`` recomputes each transformer block in the backward pass (less memory,
about one more forward of compute; the sparse masks are recomputed from the same Q and K).

Defaults that the paper leaves open follow TurboDiffusion's public SLA recipe (AdamW, lr 1e-5,
weight decay 0.01, betas (0.9, 0.999); logit-normal t with mean 1.5, std 1.6), see
``shared/background/spargeattention2.md`` §3. They are TurboDiffusion's values, not the paper's.

Determinism: step ``s`` uses clips ``[s * B, (s + 1) * B)`` of the chosen split and noise / t
from a generator seeded by ``(seed, s)`` drawn for the whole global batch, so a resumed run and a
multi-process run (each rank takes its slice of the global batch) repeat the single-process run.

Output directory layout (only rank 0 writes)::

    out/
      log.jsonl                      one "train" record per log interval
      loss_curve.png
      summary.json
      checkpoints/step-0000100.pt    student, optimizer, scheduler, RNG states, step, configs
      student/                       final student in fp16 (save_pretrained, safetensors; LoRA merged)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..config import SparseConfig
from ..utils import hash_seed, jsonable, resolve_device
from .families import WanFamily, family_for_model
from .flow import TIMESTEP_SAMPLING, sample_timesteps
from .loop import LoopConfig, dist_info, prepare_out, train_loop, uses_bf16
from .lora import LORA_SAVE, LORA_TARGETS, TRAINABLE, add_lora, merged_state_dict, save_adapter, select_trainable
from .optim import make_optimizer, make_scheduler
from .parallel import PARALLEL, full_state_dict, no_grad_sync, shard_model, unwrapped_class

__all__ = [
    "DataSource",
    "load_source",
    "make_source",
    "check_data",
    "DEFAULT_SOURCE",
    "DistillConfig",
    "distill",
    "train_student",
    "distill_loss",
    "make_student_teacher",
    "select_trainable",
    "add_lora",
    "merged_state_dict",
    "main",
]

#: the data source ``vidsparse distill`` uses by default: the tiny harness's shapes clips, named by
#: a string and imported only when used (the core never imports vidsparse.tiny)
DEFAULT_SOURCE = "vidsparse.tiny.source:ShapesSource"
#: what ``precision`` may name
PRECISIONS = ("auto", "bf16", "fp32")
# a random stream tag distinct from pretrain's (0 = train batches, 1 = validation, 2 = samples)
_STREAM_DISTILL = 3


@dataclass
class DistillConfig:
    """Everything a distillation run depends on.

    Attributes:
        out: output directory (see the module docstring).
        model: a diffusers pipeline folder (model_index.json; with ``latents`` or ``prompts``) or
            a transformer folder (Wan, CogVideoX or HunyuanVideo; with ``latents``, or the tiny
            pixel-space model on the shapes clips); None = the embedded tiny model.
        steps: optimizer steps. batch_size: global clips per step (split over ranks, then over
            ``grad_accum`` micro-batches; must be divisible by world_size * grad_accum).
        lr, warmup_steps, min_lr_ratio: peak LR, linear warm-up, cosine decay to min_lr_ratio * lr
            (1.0 = constant after warm-up).
        weight_decay, betas, grad_clip: AdamW and global gradient-norm clipping (0 = off).
        distill_weight, diffusion_weight: weights of the velocity-distillation loss and of the
            flow-matching (diffusion) loss; at least one must be > 0. With distill_weight = 0 the
            teacher is never run and ``vd_loss`` is not logged.
        timesteps, t_mean, t_std, t_shift: see :func:`vidsparse.training.flow.sample_timesteps`;
            ``t_shift`` None = the pipeline scheduler's shift (flow models), else 1.
        trainable: "all" parameters, "attention" (only ``attn1`` / ``attn2`` of every block) or
            "lora" (peft LoRA adapters on ``lora_targets``; the base weights stay frozen).
        lora_rank, lora_alpha: LoRA rank r and scaling alpha (None = r, i.e. scale 1).
        lora_targets: "attention" (to_q, to_k, to_v, to_out.0 of attn1 and attn2) or
            "attention+ffn" (also the two FFN projections).
        gradient_checkpointing: recompute every transformer block in the backward pass.
        lora_save: how the final LoRA student is saved: "merged" (adapters folded into a plain
            diffusers checkpoint) or "adapter" (peft's adapter_config.json +
            adapter_model.safetensors, to load onto the base model).
        parallel: "ddp" (a full replica per rank, gradients all-reduced; one process: no
            wrapper) or "fsdp" (FSDP2 ``fully_shard`` per block and root, bf16 compute copies
            when bf16 is on, checkpoints sharded with torch.distributed.checkpoint).
        sparse: the student's :class:`vidsparse.SparseConfig` (masker, options, blocks, backend;
            default ``SparseConfig()``, hybrid Top-k 0.03 + Top-p 0.2); a dict from
            :meth:`SparseConfig.to_dict` is accepted. Saved beside the exported student as
            ``sparse_config.json``.
        data: "train" or "shifted", the split whose clips build x_0.
        frames, size: clip geometry (the condition width is the model's ``text_dim``).
        latents: a latents folder (:mod:`vidsparse.training.latents`, from ``vidsparse encode``)
            to train on, instead of the shapes clips.
        prompts: a prompts file: the frozen dense teacher pipeline samples the clean latents
            (:mod:`vidsparse.training.prompts`), cached under ``cache`` (None = the default).
        teacher_steps, teacher_batch_size, guidance: the teacher's sampling steps, prompts per
            pipeline call and guidance scale (None = the pipeline's default; also HunyuanVideo's
            embedded guidance during training).
        height, width, num_frames: the teacher's sample size (None = the pipeline's defaults).
        expert: Wan 2.2 pipelines: "high" (``transformer``, t >= boundary_ratio; the default) or
            "low" (``transformer_2``, t < boundary_ratio); training times stay in its range.
        seed, device, precision: data/noise seed; "auto"/"cpu"/"cuda[:N]" (ignored under DDP,
            where rank r uses cuda:LOCAL_RANK or the CPU); bf16 autocast on CUDA by default.
        ckpt_every, keep_checkpoints, log_every: cadences; resume: None, "auto" or a file.
        time_limit_min: stop early (checkpoint, export) when the next step would end after this
            many minutes of this call's wall time; the LR schedule still spans ``steps``.
        export: save the final student with ``save_pretrained`` (fp16 safetensors).
        plot: draw loss_curve.png at the end (needs matplotlib).
        progress: tqdm bar (rank 0). command: recorded in summary.json.
    """

    out: str
    model: str | None = None
    steps: int = 500
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_steps: int = 20
    min_lr_ratio: float = 1.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    distill_weight: float = 1.0
    diffusion_weight: float = 0.0
    timesteps: str = "logit-normal"
    t_mean: float = 1.5
    t_std: float = 1.6
    t_shift: float | None = None
    trainable: str = "all"
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: str = "attention"
    gradient_checkpointing: bool = False
    lora_save: str = "merged"
    parallel: str = "ddp"
    sparse: SparseConfig = field(default_factory=SparseConfig)
    data: str = "train"
    source: str = DEFAULT_SOURCE
    frames: int = 16
    size: int = 64
    latents: str | None = None
    prompts: str | None = None
    expert: str | None = None
    teacher_steps: int = 8
    teacher_batch_size: int = 1
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    cache: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: str | None = None
    time_limit_min: float | None = None
    export: bool = True
    plot: bool = True
    progress: bool = True
    command: str | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0),
                              ("ckpt_every", 1), ("keep_checkpoints", 1), ("log_every", 1), ("lora_rank", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
        for name in ("lr", "weight_decay", "grad_clip", "t_mean", "t_std", "min_lr_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        for name in ("distill_weight", "diffusion_weight"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.distill_weight == 0 and self.diffusion_weight == 0:
            raise ValueError("distill_weight and diffusion_weight are both 0: nothing to train")
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be > 0 (or None for lora_rank), got {self.lora_alpha}")
        if self.lora_save not in LORA_SAVE:
            raise ValueError(f"lora_save must be one of {LORA_SAVE}, got {self.lora_save!r}")
        if self.lora_save == "adapter" and self.trainable != "lora":
            raise ValueError(f"lora_save='adapter' saves LoRA adapters: it needs trainable='lora', not {self.trainable!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"lora_targets must be one of {LORA_TARGETS}, got {self.lora_targets!r}")
        if self.time_limit_min is not None and not (self.time_limit_min > 0 and math.isfinite(self.time_limit_min)):
            raise ValueError(f"time_limit_min must be > 0, got {self.time_limit_min}")
        if self.timesteps not in TIMESTEP_SAMPLING:
            raise ValueError(f"timesteps must be one of {TIMESTEP_SAMPLING}, got {self.timesteps!r}")
        if not self.t_std > 0 or not (self.t_shift is None or (self.t_shift > 0 and math.isfinite(self.t_shift))):
            raise ValueError(f"t_std and t_shift must be > 0, got {self.t_std}, {self.t_shift}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.data not in ("train", "shifted"):
            raise ValueError(f"data must be 'train' or 'shifted', got {self.data!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if isinstance(self.sparse, dict):
            self.sparse = SparseConfig.from_dict(self.sparse)
        if not isinstance(self.sparse, SparseConfig):
            raise TypeError(f"sparse must be a SparseConfig, got {type(self.sparse).__name__}")
        _check_data_fields(self)


def _check_data_fields(cfg: DistillConfig) -> None:
    """The data-source fields (latents, prompts, teacher sampling, expert)."""
    from .families import EXPERTS

    if cfg.latents is not None and cfg.prompts is not None:
        raise ValueError("latents and prompts are two data sources: give one (--latents or --prompts)")
    for name in ("teacher_steps", "teacher_batch_size", "height", "width", "num_frames"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if cfg.guidance is not None and not (cfg.guidance >= 0 and math.isfinite(cfg.guidance)):
        raise ValueError(f"guidance must be a finite number >= 0, got {cfg.guidance}")
    if cfg.expert is not None and cfg.expert not in EXPERTS:
        raise ValueError(f"expert must be one of {EXPERTS}, got {cfg.expert!r}")


# ----------------------------------------------------------------------------------------------
# Building blocks


def make_student_teacher(model: torch.nn.Module, sparse_config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two copies of ``model``: a patched sparse-attention student and a frozen dense teacher.

    ``model`` itself is left untouched. The teacher is in eval mode with ``requires_grad=False``
    and is never patched; the student is in train mode and starts from the same weights.
    """
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    student = copy.deepcopy(model).train().requires_grad_(True)
    from ..integrations.diffusers import patch

    patch(student, sparse_config)
    return student, teacher


def distill_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    x0: torch.Tensor,
    cond_embeds: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    diffusion_weight: float = 0.0,
    distill_weight: float = 1.0,
    family=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity-distillation loss of one (micro-)batch.

    x0, noise: (B, C, T, H, W); cond_embeds: (B, L, D) or a dict of condition tensors; t: (B,) in (0, 1).
    ``family`` (:mod:`vidsparse.training.families`) gives x_t, the diffusion target and how the
    transformer is called; None = rectified flow with a Wan-style call (the tiny model).
    Returns ``(loss, vd)``: the optimised float32 scalar ``distill_weight * vd + diffusion_weight * fm``
    and the pure distillation term ``vd = mean((v_student - v_teacher)^2)`` (detached; NaN when
    ``distill_weight`` is 0, in which case the teacher is not run and may be None).
    """
    family = family if family is not None else WanFamily()
    cond = cond_embeds if isinstance(cond_embeds, dict) else {"encoder_hidden_states": cond_embeds}
    x_t = family.noisy(x0, noise, t)
    v_student = family.forward(student, x_t, t, cond).float()
    loss = v_student.new_zeros(())
    if distill_weight:
        with torch.no_grad():
            v_teacher = family.forward(teacher, x_t, t, cond).float()
        vd = F.mse_loss(v_student, v_teacher)
        loss = loss + distill_weight * vd
        vd = vd.detach()
    else:
        vd = v_student.new_full((), float("nan"))
    if diffusion_weight:
        loss = loss + diffusion_weight * F.mse_loss(v_student, family.target(x0, noise, t).float())
    return loss, vd


class DataSource(Protocol):
    """Where distillation's clean samples x0 and their conditions come from.

    ``batch(index, count, device)`` returns items ``[index, index + count)`` of a deterministic
    stream: ``x0`` (count, C, T, H, W) and the condition keyword arguments of the model's forward
    (e.g. ``{"encoder_hidden_states": ...}``). ``bind(model)`` adapts the source to the model and
    returns its token grid. Step ``s`` of a run uses items ``[s * B, (s + 1) * B)``; rank ``r``
    of a DDP run takes its slice, so resumed and multi-process runs see the same data.
    """

    def bind(self, model: torch.nn.Module) -> tuple[int, ...]: ...

    def batch(self, index: int, count: int, device: torch.device) -> tuple[torch.Tensor, dict]: ...


def load_source(spec: str, **kwargs) -> DataSource:
    """``"package.module:Class"`` -> ``Class(**kwargs)``, imported on first use."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"data source {spec!r} cannot be loaded: {e}") from None
    return cls(**kwargs)


def check_data(cfg: DistillConfig):
    """Check ``--model``, ``--latents``, ``--prompts`` and ``--expert`` together, reading only JSON
    files, safetensors headers and the prompts; nothing is loaded or sampled.

    Returns ``(spec, prompts)`` (a :class:`~vidsparse.training.families.ModelSpec` and the prompts
    or None) for a latents / prompts run, None for the default source.

    Raises:
        ValueError: one line naming the flag at fault and what differs.
    """
    from .families import resolve_model
    from .latents import LatentsSource, read_manifest
    from .prompts import read_prompts, teacher_plan

    flag = "--latents" if cfg.latents is not None else "--prompts" if cfg.prompts is not None else None
    if flag is None:
        if cfg.expert is not None:
            raise ValueError("--expert picks a Wan 2.2 expert: it needs --latents or --prompts with a pipeline --model")
        if cfg.model is not None and cfg.source == DEFAULT_SOURCE:
            _check_fits_shapes(Path(cfg.model))
        return None
    if cfg.model is None:
        raise ValueError(f"{flag} needs --model: the pipeline folder (or, with --latents, the transformer folder) to distil")
    manifest = read_manifest(cfg.latents) if cfg.latents is not None else None
    prompts = read_prompts(cfg.prompts) if cfg.prompts is not None else None
    spec = resolve_model(cfg.model, expert=cfg.expert, manifest=manifest, guidance=cfg.guidance)
    if manifest is not None:
        LatentsSource(cfg.latents, family=spec.family).check(spec.transformer_config, spec.family)
    else:
        teacher_plan(spec, prompts, _teacher_settings(cfg, torch.device("cpu")))
    return spec, prompts


def _check_fits_shapes(where: Path) -> None:
    """A --model folder without --latents / --prompts must be the tiny pixel-space model."""
    if (where / "model_index.json").is_file():
        raise ValueError(f"--model {where} is a pipeline folder: give its training data, --latents LATENTS "
                         "(from `vidsparse encode`) or --prompts FILE (the teacher samples them)")
    try:
        config = json.loads((where / "config.json").read_text())
    except (OSError, ValueError):
        return  # _load_model says what is missing
    if config.get("_class_name") != "WanTransformer3DModel" or config.get("in_channels") != 3:
        raise ValueError(f"--model {where}: a transformer folder needs --latents (VAE latents and text embeddings, "
                         "e.g. from `vidsparse encode`); the built-in shapes clips fit only the tiny pixel-space Wan model")


def _teacher_settings(cfg: DistillConfig, device: torch.device):
    from .prompts import TeacherSettings

    bf16 = uses_bf16(cfg.precision, device)
    return TeacherSettings(steps=cfg.teacher_steps, guidance=cfg.guidance, height=cfg.height, width=cfg.width,
                           num_frames=cfg.num_frames, seed=cfg.seed, batch_size=cfg.teacher_batch_size,
                           dtype=torch.bfloat16 if bf16 else torch.float32)


def make_source(cfg: DistillConfig, device: torch.device = torch.device("cpu"), rank: int = 0, world: int = 1):
    """The run's :class:`DataSource`: a :class:`~vidsparse.training.latents.LatentsSource` over
    ``cfg.latents`` or over the teacher's cache of ``cfg.prompts`` (sampled first if missing; under
    DDP every rank samples its share), else ``cfg.source`` (the tiny shapes clips).

    The latents source carries the model's family (``source.family``): its conventions, and which
    transformer of a pipeline folder is trained.
    """
    checked = check_data(cfg)
    if checked is None:
        return load_source(cfg.source, split=cfg.data, frames=cfg.frames, size=cfg.size, seed=cfg.seed)
    from .latents import LatentsSource
    from .prompts import teacher_cache

    spec, prompts = checked
    folder, flag = cfg.latents, "--latents"
    if prompts is not None:
        folder = teacher_cache(spec, prompts, _teacher_settings(cfg, device), cache_root=cfg.cache, device=device,
                               rank=rank, world=world, progress=cfg.progress)
        flag = "--prompts"
    source = LatentsSource(folder, seed=cfg.seed, family=spec.family, flag=flag)
    if spec.family.guidance is None:  # HunyuanVideo trains at the guidance its data were sampled with
        spec.family.guidance = source.manifest.get("guidance")
    return source


def _data_desc(cfg: DistillConfig) -> str:
    expert = f" (expert {cfg.expert})" if cfg.expert else ""
    if cfg.latents is not None:
        return f"--latents {cfg.latents}{expert}"
    if cfg.prompts is not None:
        return f"teacher samples of --prompts {cfg.prompts}{expert}"
    return f"split {cfg.data!r}"


def _load_model(path: str | None, source) -> torch.nn.Module:
    """The model to distil, in float32 on the CPU; errors name ``--model`` and the path.

    Of a pipeline folder, the transformer the source's family trains (``transformer``, or
    ``transformer_2`` for Wan 2.2's low-noise expert).
    """
    where = Path(path) if path is not None else Path(source.default_model_dir())
    if (where / "model_index.json").is_file():
        family = getattr(source, "family", None)
        where = where / (family.component if family is not None else "transformer")
    config = where / "config.json"
    if not config.is_file() or not any(where.glob("*.safetensors")):
        raise FileNotFoundError(f"--model {where}: no diffusers checkpoint there (expected config.json and *.safetensors)")
    import diffusers

    cls = getattr(diffusers, json.loads(config.read_text()).get("_class_name", ""), None)
    if cls is None:
        raise ValueError(f"--model {where}: config.json names no diffusers model class")
    return cls.from_pretrained(where, torch_dtype=torch.float32, use_safetensors=True).eval()


def _setup_device(cfg: DistillConfig):
    """(device, rank, world, own_group): joins torchrun's process group unless one exists.

    FSDP needs a process group even in one process: a one-rank group (in-memory store) is made.
    """
    import torch.distributed as dist

    rank, world, local_rank = dist_info()
    if world <= 1 and cfg.parallel != "fsdp":
        return resolve_device(cfg.device), 0, 1, False
    if world <= 1:
        device = resolve_device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    else:
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if dist.is_initialized():
        return device, dist.get_rank(), dist.get_world_size(), False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world <= 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    return device, rank, world, True


def _build_student(cfg: DistillConfig, model, source, device):
    base = model if model is not None else _load_model(cfg.model, source)
    grid = source.bind(base)  # raises naming frames / size
    student, teacher = make_student_teacher(base, cfg.sparse)
    del base
    if cfg.trainable == "lora":
        add_lora(student, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
    trainable = select_trainable(student, cfg.trainable)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.to(device)
    use_teacher = cfg.distill_weight > 0
    if use_teacher:  # otherwise it stays on the CPU, only to give the exported student its plain architecture
        teacher.to(device)
    if cfg.parallel == "fsdp":  # after LoRA, requires_grad and checkpointing; before the optimizer
        bf16 = uses_bf16(cfg.precision, device)
        shard_model(student, device, bf16=bf16)
        if use_teacher:  # sharded too: 1/world of its weights per rank, one block gathered at a time
            shard_model(teacher, device, bf16=bf16)
    return student, teacher, trainable, grid


def _check_resumed(cfg: DistillConfig, student):
    arch = _arch(student)

    def check(meta: dict, path: Path) -> None:
        if meta.get("model_config") != arch:
            raise ValueError(f"--resume: checkpoint {path} holds another model config: {meta.get('model_config')}")
        old = meta.get("distill_config", {})
        for key in ("trainable", "lora_rank", "lora_targets"):
            if key in old and old[key] != getattr(cfg, key) and (key == "trainable" or cfg.trainable == "lora"):
                raise ValueError(f"--resume: checkpoint {path} was trained with {key}={old[key]!r}, not {getattr(cfg, key)!r}")
        changed = {k: (old.get(k), v) for k, v in jsonable(cfg).items() if k not in _RUN_CONTROL and old.get(k) != v}
        if changed:
            print(f"note: resuming with changed settings: {changed}", file=sys.stderr)

    return check


# settings that only steer a run (where it stops, what it prints) and may change on resume silently
_RUN_CONTROL = {"out", "resume", "time_limit_min", "progress", "command", "export", "plot", "steps"}


def _arch(model: torch.nn.Module) -> dict[str, Any]:
    """The model's constructor arguments (diffusers' private "_..." bookkeeping keys dropped)."""
    return jsonable({k: v for k, v in dict(model.config).items() if not k.startswith("_")})


def _family_of(source, teacher, fwd):
    """The conventions the run uses: the source's family (from a pipeline), else the model class's."""
    family = getattr(source, "family", None)
    return family if family is not None else family_for_model(teacher if teacher is not None else fwd)


def _make_backward(cfg: DistillConfig, fwd, teacher, source, device, rank: int, world: int):
    """The loop's per-step callable: global batch drawn identically on every rank, then sliced."""
    local_bs = cfg.batch_size // world
    micro_bs = local_bs // cfg.grad_accum
    use_bf16 = uses_bf16(cfg.precision, device)
    family = _family_of(source, teacher, fwd)
    shift = cfg.t_shift if cfg.t_shift is not None else family.shift

    def backward(step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(hash_seed(cfg.seed, _STREAM_DISTILL, step))
        lo = rank * local_bs
        x0, cond = source.batch(step * cfg.batch_size + lo, local_bs, device)
        noise_all = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=g, device=device)
        t_all = family.restrict(sample_timesteps(cfg.batch_size, mode=cfg.timesteps, mean=cfg.t_mean, std=cfg.t_std,
                                                 shift=shift, generator=g, device=device))
        noise, t = noise_all[lo : lo + local_bs], t_all[lo : lo + local_bs]
        total, vd_total = torch.zeros((), device=device), torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            sl = slice(m * micro_bs, (m + 1) * micro_bs)
            # DDP all-reduces only on the last micro-batch
            sync = no_grad_sync(fwd) if m < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync, warnings.catch_warnings():
                # FSDP2 warns that the model returns a view (diffusers' unpatchify); the loss uses it
                # out of place only, so the pre-backward hook is kept
                warnings.filterwarnings("ignore", message="FSDP2-wrapped module", category=UserWarning)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, vd = distill_loss(fwd, teacher, x0[sl], {k: v[sl] for k, v in cond.items()}, noise[sl],
                                            t[sl], cfg.diffusion_weight, cfg.distill_weight, family=family)
                (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
            vd_total += vd / cfg.grad_accum
        return {"loss": total, "vd_loss": vd_total} if cfg.distill_weight > 0 else {"loss": total}

    return backward


def distill(cfg: DistillConfig, model: torch.nn.Module | None = None, source: DataSource | None = None) -> dict[str, Any]:
    """Run (or resume) a distillation run; returns the summary (also written to summary.json).

    ``model`` (float32, any device) replaces loading ``cfg.model``; ``source`` replaces
    ``cfg.source`` (the tiny shapes clips by default). Under torchrun (WORLD_SIZE > 1) this joins
    a process group (gloo on CPU, nccl on CUDA) unless one is initialised, and destroys it at the
    end if it created it.
    """
    return _run(cfg, model, source, keep_student=False)[0]


def train_student(cfg: DistillConfig, model: torch.nn.Module | None = None,
                  source: DataSource | None = None) -> tuple[dict[str, Any], torch.nn.Module | None]:
    """:func:`distill`, also returning the trained student as a plain model.

    The returned model is an unpatched float32 copy of the architecture holding the student's
    weights (LoRA adapters merged), in eval mode on the training device; patch it again for sparse
    inference. It is None on ranks other than 0.
    """
    return _run(cfg, model, source, keep_student=True)


def _run(cfg: DistillConfig, model, source, keep_student: bool):
    import torch.distributed as dist

    t_start = time.monotonic()
    device, rank, world, own_group = _setup_device(cfg)
    try:
        summary, plain, result = _train_and_export(cfg, model, source, keep_student, device, rank, world, t_start)
        if own_group:
            dist.barrier()  # rank 0 finished writing before anyone exits
    finally:
        if own_group:
            dist.destroy_process_group()
    if result.signal is not None:
        raise KeyboardInterrupt(f"{result.signal} at step {result.step}: checkpoint {result.last_checkpoint}; resume with --resume")
    return summary, (plain.to(device).eval() if keep_student and plain is not None else None)


def _train_and_export(cfg: DistillConfig, model, source, keep_student: bool, device, rank: int, world: int, t_start: float):
    """Build, train (or resume) and, unless interrupted, export: (summary, plain student, loop result)."""
    per_rank, rem = divmod(cfg.batch_size, world * cfg.grad_accum)
    if rem or per_rank == 0:
        raise ValueError(f"batch_size={cfg.batch_size} must be a positive multiple of world_size * grad_accum = {world} * {cfg.grad_accum}")
    out = prepare_out(cfg.out, cfg.resume) if rank == 0 else Path(cfg.out)
    if source is None:
        source = make_source(cfg, device, rank, world)
    student, teacher, trainable, grid = _build_student(cfg, model, source, device)
    optimizer = make_optimizer(student, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)
    fwd = student
    if world > 1 and cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        _print_start(cfg, student, teacher, trainable, grid, device, world)
    loop = LoopConfig(out=out, steps=cfg.steps, grad_clip=cfg.grad_clip, ckpt_every=cfg.ckpt_every,
                      keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every, resume=cfg.resume,
                      time_limit_s=None if cfg.time_limit_min is None else cfg.time_limit_min * 60,
                      started=t_start, batch_size=cfg.batch_size, progress=cfg.progress, desc="distill")
    result = train_loop(loop, model=student, optimizer=optimizer, scheduler=scheduler, device=device,
                        backward=_make_backward(cfg, fwd, teacher, source, device, rank, world),
                        meta={"distill_config": jsonable(cfg), "model_config": _arch(student)},
                        check_meta=_check_resumed(cfg, student))
    summary, plain = {}, None
    if result.signal is None:
        state = full_state_dict(student) if cfg.export or keep_student else None  # collective when sharded
        if rank == 0:
            summary, plain = _finish(cfg, result, student, state, teacher, grid, world, keep_student)
    return summary, plain, result


def _print_start(cfg, student, teacher, trainable, grid, device, world) -> None:
    n_trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in teacher.parameters())
    what = cfg.trainable + (f", rank {cfg.lora_rank} on {cfg.lora_targets}" if cfg.trainable == "lora" else "")
    use_teacher = cfg.distill_weight > 0
    loss_desc = " + ".join([f"{cfg.distill_weight:g} * distillation"] * use_teacher
                           + [f"{cfg.diffusion_weight:g} * diffusion"] * (cfg.diffusion_weight > 0))
    bf16 = uses_bf16(cfg.precision, device)
    print(f"distill: {n_all / 1e6:.2f} M params ({n_trainable / 1e6:.3f} M trainable in {len(trainable)} tensors: "
          f"{what}), {math.prod(grid)} tokens, {cfg.sparse.describe()}\n"
          f"device {device} x{world}{' fsdp' if cfg.parallel == 'fsdp' else ''}, {'bf16 autocast' if bf16 else 'fp32'}"
          f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}, global batch {cfg.batch_size} "
          f"(accum {cfg.grad_accum}), loss {loss_desc}, data {_data_desc(cfg)}, steps ->{cfg.steps}", file=sys.stderr)


def _finish(cfg, result, student, state, teacher, grid, world, keep_student):
    """Rank 0: summary.json, the exported student (weights or adapter + sparse_config.json) and the loss curve.

    ``state``: the student's whole state dict on the CPU (None when neither exported nor kept).
    """
    from .plots import read_jsonl, save_loss_curve

    out = Path(cfg.out)
    records = [r for r in read_jsonl(out / "log.jsonl") if r["kind"] == "train"]
    tail = records[-max(1, len(records) // 10):] if records else []
    use_teacher = cfg.distill_weight > 0
    summary = {
        "step": result.step, "steps": cfg.steps, "stop_reason": result.stop_reason, "world_size": world,
        "batch_size": cfg.batch_size, "first_loss": records[0]["loss"] if records else None,
        "final_loss": sum(r["loss"] for r in tail) / len(tail) if tail else None,
        "wall_time_s": result.elapsed_s, "train_loop_s": result.loop_s,
        "steps_per_s": result.steps_this_call / result.loop_s if result.steps_this_call and result.loop_s > 0 else None,
        "tokens": math.prod(grid), "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "sparse_config": cfg.sparse.to_dict(), "config": jsonable(cfg),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # rank 0's, over the whole run
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    adapter = cfg.lora_save == "adapter"
    plain = _plain_student(state, teacher, cfg) if (cfg.export and not adapter) or keep_student else None
    if cfg.export:
        student_dir = out / "student"
        if adapter:
            save_adapter(_empty_model(teacher), state, student_dir, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                         targets=cfg.lora_targets, base_model=cfg.model)
        else:
            save_student(plain, student_dir)
        cfg.sparse.save(student_dir)
        summary["student_dir"], summary["student_format"] = str(student_dir), "adapter" if adapter else "merged"
    if cfg.plot:
        try:
            objective = "velocity-distillation" if use_teacher else "diffusion"
            save_loss_curve(out / "log.jsonl", out / "loss_curve.png", ylabel="training loss",
                            title=f"{objective} fine-tuning ({cfg.sparse.describe()}, {result.step} steps, batch {cfg.batch_size})")
        except ImportError:  # matplotlib is optional
            pass
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary, plain


def _empty_model(teacher: torch.nn.Module) -> torch.nn.Module:
    """The teacher's architecture with its parameters on the meta device (no memory, no init)
    and its buffers copied to the CPU (so the non-persistent ones, e.g. rotary tables, are real).

    The teacher is the student's architecture without vidsparse's processors or adapters; it may
    be sharded (its buffers are not)."""
    with torch.device("meta"):
        model = unwrapped_class(teacher).from_config(teacher.config)
    for name, buf in teacher.named_buffers():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf.detach().to("cpu", copy=True)
    return model.eval().requires_grad_(False)


def _plain_student(state: dict[str, torch.Tensor], teacher: torch.nn.Module, cfg: DistillConfig) -> torch.nn.Module:
    """An unpatched float32 CPU model of the teacher's architecture holding ``state``, the student's
    whole state dict (LoRA adapters merged with peft), without copying the weights again."""
    if any(".lora_" in k for k in state):
        with_lora = _empty_model(teacher)
        add_lora(with_lora, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        with_lora.load_state_dict(state, strict=True, assign=True)
        state = merged_state_dict(with_lora)
    plain = _empty_model(teacher)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def save_student(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Save a plain model as fp16 safetensors with ``save_pretrained`` (loads with ``load_tiny_wan``).

    ``model`` is not modified (an fp16 CPU copy is saved).
    """
    half = copy.deepcopy(model).cpu()
    # plain nn.Module.to: diffusers' override warns about fp16 inference, irrelevant for storage
    torch.nn.Module.to(half, dtype=torch.float16).save_pretrained(Path(path), safe_serialization=True)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (:mod:`vidsparse.training.distill_cli`); returns the exit code."""
    from .distill_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
