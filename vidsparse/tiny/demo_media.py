"""What ``vidsparse demo`` writes: side-by-side videos, frame strips and block-mask plots.

Videos are (B, 3, T, H, W) float tensors in [-1, 1] (the tiny model's pixel space); frames handed
to the writers are (T, H', W', 3) uint8 arrays. numpy, Pillow, imageio and matplotlib (the
``video`` extra) are imported inside the functions.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

__all__ = ["FPS", "save_mask_png", "compose_frames", "frame_strip", "write_videos"]

#: frames per second of the mp4 and the GIF
FPS = 8


def save_mask_png(mask, path: str, *, head: int = 0, batch: int = 0, title: str = "",
                  tokens_per_frame: int | None = None) -> None:
    """Plot one (batch, head) of a :class:`vidsparse.BlockMask` to a PNG: kept block pairs black.

    ``tokens_per_frame`` draws a faint grid at video-frame boundaries.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = mask.dense[batch, head].float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(7, 7 * dense.shape[0] / max(dense.shape[1], 1) + 0.9))
    ax.imshow(dense, cmap="Greys", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
    ax.set_xlabel(f"key block ({mask.block_k} tokens)")
    ax.set_ylabel(f"query block ({mask.block_q} tokens)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if tokens_per_frame:
        per_frame = ((tokens_per_frame / mask.block_k, ax.axvline), (tokens_per_frame / mask.block_q, ax.axhline))
        for blocks, line in per_frame:
            if blocks >= 1:
                n = dense.shape[1] if line is ax.axvline else dense.shape[0]
                for i in range(1, int(math.ceil(n / blocks))):
                    line(i * blocks - 0.5, color="tab:blue", alpha=0.15, lw=0.6)
    ax.set_title(title or f"head {head}: kept blocks (black), sparsity {1 - dense.mean():.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _to_uint8(video):
    """(C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8 numpy."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text(draw, xy, text, font, fill=(235, 235, 235), max_width=None):
    if max_width is not None:
        while len(text) > 4 and draw.textlength(text, font=font) > max_width:
            text = text[:-4] + "..."
    draw.text(xy, text, font=font, fill=fill)


def compose_frames(dense, sparse, captions, labels, *, scale: int):
    """Labelled side-by-side frames: (T, H', W', 3) uint8, one row per sample, sizes divisible by 16."""
    import numpy as np
    from PIL import Image, ImageDraw

    b, _, t, h, w = dense.shape
    ph, pw, gap, head, foot = h * scale, w * scale, 8, 22, 20
    width = 2 * pw + 3 * gap
    row_h = head + ph + foot
    height = b * row_h + gap
    width16, height16 = -(-width // 16) * 16, -(-height // 16) * 16
    big = lambda v: np.repeat(np.repeat(_to_uint8(v), scale, 1), scale, 2)  # noqa: E731
    panels = [(big(dense[i]), big(sparse[i])) for i in range(b)]
    font, small = _font(15), _font(12)
    base = Image.new("RGB", (width16, height16), (24, 24, 28))
    draw = ImageDraw.Draw(base)
    for i in range(b):
        y0 = gap + i * row_h
        for j, label in enumerate(labels):
            _text(draw, (gap + j * (pw + gap) + 2, y0 + 2), label, font)
        _text(draw, (gap + 2, y0 + head + ph + 3), captions[i], small, fill=(180, 180, 190),
              max_width=width - 2 * gap)
    base = np.asarray(base).copy()
    frames = np.repeat(base[None], t, 0)
    for i, (dv, sv) in enumerate(panels):
        y0 = gap + i * row_h + head
        frames[:, y0:y0 + ph, gap:gap + pw] = dv
        frames[:, y0:y0 + ph, 2 * gap + pw:2 * gap + 2 * pw] = sv
    return frames


def frame_strip(dense, sparse, captions, labels, path, *, every: int, scale: int) -> None:
    """PNG: per sample, rows dense / sparse / 4x |difference| of every ``every``-th frame."""
    import numpy as np
    from PIL import Image, ImageDraw

    b, _, t, h, w = dense.shape
    idx = list(range(0, t, every))
    ph, pw, gap, label_w, cap_h = h * scale, w * scale, 4, 130, 20
    rows = 3
    width = label_w + len(idx) * (pw + gap)
    block_h = cap_h + rows * (ph + gap) + 10
    img = Image.new("RGB", (width, b * block_h + 24), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(12)
    for j, f in enumerate(idx):
        _text(draw, (label_w + j * (pw + gap) + 2, 4), f"frame {f}", small, fill=(90, 90, 90))
    for i in range(b):
        y0 = 24 + i * block_h
        _text(draw, (4, y0 + 2), captions[i], font, fill=(0, 0, 0), max_width=width - 8)
        d, s = _to_uint8(dense[i]), _to_uint8(sparse[i])
        diff = np.clip(np.abs(d.astype(np.int16) - s.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
        for r, (name, vid) in enumerate(zip((*labels, "|difference| x4"), (d, s, diff))):
            yr = y0 + cap_h + r * (ph + gap)
            _text(draw, (4, yr + ph // 2 - 8), name, font, fill=(0, 0, 0), max_width=label_w - 8)
            for j, f in enumerate(idx):
                tile = Image.fromarray(vid[f]).resize((pw, ph), Image.NEAREST)
                img.paste(tile, (label_w + j * (pw + gap), yr))
    img.save(path)


def write_videos(frames, out: Path) -> tuple[Path | None, Path]:
    """Write the mp4 (None without imageio-ffmpeg, with a warning) and the GIF."""
    import importlib.util

    import imageio.v2 as imageio

    mp4, gif = out / "side_by_side.mp4", out / "side_by_side.gif"
    # without imageio-ffmpeg, imageio would hand ".mp4" to another plugin and fail obscurely
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        print("warning: imageio-ffmpeg is not installed: skipping side_by_side.mp4 (pip install imageio-ffmpeg)",
              file=sys.stderr)
        mp4 = None
    else:
        with imageio.get_writer(mp4, format="FFMPEG", fps=FPS, codec="libx264", quality=8, macro_block_size=16,
                                ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)
    imageio.mimsave(gif, list(frames), format="GIF", duration=1000 / FPS, loop=0)
    return mp4, gif
