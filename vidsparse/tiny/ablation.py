"""SpargeAttention2's ablation (paper Table 6) at small scale, time-budgeted for one GPU call.

Run it as a module (or through ``benchmarks/ablation_gpu.sh``)::

    python -m vidsparse.tiny.ablation --out out --time-limit-min 9
    python -m vidsparse.tiny.ablation --out out/smoke --smoke       # CPU: end to end in well under a minute

Ten variants of the embedded tiny Wan model, all at about 95% block sparsity (by default with the
paper's 128 x 64 blocks in raster token order; the shared mask flags ``--block-q/--block-k``,
``--token-order tiled``, ``--keep-diagonal``, ``--keep-sink`` and ``--option KEY=VALUE`` set the base
:class:`vidsparse.SparseConfig` of every variant, e.g. the mask the shipped student uses):

====  ===================================================  ==========  ======================
 #    method                                               mask        fine-tuning data
====  ===================================================  ==========  ======================
 1    dense attention (the reference)                      -           -
 2-4  training-free sparse attention                       k / p / k+p -
 5    diffusion-loss fine-tuning (no distillation term)    k+p         "shifted" split
 6-8  velocity distillation                                k / p / k+p "shifted" split
 9    diffusion-loss fine-tuning                           k+p         "train" split
 10   velocity distillation                                k+p         "train" split
====  ===================================================  ==========  ======================

The "shifted" split uses colours, motions and backgrounds the model never saw (the paper's
mismatched fine-tuning data); "train" is the pretraining distribution (matched data).

Sparsity matching: Top-k alone at k = 0.05 keeps floor(0.05 * 64) = 3 of the 64 key blocks of a
4096-token clip, 1 - 3/64 = 95.3% block sparsity whatever the input. Top-p alone and the hybrid
depend on the attention maps, so their p is calibrated first. The hybrid's k is 0.03125 = 2 of 64
blocks, the paper's 3% on our grid: k = 0.03 would floor to 1 block, and Top-p always keeps at
least the top block, so that hybrid would be Top-p alone. The calibration is a bisection on p
until the block sparsity measured by ``vidsparse.tiny.evaluate.validation_loss`` (which records it with
``SparseConfig(collect_stats=True)``) over a batch of validation clips at several timesteps is
closest to the Top-k figure. The chosen p and the measured sparsities are
recorded; every variant's sparsity is measured again at evaluation (it drifts a little after
fine-tuning, since the student's Q and K change while k and p stay fixed).

Time budget (``--time-limit-min``, counted from the start of :func:`run_ablation`): after the
calibration and the four untrained evaluations, a short velocity-distillation run (the most
expensive objective: teacher forward + student forward/backward) measures the step time, and the
remaining time, minus the measured evaluation cost and a reserve, is split evenly over the trained
variants. All trained variants then run the SAME number of steps with the SAME seed (data order,
noise, timesteps); diffusion-loss variants do not run the teacher and finish sooner. Each variant
also gets a hard time limit (1.5 x its share) and the run skips variants it cannot finish, so
the outputs are always written; ``ablation.json`` is rewritten after every variant.

Training defaults for the 5.9 M-parameter model (reasoning in ``docs/fine-tuning.md``): batch 32
(as in pretraining), AdamW lr 1e-4 (10x below the pretraining peak of 1e-3, 2x its final lr; the
paper/TurboDiffusion's 1e-5 is for 1.3B-parameter models and would barely move a 6 M model in a
few hundred steps), 20 warm-up steps, cosine decay to 0.1 x, weight decay 0.01, grad clip 1, bf16
autocast; timesteps from the pretraining distribution (logit-normal(0, 1) warped with shift 3,
the shift the sampler uses), all parameters trained.

Outputs (only these, so the directory can be copied back from a GPU machine whole)::

    out/ablation.json                 every variant: method, data, k, p, measured sparsity, steps,
                                      train seconds, val loss, delta % vs dense, shifted-split
                                      val loss, PSNR, SSIM; plus the calibration and the settings
    out/ablation.md                   the markdown table for docs/benchmarks.md (card, versions, date, command)
    out/distilled_hybrid/             variant 8 (velocity distillation, hybrid mask, shifted data):
                                      fp16 safetensors (save_pretrained), sampling.json, MODEL_CARD.md,
                                      sparse_config.json (the k, p and blocks it was distilled for)

Checkpoints and per-variant logs go to ``--work-dir`` (default ``runs/ablation``), not to ``out``.
"""

