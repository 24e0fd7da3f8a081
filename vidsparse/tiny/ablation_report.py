"""The ablation's outputs besides its JSON: the distilled student's folder (weights, card, its
``sparse_config.json``) and the markdown table. Used by :mod:`vidsparse.tiny.ablation`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..utils import fmt

if TYPE_CHECKING:  # pragma: no cover
    from .ablation_config import AblationConfig, Variant

__all__ = ["export_student", "render_markdown"]


def export_student(student, path: Path, model_dir: Path | None, cfg: AblationConfig, v: Variant, sparse, summary, payload) -> None:
    """fp16 save_pretrained of the distilled student, with the source's sampling.json and a card."""
    from ..training.distill import save_student


    shutil.rmtree(path, ignore_errors=True)
    save_student(student, path)
    if model_dir is not None and (Path(model_dir) / "sampling.json").is_file():
        shutil.copy(Path(model_dir) / "sampling.json", path / "sampling.json")
    card = f"""# tiny Wan, velocity-distilled for hybrid block-sparse attention

The embedded tiny Wan model (`vidsparse/tiny/assets/tiny_wan`) fine-tuned by velocity distillation
(SpargeAttention2 §4.2) against its own dense copy, with vidsparse's hybrid Top-k+Top-p
block-sparse self-attention in the student. Variant {v.id} of `python -m vidsparse.tiny.ablation`.

| | |
|---|---|
| sparse setting to use | `{sparse.describe()}`, backend {sparse.backend}: `SparseConfig.load(path)` reads it from `sparse_config.json` |
| measured block sparsity (calibration) | {payload['calibration'].get('hybrid', {}).get('sparsity', float('nan')):.4f} |
| fine-tuning data | "{v.data}" split of `vidsparse.tiny.data` (colours, motions and backgrounds held out of pretraining) |
| steps | {summary['step']} x batch {cfg.batch_size}, AdamW lr {cfg.lr:g} (warm-up {cfg.warmup_steps}, cosine to {cfg.min_lr_ratio:g} x), all parameters |
| timesteps | {cfg.timesteps} (mean {cfg.t_mean}, std {cfg.t_std}), shift {cfg.t_shift:g} |
| device | {payload['device_name']}, {payload['precision']}, torch {payload['versions']['torch']} |
| date | {payload['date']} |

Weights: fp16 safetensors (`save_pretrained`); load with `vidsparse.tiny.load_tiny_wan(path)` and
patch with the setting above (`vidsparse.patch(model, SparseConfig.load(path))`). It was trained for
that sparse setting; for dense attention use the original model. Quality against the original:
`ablation.md` / `ablation.json` of the same run (variant {v.id}).
"""
    (path / "MODEL_CARD.md").write_text(card)
    sparse.save(path)  # what the student was distilled for: `vidsparse demo --distilled` reads it


# ----------------------------------------------------------------------------------------------
# markdown


def _priors_text(options: dict[str, Any]) -> str:
    on = [name for name in ("keep_diagonal", "keep_sink") if options.get(name)]
    return f" with {' and '.join(on)}" if on else ""


