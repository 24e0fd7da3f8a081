"""A small frame classifier for the synthetic data's shapes: is a sampled object recognisable?

The tiny model's samples are judged by eye otherwise. This CNN is trained on rendered frames of
single-object clips (:mod:`vidsparse.tiny.data`, train split) to name the object's shape (disc, square,
triangle, ring) whatever its colour, size, rotation, motion and background. Applied to generated
videos of single-object conditions, its per-clip majority vote gives a *shape accuracy*: 25% is
chance, real validation clips score near 100%.

    python -m vidsparse.tiny.classifier --out vidsparse/tiny/assets/shape_classifier --steps 2500

The weights shipped in ``vidsparse/tiny/assets/shape_classifier`` come from that command (12 minutes on a
2-core CPU; 99.7% of 1,024 validation frames right; ``info.json`` beside them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .data import SHAPES, Conditions, ShapesConfig, render, sample_conditions

__all__ = ["ShapeClassifier", "train_shape_classifier", "load_shape_classifier", "shape_accuracy",
           "per_shape_text", "single_object", "default_classifier_dir"]

_WEIGHTS = "model.safetensors"


class ShapeClassifier(nn.Module):
    """(N, 3, H, W) frames in [-1, 1] -> (N, len(SHAPES)) logits. Four stride-2 conv blocks, then
    global average pooling, so any H = W >= 16 works (trained at 64)."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], len(SHAPES))
        self.width = width

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (N, 3, H, W), got shape {tuple(frames.shape)}")
        return self.head(self.features(frames).mean(dim=(2, 3)))


def single_object(conditions: Conditions) -> torch.Tensor:
    """(B,) bool: the clips with exactly one object (the only ones whose shape is unambiguous)."""
    return (conditions.shape >= 0).sum(dim=1) == 1


def _frames_and_labels(n_clips: int, *, seed: int, split: str, start: int, config: ShapesConfig,
                       frames_per_clip: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random frames of single-object clips and their shape ids."""
    one = config.replace(max_objects=1)
    cond = sample_conditions(n_clips, seed=seed, split=split, start=start, config=one, device=device)
    video = render(cond, config=one)  # (B, 3, T, H, W)
    g = torch.Generator(device="cpu").manual_seed(seed * 7919 + start)
    t = torch.randint(0, config.frames, (n_clips, frames_per_clip), generator=g).to(device)
    picked = video.permute(0, 2, 1, 3, 4)[torch.arange(n_clips, device=device)[:, None], t]  # (B, F, 3, H, W)
    labels = cond.shape[:, 0].repeat_interleave(frames_per_clip)
    return picked.flatten(0, 1), labels


def train_shape_classifier(
    *, steps: int = 2500, batch_clips: int = 32, frames_per_clip: int = 4, lr: float = 2e-3, seed: int = 0,
    size: int = 64, device: str | torch.device = "cpu", progress: bool = True,
) -> tuple[ShapeClassifier, dict]:
    """Train on fresh train-split clips every step; report accuracy on 256 validation clips."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    config = ShapesConfig(size=size)
    model = ShapeClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.monotonic()
    losses = []
    for step in tqdm(range(steps), desc="shape classifier", disable=not progress):
        x, y = _frames_and_labels(batch_clips, seed=seed, split="train", start=step * batch_clips, config=config,
                                  frames_per_clip=frames_per_clip, device=device)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    x, y = _frames_and_labels(256, seed=seed, split="val", start=0, config=config, frames_per_clip=4, device=device)
    with torch.no_grad():
        frame_acc = float((model(x).argmax(1) == y).float().mean())
    info = {"steps": steps, "batch_clips": batch_clips, "frames_per_clip": frames_per_clip, "lr": lr, "seed": seed,
            "size": size, "final_loss": sum(losses[-20:]) / len(losses[-20:]), "val_frame_accuracy": frame_acc,
            "train_s": time.monotonic() - t0, "width": model.width}
    return model, info


def default_classifier_dir() -> Path:
    return Path(__file__).resolve().parent / "assets" / "shape_classifier"


def load_shape_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapeClassifier:
    """The shipped classifier (or one saved by this module's command line) in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_classifier_dir()
    file = path / _WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"no shape classifier at {file} (train one: python -m vidsparse.tiny.classifier --out DIR)")
    meta = json.loads((path / "info.json").read_text()) if (path / "info.json").is_file() else {}
    model = ShapeClassifier(width=int(meta.get("width", 32)))
    model.load_state_dict(load_file(str(file)))
    return model.to(device).eval()


@torch.no_grad()
def shape_accuracy(videos: torch.Tensor, conditions: Conditions, classifier: ShapeClassifier | None = None) -> dict:
    """Shape accuracy of generated (or real) videos against their conditions.

    Args:
        videos: (B, 3, T, H, W) in [-1, 1] (samples are clamped here).
        conditions: the B conditions they were generated for; only single-object clips count.
        classifier: default: the shipped one.

    Returns:
        {"clips": number of single-object clips judged, "accuracy": fraction whose majority vote over
        frames names the conditioned shape (None when no clip has one object), "frame_accuracy": the
        same per frame, "per_shape": {shape name: accuracy over the clips conditioned on it (None when
        there is none)}, "confusion": counts[conditioned shape][voted shape] as nested lists in
        :data:`vidsparse.tiny.data.SHAPES` order}.
    """
    if videos.dim() != 5 or videos.shape[0] != len(conditions):
        raise ValueError(f"videos must be (B={len(conditions)}, 3, T, H, W), got shape {tuple(videos.shape)}")
    classifier = classifier or load_shape_classifier(device=videos.device)
    device = next(classifier.parameters()).device
    keep = single_object(conditions).to(videos.device)
    if not bool(keep.any()):
        return {"clips": 0, "accuracy": None, "frame_accuracy": None,
                "per_shape": {name: None for name in SHAPES}, "confusion": [[0] * len(SHAPES) for _ in SHAPES]}
    vids = videos[keep].clamp(-1, 1).float().to(device)
    labels = conditions.shape[keep.to(conditions.shape.device), 0].to(device)
    b, _, t = vids.shape[:3]
    pred = classifier(vids.permute(0, 2, 1, 3, 4).flatten(0, 1)).argmax(1).view(b, t)
    votes = torch.nn.functional.one_hot(pred, len(SHAPES)).sum(1).argmax(1)
    confusion = torch.zeros(len(SHAPES), len(SHAPES), dtype=torch.long)
    confusion.index_put_((labels.cpu(), votes.cpu()), torch.ones(b, dtype=torch.long), accumulate=True)
    per_shape = {name: (int(confusion[i, i]) / int(confusion[i].sum()) if int(confusion[i].sum()) else None)
                 for i, name in enumerate(SHAPES)}
    return {"clips": b, "accuracy": int((votes == labels).sum()) / b,
            "frame_accuracy": int((pred == labels[:, None]).sum()) / (b * t),
            "per_shape": per_shape, "confusion": confusion.tolist()}


def per_shape_text(per_shape: dict, none: str = "-") -> str:
    """``shape_accuracy``'s ``per_shape`` as "disc 1.00, square 0.50, ..." (``none`` where no clip had the shape)."""
    return ", ".join(f"{name} {none if acc is None else format(acc, '.2f')}" for name, acc in per_shape.items())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the shape classifier used to judge samples of the tiny model.")
    p.add_argument("--out", required=True, help="directory for model.safetensors and info.json")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    from safetensors.torch import save_file

    model, info = train_shape_classifier(steps=args.steps, seed=args.seed, device=args.device, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / _WEIGHTS))
    info["command"] = "python -m vidsparse.tiny.classifier " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
