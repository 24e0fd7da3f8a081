"""Velocity distillation of a Wan2.1-size pipeline from prompts alone: speed and memory on one GPU.

Builds a ``WanPipeline`` with random weights: the transformer from the Wan2.1-T2V-1.3B config (or
the 14B config, optionally a subset of its blocks with ``--layers``), the Wan VAE at its released
config (z_dim 16), a one-layer UMT5 encoder of width 4,096 (the transformer's ``text_dim``) with
a word-level tokenizer, and the UniPC flow scheduler; saves it with ``save_pretrained`` and writes
a prompts file. Then, each in a fresh process (so peak memory is that phase's own):

* ``teacher``: the frozen dense pipeline samples clean latents from the prompts into the cache
  (``--teacher-steps`` steps, guidance ``--guidance``: two transformer calls per step when > 1);
  its cost is the cache manifest's ``sampling_s``;
* one ``vidsparse distill --model PIPELINE --prompts FILE`` run per ``--variants`` entry, reusing
  that cache: ``full`` (every parameter trained, gradient checkpointing), ``lora`` (peft LoRA of
  rank ``--lora-rank`` on the attention projections, gradient checkpointing); bf16 autocast,
  batch 1, the hybrid masker at Top-k ``1 - --sparsity`` (random weights give flat pooled scores:
  Top-p would keep nearly everything), ``--parallel`` ddp (one process: no wrapper) or fsdp.

Reported per run: steady steps/s (from the log, the first ``--skip`` steps excluded: Triton
autotuning and allocator warm-up), the mean step time, peak GPU memory (rank 0's
``max_memory_allocated`` over the run), the loss of the first and last step, trainable parameters.

    python benchmarks/bench_distill.py --out distill_1.3b.json                      # 480p, 32,760 tokens
    python benchmarks/bench_distill.py --config 14b --layers 4 --parallel fsdp \\
        --variants full --out distill_14b_4l.json                                   # 720p, 75,600 tokens
    python benchmarks/bench_distill.py --config smoke --out /tmp/smoke.json         # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_wan_step import TINY, WAN_2_1_1_3B, WAN_2_1_14B  # noqa: E402

from vidsparse.utils import versions  # noqa: E402

# name: (transformer config, (height, width, frames) of the samples, text width, flow shift, VAE kwargs)
CONFIGS = {
    "1.3b": (WAN_2_1_1_3B, (480, 832, 81), 4096, 3.0, {}),
    "14b": (WAN_2_1_14B, (720, 1280, 81), 4096, 5.0, {}),
    "smoke": (TINY, (64, 64, 9), 32, 3.0, dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                               latents_mean=[0.0] * 4, latents_std=[1.0] * 4)),
}
PROMPTS = ["a red square moves left", "a blue circle moves up on a black background",
           "a small green square moves right fast", "a big white circle moves down slow"]


def build_pipeline(config: str, layers: int | None, path: Path) -> Path:
    """Random-weight WanPipeline of ``config`` saved (bf16 weights) into ``path``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from tiny_pipelines import word_tokenizer
    from transformers import UMT5Config, UMT5EncoderModel

    model_cfg, _, text_dim, shift, vae_kwargs = CONFIGS[config]
    torch.manual_seed(0)
    cfg = dict(model_cfg, num_layers=layers or model_cfg["num_layers"])
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of billions of weights
        transformer = WanTransformer3DModel(**cfg).to(torch.bfloat16)
    tokenizer = word_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=64, d_ff=256, num_layers=1, num_heads=8,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    vae = AutoencoderKLWan(**vae_kwargs)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _geometry(args) -> list[str]:
    height, width, frames = CONFIGS[args.config][1]
    return ["--height", str(height), "--width", str(width), "--num-frames", str(frames)]


def _common(args, pipeline: Path, prompts: Path, cache: Path) -> list[str]:
    return ["--model", str(pipeline), "--prompts", str(prompts), "--cache", str(cache), *_geometry(args),
            "--teacher-steps", str(args.teacher_steps), "--guidance", str(args.guidance), "--seed", "0"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1"}


def sample_teacher(args, pipeline: Path, prompts: Path, cache: Path) -> dict:
    """The teacher phase in a fresh process: the cache made, its cost and peak memory."""
    code = (
        "import json, sys, time, torch\n"
        "from vidsparse.training.distill import DistillConfig, make_source\n"
        "from vidsparse.utils import resolve_device\n"
        "kw = json.loads(sys.argv[1])\n"
        "device = resolve_device('auto')\n"
        "t0 = time.perf_counter()\n"
        "source = make_source(DistillConfig(**kw), device)\n"
        "peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else None\n"
        "print('RESULT', json.dumps({'wall_s': time.perf_counter() - t0, 'peak_memory_gib': peak,\n"
        "      'folder': str(source.folder), 'sampling_s': source.manifest.get('sampling_s'),\n"
        "      'count': source.manifest['count'], 'latent_shape': source.manifest['latent_shape']}))\n"
    )
    height, width, frames = CONFIGS[args.config][1]
    kw = dict(model=str(pipeline), prompts=str(prompts), cache=str(cache), height=height, width=width,
              num_frames=frames, teacher_steps=args.teacher_steps, guidance=args.guidance, seed=0, progress=False,
              out=str(cache.parent / "teacher-run"))  # checked, never written: make_source trains nothing
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kw)], env=_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"teacher sampling failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _variant_flags(args, name: str) -> list[str]:
    flags = {"full": ["--trainable", "all"],
             "lora": ["--trainable", "lora", "--lora-rank", str(args.lora_rank)]}[name]
    return [*flags, "--gradient-checkpointing"]