def render_markdown(payload: dict[str, Any]) -> str:
    """The ablation table and its context, ready to paste into docs/benchmarks.md."""
    s = payload["settings"]
    mask = s["sparse"]  # SparseConfig.to_dict() of the base setting
    vers = payload["versions"]
    plan = payload.get("plan") or {}
    lines = [
        "### SpargeAttention2 ablation (Table 6) on the tiny Wan model",
        "",
        f"`{payload.get('command') or 'python -m vidsparse.tiny.ablation'}`, {payload['date']}, "
        f"**{payload['device_name']}**, torch {vers.get('torch')}, triton {vers.get('triton')}, "
        f"diffusers {vers.get('diffusers')}, {payload['precision']}. {payload['tokens']} tokens per clip "
        f"({s['frames']}x{s['size']}x{s['size']}), blocks {mask['block_q']}x{mask['block_k']}, "
        f"{mask['options'].get('token_order', 'raster')} token order{_priors_text(mask['options'])}, target block sparsity "
        f"{100 * payload['target_sparsity']:.1f}% (Top-k only at k = {s['topk_only']}).",
        "",
        f"Fine-tuning: {plan.get('steps', '–')} steps per trained variant ({plan.get('source', '')}), batch "
        f"{s['batch_size']}, AdamW lr {s['lr']:g} (warm-up {s['warmup_steps']}, cosine to {s['min_lr_ratio']:g} x), "
        f"weight decay {s['weight_decay']}, all parameters, seed {s['seed']}; timesteps {s['timesteps']} "
        f"(mean {s['t_mean']}, std {s['t_std']}) with shift {s['t_shift']:g}. Evaluation "
        f"(`vidsparse.tiny.evaluate.evaluate_variant`): val loss = flow-matching MSE on {s['eval_clips']} \"val\" clips x "
        f"{s['eval_num_t']} fixed times; shifted = the same on the \"shifted\" split; PSNR/SSIM of {s['samples']} "
        f"samples ({s['sample_steps']} Euler steps) against the original dense model's samples (same conditions and "
        f"noise); shape acc = fraction of {s.get('shape_samples', 0)} single-object samples whose shape the "
        f"classifier names as conditioned (chance 0.25). Sparsity = measured block sparsity of the masks in the "
        f"val-loss forwards.",
        "",
        "| # | variant | mask | fine-tune data | k | p | sparsity % | steps | train s | val loss | Δ vs dense % "
        "| shifted val loss | PSNR dB | SSIM | shape acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["variants"]:
        sp = None if r.get("sparsity") is None else 100 * r["sparsity"]
        status = "" if r.get("status") == "done" else f" ({r.get('status')})"
        lines.append(
            f"| {r['id']} | {r['variant']}{status} | {r['method']} | {r['data']} | {fmt(r.get('topk'), 'g', '–')} | "
            f"{fmt(r.get('topp'), '.4f', '–')} | {fmt(sp, '.1f', '–')} | {fmt(r.get('steps'), 'd', '–')} | "
            f"{fmt(r.get('train_seconds'), '.0f', '–')} | {fmt(r.get('val_loss'), '.5f', '–')} | "
            f"{fmt(r.get('delta_vs_dense_pct'), '+.1f', '–')} | {fmt(r.get('shifted_val_loss'), '.5f', '–')} | "
            f"{fmt(r.get('psnr'), '.2f', '–')} | {fmt(r.get('ssim'), '.4f', '–')} | {fmt(r.get('shape_accuracy'), '.2f', '–')} |"
        )
    cal = payload.get("calibration", {})
    parts = []
    for key, label in (("topp", "Top-p only"), ("hybrid", f"hybrid (k = {s['hybrid_topk']})")):
        if key in cal:
            c = cal[key]
            how = "bisection" if c.get("calibrated") else "given"
            parts.append(f"{label}: p = {c['p']:.6g} ({how}) → {100 * c['sparsity']:.2f}%")
    if "topk" in cal:
        parts.append(f"Top-k only: k = {cal['topk']['k']} ({cal['topk']['kept_blocks']} blocks) → "
                     f"{100 * cal['topk']['sparsity']:.2f}%")
    if parts:
        lines += ["", f"Calibration on {cal.get('clips')} val clips x {cal.get('num_t')} times: " + "; ".join(parts) + "."]
    if plan.get("step_s"):
        names = {"distill": "velocity distillation (teacher + student)", "diffusion": "diffusion loss (student only)"}
        rates = "; ".join(f"{names.get(k, k)} {1e3 * v:.0f} ms" for k, v in plan["step_s"].items())
        lines += ["", f"Measured time per training step (batch {s['batch_size']}): {rates}. Total wall time "
                      f"{payload.get('elapsed_s', 0) / 60:.1f} min."]
    return "\n".join(lines) + "\n"
