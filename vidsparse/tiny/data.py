"""Procedural "moving shapes" videos with attribute-token conditions.

Every clip shows 1 to ``max_objects`` coloured shapes (disc, square, triangle, ring) that move
(bouncing, orbiting, zig-zagging, wandering, ...), spin, pulse in size and occlude each other over a
slowly animated textured background (gradient, stripes, checkerboard, clouds, ...). The condition
is a short sequence of attribute tokens, e.g. "red disc bouncing, blue square orbiting, striped
background", turned into fixed seeded random vectors by :func:`embed`.

Everything is vectorised torch and runs on whatever device the conditions live on, so a training
loop renders its batches on the GPU with no data loader::

    >>> cfg = ShapesConfig()
    >>> cond = sample_conditions(64, seed=0, split="train", start=0, device="cuda")
    >>> video = render(cond, config=cfg)        # (64, 3, 16, 64, 64) float32 in [-1, 1]
    >>> emb = embed(cond, config=cfg)           # (64, 7, 128), zero rows for absent objects
    >>> describe(cond)[0]
    'red disc bouncing, blue square orbiting, striped background'

Randomness is counter-based: clip ``i`` of split ``s`` under seed ``k`` is a pure function of
``(k, s, i)``, computed with a 32-bit integer hash in int64 arithmetic. So a clip does not depend on
the batch it was drawn in, the training data of step ``n`` is simply clips ``[n*B, (n+1)*B)`` (exact
resume needs no data-RNG state), the hashed random numbers are bit-identical on CPU and GPU, and
the splits use disjoint streams. Splits:

* ``"train"`` / ``"val"``: same distribution, independent clips.
* ``"shifted"``: same shapes, but colours, motions and backgrounds come from held-out sets (see
  :data:`SPLIT_VOCAB`); meant as mismatched fine-tuning data.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from .drawing import PATHS, bg_checkerboard, bg_dots, bg_gradient, bg_ripples, bg_stripes, bg_waves, fold, shape_sdf

__all__ = [
    "ShapesConfig",
    "Conditions",
    "SHAPES",
    "COLOURS",
    "MOTIONS",
    "BACKGROUNDS",
    "SPLITS",
    "SPLIT_VOCAB",
    "sample_conditions",
    "render",
    "embed",
    "describe",
    "conditions_from_text",
    "make_batch",
]

# ----------------------------------------------------------------------------------------------
# Vocabulary. Indices into these tuples are the attribute ids stored in `Conditions`.

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring")

#: colour name -> RGB in [0, 1]. The first 8 form the training palette, the rest the shifted one.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.98, 0.88, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "magenta": (0.90, 0.15, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
    # shifted palette
    "pink": (1.00, 0.60, 0.78),
    "teal": (0.00, 0.52, 0.50),
    "purple": (0.50, 0.20, 0.80),
    "lime": (0.68, 1.00, 0.20),
    "brown": (0.55, 0.32, 0.12),
    "navy": (0.08, 0.12, 0.50),
}
_COLOUR_NAMES = tuple(COLOURS)
#: colour names in index order (the condition's colour ids)
COLOUR_NAMES = _COLOUR_NAMES
_COLOUR_RGB = torch.tensor(list(COLOURS.values()), dtype=torch.float32)

#: motion names; the first 4 are training motions, the rest shifted ("looping" is a figure eight).
MOTIONS: tuple[str, ...] = ("bouncing", "orbiting", "zigzagging", "wandering", "looping", "hopping", "spiralling")

#: background names; the first 4 are training backgrounds, the rest shifted.
BACKGROUNDS: tuple[str, ...] = ("gradient", "stripes", "checkerboard", "clouds", "dots", "ripples", "waves")
_BACKGROUND_ADJ: tuple[str, ...] = ("gradient", "striped", "checkered", "cloudy", "dotted", "rippled", "wavy")

SPLITS: tuple[str, ...] = ("train", "val", "shifted")

_TRAIN_VOCAB = {"shape": (0, 1, 2, 3), "colour": tuple(range(8)), "motion": (0, 1, 2, 3), "background": (0, 1, 2, 3)}
_SHIFTED_VOCAB = {"shape": (0, 1, 2, 3), "colour": tuple(range(8, 14)), "motion": (4, 5, 6), "background": (4, 5, 6)}
#: split -> attribute kind -> the attribute ids that split draws from.
SPLIT_VOCAB: dict[str, dict[str, tuple[int, ...]]] = {
    "train": _TRAIN_VOCAB,
    "val": _TRAIN_VOCAB,
    "shifted": _SHIFTED_VOCAB,
}

# Hash tags that separate the random streams of the splits (and of text-built conditions).
_SPLIT_TAGS = {"train": 0x1B873593, "val": 0x2C1B3C6D, "shifted": 0x297A2D39, "text": 0x6A09E667}
# Stream ids (the high 16 bits of the hash counter) for the different uses of a clip key.
_STREAM_ATTRS, _STREAM_BG, _STREAM_CLOUDS, _STREAM_OBJECT = 1, 2, 3, 16


@dataclass(frozen=True)
class ShapesConfig:
    """Geometry of the clips and of the condition embedding.

    Attributes:
        frames: T, frames per clip.
        size: H = W in pixels. Shapes and motions are defined in normalised coordinates, so a
            smaller size renders the same scene at a lower resolution (handy for tests).
        text_dim: width of the condition embedding returned by :func:`embed`.
        max_objects: objects per clip are drawn uniformly from 1..max_objects; each takes 3 tokens.
        embed_seed: seed of the fixed random attribute and position vectors used by :func:`embed`.
    """

    frames: int = 16
    size: int = 64
    text_dim: int = 128
    max_objects: int = 2
    embed_seed: int = 20260227

    def __post_init__(self) -> None:
        for name in ("frames", "size", "text_dim", "max_objects"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ShapesConfig.{name} must be a positive int, got {value!r}")
        if self.size < 8:
            raise ValueError(f"ShapesConfig.size must be >= 8 pixels, got {self.size}")
        smallest_palette = min(len(v["colour"]) for v in SPLIT_VOCAB.values())
        if self.max_objects > smallest_palette:
            raise ValueError(
                f"ShapesConfig.max_objects must be <= {smallest_palette} (objects get distinct colours), "
                f"got {self.max_objects}"
            )

    @property
    def seq_len(self) -> int:
        """L, tokens per condition: one background token plus (shape, colour, motion) per object."""
        return 1 + 3 * self.max_objects

    def replace(self, **changes) -> "ShapesConfig":
        """A copy with some fields changed."""
        return replace(self, **changes)


@dataclass(frozen=True)
class Conditions:
    """Attribute ids of a batch of clips, plus the per-clip key of every nuisance parameter.

    Attributes (B = batch, O = max_objects; ids index :data:`SHAPES`, colour names, :data:`MOTIONS`,
    :data:`BACKGROUNDS`; -1 marks an absent object slot; every tensor on one device):
        shape, colour, motion: (B, O) int64.
        background: (B,) int64.
        key: (B, 2) int64 holding two 32-bit words. It seeds positions, speeds, sizes, phases and
            background colours, so equal attributes with different keys give different clips.
    """

    shape: torch.Tensor
    colour: torch.Tensor
    motion: torch.Tensor
    background: torch.Tensor
    key: torch.Tensor

    def __post_init__(self) -> None:
        tensors = {f: getattr(self, f) for f in ("shape", "colour", "motion", "background", "key")}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise ValueError(f"Conditions.{name} must be an int64 tensor, got {getattr(t, 'dtype', type(t))}")
        if self.background.dim() != 1:
            raise ValueError(f"Conditions.background must be (B,), got shape {tuple(self.background.shape)}")
        b = self.background.shape[0]
        for name in ("shape", "colour", "motion"):
            t = tensors[name]
            if t.dim() != 2 or t.shape != self.shape.shape or t.shape[0] != b:
                raise ValueError(
                    f"Conditions.{name} must be (B, O) = ({b}, O) like .shape, got {tuple(t.shape)}"
                )
        if self.key.shape != (b, 2):
            raise ValueError(f"Conditions.key must be (B, 2) = ({b}, 2), got {tuple(self.key.shape)}")
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ValueError(f"Conditions tensors must share one device, got {sorted(map(str, devices))}")
        absent = self.shape < 0
        bad = (  # one combined check: a single host sync on GPU
            (self.shape >= len(SHAPES)).any()
            | (self.colour >= len(_COLOUR_NAMES)).any()
            | (self.motion >= len(MOTIONS)).any()
            | (self.background < 0).any()
            | (self.background >= len(BACKGROUNDS)).any()
            | ((self.colour < 0) != absent).any()
            | ((self.motion < 0) != absent).any()
            | (self.shape < -1).any()
            | (self.key < 0).any()
            | (self.key > _MASK32).any()
        )
        if bool(bad):
            raise ValueError(
                "Conditions ids out of range: shape/colour/motion must be -1 (absent, all three together) or "
                f"< ({len(SHAPES)}, {len(_COLOUR_NAMES)}, {len(MOTIONS)}), background in [0, {len(BACKGROUNDS)}), "
                "key words in [0, 2**32)"
            )

    def __len__(self) -> int:
        return self.background.shape[0]

    @property
    def device(self) -> torch.device:
        return self.background.device

    @property
    def max_objects(self) -> int:
        return self.shape.shape[1]

    @property
    def num_objects(self) -> torch.Tensor:
        """(B,) int64, objects present in each clip."""
        return (self.shape >= 0).sum(1)

    def to(self, device: torch.device | str) -> "Conditions":
        return Conditions(*(getattr(self, f).to(device) for f in ("shape", "colour", "motion", "background", "key")))

    def __getitem__(self, index) -> "Conditions":
        """Select clips with an int, slice, index tensor or bool mask (always keeps the batch dim)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Conditions(*(getattr(self, f)[index] for f in ("shape", "colour", "motion", "background", "key")))

    @staticmethod
    def cat(items: Sequence["Conditions"]) -> "Conditions":
        """Concatenate along the batch dimension."""
        if not items:
            raise ValueError("Conditions.cat needs at least one Conditions")
        fields = ("shape", "colour", "motion", "background", "key")
        return Conditions(*(torch.cat([getattr(c, f) for c in items]) for f in fields))


