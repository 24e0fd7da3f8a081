"""The on-disk format of training latents, and :class:`LatentsSource`, the data source that reads it.

``vidsparse encode`` (videos) and ``vidsparse distill --prompts`` (the teacher's samples) write
the same format; ``vidsparse distill --latents`` reads it::

    LATENTS/
      manifest.json              what is in the folder and how it was made (below)
      shard-00000.safetensors    "latents" (n, C, F, H, W) float32 and the condition tensors (n, ...)
      shard-00001.safetensors    ...
      skipped.jsonl              one {"video": ..., "reason": ...} per input that was skipped

Shard k holds the items made from inputs ``[k * shard_size, (k + 1) * shard_size)`` (fewer when
some were skipped; its safetensors metadata lists them). Every shard is written to a temporary
file, fsynced and renamed, so a shard on disk is complete: an interrupted run resumes by making
only the missing shards. ``manifest.json`` (written the same way) holds:

* ``family`` and ``transformer_class`` (e.g. "wan", "WanTransformer3DModel"), the model's
  ``scheduler`` config, ``boundary_ratio`` (Wan 2.2) and ``guidance``;
* ``latent_shape`` [C, F, H, W] and ``conditions`` {name: {"shape": [...], "dtype": ...}} per item;
* ``count`` items in ``shards`` [{"file", "count"}], ``shard_size``, ``num_shards``, ``complete``;
* ``made``: how it was made (the command, pipeline path, resolution, frames, steps, seed, a hash of
  the prompts or videos); a resumed run must match it;
* ``sampling_s`` (teacher samples only): seconds spent encoding prompts and sampling, summed over
  shards (the pipeline's loading excluded).

A distillation run reads item ``i`` of its stream as item ``perm_e[i mod N]`` of the folder, with
``e = i // N`` and ``perm_e`` a permutation seeded by ``(seed, e)``: each epoch visits every item
once, in an order that depends only on the seed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..utils import hash_seed

__all__ = ["FORMAT", "MANIFEST", "shard_path", "atomic_write", "LatentsWriter", "read_manifest", "LatentsSource"]

FORMAT, VERSION, MANIFEST = "vidsparse-latents", 1, "manifest.json"
# keys of the manifest a resumed run must reproduce exactly
_IDENTITY = ("family", "transformer_class", "made", "shard_size", "num_shards")


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.safetensors"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _shard_info(path: Path) -> dict | None:
    """The metadata of a shard, or None when it cannot be read (it is then made again)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["vidsparse"])
    except Exception:  # noqa: BLE001 - any unreadable shard is simply redone
        return None


class LatentsWriter:
    """Writes a latents folder shard by shard; a folder holding a run with the same ``header``
    (same family, ``made``, shard size) is resumed, one made differently is refused.

    Args:
        folder: the output folder (created). header: the manifest's fixed part (``family``,
            ``transformer_class``, ``made``, ``scheduler``, ``boundary_ratio``, ``guidance``).
        num_inputs: how many inputs (prompts, videos) there are. shard_size: inputs per shard.
        flag: the flag that named ``folder``, for messages.
    """

    def __init__(self, folder, header: dict, *, num_inputs: int, shard_size: int, flag: str):
        from ..utils import check_output_dir

        if num_inputs < 1 or shard_size < 1:
            raise ValueError(f"{flag}: nothing to write ({num_inputs} inputs, shard size {shard_size})")
        self.folder, self.flag = check_output_dir(folder, flag), flag
        self.header = {"format": FORMAT, "version": VERSION, **header, "shard_size": shard_size,
                       "num_shards": math.ceil(num_inputs / shard_size)}
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            self._check_same(json.loads(manifest.read_text()))
        elif any(self.folder.iterdir()):
            raise ValueError(f"{flag} {self.folder}: the folder holds other files; give an empty or new folder")
        else:
            atomic_write(manifest, _dump({**self.header, "complete": False, "count": 0, "shards": []}))

    def _check_same(self, old: dict) -> None:
        diff = [k for k in _IDENTITY if old.get(k) != self.header.get(k)]
        if diff:
            made = {k: (old.get("made", {}).get(k), v) for k, v in self.header["made"].items()
                    if old.get("made", {}).get(k) != v}
            raise ValueError(f"{self.flag} {self.folder}: holds latents made differently ({', '.join(diff)}"
                             f"{f': {made}' if made else ''}); give another folder")

    def done(self) -> dict[int, dict]:
        """Shard index -> metadata of every complete shard on disk."""
        found = {}
        for k in range(self.header["num_shards"]):
            path = shard_path(self.folder, k)
            info = _shard_info(path) if path.is_file() else None
            if info is not None:
                found[k] = info
        return found

    def pending(self) -> list[int]:
        done = self.done()
        return [k for k in range(self.header["num_shards"]) if k not in done]

    def write(self, index: int, tensors: dict[str, torch.Tensor], info: dict) -> Path:
        """Shard ``index``: ``tensors`` ("latents" (n, C, F, H, W) + conditions, n may be 0) and
        ``info`` (JSON: "sources", "skipped", ...), written atomically."""
        from safetensors.torch import save

        n = int(tensors["latents"].shape[0])
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    metadata={"vidsparse": json.dumps({**info, "index": index, "count": n})})
        path = shard_path(self.folder, index)
        atomic_write(path, data)
        return path

    def finish(self) -> dict:
        """Scan the shards, write manifest.json and skipped.jsonl; returns the manifest."""
        from safetensors import safe_open

        done = self.done()
        shards, skipped, shapes = [], [], {}
        for k in sorted(done):
            info = done[k]
            skipped += info.get("skipped", [])
            if not info["count"]:
                continue
            shards.append({"file": shard_path(self.folder, k).name, "count": info["count"]})
            if not shapes:
                with safe_open(str(shard_path(self.folder, k)), framework="pt") as f:
                    shapes = {name: f.get_slice(name) for name in f.keys()}
                    shapes = {name: {"shape": list(s.get_shape()[1:]), "dtype": s.get_dtype()} for name, s in shapes.items()}
        latents = shapes.pop("latents", {"shape": None})
        manifest = {**self.header, "complete": len(done) == self.header["num_shards"],
                    "count": sum(s["count"] for s in shards), "latent_shape": latents["shape"],
                    "conditions": shapes, "shards": shards}
        timed = [info["sampling_s"] for info in done.values() if "sampling_s" in info]
        if timed:  # teacher samples: what making them cost (summed over shards and ranks)
            manifest["sampling_s"] = round(sum(timed), 3)
        atomic_write(self.folder / MANIFEST, _dump(manifest))
        atomic_write(self.folder / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped).encode())
        return manifest


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def read_manifest(folder, flag: str = "--latents") -> dict:
    """The manifest of a complete latents folder; ValueError naming ``flag`` otherwise."""
    where = Path(folder)
    if not where.is_dir():
        raise ValueError(f"{flag} {where}: no such folder")
    path = where / MANIFEST
    if not path.is_file():
        raise ValueError(f"{flag} {where}: no {MANIFEST} (not a folder written by `vidsparse encode` or `distill --prompts`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag} {where}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{flag} {where}: {MANIFEST} is not a vidsparse latents manifest")
    if not manifest.get("complete"):
        have = len(manifest.get("shards", []))
        raise ValueError(f"{flag} {where}: incomplete ({have} of {manifest.get('num_shards')} shards listed); "
                         "run the command that made it again to finish it")
    if not manifest.get("count"):
        raise ValueError(f"{flag} {where}: holds no items (every input was skipped; see skipped.jsonl)")
    return manifest


