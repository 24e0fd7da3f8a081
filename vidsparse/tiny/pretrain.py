"""Flow-matching pretraining of the tiny Wan model on the synthetic shapes videos.

Run it as a module::

    python -m vidsparse.tiny.pretrain --out runs/tiny_wan --steps auto --time-limit-min 10

(``--steps auto`` times the first steps and then plans as many as fit the wall-clock limit,
minus ``time_reserve_s`` for the final checkpoint and export.)

The run is :func:`vidsparse.training.loop.train_loop` (resume, checkpoints, time limit, log,
signals); the EMA and the ``steps="auto"`` plan are its checkpointed state objects and the
periodic evaluation runs in its callback. Batches are rendered on the training device every
step (no data loader). Per step: clips
``[step * B, (step + 1) * B)`` of the "train" split, and noise / timesteps / condition dropout
from a generator seeded by ``(seed, step)``; so the data never needs RNG state and a resumed run
repeats the straight run exactly (bit-identical on CPU; on GPU up to non-deterministic kernels).

Output directory layout::

    out/
      log.jsonl              one record per log interval ("train") and per evaluation ("eval")
      loss_curve.png
      summary.json
      checkpoints/step-0000500.pt   model, optimizer, scheduler, state (EMA, step plan), RNG, step, configs
      model/                 the EMA weights in fp16, saved with save_pretrained (safetensors)
        config.json  diffusion_pytorch_model.safetensors  sampling.json  MODEL_CARD.md
        samples.png  loss_curve.png

Training recipe: AdamW (no decay on biases, norms and modulation tables), linear warm-up then
cosine decay, bf16 autocast on CUDA (fp32 on CPU), logit-normal or uniform t warped towards
noise (``t_shift``; the pixels of 16 similar frames are very redundant), condition dropout
for classifier-free guidance (the all-zero embedding), gradient clipping, EMA of the weights (the
exported model), a fixed validation batch (fixed noise and evenly spread t) for a low-variance
validation loss.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..training.ema import EMA
from ..training.flow import TIMESTEP_SAMPLING, flow_matching_loss, sample_timesteps
from ..training.loop import LoopConfig, StepInfo, list_checkpoints, prepare_out, train_loop, uses_bf16
from ..training.optim import make_optimizer, make_scheduler
from ..training.planner import StepPlanner
from ..training.plots import read_jsonl, save_loss_curve
from ..cli_options import float_in, int_at_least
from ..utils import device_name, hash_seed, jsonable, resolve_device
from .data import ShapesConfig, make_batch
from .flow import check_sampler_settings
from .pretrain_card import model_card

# EMA and list_checkpoints are re-exported: they were defined here before the shared loop existed
__all__ = ["TrainConfig", "train", "main", "EMA", "list_checkpoints"]

_PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """Everything a pretraining run depends on. Defaults are the recommended H100 recipe.

    Attributes:
        out: output directory (see the module docstring for its layout).
        steps: total optimizer steps (the LR schedule spans them), or "auto" with
            ``time_limit_min``: after a short throughput measurement during warm-up, the run
            picks as many steps as fit the time limit (stored in checkpoints for exact resume).
        batch_size: clips per step.
        lr, min_lr_ratio, warmup_steps: peak LR, final LR as a fraction of it, linear warm-up.
        weight_decay, betas: AdamW settings.
        grad_clip: max global gradient norm (0 disables clipping).
        ema_decay: EMA decay of the exported weights (warmed up as min(decay, (1+s)/(10+s))).
        cond_dropout: probability of replacing a clip's condition by zeros (for CFG).
        timesteps, t_mean, t_std: "logit-normal" (t = sigmoid(N(t_mean, t_std))) or "uniform".
        t_shift: warp of the training times towards noise, ``s t / (1 + (s - 1) t)``; exported
            samples use the same shift (see :func:`vidsparse.tiny.flow.shift_time`).
        seed: model init, data stream and noise seed (0 <= seed < 2**32).
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32".
        compile: wrap the training forward in torch.compile.
        ckpt_every, keep_checkpoints: checkpoint cadence and how many to keep (>= 1).
        log_every, eval_every, eval_clips: logging / validation cadence and validation batch size.
        time_limit_min: stop cleanly (checkpoint and export) before this many minutes of wall time
            of this process (counted from the start of :func:`train`).
        time_reserve_s: seconds kept free at the end for the final checkpoint and export.
        stop_at: stop (checkpoint, no export) after this step, keeping the schedule of ``steps``.
        resume: None, "auto" (latest checkpoint in ``out``) or a checkpoint file.
        init_from: a saved model directory (``save_pretrained``, e.g. an earlier run's ``model/``)
            whose weights start this run instead of the random init; optimizer, schedule and EMA
            start fresh (a warm restart). The architecture must match. Ignored when resuming.
        export: write ``out/model`` (fp16 EMA, card, samples) at the end.
        num_samples, sample_steps, guidance_scale, guidance_interval: the sampler settings of the
            sample strip and shape accuracy at export, saved to ``sampling.json``.
        shape_samples: single-object conditions sampled at export to measure the shape accuracy
            (:mod:`vidsparse.tiny.classifier`; 0 = skip).
        progress: show tqdm progress bars.
        data: the dataset geometry; ``data.text_dim`` must equal the model's ``text_dim``.
        model_overrides: changes to :func:`vidsparse.tiny.model_config` (tests, ablations).
        command: the command line, recorded in the model card.
    """

    out: str
    steps: int | str = 6000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    timesteps: str = "logit-normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 3.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    eval_every: int = 250
    eval_clips: int = 64
    time_limit_min: float | None = None
    time_reserve_s: float = 30.0
    stop_at: int | None = None
    resume: str | None = None
    init_from: str | None = None
    export: bool = True
    num_samples: int = 6
    shape_samples: int = 16
    sample_steps: int = 40
    guidance_scale: float = 4.0
    guidance_interval: tuple[float, float] = (0.1, 0.8)
    progress: bool = True
    data: ShapesConfig = field(default_factory=ShapesConfig)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    command: str | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")

        if self.steps == "auto":
            if self.time_limit_min is None:
                raise ValueError("steps='auto' needs time_limit_min (the wall-clock budget to fill)")
        else:
            positive_int("steps")
        for name in ("batch_size", "ckpt_every", "keep_checkpoints", "log_every", "eval_every", "eval_clips"):
            positive_int(name)
        positive_int("warmup_steps", 0)
        positive_int("num_samples", 0)
        positive_int("shape_samples", 0)
        positive_int("sample_steps")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.timesteps not in TIMESTEP_SAMPLING:
            raise ValueError(f"timesteps must be one of {TIMESTEP_SAMPLING}, got {self.timesteps!r}")
        if not self.t_shift > 0:
            raise ValueError(f"t_shift must be > 0, got {self.t_shift}")
        self.guidance_interval = check_sampler_settings(self.guidance_scale, self.guidance_interval, 0.0)
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if self.time_limit_min is not None and not self.time_limit_min > 0:
            raise ValueError(f"time_limit_min must be > 0, got {self.time_limit_min}")
        if self.stop_at is not None and not (
            isinstance(self.stop_at, int) and self.stop_at >= 1 and (self.steps == "auto" or self.stop_at <= self.steps)
        ):
            raise ValueError(f"stop_at must be an int in [1, steps={self.steps}], got {self.stop_at}")
        if not isinstance(self.data, ShapesConfig):
            raise ValueError(f"data must be a ShapesConfig, got {type(self.data).__name__}")
        self.betas = tuple(self.betas)


# ----------------------------------------------------------------------------------------------
# Training on the shared loop (vidsparse.training.loop)

# stream tags of the per-step generators: 0 = train batches, 1 = validation noise, 2 = samples
_STREAM_TRAIN, _STREAM_VAL, _STREAM_SAMPLES = 0, 1, 2
# settings that only steer a run (where it stops, what it prints) and may change on resume silently
_RUN_CONTROL = {"out", "resume", "stop_at", "time_limit_min", "time_reserve_s", "progress", "command", "export", "steps"}


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(hash_seed(*parts))


def _arch(model: torch.nn.Module) -> dict[str, Any]:
    """The model's constructor arguments (diffusers' private "_..." bookkeeping keys dropped)."""
    return jsonable({k: v for k, v in dict(model.config).items() if not k.startswith("_")})


@torch.no_grad()
def _validation_loss(model, batch, batch_size: int, amp) -> float:
    x0, emb, noise, t = batch
    total = 0.0
    for i in range(0, x0.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        with amp():
            loss = flow_matching_loss(model, x0[sl], emb[sl], noise[sl], t[sl])
        total += float(loss) * x0[sl].shape[0]
    return total / x0.shape[0]


def _validation_batch(cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The fixed validation batch: "val" split, fixed noise, t evenly spread over (0, 1)."""
    x0, emb, _ = make_batch(cfg.eval_clips, seed=cfg.seed, split="val", config=cfg.data, device=device)
    noise = torch.randn(x0.shape, generator=_generator(device, cfg.seed, _STREAM_VAL), device=device)
    t = (torch.arange(cfg.eval_clips, device=device, dtype=torch.float32) + 0.5) / cfg.eval_clips
    return x0, emb, noise, t


