"""The ablation's settings: its ten variants (SpargeAttention2's Table 6 rows), the run's
configuration and the CPU smoke configuration. Used by :mod:`vidsparse.tiny.ablation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import SparseConfig

__all__ = ["Variant", "VARIANTS", "AblationConfig", "smoke_config", "SMOKE", "SMOKE_BLOCKS", "TRAIN_ORDER",
           "EXPORT_VARIANT"]


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table."""

    id: int
    name: str
    mask: str  # "dense", "topk", "topp", "hybrid"
    objective: str | None  # None (training-free), "diffusion" or "distill"
    data: str | None  # fine-tuning split


VARIANTS: tuple[Variant, ...] = (
    Variant(1, "dense", "dense", None, None),
    Variant(2, "training-free Top-k", "topk", None, None),
    Variant(3, "training-free Top-p", "topp", None, None),
    Variant(4, "training-free hybrid", "hybrid", None, None),
    Variant(5, "diffusion-loss FT, hybrid", "hybrid", "diffusion", "shifted"),
    Variant(6, "velocity distillation, Top-k", "topk", "distill", "shifted"),
    Variant(7, "velocity distillation, Top-p", "topp", "distill", "shifted"),
    Variant(8, "velocity distillation, hybrid", "hybrid", "distill", "shifted"),
    Variant(9, "diffusion-loss FT, hybrid", "hybrid", "diffusion", "train"),
    Variant(10, "velocity distillation, hybrid", "hybrid", "distill", "train"),
)
#: training order: the shipped model (8) and the paper's main comparison first, so that a run
#: short of time loses the least important rows
TRAIN_ORDER = (8, 5, 6, 7, 10, 9)
#: the variant whose student is exported to ``out/distilled_hybrid``
EXPORT_VARIANT = 8

SMOKE_BLOCKS = dict(block_q=16, block_k=16)
SMOKE = dict(num_layers=1, frames=4, size=32, batch_size=2, steps=2, warmup_steps=1, eval_clips=2,
              eval_num_t=2, samples=1, sample_steps=2, calib_clips=2, calib_num_t=2,
              calib_iters=4, topk_only=0.2, hybrid_topk=0.125, train_calib_steps=0, shape_samples=2)


