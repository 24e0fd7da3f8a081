"""The procedural "moving shapes" clips as a :class:`vidsparse.training.distill.DataSource`.

``vidsparse distill`` without ``--model`` distils the embedded tiny model on this source.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import ShapesConfig, make_batch
from .model import default_weights_dir

__all__ = ["ShapesSource"]


class ShapesSource:
    """Clips ``[index, index + count)`` of a split of the shapes data, with their condition embeddings.

    The stream is a pure function of ``(seed, split, index)``, so a resumed or multi-process run
    sees the same clips as a straight one. ``frames`` x ``size`` x ``size`` pixels; the condition
    width follows the model (:meth:`bind`).
    """

    def __init__(self, *, split: str = "train", frames: int = 16, size: int = 64, seed: int = 0):
        if split not in ("train", "shifted"):
            raise ValueError(f"data must be 'train' or 'shifted', got {split!r}")
        self.split, self.seed = split, seed
        self.config = ShapesConfig(frames=frames, size=size)

    def bind(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """Match the condition width to ``model``; returns the clip's token grid (checks frames / size)."""
        from .model import token_grid

        self.config = ShapesConfig(frames=self.config.frames, size=self.config.size, text_dim=model.config.text_dim)
        return token_grid(model.config, self.config.frames, self.config.size, self.config.size)

    def batch(self, index: int, count: int, device: torch.device) -> tuple[torch.Tensor, dict]:
        x0, emb, _ = make_batch(count, seed=self.seed, split=self.split, start=index, config=self.config, device=device)
        return x0, {"encoder_hidden_states": emb}

    @staticmethod
    def default_model_dir() -> Path:
        return default_weights_dir()