def _load_init_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy the weights of the saved model in ``path`` into ``model`` (same architecture, fp32)."""
    from .model import load_tiny_wan

    init = load_tiny_wan(path)
    if _arch(init) != _arch(model):
        raise ValueError(f"init_from={str(path)!r} has another architecture: {_arch(init)} vs {_arch(model)}")
    model.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
    print(f"initialised from {path}", file=sys.stderr)


def _build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The freshly initialised model (or ``init_from``'s weights), in float32 on the CPU."""
    from .model import build_tiny_wan

    model = build_tiny_wan(seed=cfg.seed, **cfg.model_overrides)
    if model.config.text_dim != cfg.data.text_dim:
        raise ValueError(
            f"model text_dim={model.config.text_dim} must equal data.text_dim={cfg.data.text_dim} "
            "(set both, e.g. model_overrides={'text_dim': ...})"
        )
    if cfg.init_from is not None and cfg.resume is None:
        _load_init_weights(model, cfg.init_from)
    return model


def _make_backward(cfg: TrainConfig, fwd, device: torch.device, amp) -> Callable[[int], dict[str, torch.Tensor]]:
    """The loop's per-step callable: clips ``[step * B, (step + 1) * B)`` and noise / t / dropout
    from a generator seeded by ``(seed, step)``, so the data need no RNG state on resume."""

    def backward(step: int) -> dict[str, torch.Tensor]:
        x0, emb, _ = make_batch(cfg.batch_size, seed=cfg.seed, split="train", start=step * cfg.batch_size,
                                config=cfg.data, device=device)
        g = _generator(device, cfg.seed, _STREAM_TRAIN, step)
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = sample_timesteps(cfg.batch_size, mode=cfg.timesteps, mean=cfg.t_mean, std=cfg.t_std, shift=cfg.t_shift,
                             generator=g, device=device)
        keep = torch.rand(cfg.batch_size, generator=g, device=device) >= cfg.cond_dropout
        with amp():
            loss = flow_matching_loss(fwd, x0, emb * keep[:, None, None], noise, t)
        loss.backward()
        return {"loss": loss.detach()}

    return backward


