"""``vidsparse encode``: a folder of videos (and their captions) -> a latents folder for
``vidsparse distill --latents``.

    vidsparse encode --pipeline /models/Wan2.1-T2V-1.3B-Diffusers --videos clips/ --captions captions.jsonl --out latents/

Every video (``.mp4 .mov .avi .mkv .webm .m4v .gif`` directly in ``--videos``, sorted by name) is
decoded with imageio (ffmpeg); its first ``--num-frames`` frames are resized so that they cover
``--height`` x ``--width`` and centre-cropped to it, then encoded with the pipeline's VAE (posterior
mean, normalised as the family does: Wan ``(z - latents_mean) / latents_std``, CogVideoX and
HunyuanVideo ``z * scaling_factor``). Its caption is encoded with the pipeline's text encoder
(``pipe.encode_prompt``, as the pipeline's ``__call__`` would). Geometry defaults to the pipeline's
own (Wan 480x832x81, CogVideoX its sample size, HunyuanVideo 720x1280x129); the frame count must be
4k + 1 (the VAEs compress time 4x).

Captions (``--captions FILE``): JSON lines ``{"video": "clip.mp4", "caption": "..."}``, or
tab-separated lines ``clip.mp4<TAB>caption``. A video is matched by its file name (or its name
without the extension). Videos without a caption get the empty prompt and are counted.

Unreadable videos and videos shorter than ``--num-frames`` are skipped; each reason is kept (in
``skipped.jsonl`` of the output) and counted in the summary. Work is written one shard of
``--shard-size`` videos at a time, atomically: running the same command again resumes after the
last complete shard. The format is described in :mod:`vidsparse.training.latents`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..utils import read_text_lines

__all__ = ["VIDEO_EXTENSIONS", "list_videos", "read_captions", "read_frames", "to_pixels", "encode_videos", "main"]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif")


class SkipVideo(Exception):
    """A video that cannot be used; the message is the reason."""


def list_videos(folder) -> list[Path]:
    """The video files directly in ``folder``, sorted; ValueError naming ``--videos``."""
    where = Path(folder)
    if not where.is_dir():
        raise ValueError(f"--videos {where}: no such folder")
    videos = sorted(p for p in where.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not videos:
        raise ValueError(f"--videos {where}: no video files there ({' '.join(VIDEO_EXTENSIONS)})")
    return videos


def read_captions(path) -> dict[str, str]:
    """{video name: caption} from JSON lines or tab-separated lines; ValueError naming ``--captions``."""
    where = Path(path)
    lines = read_text_lines(where, "--captions")
    captions = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
                name, text = record["video"], record["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f'--captions {where}: line {n} is not a JSON object with "video" and "caption"') from None
        else:
            name, tab, text = line.partition("\t")
            if not tab:
                raise ValueError(f"--captions {where}: line {n} is neither JSON nor 'video<TAB>caption'")
        if not isinstance(name, str) or not isinstance(text, str):
            raise ValueError(f"--captions {where}: line {n}: video and caption must be strings")
        captions[name.strip()] = text.strip()
    return captions


def _caption(captions: dict[str, str], video: Path) -> str | None:
    for key in (video.name, video.stem):
        if key in captions:
            return captions[key]
    return None


def read_frames(path, num_frames: int):
    """The first ``num_frames`` frames of a video, (F, H, W, 3) uint8; SkipVideo with the reason."""
    import imageio.v3 as iio
    import numpy as np

    frames = []
    try:
        with iio.imopen(path, "r") as video:
            for frame in video.iter():
                frames.append(frame)
                if len(frames) == num_frames:
                    break
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unusable
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise SkipVideo(f"unreadable ({type(exc).__name__}: {first_line})"[:300]) from None
    if len(frames) < num_frames:
        raise SkipVideo(f"too short: {len(frames)} frames, needs {num_frames}")
    clip = np.stack(frames)
    if clip.ndim == 3:  # greyscale
        clip = np.repeat(clip[..., None], 3, axis=-1)
    return clip[..., :3]


def to_pixels(frames, height: int, width: int) -> torch.Tensor:
    """(F, H0, W0, 3) uint8 -> (3, F, height, width) float32 in [-1, 1]: resized to cover the
    target (aspect kept, antialiased bilinear), then centre-cropped."""
    import torch.nn.functional as F

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # (F, 3, H0, W0)
    h0, w0 = x.shape[-2:]
    scale = max(height / h0, width / w0)
    size = (max(height, round(h0 * scale)), max(width, round(w0 * scale)))
    if size != (h0, w0):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[:, :, top:top + height, left:left + width].clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def _made(spec, videos, captions, geometry, dtype) -> dict:
    listing = [(p.name, p.stat().st_size) for p in videos]
    return {"by": "vidsparse encode", "pipeline": str(spec.pipeline_dir.resolve()), "videos": str(videos[0].parent.resolve()),
            "videos_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
            "captions_sha256": hashlib.sha256(json.dumps(captions, sort_keys=True).encode()).hexdigest() if captions else None,
            **geometry, "dtype": str(dtype).split(".")[-1]}


def prepare(pipeline, videos_dir, out, *, captions=None, height=None, width=None, num_frames=None,
            shard_size=32, dtype=torch.float32):
    """Everything checked before any model is loaded: (spec, videos, captions, geometry, writer)."""
    from .families import resolve_model
    from .latents import LatentsWriter
    from .prompts import check_geometry, vae_factors

    if not (Path(pipeline) / "model_index.json").is_file():
        raise ValueError(f"--pipeline {pipeline}: not a diffusers pipeline folder (no model_index.json)")
    spec = resolve_model(pipeline)
    videos = list_videos(videos_dir)
    caption_map = read_captions(captions) if captions is not None else {}
    defaults = spec.default_geometry()
    geometry = {"height": height or defaults["height"], "width": width or defaults["width"],
                "num_frames": num_frames or defaults["num_frames"]}
    spatial, temporal = vae_factors(spec)
    check_geometry(spec, **geometry, spatial=spatial, temporal=temporal)
    header = {"family": spec.family.name, "transformer_class": spec.transformer_config["_class_name"],
              "made": _made(spec, videos, caption_map, geometry, dtype), "scheduler": spec.family.scheduler_config,
              "boundary_ratio": spec.boundary_ratio, "guidance": None}
    writer = LatentsWriter(out, header, num_inputs=len(videos), shard_size=shard_size, flag="--out")
    return spec, videos, caption_map, geometry, writer


def encode_videos(pipeline, videos_dir, out, *, captions=None, height=None, width=None, num_frames=None,
                  batch_size: int = 1, shard_size: int = 32, device="auto", precision: str = "auto",
                  progress: bool = True) -> dict:
    """Encode a folder of videos into a latents folder (see the module docstring); returns the summary."""
    from ..utils import resolve_device

    device = resolve_device(device)
    dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else torch.float32
    spec, videos, caption_map, geometry, writer = prepare(
        pipeline, videos_dir, out, captions=captions, height=height, width=width, num_frames=num_frames,
        shard_size=shard_size, dtype=dtype)
    pending = writer.pending()
    if pending:
        _encode_shards(spec, videos, caption_map, geometry, writer, pending, batch_size, device, dtype, progress)
    manifest = writer.finish()
    infos = writer.done().values()
    skipped = [s for info in infos for s in info.get("skipped", [])]
    summary = {"out": str(writer.folder), "videos": len(videos), "encoded": manifest["count"], "skipped": len(skipped),
               "uncaptioned": sum(info.get("uncaptioned", 0) for info in infos), "latent_shape": manifest["latent_shape"],
               "complete": manifest["complete"], "family": spec.family.name, **geometry}
    if summary["uncaptioned"]:
        print(f"warning: {summary['uncaptioned']} encoded videos have no caption (encoded with the empty prompt)", file=sys.stderr)
    if skipped:
        print(f"warning: {len(skipped)} videos skipped (reasons in {writer.folder / 'skipped.jsonl'})", file=sys.stderr)
    return summary


def _encode_shards(spec, videos, caption_map, geometry, writer, pending, batch_size, device, dtype, progress) -> None:
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    # the transformer is not needed to encode: do not load it
    skip = {name: None for name in ("transformer", "transformer_2") if (spec.pipeline_dir / name).is_dir()}
    pipe = DiffusionPipeline.from_pretrained(spec.pipeline_dir, dtype=dtype, use_safetensors=True, **skip).to(device)
    size = writer.header["shard_size"]
    bar = tqdm(total=sum(len(videos[k * size:(k + 1) * size]) for k in pending), desc="encode", unit="video",
               disable=not progress)
    try:
        for k in pending:
            writer.write(k, *_encode_shard(spec, pipe, videos[k * size:(k + 1) * size], caption_map, geometry,
                                           batch_size, device, bar))
    finally:
        bar.close()


@torch.no_grad()
def _encode_shard(spec, pipe, videos, caption_map, geometry, batch_size, device, bar):
    """(tensors, info) of one shard: latents and conditions of the usable videos, skip reasons."""
    family, encoded, skipped, parts, batch = spec.family, [], [], [], []

    def flush():
        if batch:
            pixels = torch.stack([px for _, px, _ in batch])
            cond = family.encode_text(pipe, [text for _, _, text in batch], device)
            parts.append({"latents": family.encode_video(pipe, pixels).cpu(), **{k: v.cpu() for k, v in cond.items()}})
            batch.clear()

    uncaptioned = 0
    for path in videos:
        try:
            pixels = to_pixels(read_frames(path, geometry["num_frames"]), geometry["height"], geometry["width"])
        except SkipVideo as why:
            skipped.append({"video": path.name, "reason": str(why)})
        else:
            text = _caption(caption_map, path)
            uncaptioned += text is None
            encoded.append(path.name)
            batch.append((path.name, pixels, text or ""))
            if len(batch) == batch_size:
                flush()
        bar.update(1)
    flush()
    tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]} if parts else {"latents": torch.zeros(0)}
    return tensors, {"sources": encoded, "skipped": skipped, "uncaptioned": uncaptioned}


def build_parser() -> argparse.ArgumentParser:
    from ..cli_options import int_at_least

    p = argparse.ArgumentParser(prog="vidsparse encode", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Encode a folder of videos (and captions) with a pipeline's VAE and text "
                                            "encoder into a latents folder for `vidsparse distill --latents`.")
    p.add_argument("--pipeline", required=True, help="diffusers pipeline folder (model_index.json)")
    p.add_argument("--videos", required=True, help="folder of video files")
    p.add_argument("--captions", default=None,
                   help='JSON lines {"video": NAME, "caption": TEXT} or NAME<TAB>TEXT lines; videos without one get the empty prompt')
    p.add_argument("--out", required=True, help="the latents folder to write (run again to resume)")
    p.add_argument("--height", type=int_at_least(1), default=None, help="%(default)s = the pipeline's")
    p.add_argument("--width", type=int_at_least(1), default=None, help="%(default)s = the pipeline's")
    p.add_argument("--num-frames", type=int_at_least(1), default=None, help="4k + 1; %(default)s = the pipeline's")
    p.add_argument("--batch-size", type=int_at_least(1), default=1, help="videos per VAE call")
    p.add_argument("--shard-size", type=int_at_least(1), default=32, help="videos per shard (the unit of resumption)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 done, 2 a refused flag or input (one line naming it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = encode_videos(args.pipeline, args.videos, args.out, captions=args.captions, height=args.height,
                                width=args.width, num_frames=args.num_frames, batch_size=args.batch_size,
                                shard_size=args.shard_size, device=args.device, precision=args.precision,
                                progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
