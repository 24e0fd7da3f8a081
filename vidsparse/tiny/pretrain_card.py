"""The model card that tiny-model pretraining writes beside its weights (``MODEL_CARD.md``).

One function per section, joined by :func:`model_card`. ``s`` is the run's summary dict (steps,
losses, timings, token grid ...) as :func:`vidsparse.tiny.pretrain.train` builds it.
"""

from __future__ import annotations

from typing import Any

from ..utils import fmt
from .classifier import per_shape_text
from .data import BACKGROUNDS, COLOUR_NAMES, MOTIONS, SHAPES, SPLIT_VOCAB
from .flow import describe_sampler

__all__ = ["model_card"]


def model_card(cfg, model, s: dict[str, Any], nbytes: int, diffusers_version: str) -> str:
    """Markdown of the card for the run ``cfg`` (a ``TrainConfig``) that produced ``model``."""
    return (_model_section(cfg, dict(model.config), s, nbytes, diffusers_version) + _data_section(cfg, s)
            + _training_section(cfg, s) + _results_section(cfg, s))


def _vocab(split: str, kind: str, table) -> str:
    return ", ".join(table[i] for i in SPLIT_VOCAB[split][kind])


def _model_section(cfg, mc: dict, s: dict, nbytes: int, diffusers_version: str) -> str:
    """The title, what the model is, its architecture and how to call it."""
    d = cfg.data
    return f"""# vidsparse tiny Wan: a pixel-space video diffusion transformer for testing sparse attention

A {s['parameters'] / 1e6:.2f} M-parameter diffusers `WanTransformer3DModel`, trained from scratch with
rectified flow on procedural "moving shapes" videos. It is vidsparse's demo model and its quality
yardstick for sparse attention: every self-attention layer sees {s['tokens']} tokens, enough for
block-sparse attention to matter, and the model is small enough to train in minutes and ship in
the repository. It is not a general-purpose video model.

## Model

| | |
|---|---|
| class | `diffusers.WanTransformer3DModel` (diffusers {diffusers_version}) |
| input / output | (B, 3, {d.frames}, {d.size}, {d.size}) RGB video in [-1, 1], pixel space, no VAE |
| patch | {tuple(mc['patch_size'])} -> token grid {tuple(s['token_grid'])} = {s['tokens']} tokens, frame-major (t, h, w) |
| blocks | {mc['num_layers']}, {mc['num_attention_heads']} heads x head dim {mc['attention_head_dim']}, FFN {mc['ffn_dim']} |
| condition | (B, {d.seq_len}, {d.text_dim}) attribute-token embedding, `vidsparse.tiny.data.embed` |
| parameters | {s['parameters']:,} ({nbytes / 1e6:.2f} MB as fp16; file {s.get('weights_bytes', 0) / 1e6:.2f} MB) |
| weights | EMA (decay {cfg.ema_decay}) stored in fp16 safetensors |

Conventions (`vidsparse.tiny.flow`): `x_t = (1 - t) * x0 + t * noise`, the network predicts the
velocity `noise - x0` and receives `timestep = 1000 * t`; sampling runs Euler steps from t = 1 to 0,
with classifier-free guidance against the all-zero condition.

```python
from vidsparse.tiny.data import ShapesConfig, conditions_from_text, embed
from vidsparse.tiny import load_tiny_wan, sample
model = load_tiny_wan("path/to/model", device="cuda")
cond = conditions_from_text(["red disc bouncing, blue square orbiting, striped background"], device="cuda")
video = sample(model, embed(cond), shape=(3, {d.frames}, {d.size}, {d.size}), steps={cfg.sample_steps},
               guidance_scale={cfg.guidance_scale}, guidance_interval={cfg.guidance_interval},
               shift={cfg.t_shift})   # settings also in sampling.json
```

"""