def _check_resumed(cfg: TrainConfig, model: torch.nn.Module) -> Callable[[dict, Path], None]:
    """Refuse a checkpoint of another model or data geometry; print changed hyperparameters."""
    arch, data = _arch(model), jsonable(cfg.data)

    def check(meta: dict, path: Path) -> None:
        if meta.get("model_config") != arch:
            raise ValueError(f"checkpoint {path} was trained with another model config: {meta.get('model_config')}")
        if meta.get("data_config") != data:
            raise ValueError(f"checkpoint {path} was trained with another data config: {meta.get('data_config')}")
        old = meta.get("train_config", {})
        changed = {k: (old.get(k), v) for k, v in jsonable(cfg).items() if k not in _RUN_CONTROL and old.get(k) != v}
        if changed:
            print(f"note: resuming with changed settings: {changed}", file=sys.stderr)

    return check


class _Evaluator:
    """Validation loss of the raw and the EMA weights on the fixed batch, logged as "eval" records."""

    def __init__(self, cfg: TrainConfig, model, ema: EMA, val_batch, amp):
        self.cfg, self.model, self.ema, self.val_batch, self.amp = cfg, model, ema, val_batch, amp

    def __call__(self, step: int, elapsed_s: float, log: Callable[[dict], None]) -> None:
        self.model.eval()
        v = _validation_loss(self.model, self.val_batch, self.cfg.batch_size, self.amp)
        v_ema = _validation_loss(self.ema.model, self.val_batch, self.cfg.batch_size, self.amp)
        self.model.train()
        log({"kind": "eval", "step": step, "val_loss": v, "val_loss_ema": v_ema, "elapsed_s": elapsed_s})


