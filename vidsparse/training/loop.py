"""The one training loop of vidsparse: resume, checkpoints, time limit, JSONL log, DDP, fault tolerance.

Model-agnostic: the caller owns the model, the optimizer and the loss. Per step the loop zeroes the
gradients, calls ``backward(step)`` (which runs the forward and ``loss.backward()`` and returns
detached scalar metrics, ``"loss"`` among them), clips the gradient norm, steps the optimizer and
the scheduler, then calls ``callback(info)`` (EMA updates, evaluations, extra log records)::

    result = train_loop(LoopConfig(out="runs/x", steps=500), model=model, optimizer=opt,
                        scheduler=sched, backward=lambda step: {"loss": my_loss(step)})

Layout of ``out`` (only rank 0 writes, except the shards of a sharded checkpoint)::

    log.jsonl                           {"kind": "train", "step", "loss", ..., "grad_norm", "lr", "elapsed_s"} per log interval
    checkpoints/step-0000100.pt         model, optimizer, scheduler, extra state, RNG, step, elapsed time, meta
    checkpoints/step-0000100.pt.sha256  its digest (``sha256sum -c`` reads it)
    checkpoints/step-0000100/           instead, for an FSDP2-sharded model: a DCP folder (training/parallel.py)

A model sharded with ``fully_shard`` is saved with torch.distributed.checkpoint by every rank and
resumes on any number of ranks (or in one process into a plain model); any other model is
saved whole by rank 0 into one ``.pt`` file (one process, DDP).

Fault tolerance:

* a non-finite loss or gradient norm stops the run with ``FloatingPointError`` before anything
  is saved (checked, with one host sync, at every log and before every checkpoint; the norm is
  the global one, also for sharded gradients), so the last finite checkpoint is never pruned;
* SIGTERM / SIGINT finish the current step, write a checkpoint and return with
  ``result.signal`` set (every rank stops at the same step);
* checkpoints are written to a temporary file (folder), fsynced, hashed and renamed; on resume
  each is checked against its sha256 and loaded, and a truncated or overwritten latest
  checkpoint falls back to the previous one with a warning naming the file. Saving step s
  removes checkpoints of later steps (left by the run this one resumed before them, damaged
  ones included) and then keeps the newest ``keep_checkpoints``;
* a torn last line of ``log.jsonl`` (a crash mid-write) is dropped on resume;
* :func:`prepare_out` refuses an ``out`` that holds a run unless resuming, and checks it is
  writable before any work.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .parallel import file_sha256, fsync_dir, is_sharded, load_sharded, save_sharded, verify_sharded

__all__ = ["LoopConfig", "StepInfo", "LoopResult", "train_loop", "prepare_out", "list_checkpoints",
           "load_checkpoint", "latest_checkpoint", "dist_info", "truncate_log", "uses_bf16"]

_CKPT_VERSION = 3
_REQUIRED_LOOP = ("version", "step", "elapsed_s", "rng")  # a sharded folder's loop.pt
_REQUIRED = (*_REQUIRED_LOOP, "model", "optimizer")
_STEP_NAME = re.compile(r"step-(\d+)(\.pt)?")


@dataclass
class LoopConfig:
    """How the loop runs (what is trained is the caller's business).

    Attributes:
        out: run directory. steps: total optimizer steps, or a callable read every step that
            returns None while the total is not known yet (e.g. planned from measured throughput).
        grad_clip: max global gradient norm (0: measure the norm only).
        ckpt_every, keep_checkpoints, log_every: cadences (>= 1) and how many checkpoints to keep.
        time_limit_s: stop (with a checkpoint) when the next step would end less than
            ``time_reserve_s`` before this many seconds after ``started`` (time.monotonic()).
        stop_at: stop after this step (checkpoint), keeping the schedule of ``steps``.
        resume: None, "auto" (latest valid checkpoint in ``out``) or a checkpoint file.
        batch_size: items per step (for ``clips_per_s`` in the log; 0 = not logged).
        progress, desc: tqdm bar on rank 0. handle_signals: turn SIGTERM/SIGINT into a checkpoint.
    """

    out: str | os.PathLike
    steps: int | Callable[[], int | None]
    grad_clip: float = 0.0
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    time_limit_s: float | None = None
    time_reserve_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    stop_at: int | None = None
    resume: str | None = None
    batch_size: int = 0
    progress: bool = True
    desc: str = "train"
    handle_signals: bool = True


@dataclass
class StepInfo:
    """What ``callback`` sees after each optimizer step."""

    step: int
    total: int | None
    elapsed_s: float
    log: Callable[[dict], None]
    main_rank: bool


@dataclass
class LoopResult:
    step: int
    stop_reason: str
    elapsed_s: float
    loop_s: float
    steps_this_call: int
    resumed_from: Path | None = None
    resumed_meta: dict = field(default_factory=dict)
    last_checkpoint: Path | None = None
    signal: str | None = None


# ----------------------------------------------------------------------------------------------
# run directory, checkpoints and log


def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def _step_of(path: Path) -> int:
    return int(_STEP_NAME.fullmatch(path.name).group(1))


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run directory by step, oldest first: ``step-N.pt`` files and ``step-N``
    folders (sharded); temporary ones of an interrupted save are left out."""
    d = _ckpt_dir(Path(out))
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if (m := _STEP_NAME.fullmatch(p.name)) and p.is_dir() != bool(m.group(2))]
    return sorted(found, key=lambda p: (_step_of(p), p.name))


