"""Data-free distillation data: the frozen dense teacher pipeline samples clean latents from prompts.

``vidsparse distill --model PIPELINE --prompts FILE`` needs no videos. Velocity distillation only
uses the clean samples to build x_t, so the teacher's own samples serve (SpargeAttention2 §4.2).
They are made once with the pipeline's own scheduler and few steps (``--teacher-steps``),
``output_type="latent"``, and cached in the latents format (:mod:`.latents`) with the prompt
embeddings; every later run with the same pipeline, prompts and settings reuses the cache.

Prompts file: one prompt per line, or JSON lines ``{"prompt": "..."}`` (blank lines are skipped).

Cache: ``--cache DIR`` (default ``$VIDSPARSE_CACHE``, else ``~/.cache/vidsparse``) holds one folder
per key, ``teacher-<family>-<16 hex digits>``, the key a hash of the pipeline's absolute path, the
prompts, the steps, guidance, height, width, frame count, seed and sampling dtype. Generation
writes a shard at a time (atomically), so an interrupted run resumes where it stopped. Under
torchrun every rank samples its share of the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..utils import hash_seed, read_text_lines
from .families import ModelSpec, call_default
from .latents import MANIFEST, LatentsWriter

__all__ = ["read_prompts", "prompts_hash", "default_cache_root", "TeacherSettings", "teacher_plan", "teacher_cache",
           "check_geometry", "vae_factors", "SHARD_SIZE"]

#: prompts per cache shard (the unit of resumption)
SHARD_SIZE = 16
# a random stream tag for the teacher's initial noise (distill uses 3)
_STREAM_TEACHER = 4


def read_prompts(path, flag: str = "--prompts") -> list[str]:
    """The prompts of a file: one per line, or JSON lines with a "prompt" key; ValueError naming ``flag``."""
    where = Path(path)
    lines = read_text_lines(where, flag)
    prompts = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                text = json.loads(text)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f'{flag} {where}: line {n} is not a JSON object with a "prompt" string') from None
            if not isinstance(text, str):
                raise ValueError(f'{flag} {where}: line {n}: "prompt" must be a string')
        prompts.append(text)
    if not prompts:
        raise ValueError(f"{flag} {where}: the file holds no prompts")
    return prompts


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def default_cache_root() -> Path:
    """``$VIDSPARSE_CACHE``, else ``~/.cache/vidsparse``."""
    env = os.environ.get("VIDSPARSE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vidsparse"


class TeacherSettings:
    """How the teacher samples: steps, guidance (None = the pipeline's default), height, width,
    num_frames (None = the pipeline's defaults), seed, batch size, dtype."""

    def __init__(self, *, steps: int = 8, guidance: float | None = None, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, seed: int = 0, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32):
        self.steps, self.guidance, self.seed, self.batch_size, self.dtype = steps, guidance, seed, batch_size, dtype
        self.height, self.width, self.num_frames = height, width, num_frames

    def resolved(self, spec: ModelSpec) -> dict:
        """The settings with the pipeline's defaults filled in (JSON, part of the cache key)."""
        geometry = spec.default_geometry()
        guidance = self.guidance if self.guidance is not None else call_default(spec.pipeline_class(), "guidance_scale")
        out = {"steps": self.steps, "guidance": float(guidance), "seed": self.seed, "dtype": str(self.dtype).split(".")[-1]}
        for k in ("height", "width", "num_frames"):
            out[k] = getattr(self, k) or geometry[k]
        return out


def check_geometry(spec: ModelSpec, height: int, width: int, num_frames: int, *, spatial: int, temporal: int) -> None:
    """Refuse a size the VAE and patching cannot take, naming the flag."""
    _, ph, pw = spec.family.patch(spec.transformer_config)
    for flag, size, p in (("--height", height, ph), ("--width", width, pw)):
        if size % (spatial * p):
            raise ValueError(f"{flag} {size}: must be a multiple of {spatial * p} (VAE factor {spatial} x patch {p})")
    if (num_frames - 1) % temporal:
        raise ValueError(f"--num-frames {num_frames}: must be {temporal}k + 1 (the VAE compresses time {temporal}x)")


def vae_factors(spec: ModelSpec) -> tuple[int, int]:
    """(spatial, temporal) compression of the pipeline's VAE, from its config."""
    cfg = json.loads((spec.pipeline_dir / "vae" / "config.json").read_text())
    if spec.family.name == "cogvideox":
        return 2 ** (len(cfg["block_out_channels"]) - 1), int(cfg.get("temporal_compression_ratio", 4))
    if spec.family.name == "hunyuan_video":
        return int(cfg.get("spatial_compression_ratio", 8)), int(cfg.get("temporal_compression_ratio", 4))
    return int(cfg.get("scale_factor_spatial") or 8), int(cfg.get("scale_factor_temporal") or 4)


def teacher_plan(spec: ModelSpec, prompts: list[str], settings: TeacherSettings) -> dict:
    """What the teacher will sample (the cache's ``made`` record), checked: a pipeline ``--model``
    and a geometry the VAE and patching accept. ValueError naming the flag."""
    if spec.pipeline_dir is None:
        raise ValueError("--prompts: --model must be a pipeline folder (model_index.json): the teacher samples with it")
    made = {"by": "vidsparse distill --prompts", "pipeline": str(spec.pipeline_dir.resolve()),
            "prompts_sha256": prompts_hash(prompts), "prompts": len(prompts), **settings.resolved(spec)}
    spatial, temporal = vae_factors(spec)
    check_geometry(spec, made["height"], made["width"], made["num_frames"], spatial=spatial, temporal=temporal)
    return made


def teacher_cache(spec: ModelSpec, prompts: list[str], settings: TeacherSettings, *, cache_root=None,
                  device=torch.device("cpu"), rank: int = 0, world: int = 1, progress: bool = True,
                  shard_size: int = SHARD_SIZE) -> Path:
    """The cache folder of the teacher's latents for ``prompts``, made (or finished) if needed.

    Returns the folder (a complete latents folder). Loads the pipeline only when shards are
    missing. Under DDP (``world`` > 1) rank r samples shards r, r + world, ...; the caller's
    process group synchronises the ranks.
    """
    made = teacher_plan(spec, prompts, settings)
    key = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_root or default_cache_root()) / f"teacher-{spec.family.name}-{key}"
    if _complete(folder):
        if rank == 0:
            print(f"teacher latents: reusing {folder}", file=sys.stderr)
        return folder
    header = {"family": spec.family.name, "transformer_class": spec.transformer_config["_class_name"], "made": made,
              "scheduler": spec.family.scheduler_config, "boundary_ratio": spec.boundary_ratio,
              "guidance": made["guidance"]}

    def open_writer():
        return LatentsWriter(folder, header, num_inputs=len(prompts), shard_size=shard_size, flag="--cache")

    writer = open_writer() if rank == 0 else None  # rank 0 creates the folder and its manifest first
    _barrier(world)
    writer = writer or open_writer()
    mine = [k for k in writer.pending() if k % world == rank]
    if mine:
        _sample_shards(spec, prompts, made, writer, mine, settings, device, progress and rank == 0)
    _barrier(world)
    if rank == 0:
        writer.finish()
    _barrier(world)
    return folder


def _complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("complete", False)
    except (OSError, json.JSONDecodeError):
        return False


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _sample_shards(spec, prompts, made, writer, shards, settings, device, progress) -> None:
    """Load the pipeline and sample the latents of ``shards``, one atomic shard at a time."""
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    size = writer.header["shard_size"]
    todo = {k: list(range(k * size, min(len(prompts), (k + 1) * size))) for k in shards}
    print(f"teacher latents: sampling {sum(map(len, todo.values()))} of {len(prompts)} prompts with {spec.pipeline_dir} "
          f"({made['steps']} steps, guidance {made['guidance']:g}, {made['width']}x{made['height']}x{made['num_frames']}) "
          f"into {writer.folder}", file=sys.stderr)
    pipe = DiffusionPipeline.from_pretrained(spec.pipeline_dir, dtype=settings.dtype, use_safetensors=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=sum(map(len, todo.values())), desc="teacher samples", unit="prompt", disable=not progress)
    try:
        for k, idx in todo.items():
            parts, t0 = [], time.perf_counter()
            for lo in range(0, len(idx), settings.batch_size):
                chunk = idx[lo:lo + settings.batch_size]
                parts.append(_sample(pipe, spec.family, [prompts[i] for i in chunk], chunk, made, device))
                bar.update(len(chunk))
            tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
            # "sampling_s": text encoding + sampling of the shard, the pipeline's loading excluded
            writer.write(k, tensors, {"sources": idx, "skipped": [], "sampling_s": round(time.perf_counter() - t0, 3)})
    finally:
        bar.close()
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@torch.no_grad()
def _sample(pipe, family, texts: list[str], indices: list[int], made: dict, device) -> dict[str, torch.Tensor]:
    """{"latents": (n, C, F, H, W) float32, conditions...} for prompts ``texts`` (items ``indices``)."""
    cond = family.encode_text(pipe, texts, device)
    # one generator per prompt, seeded by (seed, prompt index): an item does not depend on its batch
    generators = [torch.Generator().manual_seed(hash_seed(made["seed"], _STREAM_TEACHER, i)) for i in indices]
    latents = family.sample(pipe, cond, generators=generators, steps=made["steps"], guidance=made["guidance"],
                            height=made["height"], width=made["width"], num_frames=made["num_frames"])
    return {"latents": latents.cpu(), **{k: v.cpu() for k, v in cond.items()}}