def _make_callback(cfg: TrainConfig, model, ema: EMA, planner: StepPlanner | None, evaluate: _Evaluator):
    """After each optimizer step: the EMA update, the step plan (``steps="auto"``), evaluation."""

    def callback(info: StepInfo) -> None:
        ema.update(model, info.step)
        total = info.total
        if planner is not None and total is None:
            planner.observe(info.step)
            total = planner()
            if total is not None:
                print(f"\nsteps='auto': measured throughput fits {total} steps in the time limit", file=sys.stderr)
        if info.step % cfg.eval_every == 0 or info.step == total:
            evaluate(info.step, info.elapsed_s, info.log)

    return callback


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the summary that is also written to summary.json."""
    from .model import describe_model, token_grid

    t_start = time.monotonic()
    out = prepare_out(cfg.out, cfg.resume)  # fail before any work on an occupied or unwritable --out
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg.precision, device))
    model = _build_model(cfg).to(device).train()
    grid = token_grid(model.config, cfg.data.frames, cfg.data.size, cfg.data.size)
    ema = EMA(model, cfg.ema_decay)
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, fused=device.type == "cuda")
    limit_s = cfg.time_limit_min * 60 if cfg.time_limit_min else None
    planner = None
    if cfg.steps == "auto":
        # an evaluation (two forward passes over eval_clips) costs about eval_clips / batch_size steps
        planner = StepPlanner(time_limit_s=limit_s, started=t_start, reserve_s=cfg.time_reserve_s, device=device,
                              overhead=cfg.eval_clips / cfg.batch_size / cfg.eval_every)
    steps = planner if planner is not None else cfg.steps
    scheduler = make_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=steps, min_lr_ratio=cfg.min_lr_ratio)
    val_batch = _validation_batch(cfg, device)
    evaluate = _Evaluator(cfg, model, ema, val_batch, amp)
    print(f"{describe_model(model, cfg.data.frames, cfg.data.size)}\n"
          f"device {device_name(device)}, {'bf16 autocast' if uses_bf16(cfg.precision, device) else 'fp32'}, batch "
          f"{cfg.batch_size} ({cfg.batch_size * math.prod(grid)} tokens), steps -> {cfg.steps}", file=sys.stderr)
    loop = LoopConfig(out=out, steps=steps, grad_clip=cfg.grad_clip, ckpt_every=cfg.ckpt_every,
                      keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every, time_limit_s=limit_s,
                      time_reserve_s=cfg.time_reserve_s, started=t_start, stop_at=cfg.stop_at, resume=cfg.resume,
                      batch_size=cfg.batch_size, progress=cfg.progress, desc="pretrain")
    result = train_loop(
        loop, model=model, optimizer=optimizer, scheduler=scheduler, device=device,
        backward=_make_backward(cfg, torch.compile(model) if cfg.compile else model, device, amp),
        state={"ema": ema, **({"plan": planner} if planner is not None else {})},
        meta={"train_config": jsonable(cfg), "model_config": _arch(model), "data_config": jsonable(cfg.data)},
        check_meta=_check_resumed(cfg, model), callback=_make_callback(cfg, model, ema, planner, evaluate))
    if result.signal is not None:
        raise KeyboardInterrupt(f"{result.signal} at step {result.step}: checkpoint {result.last_checkpoint}; "
                                "resume with --resume")
    log_path = out / "log.jsonl"
    if result.step > 0 and not any(r["kind"] == "eval" and r["step"] == result.step for r in read_jsonl(log_path)):
        evaluate(result.step, result.elapsed_s, functools.partial(_append_record, log_path))
    summary = _summary(cfg, result, model, grid, device, planner)
    return _finish(cfg, summary, ema, device, val_batch, amp, out)


def _append_record(log_path: Path, record: dict) -> None:
    with log_path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _summary(cfg: TrainConfig, result, model, grid, device, planner) -> dict[str, Any]:
    from .model import count_parameters

    records = read_jsonl(Path(cfg.out) / "log.jsonl")
    train_recs = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    tail = train_recs[-max(1, len(train_recs) // 10):] if train_recs else []
    rates = [r["clips_per_s"] for r in train_recs[1:]]
    total = planner() if planner is not None else cfg.steps
    return {
        "step": result.step,
        "steps": total if total is not None else result.step,
        "stop_reason": result.stop_reason,
        "batch_size": cfg.batch_size,
        "clips_seen": result.step * cfg.batch_size,
        "final_train_loss": sum(r["loss"] for r in tail) / len(tail) if tail else None,
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "val_loss_ema": evals[-1]["val_loss_ema"] if evals else None,
        "mean_clips_per_s": sum(rates) / len(rates) if rates else None,
        "wall_time_s": result.elapsed_s,
        "device": f"{device_name(device)} (torch {torch.__version__})",
        "precision": "bf16 autocast" if uses_bf16(cfg.precision, device) else "fp32",
        "parameters": count_parameters(model),
        "tokens": math.prod(grid),
        "token_grid": list(grid),
    }


def _finish(cfg: TrainConfig, summary: dict[str, Any], ema: EMA, device, val_batch, amp, out: Path) -> dict[str, Any]:
    """Export (unless stopped early by ``stop_at``), the loss curve and summary.json."""
    step = summary["step"]
    finished = cfg.stop_at is None or step >= summary["steps"] or summary["stop_reason"].startswith("time")
    if finished and cfg.export and step > 0:
        summary.update(_export(cfg, ema.model, device, val_batch, amp, summary, out))
    try:
        save_loss_curve(out / "log.jsonl", out / "loss_curve.png", title=f"tiny Wan pretraining ({step} steps, batch {cfg.batch_size})")
    except ImportError:  # matplotlib is optional
        pass
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------
# Export


def _export(cfg: TrainConfig, ema_model, device, val_batch, amp, summary, out: Path) -> dict[str, Any]:
    """Save the EMA weights in fp16, then reload them to measure and sample what is shipped."""
    import diffusers

    from .model import fp16_bytes, load_tiny_wan

    model_dir = out / "model"
    # plain nn.Module.to: diffusers' override warns about fp16 *inference*, irrelevant for storage
    half = torch.nn.Module.to(copy.deepcopy(ema_model), device="cpu", dtype=torch.float16)
    half.save_pretrained(model_dir, safe_serialization=True)
    del half
    weights = model_dir / "diffusion_pytorch_model.safetensors"
    shipped = load_tiny_wan(model_dir, device=device, dtype=torch.float32)
    val_exported = _validation_loss(shipped, val_batch, cfg.batch_size, amp)

    sampler = dict(guidance_scale=cfg.guidance_scale, guidance_interval=cfg.guidance_interval, shift=cfg.t_shift)
    sampling = {"steps": cfg.sample_steps, **sampler, "guidance_interval": list(cfg.guidance_interval)}
    (model_dir / "sampling.json").write_text(json.dumps(sampling, indent=2) + "\n")  # read by load_sampling_defaults
    result: dict[str, Any] = {"model_dir": str(model_dir), "weights_bytes": weights.stat().st_size, "val_loss_exported": val_exported}
    if cfg.num_samples > 0:
        try:
            from .plots import save_sample_strip

            result["sample_captions"] = save_sample_strip(
                model_dir / "samples.png", shipped, num_samples=cfg.num_samples, seed=cfg.seed, steps=cfg.sample_steps,
                generator=_generator(device, cfg.seed, _STREAM_SAMPLES), data=cfg.data, progress=cfg.progress, **sampler)
            result["samples_png"] = str(model_dir / "samples.png")
        except ImportError:
            pass
    if cfg.shape_samples > 0:
        from .evaluate import sample_shape_accuracy

        judged = sample_shape_accuracy(
            shipped, None, cfg.shape_samples, steps=cfg.sample_steps, seed=cfg.seed, data=cfg.data, device=device,
            **sampler)
        result["shape_accuracy"] = judged["accuracy"]
        result["shape_per_shape"] = judged["per_shape"]
        result["shape_samples"] = cfg.shape_samples

    try:
        save_loss_curve(out / "log.jsonl", model_dir / "loss_curve.png", title=f"tiny Wan pretraining ({summary['step']} steps)")
    except ImportError:
        pass
    card = model_card(cfg, ema_model, summary | result, fp16_bytes(ema_model), diffusers.__version__)
    (model_dir / "MODEL_CARD.md").write_text(card)
    return result


# ----------------------------------------------------------------------------------------------
# Command line


_POSITIVE = float_in(0, low_open=True)


def _steps_arg(text: str) -> int | str:
    return text if text == "auto" else int_at_least(1)(text)


def _seed(text: str) -> int:
    value = int_at_least(0)(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be < 2**32, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig(out="")
    p = argparse.ArgumentParser(
        prog="python -m vidsparse.tiny.pretrain",
        description="Flow-matching pretraining of the tiny Wan video model on synthetic shapes videos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (checkpoints, logs, exported model)")
    p.add_argument(
        "--steps", type=_steps_arg, default=d.steps,
        help="total optimizer steps (the LR schedule spans them), or 'auto' to fill --time-limit-min",
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size)
    p.add_argument("--lr", type=_POSITIVE, default=d.lr, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float_in(0, 1), default=d.min_lr_ratio)
    p.add_argument("--warmup-steps", type=int_at_least(0), default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float_in(0), default=d.weight_decay)
    p.add_argument("--grad-clip", type=float_in(0), default=d.grad_clip, help="0 disables clipping")
    p.add_argument("--ema-decay", type=float_in(0, 1, high_open=True), default=d.ema_decay)
    p.add_argument("--cond-dropout", type=float_in(0, 1, high_open=True), default=d.cond_dropout)
    p.add_argument("--timesteps", choices=TIMESTEP_SAMPLING, default=d.timesteps)
    p.add_argument("--t-shift", type=_POSITIVE, default=d.t_shift, help="warp training (and sample) times towards noise")
    p.add_argument("--seed", type=_seed, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=_PRECISIONS, default=d.precision)
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--ckpt-every", type=int_at_least(1), default=d.ckpt_every)
    p.add_argument("--log-every", type=int_at_least(1), default=d.log_every)
    p.add_argument("--eval-every", type=int_at_least(1), default=d.eval_every)
    p.add_argument("--time-limit-min", type=_POSITIVE, default=None, help="checkpoint and export before this wall time")
    p.add_argument("--stop-at", type=int_at_least(1), default=None, help="stop after this step without finishing the schedule")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="resume from the latest checkpoint in --out, or from the given file")
    p.add_argument("--init-from", default=None, help="start from this saved model directory (fresh optimizer and schedule)")
    p.add_argument("--no-export", action="store_true", help="skip the fp16 export, samples and model card")
    p.add_argument("--num-samples", type=int_at_least(0), default=d.num_samples)
    p.add_argument("--shape-samples", type=int_at_least(0), default=d.shape_samples,
                   help="single-object samples judged by the shape classifier at export (0 = skip)")
    p.add_argument("--sample-steps", type=int_at_least(1), default=d.sample_steps)
    p.add_argument("--guidance-scale", type=float_in(0), default=d.guidance_scale)
    p.add_argument("--guidance-interval", type=float_in(0, 1), nargs=2, default=d.guidance_interval, metavar=("T_LO", "T_HI"),
                   help="guide only sampling steps with t in [T_LO, T_HI]")
    p.add_argument("--no-progress", action="store_true")
    small = p.add_argument_group("reduced sizes (smoke tests)")
    small.add_argument("--frames", type=int_at_least(1), default=d.data.frames)
    small.add_argument("--size", type=int_at_least(1), default=d.data.size)
    small.add_argument("--num-layers", type=int_at_least(1), default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    overrides = {} if args.num_layers is None else {"num_layers": args.num_layers}
    cmd = "python -m vidsparse.tiny.pretrain " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = TrainConfig(
            out=args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            min_lr_ratio=args.min_lr_ratio,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            ema_decay=args.ema_decay,
            cond_dropout=args.cond_dropout,
            timesteps=args.timesteps,
            t_shift=args.t_shift,
            seed=args.seed,
            device=args.device,
            precision=args.precision,
            compile=args.compile,
            ckpt_every=args.ckpt_every,
            log_every=args.log_every,
            eval_every=args.eval_every,
            time_limit_min=args.time_limit_min,
            stop_at=args.stop_at,
            resume=args.resume,
            init_from=args.init_from,
            export=not args.no_export,
            num_samples=args.num_samples,
            shape_samples=args.shape_samples,
            sample_steps=args.sample_steps,
            guidance_scale=args.guidance_scale,
            guidance_interval=tuple(args.guidance_interval),
            progress=not args.no_progress,
            data=ShapesConfig(frames=args.frames, size=args.size),
            model_overrides=overrides,
            command=cmd,
        )
    except ValueError as e:
        parser.error(str(e))  # exit code 2, before any work
    try:
        summary = train(cfg)
    except KeyboardInterrupt as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
