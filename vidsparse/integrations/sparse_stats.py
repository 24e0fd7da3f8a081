"""Opt-in per-layer, per-step statistics of a patched model (``SparseConfig(collect_stats=True)``).

Recording is cheap on the GPU: a record keeps CUDA events and 0-d/1-d device tensors, and nothing
is synchronised or copied to the host until the records are read (:attr:`SparseStats.records`,
:meth:`SparseStats.to_json`). On the CPU the times come from ``time.perf_counter``.

Each record is a dict with these keys:

* ``model``: which transformer ("transformer", or "transformer_2" for Wan 2.2's second expert);
* ``layer``: self-attention layer index (block order; see ``SparseConfig.dense_layers``);
* ``step``: denoising step of the generation (0-based; None when not tracked);
* ``call``: forward call within the step (0 = first, 1 = the second CFG call, ...);
* ``generation``: generation counter (0-based; a rise of the timestep starts a new one);
* ``timestep``: the timestep the step was recognised by (max over the batch);
* ``dense``: True for a dense warm-up call (stock processor: no mask, no timing, sparsity 0);
* ``batch``, ``heads``: B and H of the attention call (HunyuanVideo batches whose text lengths
  differ run, and are recorded, once per length);
* ``q_len``, ``k_len``: tokens attended (k_len < q_len where padded text keys are dropped);
* ``n_video``, ``n_text``: video and text tokens in the sequence;
* ``block_q``, ``block_k``: block shape of the mask;
* ``sparsity``: block-level sparsity of the mask that ran, 1 - kept / all block pairs, averaged
  over batch and heads (blocks holding text count as kept);
* ``video_sparsity``: the same for the hybrid mask of the video->video part alone;
* ``head_sparsity``: list of H per-head block-level sparsities (``sparsity`` per head);
* ``mask_ms``: mask prediction (pooling, softmax, selection, text composition), milliseconds;
* ``attn_ms``: the block-sparse attention call, milliseconds;
* under context parallelism, per rank: ``cp``, ``cp_rank``, ``cp_heads`` and (ring) ``cp_queries``
  (see :mod:`vidsparse.integrations.context_parallel`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict

import torch

__all__ = ["SparseStats", "Timer"]


class Timer:
    """Time marks: CUDA events on a CUDA device (resolved later), perf_counter otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    @staticmethod
    def elapsed_ms(start, end) -> float:
        if isinstance(start, float):
            return (end - start) * 1e3
        end.synchronize()
        return float(start.elapsed_time(end))


def _to_py(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


class SparseStats:
    """Records of a patched model (see the module docstring for the keys).

    ``len(stats)``, iteration and indexing give the resolved record dicts.
    """

    def __init__(self):
        self._records: list[dict] = []
        self._resolved = 0  # records before this index hold only plain Python values

    # --------------------------------------------------------------------------------- writing
    def _append(self, record: dict, marks=None) -> None:
        if marks is not None:
            record["_marks"] = marks
        self._records.append(record)

    def clear(self) -> None:
        """Drop all records (e.g. between generations)."""
        self._records.clear()
        self._resolved = 0

    # --------------------------------------------------------------------------------- reading
    def _resolve(self) -> None:
        for rec in self._records[self._resolved:]:
            marks = rec.pop("_marks", None)
            if marks is not None:
                m0, m1, m2 = marks
                rec["mask_ms"] = Timer.elapsed_ms(m0, m1)
                rec["attn_ms"] = Timer.elapsed_ms(m1, m2)
            for key in ("sparsity", "video_sparsity", "head_sparsity"):
                rec[key] = _to_py(rec.get(key))
        self._resolved = len(self._records)

    @property
    def records(self) -> list[dict]:
        """All records as plain dicts (synchronises with the GPU on first read)."""
        self._resolve()
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def summary(self) -> dict:
        """Aggregates: per (model, layer) mean sparsity and mean times over the sparse calls, and
        overall means. Dense warm-up calls are counted but not averaged in."""
        per = defaultdict(list)
        dense_calls = 0
        for rec in self.records:
            if rec["dense"]:
                dense_calls += 1
                continue
            per[(rec["model"], rec["layer"])].append(rec)

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return sum(xs) / len(xs) if xs else None

        layers = []
        for (model, layer), recs in sorted(per.items()):
            layers.append({
                "model": model,
                "layer": layer,
                "calls": len(recs),
                "sparsity": mean([r["sparsity"] for r in recs]),
                "video_sparsity": mean([r["video_sparsity"] for r in recs]),
                "mask_ms": mean([r.get("mask_ms") for r in recs]),
                "attn_ms": mean([r.get("attn_ms") for r in recs]),
            })
        sparse = [r for recs in per.values() for r in recs]
        return {
            "sparse_calls": len(sparse),
            "dense_calls": dense_calls,
            "sparsity": mean([r["sparsity"] for r in sparse]),
            "video_sparsity": mean([r["video_sparsity"] for r in sparse]),
            "mask_ms_total": sum(r.get("mask_ms") or 0.0 for r in sparse),
            "attn_ms_total": sum(r.get("attn_ms") or 0.0 for r in sparse),
            "layers": layers,
        }

    def to_json(self, path: str | os.PathLike, *, config=None, indent: int | None = 1) -> None:
        """Write ``{"config": ..., "summary": ..., "records": [...]}`` to ``path``.

        Args:
            path: output file.
            config: optional :class:`SparseConfig` stored alongside (as ``config.to_dict()``).
        """
        payload = {
            "config": config.to_dict() if config is not None else None,
            "summary": self.summary(),
            "records": self.records,
        }
        with open(path, "w") as f:
            json.dump(payload, f, indent=indent, default=_json_default)

    write_json = to_json

    def __repr__(self) -> str:
        return f"SparseStats({len(self._records)} records)"


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