from __future__ import annotations

import time

_T_IMPORT = time.monotonic()  # the budget counts the imports too (torch, diffusers: seconds on a cold machine)

import argparse
import datetime
import functools
import inspect
import json
import math
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..cli_options import UNSET, add_mask_arguments, float_in, int_at_least, sparse_config_from_args
from ..config import SparseConfig
from ..utils import device_name, jsonable, sync, versions
from .ablation_config import (EXPORT_VARIANT, SMOKE, SMOKE_BLOCKS, TRAIN_ORDER, VARIANTS, AblationConfig, Variant,
                              smoke_config)
from .ablation_report import export_student, render_markdown

__all__ = ["AblationConfig", "VARIANTS", "run_ablation", "calibrate_topp", "plan_steps", "smoke_config", "build_parser",
           "base_sparse_from_args", "main"]


# ----------------------------------------------------------------------------------------------
# helpers


def _log(msg: str) -> None:
    print(f"[ablation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _call(fn, **kwargs):
    """Call ``fn`` with the keyword arguments its signature accepts (evaluate.py is young)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


# ----------------------------------------------------------------------------------------------
# calibration of p


def measured_sparsity(model, sparse, cfg: AblationConfig, data, device) -> float:
    """Mean block sparsity of ``sparse`` on ``calib_clips`` val clips x ``calib_num_t`` times."""
    from .evaluate import validation_loss

    r = _call(validation_loss, model=model, sparse=sparse, split="val", clips=cfg.calib_clips,
              batch_size=cfg.eval_batch_size, seed=cfg.seed, num_t=cfg.calib_num_t, device=device, data=data)
    return float(r["sparsity"])


def calibrate_topp(model, make_sparse, target: float, *, iters: int, measure) -> dict[str, Any]:
    """Bisect p in (0, 1) so that ``measure(make_sparse(p))`` is closest to ``target``.

    Block sparsity falls monotonically as p grows (Top-p keeps a longer prefix of the same sorted
    row). Returns ``{"p", "sparsity", "trace": [(p, sparsity), ...]}`` for the closest p tried.
    """
    lo, hi = 0.0, 1.0
    trace = []
    for _ in range(iters):
        p = (lo + hi) / 2
        s = measure(make_sparse(p))
        trace.append((p, s))
        if s > target:  # too sparse: keep more mass
            lo = p
        else:
            hi = p
    p, s = min(trace, key=lambda ps: (abs(ps[1] - target), ps[0]))
    return {"p": p, "sparsity": s, "trace": trace}


# ----------------------------------------------------------------------------------------------
# the run


def _load_model(cfg: AblationConfig, device: torch.device):
    from .model import default_weights_dir, load_tiny_wan

    where = Path(cfg.model) if cfg.model is not None else default_weights_dir()
    model = load_tiny_wan(where, device=device, dtype=torch.float32)
    if cfg.num_layers is not None and cfg.num_layers < len(model.blocks):
        model.blocks = model.blocks[: cfg.num_layers]
        model.register_to_config(num_layers=cfg.num_layers)  # an export then loads as this depth
    return model, where


def _evaluate(model, sparse, cfg: AblationConfig, reference, data, device, cache) -> dict[str, Any]:
    from .evaluate import evaluate_variant, validation_loss

    t0 = time.monotonic()
    r = _call(evaluate_variant, model=model, sparse=sparse, reference=reference, split="val", clips=cfg.eval_clips,
              batch_size=cfg.eval_batch_size, samples=cfg.samples, sample_steps=cfg.sample_steps, seed=cfg.seed,
              device=device, progress=cfg.progress, num_t=cfg.eval_num_t, data=data, cache=cache,
              shape_samples=cfg.shape_samples)
    out = {k: r.get(k) for k in ("val_loss", "per_t", "sparsity", "sample_sparsity", "psnr", "ssim", "seconds",
                                 "shape_accuracy", "shape_per_shape", "shape_confusion")}
    if cfg.shifted_eval:
        s = _call(validation_loss, model=model, sparse=sparse, split="shifted", clips=cfg.eval_clips,
                  batch_size=cfg.eval_batch_size, seed=cfg.seed, num_t=cfg.eval_num_t, device=device, data=data)
        out["shifted_val_loss"] = s["val_loss"]
    sync(device)
    out["eval_seconds"] = time.monotonic() - t0
    return out


def _distill_config(cfg: AblationConfig, variant: Variant, sparse, out_dir: Path, steps: int, limit_min: float | None,
                    device: str):
    from ..training.distill import DistillConfig

    return DistillConfig(
        out=str(out_dir), steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, steps),
        min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        distill_weight=1.0 if variant.objective == "distill" else 0.0,
        diffusion_weight=1.0 if variant.objective == "diffusion" else 0.0,
        timesteps=cfg.timesteps, t_mean=cfg.t_mean, t_std=cfg.t_std, t_shift=cfg.t_shift, trainable="all",
        sparse=sparse,
        data=variant.data or "train", frames=cfg.frames, size=cfg.size, seed=cfg.seed, device=device,
        ckpt_every=steps, keep_checkpoints=1, log_every=max(1, min(25, steps // 10 or 1)),
        time_limit_min=limit_min, export=False, plot=not cfg.smoke, progress=cfg.progress,
    )


def _measure_step_time(cfg: AblationConfig, model, sparse, work: Path, device: torch.device, objective: str) -> dict[str, Any]:
    """Seconds per training step of ``objective`` (hybrid mask, shifted data), from a short throw-away run."""
    from ..training.distill import distill
    from ..training.plots import read_jsonl

    run_dir = work / f"throughput_{objective}"
    shutil.rmtree(run_dir, ignore_errors=True)
    variant = next(v for v in VARIANTS if v.objective == objective and v.mask == "hybrid")
    dcfg = _distill_config(cfg, variant, sparse, run_dir, cfg.train_calib_steps, None, str(device))
    dcfg.log_every = 1
    t0 = time.monotonic()
    distill(dcfg, model=model)
    wall = time.monotonic() - t0
    recs = [r for r in read_jsonl(run_dir / "log.jsonl") if r["kind"] == "train"]
    # skip the first steps (Triton JIT / autotuning of the backward kernels, cuDNN warm-up)
    times = sorted(cfg.batch_size / r["clips_per_s"] for r in recs[len(recs) // 2:])
    step_s = times[len(times) // 2]
    return {"steps": len(recs), "step_s": step_s, "wall_s": wall,
            "overhead_s": max(0.0, wall - sum(cfg.batch_size / r["clips_per_s"] for r in recs))}


def plan_steps(budget_s: float, objectives: Sequence[str], step_s: dict[str, float], overhead_s: dict[str, float],
               eval_s: float, *, margin: float = 0.92) -> int:
    """The common number of steps that lets every trained variant finish within ``budget_s``.

    Each variant costs ``steps * step_s[objective]`` plus fixed costs: its evaluation (``eval_s``,
    with 25% slack), the model copies / optimizer / checkpoint of a run (``overhead_s[objective]``,
    measured) and 2 s of logging. ``margin`` keeps a share of the training time in reserve.
    Returns at least 1.
    """
    fixed = sum(1.25 * eval_s + overhead_s.get(obj, 0.0) + 2.0 for obj in objectives)
    per_step = sum(step_s[obj] for obj in objectives)
    return max(1, int(margin * (budget_s - fixed) / per_step))


class _Run:
    """One ablation run: its model, device, budget, rows and the payload written after every step."""

    def __init__(self, cfg: AblationConfig, model, started: float | None):
        from .data import ShapesConfig
        from .model import token_grid
        from ..utils import resolve_device

        self.cfg = cfg
        self.t_start = time.monotonic() if started is None else started
        self.deadline = self.t_start + cfg.time_limit_min * 60
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.out, self.work = Path(cfg.out), Path(cfg.work_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        if model is None:
            model, self.model_dir = _load_model(cfg, self.device)
        else:
            model, self.model_dir = model.to(self.device).eval(), None
        self.model = model.requires_grad_(False)
        self.data = ShapesConfig(frames=cfg.frames, size=cfg.size, text_dim=int(model.config.text_dim))
        self.tokens = math.prod(token_grid(model.config, self.data.frames, self.data.size, self.data.size))
        block_k = cfg.sparse.block_k
        self.n_kv = -(-self.tokens // block_k)
        self.kept_topk = max(1, math.floor(cfg.topk_only * self.n_kv * (1 + 1e-6)))  # the masker's rounding
        self.selected = [v for v in VARIANTS if v.id in cfg.variants]
        self.trained = sorted((v for v in self.selected if v.objective), key=lambda v: TRAIN_ORDER.index(v.id))
        self.topp: dict[str, float] = {}
        self.cache: dict = {}
        self.dense_loss: float | None = None
        self.eval_costs: list[float] = []
        self.payload = self._new_payload()
        self.rows = {v.id: {"id": v.id, "variant": v.name, "method": v.mask, "objective": v.objective or "none",
                            "data": v.data or "-", "topk": None, "topp": None, "status": "pending"} for v in self.selected}
        self.payload["variants"] = [self.rows[v.id] for v in self.selected]
        target = self.payload["target_sparsity"]
        _log(f"{self.tokens} tokens, {self.n_kv} key blocks of {block_k}; Top-k only k={cfg.topk_only} keeps "
             f"{self.kept_topk} -> target block sparsity {target:.4f}; device {device_name(self.device)}; "
             f"budget {cfg.time_limit_min:g} min")

    def _new_payload(self) -> dict[str, Any]:
        cfg, device = self.cfg, self.device
        target = cfg.target_sparsity if cfg.target_sparsity is not None else 1 - self.kept_topk / self.n_kv
        return {
            "title": "SpargeAttention2 ablation (Table 6) on the tiny Wan model",
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "command": cfg.command,
            "device": str(device), "device_name": device_name(device),
            "precision": "bf16 autocast" if device.type == "cuda" else "float32", "versions": versions(),
            "model": str(self.model_dir) if self.model_dir is not None else "(in-memory model)",
            "tokens": self.tokens, "settings": jsonable({k: v for k, v in vars(cfg).items() if k != "command"}),
            "target_sparsity": target, "calibration": {}, "plan": {}, "variants": [], "status": "running",
        }

    def write(self) -> None:
        """ablation.json and ablation.md, after every step, so a run that dies still leaves its results."""
        self.payload["elapsed_s"] = time.monotonic() - self.t_start
        (self.out / "ablation.json").write_text(json.dumps(jsonable(self.payload), indent=2) + "\n")
        (self.out / "ablation.md").write_text(render_markdown(self.payload))

    def measure(self, sparse: SparseConfig) -> float:
        return measured_sparsity(self.model, sparse, self.cfg, self.data, self.device)

    def evaluate(self, model, sparse: SparseConfig | None) -> dict[str, Any]:
        return _evaluate(model, sparse, self.cfg, self.model, self.data, self.device, self.cache)

    def finish_row(self, row: dict[str, Any], result: dict[str, Any]) -> None:
        row.update(result)
        if self.dense_loss is not None and row.get("val_loss") is not None:
            row["delta_vs_dense_pct"] = 100.0 * (row["val_loss"] - self.dense_loss) / self.dense_loss
        row["status"] = "done"

    # ---- 1. calibrate p of Top-p only and of the hybrid on validation clips
    def calibrate(self) -> None:
        cfg, cal = self.cfg, self.payload["calibration"]
        t0 = time.monotonic()
        needs = {v.mask for v in self.selected}
        if cfg.priors and cfg.target_sparsity is None:
            # the prior's blocks come on top of Top-k's where Top-k did not pick them: measure, not count
            self.payload["target_sparsity"] = self.measure(cfg.mask("topk", {}))
            _log(f"with the prior(s), Top-k only measures block sparsity {self.payload['target_sparsity']:.4f}: the target")
        target = self.payload["target_sparsity"]
        for key, fixed in (("topp", cfg.topp_only), ("hybrid", cfg.hybrid_topp)):
            make = functools.partial(lambda k, p: cfg.mask(k, {k: p}), key)
            if key not in needs:
                self.topp[key] = fixed if fixed is not None else 0.5
                continue
            if fixed is not None:
                self.topp[key] = fixed
                cal[key] = {"p": fixed, "sparsity": self.measure(make(fixed)), "calibrated": False}
            else:
                res = calibrate_topp(self.model, make, target, iters=cfg.calib_iters, measure=self.measure)
                self.topp[key] = res["p"]
                cal[key] = {"p": res["p"], "sparsity": res["sparsity"], "calibrated": True, "trace": res["trace"]}
            _log(f"calibrated {key}: p={cal[key]['p']:.5f} -> block sparsity {cal[key]['sparsity']:.4f} (target {target:.4f})")
        if "topk" in needs:
            cal["topk"] = {"k": cfg.topk_only, "sparsity": self.measure(cfg.mask("topk", self.topp)),
                           "kept_blocks": self.kept_topk}
        cal.update(seconds=time.monotonic() - t0, clips=cfg.calib_clips, num_t=cfg.calib_num_t)
        for v in self.selected:
            sp = cfg.mask(v.mask, self.topp)
            if sp is not None:
                self.rows[v.id]["topk"], self.rows[v.id]["topp"] = sp.options["topk"], sp.options["topp"]
        self.write()

    # ---- 2. untrained variants (dense first: the reference of every delta)
    def evaluate_untrained(self) -> None:
        if 1 not in self.cfg.variants:  # the delta column still needs the dense number
            self.dense_loss = self.evaluate(self.model, None)["val_loss"]
        for v in (v for v in self.selected if not v.objective):
            r = self.evaluate(self.model, self.cfg.mask(v.mask, self.topp))
            if v.id == 1:
                self.dense_loss = r["val_loss"]
            else:
                self.eval_costs.append(r["eval_seconds"])
            self.finish_row(self.rows[v.id], r | {"steps": 0, "train_seconds": 0.0})
            _log(f"variant {v.id} ({v.name}): val loss {r['val_loss']:.5f}, sparsity {r['sparsity']}, "
                 f"PSNR {r['psnr']}, {r['eval_seconds']:.1f} s")
            self.write()
        self.payload["dense_val_loss"] = self.dense_loss

    # ---- 3. plan the steps of the trained variants
    def plan(self) -> dict[str, Any]:
        cfg = self.cfg
        # the first sparse evaluation pays for kernel compilation / autotuning: leave it out
        warm = self.eval_costs[1:] or self.eval_costs
        eval_s = max(warm) if warm else 0.0
        if cfg.steps is not None:
            plan = {"steps": cfg.steps, "source": "fixed (--steps)", "eval_s": eval_s, "step_s": {}}
        else:
            # time one short run per objective: velocity distillation also runs the teacher. It goes
            # first: its first steps absorb the one-time costs (Triton autotuning of the backward)
            hybrid = cfg.mask("hybrid", self.topp)
            meas = {obj: _measure_step_time(cfg, self.model, hybrid, self.work, self.device, obj)
                    for obj in sorted({v.objective for v in self.trained}, key=lambda o: o != "distill")}
            step_s = {obj: m["step_s"] for obj, m in meas.items()}
            left = self.deadline - time.monotonic() - cfg.reserve_s
            steps = plan_steps(left, [v.objective for v in self.trained], step_s,
                               {obj: m["overhead_s"] for obj, m in meas.items()}, eval_s)
            plan = {"steps": steps, "source": f"time budget ({cfg.time_limit_min:g} min)", "step_s": step_s,
                    "throughput_runs": meas, "train_budget_s": left, "eval_s": eval_s}
            rates = ", ".join(f"{obj} {1e3 * s:.0f} ms" for obj, s in step_s.items())
            _log(f"throughput per step (batch {cfg.batch_size}): {rates}; {left:.0f} s left for "
                 f"{len(self.trained)} trained variants -> {steps} steps each")
        self.payload["plan"] = plan
        self.write()
        return plan

    # ---- 4. train and evaluate
    def time_limit_min(self, v: Variant, plan: dict[str, Any]) -> float | None | bool:
        """The variant's hard time limit in minutes (None: fixed steps), False to skip it."""
        if self.cfg.steps is not None:
            return None
        # what is left for this variant's training once its evaluation is paid for
        left = self.deadline - time.monotonic() - self.cfg.reserve_s - 1.25 * plan["eval_s"]
        expected = plan["step_s"][v.objective] * plan["steps"]
        if left < 0.5 * expected:
            self.rows[v.id]["status"] = "skipped (time)"
            _log(f"variant {v.id}: skipped, {left:.0f} s left for {expected:.0f} s of training")
            return False
        # a hard stop: a slow variant cannot eat the others' time or the final writes
        return min(1.5 * expected + 10.0, left) / 60

    def train_variant(self, v: Variant, plan: dict[str, Any]) -> None:
        from ..training.distill import train_student

        limit_min = self.time_limit_min(v, plan)
        if limit_min is False:
            return
        cfg, row, steps = self.cfg, self.rows[v.id], plan["steps"]
        sparse = cfg.mask(v.mask, self.topp)
        run_dir = self.work / f"v{v.id:02d}"
        shutil.rmtree(run_dir, ignore_errors=True)
        dcfg = _distill_config(cfg, v, sparse, run_dir, steps, limit_min, str(self.device))
        summary, student = train_student(dcfg, model=self.model)
        sync(self.device)
        row.update(steps=summary["step"], train_seconds=summary["train_loop_s"], first_train_loss=summary["first_loss"],
                   final_train_loss=summary["final_loss"], stop_reason=summary["stop_reason"])
        if v.id == EXPORT_VARIANT:
            export_student(student, self.out / "distilled_hybrid", self.model_dir, cfg, v, sparse, summary, self.payload)
            row["exported_to"] = str(self.out / "distilled_hybrid")
        r = self.evaluate(student, sparse)
        del student
        self.finish_row(row, r)
        if summary["step"] != steps:
            row["status"] = f"done ({summary['stop_reason']} after {summary['step']} of {steps} steps)"
        _log(f"variant {v.id} ({v.name}, {v.data}): {summary['step']} steps in {summary['train_loop_s']:.1f} s, "
             f"val loss {r['val_loss']:.5f} ({row['delta_vs_dense_pct']:+.1f}% vs dense), sparsity {r['sparsity']}, "
             f"PSNR {r['psnr']}")

    def train_all(self, plan: dict[str, Any]) -> None:
        for v in self.trained:
            try:
                self.train_variant(v, plan)
            except Exception as e:  # one failed variant (e.g. a diverging loss) must not lose the others
                import traceback

                traceback.print_exc()
                self.rows[v.id]["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                _log(f"variant {v.id}: {self.rows[v.id]['status']}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.write()


def run_ablation(cfg: AblationConfig, model: torch.nn.Module | None = None, *, started: float | None = None) -> dict[str, Any]:
    """Run the ablation; returns the payload written to ``out/ablation.json``.

    ``model`` (float32) replaces loading ``cfg.model`` (tests). ``started``: the
    ``time.monotonic()`` the time limit counts from (default: now; the CLI passes its import time).
    """
    run = _Run(cfg, model, started)
    run.calibrate()
    run.evaluate_untrained()
    if run.trained:
        run.train_all(run.plan())
    run.payload["status"] = "done"
    run.write()
    _log(f"done in {run.payload['elapsed_s']:.0f} s: {run.out / 'ablation.json'}, {run.out / 'ablation.md'}")
    return run.payload


# ----------------------------------------------------------------------------------------------
# command line


def _variants_arg(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated variant ids, got {text!r}") from None


_POSITIVE = float_in(0, low_open=True)
_FRACTION = float_in(0, 1, low_open=True)  # (0, 1]
_OPEN_FRACTION = float_in(0, 1, low_open=True, high_open=True)  # (0, 1)


def build_parser() -> argparse.ArgumentParser:
    d = AblationConfig(out="")
    p = argparse.ArgumentParser(
        prog="python -m vidsparse.tiny.ablation",
        description="SpargeAttention2's Table 6 ablation on the tiny Wan model, inside a wall-clock budget.",
    )
    p.add_argument("--out", required=True, help="ablation.json, ablation.md and distilled_hybrid/ go here")
    p.add_argument("--work-dir", default=None, help="checkpoints and logs (default runs/ablation; smoke: runs/ablation_smoke)")
    p.add_argument("--model", default=None, help="diffusers Wan directory (default: the embedded tiny model)")
    p.add_argument("--time-limit-min", type=_POSITIVE, default=d.time_limit_min, help=f"budget of the whole run, imports included (default {d.time_limit_min:g})")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="fixed steps per trained variant (default: planned from the budget)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help=f"clips per step (default {d.batch_size}; smoke 2)")
    p.add_argument("--lr", type=_POSITIVE, default=d.lr, help=f"AdamW peak lr (default {d.lr:g})")
    p.add_argument("--warmup-steps", type=int_at_least(0), default=None, help=f"(default {d.warmup_steps})")
    p.add_argument("--min-lr-ratio", type=float_in(0, 1), default=d.min_lr_ratio, help=f"cosine floor (default {d.min_lr_ratio:g})")
    p.add_argument("--topk-only", type=_FRACTION, default=None, help=f"k of the Top-k variants (default {d.topk_only})")
    p.add_argument("--hybrid-topk", type=_FRACTION, default=None, help=f"k of the hybrid variants (default {d.hybrid_topk})")
    p.add_argument("--topp-only", type=float_in(0, 1, low_open=True, high_open=True, none=True), default=None,
                   help="fixed p of Top-p only (default: calibrated)")
    p.add_argument("--hybrid-topp", type=float_in(0, 1, low_open=True, high_open=True, none=True), default=None,
                   help="fixed p of the hybrid (default: calibrated)")
    p.add_argument("--target-sparsity", type=_OPEN_FRACTION, default=None, help="calibration target (default: Top-k only's)")
    p.add_argument("--t-shift", type=_POSITIVE, default=None, help=f"shift of the training times (default {d.t_shift:g})")
    p.add_argument("--shape-samples", type=int_at_least(0), default=None,
                   help=f"single-object samples per variant judged by the shape classifier (default {d.shape_samples})")
    p.add_argument("--variants", type=_variants_arg, default=None, help="subset of 1..10, e.g. 1,4,8")
    p.add_argument("--eval-clips", type=int_at_least(1), default=None, help=f"val clips (default {d.eval_clips})")
    p.add_argument("--samples", type=int_at_least(0), default=None, help=f"samples for PSNR/SSIM (default {d.samples})")
    p.add_argument("--sample-steps", type=int_at_least(1), default=None, help=f"Euler steps per sample (default {d.sample_steps})")
    p.add_argument("--no-shifted-eval", action="store_true", help="skip the shifted split's val loss")
    p.add_argument("--seed", type=int_at_least(0), default=d.seed, help="data, noise and evaluation seed (default 0)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU configuration (end-to-end check; 16x16 blocks)")
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    add_mask_arguments(p, d.sparse, title="the base mask of every sparse variant (k and p are set per variant)")
    return p


def base_sparse_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SparseConfig:
    """The base SparseConfig from the shared mask flags; k and p belong to the variants."""
    given = [f for f, v in (("--topk", args.topk), ("--topp", args.topp)) if v is not UNSET]
    given += [f"--option {k}" for k, _ in args.option if k in ("topk", "topp")]
    if given:
        parser.error(f"{given[0]}: the ablation sets k and p per variant; use --topk-only / --hybrid-topk "
                     "(and --topp-only / --hybrid-topp to skip the calibration)")
    if args.method is not UNSET and args.method != "hybrid":
        parser.error(f"--method: the ablation compares the 'hybrid' masker's Top-k, Top-p and hybrid rules, "
                     f"not {args.method!r}")
    return sparse_config_from_args(args, parser, defaults=SparseConfig(**SMOKE_BLOCKS) if args.smoke else None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = "python -m vidsparse.tiny.ablation " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    changes: dict[str, Any] = dict(model=args.model, time_limit_min=args.time_limit_min, steps=args.steps, lr=args.lr,
                                   min_lr_ratio=args.min_lr_ratio, topp_only=args.topp_only, hybrid_topp=args.hybrid_topp,
                                   target_sparsity=args.target_sparsity, shifted_eval=not args.no_shifted_eval,
                                   seed=args.seed, device=args.device, progress=args.progress, command=cmd,
                                   sparse=base_sparse_from_args(args, parser))
    for name in ("batch_size", "warmup_steps", "topk_only", "hybrid_topk", "eval_clips", "samples", "sample_steps",
                 "variants", "work_dir", "t_shift", "shape_samples"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    try:
        if args.smoke:
            changes["steps"] = changes["steps"] or SMOKE["steps"]
            cfg = smoke_config(args.out, **changes)
        else:
            cfg = AblationConfig(out=args.out, **changes)
    except ValueError as e:
        parser.error(str(e))
    try:
        payload = run_ablation(cfg, started=_T_IMPORT)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