# ----------------------------------------------------------------------------------------------
# Counter-based hashing. All values stay in [0, 2**32) inside int64, and products are split so
# they never exceed 2**48: no signed overflow, hence identical bits on every device.

_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32) (int or int64 tensor), c a 32-bit constant."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """A bijective 32-bit finaliser (xorshift-multiply, "lowbias32" constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _clip_keys(seed: int, tag: int, index: torch.Tensor) -> torch.Tensor:
    """(B,) indices -> (B, 2) keys. For a fixed (seed, tag) each word is a bijection of the index."""
    h0 = _mix32(_mix32(seed) ^ tag)
    h1 = _mix32(h0 ^ 0x9E3779B9)
    k0 = _mix32(_mix32(index ^ h0) ^ 0x85EBCA6B)
    k1 = _mix32(_mix32(index ^ h1) ^ 0xC2B2AE35)
    return torch.stack([k0, k1], dim=1)


def _uniform(keys: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """(B, 2) keys -> (B, n) float32 uniforms in [0, 1) with 24 random bits each."""
    counter = torch.arange(n, device=keys.device, dtype=torch.int64) + (stream << 16)
    h = _mix32(keys[:, :1] ^ _mix32(counter)[None, :])
    h = _mix32(h ^ keys[:, 1:])
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _choice(u: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """Uniforms (any shape) -> ids drawn uniformly from `values` (same shape, int64)."""
    table = torch.tensor(values, dtype=torch.int64, device=u.device)
    return table[(u * len(values)).long().clamp_(max=len(values) - 1)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MASK32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")


# ----------------------------------------------------------------------------------------------
# Conditions


def sample_conditions(
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    start: int = 0,
    config: ShapesConfig | None = None,
    device: torch.device | str = "cpu",
) -> Conditions:
    """Draw the attributes of clips ``start .. start+n-1`` of a split.

    Object count is uniform in 1..max_objects; each object gets a uniform shape and motion and a
    colour distinct from the other objects of its clip; the background type is uniform. All come
    from the vocabulary of ``split`` (:data:`SPLIT_VOCAB`).

    Args:
        n: number of clips B (>= 1).
        seed: dataset seed in [0, 2**32); same (seed, split, index) -> same clip, on any device.
        split: "train", "val" (same distribution, disjoint stream) or "shifted".
        start: index of the first clip (>= 0); clip indices must stay below 2**32.
        config: only ``max_objects`` is used here.
        device: where the returned tensors live (and where :func:`render` will run).

    Returns:
        Conditions with B = n.
    """
    config = config or ShapesConfig()
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(start, int) or isinstance(start, bool) or start < 0 or start + n > _MASK32 + 1:
        raise ValueError(f"start must be an int with 0 <= start and start + n <= 2**32, got start={start!r}, n={n}")
    _check_seed(seed)
    _check_split(split)
    vocab = SPLIT_VOCAB[split]
    o = config.max_objects

    index = torch.arange(start, start + n, device=device, dtype=torch.int64)
    keys = _clip_keys(seed, _SPLIT_TAGS[split], index)
    u = _uniform(keys, _STREAM_ATTRS, 2 + 2 * o + len(vocab["colour"]))
    count = 1 + (u[:, 0] * o).long().clamp_(max=o - 1)  # (B,)
    present = torch.arange(o, device=device)[None, :] < count[:, None]  # (B, O)
    background = _choice(u[:, 1], vocab["background"])
    shape = _choice(u[:, 2 : 2 + o], vocab["shape"])
    motion = _choice(u[:, 2 + o : 2 + 2 * o], vocab["motion"])
    # distinct colours: the first O entries of a random permutation of the palette
    perm = torch.argsort(u[:, 2 + 2 * o :], dim=1, stable=True)[:, :o]
    colour = torch.tensor(vocab["colour"], device=device)[perm]
    absent = torch.full_like(shape, -1)
    return Conditions(
        shape=torch.where(present, shape, absent),
        colour=torch.where(present, colour, absent),
        motion=torch.where(present, motion, absent),
        background=background,
        key=keys,
    )


def describe(conditions: Conditions) -> list[str]:
    """Human-readable captions, e.g. ``"red disc bouncing, blue square orbiting, striped background"``.

    :func:`conditions_from_text` parses them back.
    """
    cpu = conditions.to("cpu")
    out = []
    for b in range(len(cpu)):
        parts = []
        for k in range(cpu.max_objects):
            s = int(cpu.shape[b, k])
            if s < 0:
                continue
            parts.append(f"{_COLOUR_NAMES[int(cpu.colour[b, k])]} {SHAPES[s]} {MOTIONS[int(cpu.motion[b, k])]}")
        parts.append(f"{_BACKGROUND_ADJ[int(cpu.background[b])]} background")
        out.append(", ".join(parts))
    return out


def conditions_from_text(
    texts: str | Sequence[str],
    *,
    seed: int = 0,
    config: ShapesConfig | None = None,
    device: torch.device | str = "cpu",
) -> Conditions:
    """Parse captions in the format of :func:`describe` into Conditions (for demos and prompts).

    Each caption is ``"<colour> <shape> <motion>, ..., <adjective> background"`` with 1 to
    ``max_objects`` objects; any vocabulary entry is accepted, shifted ones included. Caption ``i``
    gets nuisance key number ``i`` of ``seed``, so change ``seed`` for another rendering/sample.

    Raises:
        ValueError: an unknown word, a missing background, or too many objects.
    """
    config = config or ShapesConfig()
    _check_seed(seed)
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("texts must contain at least one caption")
    o = config.max_objects
    rows = []
    for text in texts:
        parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
        if not parts or not parts[-1].endswith(" background"):
            raise ValueError(f"caption must end with '<adjective> background', got {text!r}")
        adj = parts[-1][: -len(" background")].strip()
        if adj not in _BACKGROUND_ADJ:
            raise ValueError(f"unknown background {adj!r} in {text!r}; expected one of {_BACKGROUND_ADJ}")
        objects = parts[:-1]
        if not 1 <= len(objects) <= o:
            raise ValueError(f"caption must describe 1..{o} objects, got {len(objects)} in {text!r}")
        row = [[-1] * o, [-1] * o, [-1] * o, _BACKGROUND_ADJ.index(adj)]
        for k, obj in enumerate(objects):
            words = obj.split()
            if len(words) != 3:
                raise ValueError(f"object must be '<colour> <shape> <motion>', got {obj!r} in {text!r}")
            for slot, (word, vocab, what) in enumerate(
                zip(words, (_COLOUR_NAMES, SHAPES, MOTIONS), ("colour", "shape", "motion"))
            ):
                if word not in vocab:
                    raise ValueError(f"unknown {what} {word!r} in {text!r}; expected one of {vocab}")
                row[(1, 0, 2)[slot]][k] = vocab.index(word)
        rows.append(row)
    tensor = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    index = torch.arange(len(rows), device=device, dtype=torch.int64)
    return Conditions(
        shape=tensor([r[0] for r in rows]),
        colour=tensor([r[1] for r in rows]),
        motion=tensor([r[2] for r in rows]),
        background=tensor([r[3] for r in rows]),
        key=_clip_keys(seed, _SPLIT_TAGS["text"], index),
    )


# ----------------------------------------------------------------------------------------------
# Embedding


@functools.lru_cache(maxsize=16)
def _token_tables(text_dim: int, embed_seed: int, max_objects: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, D) attribute vectors and (L, D) position vectors, N(0, 1/2) each, from fixed seeds.

    Drawn on the CPU (reproducible everywhere) and cached per device. Attribute vectors do not
    depend on max_objects, so configs that differ only there share them.
    """
    vocab = len(SHAPES) + len(_COLOUR_NAMES) + len(MOTIONS) + len(BACKGROUNDS)
    g = torch.Generator().manual_seed(embed_seed)
    attr = torch.randn(vocab, text_dim, generator=g) * math.sqrt(0.5)
    g = torch.Generator().manual_seed(embed_seed + 1)
    pos = torch.randn(1 + 3 * max_objects, text_dim, generator=g) * math.sqrt(0.5)
    return attr.to(device), pos.to(device)


def embed(conditions: Conditions, *, config: ShapesConfig | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Condition embedding for the transformer's cross-attention.

    Token order: [background, shape_1, colour_1, motion_1, shape_2, ...]. Each present token is its
    attribute's fixed random vector plus a fixed random vector of its position (so the model can
    tell which colour belongs to which shape); tokens of absent objects are zero. No learned
    weights: all learning happens in the transformer. The all-zero embedding is the unconditional
    input for classifier-free guidance.

    Returns:
        (B, L, text_dim) tensor of ``dtype`` on the conditions' device, L = 1 + 3 * max_objects.
    """
    config = config or ShapesConfig()
    if conditions.max_objects != config.max_objects:
        raise ValueError(
            f"conditions have {conditions.max_objects} object slots but config.max_objects={config.max_objects}"
        )
    dev = conditions.device
    attr, pos = _token_tables(config.text_dim, config.embed_seed, config.max_objects, str(dev))
    n_shape, n_colour, n_motion = len(SHAPES), len(_COLOUR_NAMES), len(MOTIONS)
    per_object = torch.stack(
        [conditions.shape, conditions.colour + n_shape, conditions.motion + n_shape + n_colour], dim=2
    )  # (B, O, 3) global vocab ids
    per_object = torch.where((conditions.shape >= 0)[:, :, None], per_object, -1).flatten(1)
    bg = conditions.background[:, None] + n_shape + n_colour + n_motion
    ids = torch.cat([bg, per_object], dim=1)  # (B, L), -1 = padding
    tokens = attr[ids.clamp(min=0)] + pos[None]
    tokens = tokens * (ids >= 0)[..., None]
    return tokens.to(dtype)


# ----------------------------------------------------------------------------------------------
# Rendering. Coordinates are normalised to [-1, 1] (x right, y down); time is the frame index.


# Each path function maps per-object uniforms u (B, 48), frame times t (T,) and the allowed
# half-extent lim (B,) of the object's centre to raw centres (B, T, 2); the caller folds them into
# the frame. Different motions may reuse the same uniforms: an object has only one motion.


assert len(PATHS) == len(MOTIONS)


def _draw_objects(img: torch.Tensor, cond: Conditions, config: ShapesConfig, t, x, y) -> torch.Tensor:
    """Paint the objects, slot 0 first (later slots occlude earlier ones), onto img (B, T, H, W, 3).

    t: (T,) frame times; x: (1, 1, 1, W) and y: (1, 1, H, 1) pixel-centre coordinates.
    """
    pixel = 2.0 / config.size
    rgb = _COLOUR_RGB.to(img.device)
    for k in range(cond.max_objects):
        u = _uniform(cond.key, _STREAM_OBJECT + k, 48)
        present = cond.shape[:, k] >= 0
        radius = 0.16 + 0.14 * u[:, 0]  # half-extent in normalised units (5..10 px at 64 px)
        pulse = 0.25 * u[:, 1]
        wave = torch.sin((0.15 + 0.35 * u[:, 2, None]) * t[None] + 2 * math.pi * u[:, 3, None])
        scale = radius[:, None] * (1 + pulse[:, None] * wave)  # (B, T)
        theta = 2 * math.pi * u[:, 4, None] + (0.6 * u[:, 5, None] - 0.3) * t[None]  # (B, T) spin
        lim = 1.0 - radius * (1 + pulse) - 0.02
        paths = torch.stack([p(u, t, lim) for p in PATHS], dim=1)  # (B, M, T, 2)
        centre = paths[torch.arange(len(cond), device=img.device), cond.motion[:, k].clamp(min=0)]
        centre = fold(centre, lim[:, None, None])
        dx = x - centre[..., 0, None, None]  # (B, T, 1, W)
        dy = y - centre[..., 1, None, None]  # (B, T, H, 1)
        cos, sin = torch.cos(theta)[..., None, None], torch.sin(theta)[..., None, None]
        s = scale[..., None, None]
        lx = (cos * dx + sin * dy) / s
        ly = (cos * dy - sin * dx) / s
        sdf = shape_sdf(cond.shape[:, k, None, None, None], lx, ly)
        alpha = (0.5 - sdf * s / pixel).clamp_(0, 1).mul_(present[:, None, None, None])
        # shading fixed to the object frame, so spinning is visible even on a disc; light <= 1
        light = (0.6 * lx - 0.8 * ly).clamp_(-1, 1).mul_(0.15).add_(0.85)
        colour = (rgb[cond.colour[:, k].clamp(min=0)] * (0.9 + 0.15 * u[:, 40, None])).clamp_(0, 1)  # (B, 3)
        # img <- (1 - alpha) * img + alpha * light * colour, in place on the big (B, T, H, W, 3) tensor
        img.mul_((1 - alpha)[..., None]).addcmul_((alpha * light)[..., None], colour[:, None, None, None, :])
    return img


# Background weight functions: uniforms u (b, 24), keys (b, 2), t (1, T, 1, 1), x (1, 1, 1, W),
# y (1, 1, H, 1) -> weight (b, T, H, W) in [0, 1] that blends the two background colours.


def _bg_clouds(u, keys, t, x, y, size):
    grid = 6
    noise = _uniform(keys, _STREAM_CLOUDS, 2 * grid * grid).view(-1, 2, grid, grid) - 0.5
    noise = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)  # (b, 2, H, W)
    phase = (0.08 + 0.15 * u[:, 10, None, None, None]) * t + 2 * math.pi * u[:, 11, None, None, None]
    field = noise[:, :1] * torch.cos(phase) + noise[:, 1:] * torch.sin(phase)  # evolves, keeps its variance
    return (0.5 + 2.0 * field).clamp(0, 1)


_BACKGROUND_FNS = (bg_gradient, bg_stripes, bg_checkerboard, _bg_clouds, bg_dots, bg_ripples, bg_waves)
assert len(_BACKGROUND_FNS) == len(BACKGROUNDS)


def _draw_background(cond: Conditions, config: ShapesConfig, t, x, y) -> torch.Tensor:
    """(B, T, H, W, 3) in [0, 1]: two muted colours with guaranteed contrast, blended by a texture."""
    b_total, size = len(cond), config.size
    u = _uniform(cond.key, _STREAM_BG, 24)
    base = 0.2 + 0.45 * u[:, 0:3]
    base = 0.6 * base + 0.4 * base.mean(1, keepdim=True)  # desaturate: objects should stand out
    amount = (0.35 + 0.25 * u[:, 6:7])
    lighter = base + (1 - base) * amount
    darker = base * (1 - amount)
    second = torch.where(u[:, 7:8] < 0.5, lighter, darker)
    img = torch.empty(b_total, config.frames, size, size, 3, device=cond.device)
    t4 = t.view(1, -1, 1, 1)
    for bg_id, fn in enumerate(_BACKGROUND_FNS):
        idx = (cond.background == bg_id).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        w = fn(u[idx], cond.key[idx], t4, x, y, size)[..., None]  # (b, T, H, W, 1)
        c1, c2 = base[idx, None, None, None, :], second[idx, None, None, None, :]
        img[idx] = c1 + w * (c2 - c1)
    return img


def render(conditions: Conditions, *, config: ShapesConfig | None = None) -> torch.Tensor:
    """Render the clips described by ``conditions`` on their device.

    Deterministic: the same conditions (attributes and keys) give the same video. On one device the
    result is bit-identical across calls; CPU and GPU agree to float rounding.

    Returns:
        (B, 3, T, H, W) float32 in [-1, 1], with T = config.frames and H = W = config.size.
    """
    config = config or ShapesConfig()
    if not isinstance(conditions, Conditions):
        raise ValueError(f"conditions must be a vidsparse.tiny.data.Conditions, got {type(conditions).__name__}")
    if conditions.max_objects != config.max_objects:
        raise ValueError(
            f"conditions have {conditions.max_objects} object slots but config.max_objects={config.max_objects}"
        )
    dev = conditions.device
    coords = (torch.arange(config.size, device=dev, dtype=torch.float32) + 0.5) * (2.0 / config.size) - 1.0
    x = coords.view(1, 1, 1, -1)
    y = coords.view(1, 1, -1, 1)
    t = torch.arange(config.frames, device=dev, dtype=torch.float32)
    img = _draw_background(conditions, config, t, x, y)
    img = _draw_objects(img, conditions, config, t, x, y)
    return img.mul_(2).sub_(1).clamp_(-1, 1).permute(0, 4, 1, 2, 3).contiguous()


def make_batch(
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    start: int = 0,
    config: ShapesConfig | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, Conditions]:
    """Clips ``start .. start+n-1`` of a split, ready for training.

    Returns:
        video (n, 3, T, H, W) float32 in [-1, 1]; embedding (n, L, text_dim) float32; the Conditions.
    """
    config = config or ShapesConfig()
    cond = sample_conditions(n, seed=seed, split=split, start=start, config=config, device=device)
    return render(cond, config=config), embed(cond, config=config), cond