@dataclass
class AblationConfig:
    """Settings of one ablation run (see the module docstring).

    Attributes:
        out: output directory (ablation.json, ablation.md, distilled_hybrid/).
        work_dir: checkpoints and logs of the training runs.
        model: diffusers Wan directory; None = the embedded tiny model.
        num_layers: keep only the first N transformer blocks of the loaded model (smoke runs).
        time_limit_min: wall-clock budget of the whole run; ignored when ``steps`` is given.
        steps: fixed optimizer steps per trained variant (None = planned from the budget).
        batch_size, lr, warmup_steps, min_lr_ratio, weight_decay, grad_clip: fine-tuning recipe.
        timesteps, t_mean, t_std, t_shift: training-time distribution.
        topk_only: k of the Top-k-only variants; its block sparsity is the target of the others.
        hybrid_topk: k of the hybrid variants (their p is calibrated).
        topp_only, hybrid_topp: fixed p values instead of calibrating them.
        target_sparsity: the calibration target; None = Top-k-only's 1 - floor(k * N) / N.
        sparse: the base :class:`vidsparse.SparseConfig` of every sparse variant (the "hybrid"
            masker; blocks, backend, token order, priors and any other option); each variant
            changes only its k and p (:meth:`SparseConfig.replace`). With a prior on
            (``keep_diagonal`` / ``keep_sink``), the target sparsity is the measured one of Top-k
            only (the prior adds blocks Top-k may not have chosen).
        frames, size: clip geometry.
        calib_clips, calib_num_t, calib_iters: the p bisection (val clips x times, iterations).
        train_calib_steps: steps of the throughput measurement (0 = none; needs ``steps``).
        eval_clips, eval_num_t, eval_batch_size, samples, sample_steps: evaluation
            (``vidsparse.tiny.evaluate.evaluate_variant``); ``shifted_eval`` adds the shifted split's
            val loss; ``shape_samples`` single-object samples per variant are judged by the shape
            classifier (0 = none).
        variants: ids to run (default all ten).
        seed, device, progress, smoke, command.
    """

    out: str
    work_dir: str = "runs/ablation"
    model: str | None = None
    num_layers: int | None = None
    time_limit_min: float = 9.0
    steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    timesteps: str = "logit-normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 3.0
    topk_only: float = 0.05
    hybrid_topk: float = 0.03125
    topp_only: float | None = None
    hybrid_topp: float | None = None
    target_sparsity: float | None = None
    sparse: SparseConfig = field(default_factory=SparseConfig)
    frames: int = 16
    size: int = 64
    calib_clips: int = 16
    calib_num_t: int = 4
    calib_iters: int = 14
    train_calib_steps: int = 12
    eval_clips: int = 64
    eval_num_t: int = 8
    eval_batch_size: int = 32
    samples: int = 4
    sample_steps: int = 20
    shifted_eval: bool = True
    shape_samples: int = 16
    variants: tuple[int, ...] = tuple(v.id for v in VARIANTS)
    seed: int = 0
    device: str = "auto"
    progress: bool = False
    smoke: bool = False
    command: str | None = None
    reserve_s: float = 20.0

    def __post_init__(self) -> None:
        known = {v.id for v in VARIANTS}
        self.variants = tuple(sorted(set(self.variants)))
        bad = [v for v in self.variants if v not in known]
        if bad or not self.variants:
            raise ValueError(f"variants must be a non-empty subset of 1..10, got {list(self.variants)}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an int >= 1 or None, got {self.steps!r}")
        if not self.time_limit_min > 0:
            raise ValueError(f"time_limit_min must be > 0, got {self.time_limit_min}")
        if self.steps is None and self.train_calib_steps < 4:
            raise ValueError("planning the steps from the time limit needs train_calib_steps >= 4 (or give steps)")
        for name in ("topk_only", "hybrid_topk"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("topp_only", "hybrid_topp", "target_sparsity"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                raise ValueError(f"{name} must be in (0, 1) or None, got {v}")
        if self.shape_samples < 0:
            raise ValueError(f"shape_samples must be >= 0, got {self.shape_samples}")
        if isinstance(self.sparse, dict):
            self.sparse = SparseConfig.from_dict(self.sparse)
        if not isinstance(self.sparse, SparseConfig) or self.sparse.method != "hybrid":
            raise ValueError("sparse must be a SparseConfig of the 'hybrid' masker (the variants are its Top-k, "
                             f"Top-p and hybrid rules), got {self.sparse!r}")
        for kind in ("topk", "topp", "hybrid"):  # the variants' options against the base now, not mid-run
            self.mask(kind, {"topp": 0.5, "hybrid": 0.5})

    def mask(self, kind: str, topp: dict[str, float]) -> SparseConfig | None:
        """The :class:`vidsparse.SparseConfig` of a mask kind ("dense" -> None): the base ``sparse``
        with the kind's k and p (``topp``: the calibrated p of "topp" and "hybrid")."""
        if kind == "dense":
            return None
        if kind == "topk":
            return self.sparse.replace(topk=self.topk_only, topp=None)
        if kind == "topp":
            return self.sparse.replace(topk=None, topp=topp["topp"])
        return self.sparse.replace(topk=self.hybrid_topk, topp=topp["hybrid"])

    @property
    def priors(self) -> bool:
        opts = self.sparse.resolved_options()
        return bool(opts["keep_diagonal"] or opts["keep_sink"])


def smoke_config(out: str, **changes: Any) -> AblationConfig:
    """A tiny CPU configuration: the model's first block only, 4 frames of 32x32 (256 tokens) with
    16x16 blocks, 2 training steps, minimal evaluation. Checks the plumbing, not the paper."""
    base = dict(SMOKE)
    base["sparse"] = SparseConfig(**SMOKE_BLOCKS)
    base.update(changes)
    base.setdefault("work_dir", "runs/ablation_smoke")
    return AblationConfig(out=out, smoke=True, **base)
