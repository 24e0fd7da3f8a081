"""Frame strip of a tiny model's samples with its own sampler settings (sampling.json), for the docs.

Rows alternate a validation clip and the sample for its condition (the first N "val" conditions of
--seed, initial noise from --seed): the same picture the pretraining export draws, but for any
model directory and sampler flags.

    python benchmarks/sample_strip.py --out docs/images/tiny_wan_samples.png
    python benchmarks/sample_strip.py --guidance-scale 2 --guidance-interval 0 1 --out /tmp/g2.png
"""

from __future__ import annotations

import argparse
import json

import torch

from vidsparse.tiny import load_sampling_defaults, load_tiny_wan
from vidsparse.tiny.flow import resolve_sampler
from vidsparse.tiny.plots import save_sample_strip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped tiny model)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None)
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    defaults = load_sampling_defaults(args.model)
    sampler = resolve_sampler(defaults, guidance_scale=args.guidance_scale, guidance_interval=args.guidance_interval,
                              eta=args.eta)
    model = load_tiny_wan(args.model, device=args.device)
    steps = int(defaults["steps"] if args.steps is None else args.steps)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    captions = save_sample_strip(args.out, model, num_samples=args.samples, seed=args.seed, steps=steps,
                                 generator=generator, progress=True, **sampler)
    print(json.dumps({"out": args.out, "steps": steps, **sampler, "captions": captions}, indent=1))


if __name__ == "__main__":
    main()