class LatentsSource:
    """A :class:`~vidsparse.training.distill.DataSource` over a latents folder.

    ``batch(index, count, device)`` returns ``x0`` (count, C, F, H, W) float32 and the condition
    tensors (count, ...) as stored; item i is a pure function of (seed, i) (module docstring).

    Args:
        folder: the latents folder. seed: the data order's seed. family: the model's
            :class:`~vidsparse.training.families.Family` (checked against the manifest).
        flag: the flag that named the folder, for messages.
    """

    def __init__(self, folder, *, seed: int = 0, family=None, flag: str = "--latents"):
        self.folder, self.flag, self.seed, self.family = Path(folder), flag, seed, family
        self.manifest = read_manifest(folder, flag)
        counts = [s["count"] for s in self.manifest["shards"]]
        self._starts = torch.tensor([0] + counts).cumsum(0)
        self._files: dict[int, Any] = {}
        self._perm: tuple[int, torch.Tensor] | None = None
        for s in self.manifest["shards"]:
            if not (self.folder / s["file"]).is_file():
                raise ValueError(f"{flag} {self.folder}: {s['file']} is missing")

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def check(self, config, family) -> tuple[int, int, int]:
        """Check the latents fit a model (config dict, family) before its weights are loaded;
        returns the token grid. ValueError naming the flag and what differs."""
        m, where = self.manifest, f"{self.flag} {self.folder}"
        if m["family"] != family.name:
            raise ValueError(f"{where}: latents made for a {m['transformer_class']} ({m['family']}); --model is a "
                             f"{family.transformer_class} ({family.name})")
        channels = family.channels(config)
        if m["latent_shape"][0] != channels:
            raise ValueError(f"{where}: latents have {m['latent_shape'][0]} channels; --model takes {channels} (in_channels)")
        for name, width in family.condition_widths(config).items():
            have = m["conditions"].get(name, {}).get("shape")
            if not have or have[-1] != width:
                raise ValueError(f"{where}: condition {name} is {have[-1] if have else 'missing'} wide; --model expects {width}")
        try:
            return family.grid(config, tuple(m["latent_shape"]))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def bind(self, model: torch.nn.Module) -> tuple[int, int, int]:
        from .families import family_for_model

        family = self.family or family_for_model(model)
        return self.check(dict(getattr(model, "module", model).config), family)

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(len(self), generator=g))
        return self._perm[1]

    def _file(self, shard: int):
        if shard not in self._files:
            from safetensors import safe_open

            self._files[shard] = safe_open(str(self.folder / self.manifest["shards"][shard]["file"]), framework="pt")
        return self._files[shard]

    def item(self, i: int) -> dict[str, torch.Tensor]:
        """Item ``i`` of the folder (not of the shuffled stream): {"latents": (C, F, H, W), conditions...}."""
        shard = int(torch.searchsorted(self._starts, i, right=True)) - 1
        row = i - int(self._starts[shard])
        f = self._file(shard)
        return {name: f.get_slice(name)[row:row + 1][0] for name in ["latents", *self.manifest["conditions"]]}

    def batch(self, index: int, count: int, device: torch.device) -> tuple[torch.Tensor, dict]:
        n = len(self)
        items = [self.item(int(self._order(i // n)[i % n])) for i in range(index, index + count)]
        stacked = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
        return stacked.pop("latents").float(), stacked