def prepare_out(out: str | os.PathLike, resume: str | None, *, flag: str = "--out") -> Path:
    """Create ``out`` and check it is writable; refuse one that holds a run unless resuming."""
    out = Path(out)
    if resume is None:
        held = [p.name for p in (out / "log.jsonl", _ckpt_dir(out)) if p.exists()]
        if held:
            ckpts = list_checkpoints(out)
            what = f"{len(ckpts)} checkpoint(s), latest {ckpts[-1].name}" if ckpts else ", ".join(held)
            raise ValueError(f"{flag} {out} already holds a run ({what}); pass --resume to continue it or choose a new {flag}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {out} is not writable: {e.strerror or e}") from None
    return out


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_synced(path: Path, write: Callable) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _atomic_save(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, digest beside it, rename both."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest_tmp = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".sha256.tmp")
    _write_synced(tmp, lambda f: torch.save(state, f))
    line = f"{file_sha256(tmp)}  {path.name}\n".encode()
    _write_synced(digest_tmp, lambda f: f.write(line))
    os.replace(digest_tmp, _digest_path(path))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _check_digest(path: Path) -> None:
    """ValueError when the ``.sha256`` beside a checkpoint file does not match it (no digest: older run)."""
    digest = _digest_path(path)
    if not digest.is_file():
        return
    fields = digest.read_text().split()
    if file_sha256(path) != (fields[0] if fields else ""):
        raise ValueError(f"checkpoint {path} is damaged (does not match its sha256 in {digest.name})")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and check a checkpoint written by :func:`train_loop`; ValueError if it is damaged.

    A ``.pt`` file gives its whole state; a sharded folder is checked against its manifest
    (collectively when a process group is initialised) and gives its loop state only (the weights:
    :func:`vidsparse.training.parallel.read_sharded_model`).
    """
    path = Path(path)
    if path.is_dir():
        return verify_sharded(path, _REQUIRED_LOOP)
    _check_digest(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickle errors
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete (missing {missing})")
    return state


def latest_checkpoint(out: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, warning (on rank 0) about damaged newer ones, which are skipped."""
    rank = dist_info()[0]
    for path in reversed(list_checkpoints(out)):
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            if rank == 0:
                warnings.warn(f"{e}; falling back to the previous checkpoint", RuntimeWarning, stacklevel=2)
    return None


def _remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        _digest_path(path).unlink(missing_ok=True)


def truncate_log(log_path: Path, step: int) -> None:
    """Keep the log records up to ``step``; a torn (unparseable) last line is dropped."""
    if not log_path.exists():
        return
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                warnings.warn(f"{log_path}: dropped a torn last line", RuntimeWarning, stacklevel=2)
                break
            raise ValueError(f"{log_path}: line {i + 1} is not JSON") from None
        if rec.get("step", 0) <= step:
            keep.append(line)
    log_path.write_text("".join(line + "\n" for line in keep))


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run's ``precision`` ("auto", "bf16", "fp32") means bf16 autocast on ``device``
    ("auto": on CUDA only)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


# ----------------------------------------------------------------------------------------------
# the loop


class _Signals:
    """Turns SIGTERM / SIGINT into a flag while the loop runs (main thread only)."""

    def __init__(self, enabled: bool):
        self.caught: str | None = None
        self._old: dict = {}
        self.enabled = enabled and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.caught = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Run:
    """State of one call of :func:`train_loop` (kept apart so each method stays short)."""

    def __init__(self, cfg: LoopConfig, model, optimizer, scheduler, state, meta, device):
        import torch.distributed as dist

        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.state, self.meta, self.device = state or {}, meta or {}, device
        self.out = Path(cfg.out)
        self.log_path = self.out / "log.jsonl"
        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.main = self.dist is None or self.dist.get_rank() == 0
        self.step, self.prev_elapsed = 0, 0.0
        self.sums: dict[str, torch.Tensor] = {}
        self.n_acc, self.t_log, self.step_time = 0, time.monotonic(), None
        self.last_ckpt: Path | None = None
        self.ckpt_step = -1

    def total(self) -> int | None:
        return self.cfg.steps() if callable(self.cfg.steps) else self.cfg.steps

    def elapsed(self) -> float:
        return self.prev_elapsed + time.monotonic() - self.cfg.started

    def log(self, record: dict) -> None:
        if self.main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def resume(self, check_meta) -> tuple[Path | None, dict]:
        cfg = self.cfg
        if self.main:
            prepare_out(self.out, cfg.resume)
        if cfg.resume is None:
            return None, {}
        if cfg.resume == "auto":
            found = latest_checkpoint(self.out)
            if found is None:
                raise FileNotFoundError(f"--resume: {_ckpt_dir(self.out)} has no readable checkpoint")
            path, ckpt = found
        else:
            path = Path(cfg.resume)
            if not path.exists():
                raise FileNotFoundError(f"--resume: checkpoint {path} does not exist")
            ckpt = load_checkpoint(path)
        if check_meta is not None:
            check_meta(ckpt.get("meta", {}), path)
        self.load_weights(path, ckpt)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        for name, obj in self.state.items():
            obj.load_state_dict(ckpt["state"][name])
        _restore_rng(ckpt["rng"], self.device)
        self.step, self.prev_elapsed = int(ckpt["step"]), float(ckpt["elapsed_s"])
        self.ckpt_step, self.last_ckpt = self.step, path
        if self.main:
            truncate_log(self.log_path, self.step)
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)
        return path, ckpt.get("meta", {})

    def load_weights(self, path: Path, ckpt: dict) -> None:
        """Model and optimizer from a checkpoint file, or from a sharded folder (resharded to this run)."""
        if path.is_dir():
            load_sharded(path, self.model, self.optimizer)
            return
        if is_sharded(self.model):
            raise ValueError(f"--resume: {path} is a single-file checkpoint (one process or DDP); a sharded "
                             "(FSDP) run resumes from checkpoint folders: resume this run without FSDP")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])

    def check_finite(self) -> None:
        """Raise before anything is saved when a loss or gradient norm since the last check was not finite."""
        if not self.sums:
            return
        names = list(self.sums)
        vals = torch.stack([self.sums[k] for k in names])
        if self.dist is not None:
            bad = (~torch.isfinite(vals)).any().float().reshape(1)
            self.dist.all_reduce(bad, op=self.dist.ReduceOp.MAX)
            ok = not bool(bad.item())
        else:
            ok = bool(torch.isfinite(vals).all())
        if not ok:
            last = self.last_ckpt if self.last_ckpt is not None else "none"
            bad_names = [k for k, v in zip(names, vals.tolist()) if not math.isfinite(v)] or names
            raise FloatingPointError(f"non-finite {', '.join(bad_names)} by step {self.step}; nothing was saved "
                                     f"after it, last checkpoint: {last} (resume from it with a lower lr)")

    def checkpoint(self) -> Path | None:
        self.check_finite()
        sharded = is_sharded(self.model)
        path = _ckpt_dir(self.out) / f"step-{self.step:07d}{'' if sharded else '.pt'}"
        loop_state = {
            "version": _CKPT_VERSION, "step": self.step, "elapsed_s": self.elapsed(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "state": {k: v.state_dict() for k, v in self.state.items()}, "rng": _rng_state(self.device),
            "meta": self.meta, "total_steps": self.total(),
        }
        if sharded:  # every rank writes its shards
            save_sharded(path, self.model, self.optimizer, loop_state)
        elif self.main:
            _atomic_save({**loop_state, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, path)
        if self.main:
            self.prune()
        self.ckpt_step, self.last_ckpt = self.step, path
        return path

    def prune(self) -> None:
        """Drop checkpoints of later steps (a resume went back before them) and all but the newest kept."""
        ckpts = list_checkpoints(self.out)
        later = [p for p in ckpts if _step_of(p) > self.step]
        if later:
            print(f"removing checkpoint(s) after step {self.step} (from before this resume): "
                  f"{', '.join(p.name for p in later)}", file=sys.stderr)
        done = [p for p in ckpts if _step_of(p) <= self.step]
        for old in later + done[:-self.cfg.keep_checkpoints]:
            _remove_checkpoint(old)

    def accumulate(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float().reshape(())
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.n_acc += 1

    def write_log(self) -> None:
        self.check_finite()
        names = list(self.sums)
        vals = torch.stack([self.sums[k] for k in names]) / self.n_acc
        if self.dist is not None:  # the mean over the global batch, not rank 0's slice
            self.dist.all_reduce(vals)
            vals /= self.dist.get_world_size()
        now = time.monotonic()
        self.step_time = (now - self.t_log) / self.n_acc
        rec = {"kind": "train", "step": self.step, **dict(zip(names, vals.tolist()))}
        if self.scheduler is not None:
            rec["lr"] = self.scheduler.get_last_lr()[0]
        if self.cfg.batch_size:
            rec["clips_per_s"] = self.cfg.batch_size / self.step_time
        rec["elapsed_s"] = self.elapsed()
        self.log(rec)
        self.sums, self.n_acc, self.t_log = {}, 0, time.monotonic()

    def should_stop(self, signals: _Signals, steps_this_call: int) -> str | None:
        cfg, total = self.cfg, self.total()
        if total is not None and self.step >= total:
            return "completed"
        if cfg.stop_at is not None and self.step >= cfg.stop_at:
            return f"stop_at={cfg.stop_at}"
        late = False
        if cfg.time_limit_s is not None and steps_this_call >= 1:
            needed = 1.5 * (self.step_time or 0.0) + cfg.time_reserve_s
            late = time.monotonic() - cfg.started + needed > cfg.time_limit_s
        flags = [late, signals.caught is not None]
        if self.dist is not None:  # every rank stops at the same step
            t = torch.tensor([float(f) for f in flags], device=self.device)
            self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
            flags = [bool(x) for x in t.tolist()]
        if flags[1]:
            return f"interrupted ({signals.caught or 'signal on another rank'})"
        if flags[0]:
            return f"time limit ({cfg.time_limit_s / 60:g} min)"
        return None


def _global(norm: torch.Tensor) -> torch.Tensor:
    """The gradient norm as a plain tensor: over sharded (DTensor) gradients it is a DTensor."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def train_loop(
    cfg: LoopConfig,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    backward: Callable[[int], dict[str, torch.Tensor]],
    scheduler=None,
    params=None,
    state: dict[str, Any] | None = None,
    meta: dict | None = None,
    check_meta: Callable[[dict, Path], None] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    device: torch.device | None = None,
) -> LoopResult:
    """Run (or resume) the loop until ``cfg.steps``, ``stop_at``, the time limit or a signal.

    Args:
        model: what is checkpointed (the unwrapped module; wrap it in DDP yourself for ``backward``).
            A model sharded with ``fully_shard`` is checkpointed in sharded folders (DCP); build
            ``optimizer`` after sharding.
        backward: ``step -> {"loss": tensor, ...}``; runs the forward and ``.backward()`` of step
            ``step`` (0-based) and returns detached scalar metrics, averaged per log interval.
        params: the parameters whose gradient norm is clipped (default: those requiring grad).
        state: extra objects with ``state_dict`` / ``load_state_dict`` to checkpoint (EMA, plans).
        meta: JSON-ready settings saved in every checkpoint; ``check_meta(saved_meta, path)``
            raises on resume when they are incompatible.
        callback: called after every optimizer step with a :class:`StepInfo` (EMA updates,
            evaluations); its time is left out of ``clips_per_s`` and of the step time that the
            time limit extrapolates.
    Raises:
        FloatingPointError: a non-finite loss or gradient norm (nothing saved after it).
    """
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    run = _Run(cfg, model, optimizer, scheduler, state, meta, device)
    resumed_from, resumed_meta = run.resume(check_meta)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    bar = tqdm(total=run.total(), initial=run.step, desc=cfg.desc, disable=not (cfg.progress and run.main),
               dynamic_ncols=True)
    t_loop, steps_this_call, reason = time.monotonic(), 0, "completed"
    with _Signals(cfg.handle_signals) as signals:
        try:
            while (reason := run.should_stop(signals, steps_this_call)) is None:
                optimizer.zero_grad(set_to_none=True)
                metrics = dict(backward(run.step))
                metrics["grad_norm"] = _global(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                run.step += 1
                steps_this_call += 1
                run.accumulate(metrics)
                bar.update(1)
                total = run.total()
                if bar.total != total:
                    bar.total = total
                if run.step % cfg.log_every == 0 or run.step == total:
                    run.write_log()
                elif run.step_time is None and steps_this_call >= 2:
                    run.step_time = (time.monotonic() - t_loop) / steps_this_call
                if callback is not None:
                    t_cb = time.monotonic()
                    callback(StepInfo(run.step, total, run.elapsed(), run.log, run.main))
                    run.t_log += time.monotonic() - t_cb  # evaluations stay out of the throughput numbers
                if run.step % cfg.ckpt_every == 0:
                    run.checkpoint()
        finally:
            bar.close()
        if run.ckpt_step != run.step:
            run.checkpoint()  # checks the steps since the last log are finite first
    return LoopResult(step=run.step, stop_reason=reason, elapsed_s=run.elapsed(), loop_s=time.monotonic() - t_loop,
                      steps_this_call=steps_this_call, resumed_from=resumed_from, resumed_meta=resumed_meta,
                      last_checkpoint=run.last_ckpt, signal=signals.caught)
