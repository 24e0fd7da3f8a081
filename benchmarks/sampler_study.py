"""Which sampler settings make the tiny model's objects recognisable? (GPU, 3 to 5 minutes.)

For the shipped tiny model (or --model), sample N single-object validation conditions with each
sampler variant of a grid from the same initial noise and judge the objects with the shape
classifier (accuracy overall and per shape). Before that, a one-step check: noise real validation
clips to time t, predict x0 = x_t - t v in one network call and classify it, which tells at which
noise levels the network still sees the conditioned shape. With --confirm-seed, the grid's best
variant and the first (baseline) one are sampled again on other conditions (that seed's clips),
so the winner's number is not the maximum of noisy estimates.

    python benchmarks/sampler_study.py --grid broad --samples 256 --json out/sampler_study.json
    python benchmarks/sampler_study.py --grid refine --samples 256 --confirm-seed 1 --json out/refine.json
    python benchmarks/sampler_study.py --grid shipped --samples 256 --seed 2 --json out/shipped.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vidsparse.tiny.data import SHAPES, ShapesConfig, render
from vidsparse.tiny.evaluate import _amp, _single_object_inputs
from vidsparse.tiny import load_tiny_wan
from vidsparse.tiny.flow import predict_velocity, sample
from vidsparse.tiny.classifier import load_shape_classifier, per_shape_text, shape_accuracy

BROAD = {  # name: sampler keyword arguments (shift 1 throughout, as trained); the first is the baseline
    "euler40 g2": dict(steps=40, guidance_scale=2.0),
    "euler100 g2": dict(steps=100, guidance_scale=2.0),
    "euler40 g1": dict(steps=40, guidance_scale=1.0),
    "euler40 g3 [0.1,0.7]": dict(steps=40, guidance_scale=3.0, guidance_interval=(0.1, 0.7)),
    "euler40 g4 [0.1,0.7]": dict(steps=40, guidance_scale=4.0, guidance_interval=(0.1, 0.7)),
    "eta0.5 40 g2": dict(steps=40, guidance_scale=2.0, eta=0.5),
    "eta1 40 g2": dict(steps=40, guidance_scale=2.0, eta=1.0),
    "eta1 100 g2": dict(steps=100, guidance_scale=2.0, eta=1.0),
    "eta1 40 g3 [0.1,0.7]": dict(steps=40, guidance_scale=3.0, guidance_interval=(0.1, 0.7), eta=1.0),
}
# around the broad grid's best (guidance limited to the middle of the trajectory)
REFINE = {"euler40 g2": dict(steps=40, guidance_scale=2.0)}
REFINE.update({f"euler40 g{g} [0.1,0.7]": dict(steps=40, guidance_scale=float(g), guidance_interval=(0.1, 0.7))
               for g in (3, 4, 5, 6)})
REFINE.update({f"euler40 g4 [{lo},{hi}]": dict(steps=40, guidance_scale=4.0, guidance_interval=(lo, hi))
               for lo, hi in ((0.0, 0.7), (0.2, 0.7), (0.1, 0.6), (0.1, 0.8), (0.3, 0.8))})
# the old default against the shipped sampling.json, e.g. on another seed's conditions
SHIPPED = {"euler40 g2": dict(steps=40, guidance_scale=2.0),
           "euler40 g4 [0.1,0.8]": dict(steps=40, guidance_scale=4.0, guidance_interval=(0.1, 0.8))}
GRIDS = {"broad": BROAD, "refine": REFINE, "shipped": SHIPPED}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the val conditions judged: the single-object clips of this seed")
    p.add_argument("--grid", choices=tuple(GRIDS), default="broad")
    p.add_argument("--confirm-seed", type=int, default=None,
                   help="sample the best variant and the baseline again on this seed's conditions")
    p.add_argument("--json", default=None)
    p.add_argument("--videos", default=None, help="save uint8 videos of the first 8 triangles per variant (.pt)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_tiny_wan(args.model, device=device)
    classifier = load_shape_classifier(device=device)
    data = ShapesConfig()
    cond, emb, noise = _single_object_inputs(args.samples, split="val", seed=args.seed, data=data, device=device)
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "samples": args.samples,
                     "seed": args.seed, "model": args.model or "shipped",
                     "one_step": {}, "variants": {}}

    # one-step x0 predictions from noised real clips
    x0 = render(cond, config=data)
    g = torch.Generator(device=device).manual_seed(1)
    eps = torch.randn(x0.shape, generator=g, device=device)
    for t in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        x_t = (1 - t) * x0 + t * eps
        with torch.no_grad(), _amp(torch.device(device)):
            x0_hat = torch.cat([xb - t * predict_velocity(model, xb, torch.full((len(xb),), t, device=device), eb)
                                for xb, eb in zip(x_t.split(args.batch), emb.split(args.batch))])
        r = shape_accuracy(x0_hat.float(), cond, classifier)
        results["one_step"][t] = r
        print(f"one step from t={t}: accuracy {r['accuracy']:.3f} ({per_shape_text(r['per_shape'])})", flush=True)

    def judge(name: str, kw: dict, cond, emb, noise) -> tuple[dict, torch.Tensor]:
        t0 = time.perf_counter()
        videos = []
        for i in range(0, len(cond), args.batch):
            gen = torch.Generator(device=device).manual_seed(1000 + i)
            with _amp(torch.device(device)):
                videos.append(sample(model, emb[i:i + args.batch], noise=noise[i:i + args.batch], shift=1.0,
                                     generator=gen, progress=False, **kw).float().clamp(-1, 1))
        videos = torch.cat(videos)
        r = shape_accuracy(videos, cond, classifier)
        r["seconds"] = time.perf_counter() - t0
        r["kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
        print(f"{name:24s} accuracy {r['accuracy']:.3f} ({per_shape_text(r['per_shape'])}) {r['seconds']:.1f} s",
              flush=True)
        return r, videos

    saved = {}
    tri = (cond.shape[:, 0] == SHAPES.index("triangle")).nonzero().flatten()[:8]
    grid = GRIDS[args.grid]
    for name, kw in grid.items():
        r, videos = judge(name, kw, cond, emb, noise)
        results["variants"][name] = r
        saved[name] = ((videos[tri.to(videos.device)] + 1) * 127.5).round().to(torch.uint8).cpu()
    if args.confirm_seed is not None:
        best = max(grid, key=lambda n: results["variants"][n]["accuracy"])
        base = next(iter(grid))
        print(f"confirming on seed {args.confirm_seed}'s conditions: {base} against the best, {best}", flush=True)
        other = _single_object_inputs(args.samples, split="val", seed=args.confirm_seed, data=data, device=device)
        results["confirm"] = {"seed": args.confirm_seed, "best": best, "baseline": base,
                              "variants": {n: judge(n, grid[n], *other)[0] for n in dict.fromkeys((base, best))}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.videos:
        torch.save({"videos": saved, "conditions": tri.cpu()}, args.videos)


if __name__ == "__main__":
    main()
