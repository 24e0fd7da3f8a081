"""Maskers: pure functions (q, k) -> BlockMask, without gradient."""

from .hybrid import block_mean, hybrid_block_mask, pooled_block_scores, select_hybrid

__all__ = ["hybrid_block_mask", "block_mean", "pooled_block_scores", "select_hybrid"]