def run_variant(args, name: str, pipeline: Path, prompts: Path, cache: Path, work: Path) -> dict:
    """One ``vidsparse distill`` run in a fresh process; its summary and steady step rate."""
    out = work / f"run-{name}"
    cmd = [sys.executable, "-m", "vidsparse.training.distill", *_common(args, pipeline, prompts, cache),
           *_variant_flags(args, name), "--out", str(out), "--steps", str(args.steps), "--batch-size", "1",
           "--lr", "1e-5", "--warmup-steps", "0", "--log-every", "1", "--ckpt-every", str(10 ** 6), "--no-export",
           "--no-progress", "--precision", "bf16" if torch.cuda.is_available() else "fp32",
           "--parallel", args.parallel, "--topk", str(round(1 - args.sparsity, 6)), "--topp", "none"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"variant": name, "error": (proc.stderr or proc.stdout)[-2000:], "command": cmd}
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    records = [r for r in records if r.get("kind") == "train"]
    steady = [r for r in records if r["step"] > args.skip]
    rate = None
    if len(steady) >= 2:
        rate = (steady[-1]["step"] - steady[0]["step"]) / (steady[-1]["elapsed_s"] - steady[0]["elapsed_s"])
    return {
        "variant": name, "steps": summary["step"], "steady_steps_per_s": rate,
        "steady_step_s": 1 / rate if rate else None, "loop_steps_per_s": summary["steps_per_s"],
        "peak_memory_gib": summary.get("peak_memory_gib"), "trainable_parameters": summary["trainable_parameters"],
        "tokens": summary["tokens"], "first_loss": records[0]["loss"] if records else None,
        "last_loss": records[-1]["loss"] if records else None, "process_wall_s": wall,
        "sparsity_config": summary["sparse_config"], "stderr_head": proc.stderr.splitlines()[:3],
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="1.3b")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the config's)")
    p.add_argument("--variants", default="full,lora", help="comma-separated: full, lora")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the steady rate")
    p.add_argument("--prompts", type=int, default=2, help="prompts sampled by the teacher")
    p.add_argument("--teacher-steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--work", default=None, help="folder for the pipeline, cache and runs (default: a temporary one)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in ("full", "lora") for v in variants):
        raise SystemExit(f"--variants: expected full and/or lora, got {args.variants!r}")
    if args.steps <= args.skip + 1:
        raise SystemExit(f"--steps {args.steps} must exceed --skip + 1 = {args.skip + 1}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_distill_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipeline = build_pipeline(args.config, args.layers, work / "pipeline")
    build_s = time.perf_counter() - t0
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join((PROMPTS * args.prompts)[:args.prompts]) + "\n")
    cache = work / "cache"
    teacher = sample_teacher(args, pipeline, prompts, cache)
    print(f"teacher: {teacher['count']} samples {teacher['latent_shape']} in {teacher['sampling_s']:.1f} s "
          f"({teacher['sampling_s'] / teacher['count']:.2f} s each), peak {teacher['peak_memory_gib']} GiB", flush=True)
    result = {"benchmark": "bench_distill", "config": args.config,
              "layers": args.layers or CONFIGS[args.config][0]["num_layers"],
              "geometry": dict(zip(("height", "width", "num_frames"), CONFIGS[args.config][1])),
              "args": vars(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "versions": versions(), "pipeline_build_s": build_s, "teacher": teacher, "runs": [],
              "date": time.strftime("%Y-%m-%d")}
    runs = result["runs"]
    for name in variants:
        out.write_text(json.dumps(result, indent=2) + "\n")  # what is done so far survives a time-out
        runs.append(run_variant(args, name, pipeline, prompts, cache, work))
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("sparsity_config", "command")}), flush=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'variant':<8} {'tokens':>7} {'step s':>8} {'steps/s':>8} {'peak GiB':>9} {'trainable':>12}")
    for r in runs:
        if "error" in r:
            print(f"{r['variant']:<8} FAILED: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        print(f"{r['variant']:<8} {r['tokens']:>7} {r['steady_step_s'] or float('nan'):>8.3f} "
              f"{r['steady_steps_per_s'] or float('nan'):>8.3f} {r['peak_memory_gib'] or float('nan'):>9.2f} "
              f"{r['trainable_parameters']:>12,}")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