def _data_section(cfg, s: dict) -> str:
    """The procedural data it was trained on, with the held-out vocabulary."""
    d = cfg.data

    def names(kind: str, table) -> str:
        return _vocab("train", kind, table)

    def shifted(kind: str, table) -> str:
        return _vocab("shifted", kind, table)

    return f"""## Data

`vidsparse.tiny.data` (procedural, rendered on the GPU during training, seed {cfg.seed}): {d.frames}
frames of {d.size}x{d.size}, 1 to {d.max_objects} objects that move, spin, pulse and occlude each
other over an animated textured background. Condition tokens: background type, then (shape,
colour, motion) per object.

- shapes: {names('shape', SHAPES)}
- training colours: {names('colour', COLOUR_NAMES)}
- training motions: {names('motion', MOTIONS)}
- training backgrounds: {names('background', BACKGROUNDS)}
- held out for the "shifted" split (never seen in pretraining): colours {shifted('colour', COLOUR_NAMES)};
  motions {shifted('motion', MOTIONS)}; backgrounds {shifted('background', BACKGROUNDS)}

Training used clips 0..{s['clips_seen'] - 1} of the "train" split; validation uses the disjoint "val" stream.

"""


def _training_section(cfg, s: dict) -> str:
    """The training settings of the run."""
    stopped = "" if s["stop_reason"] == "completed" else f" (stopped early: {s['stop_reason']})"
    return f"""## Training

| | |
|---|---|
| steps | {s['step']} of {s['steps']}{stopped}{f"; warm restart from the weights in `{cfg.init_from}` (earlier runs' steps not counted)" if cfg.init_from else ''} |
| batch | {cfg.batch_size} clips ({cfg.batch_size * s['tokens']:,} tokens); {s['clips_seen']:,} clips seen |
| optimizer | AdamW, peak lr {cfg.lr:g}, betas {cfg.betas}, weight decay {cfg.weight_decay} (matrices only), grad clip {cfg.grad_clip} |
| schedule | {cfg.warmup_steps} warm-up steps, cosine decay to {cfg.min_lr_ratio:g} x peak |
| timesteps | {cfg.timesteps}{f' (mean {cfg.t_mean}, std {cfg.t_std})' if cfg.timesteps == 'logit-normal' else ''}, shifted towards noise with shift {cfg.t_shift:g} |
| condition dropout | {cfg.cond_dropout} (for classifier-free guidance) |
| precision | {s['precision']}{', torch.compile' if cfg.compile else ''} |
| device | {s['device']} |
| wall time | {s['wall_time_s'] / 60:.1f} min (mean {fmt(s['mean_clips_per_s'], '.0f', 'n/a')} clips/s) |
| command | `{cfg.command or 'vidsparse.tiny.pretrain.train(...)'}` |

"""


def _results_section(cfg, s: dict) -> str:
    """Losses, shape accuracy, the loss curve and samples, and the limitations."""
    return f"""## Results

| | |
|---|---|
| final training loss (mean of the last 10% of log intervals) | {fmt(s['final_train_loss'], '.4f', 'n/a')} |
| validation loss, raw weights | {fmt(s['val_loss'], '.4f', 'n/a')} |
| validation loss, EMA weights | {fmt(s['val_loss_ema'], '.4f', 'n/a')} |
| validation loss, exported fp16 weights | {fmt(s.get('val_loss_exported'), '.4f', 'n/a')} |
| shape accuracy of samples (chance 0.25; `vidsparse eval --shape-samples`) | {fmt(s.get('shape_accuracy'), '.4f', 'n/a')} on {s.get('shape_samples', 0)} single-object conditions{f" ({per_shape_text(s['shape_per_shape'], 'n/a')})" if s.get('shape_per_shape') else ""} |

The validation loss uses {cfg.eval_clips} "val" clips with fixed noise and t spread evenly over (0, 1).

![loss curve](loss_curve.png)

Samples ({cfg.sample_steps} Euler steps, {describe_sampler(cfg.guidance_scale, cfg.guidance_interval, 0.0, cfg.t_shift)}); rows alternate a validation clip and a sample for its condition:

![samples](samples.png)

## Limitations

Synthetic data only, 64x64 pixels, 16 frames. The loss and samples measure how well the model
fits this toy distribution; they say nothing about natural video.
"""
