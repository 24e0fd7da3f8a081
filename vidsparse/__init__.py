"""vidsparse: trainable block-sparse attention for video diffusion transformers.

Data flows masker -> BlockMask -> kernel -> output:

    >>> import vidsparse
    >>> mask = vidsparse.hybrid_block_mask(q, k, topk=0.03, topp=0.2)   # (B, H, Lq/128, Lk/64)
    >>> o = vidsparse.block_sparse_attention(q, k, v, mask)              # same as q
    >>> o = vidsparse.sparse_attention(q, k, v, topk=0.03, topp=0.2)     # both in one call

Integrations (diffusers) are imported lazily, so ``import vidsparse`` only needs torch.
"""

from .api import block_sparse_attention, sparse_attention
from .dispatch import NoBackendError
from .mask import BlockMask
from .maskers import hybrid_block_mask

__version__ = "0.1.0"

_LAZY = {
    "patch": "vidsparse.integrations.diffusers",
    "unpatch": "vidsparse.integrations.diffusers",
    "stats": "vidsparse.integrations.diffusers",
    "SparseConfig": "vidsparse.integrations.config",
}

__all__ = [
    "BlockMask",
    "hybrid_block_mask",
    "block_sparse_attention",
    "sparse_attention",
    "NoBackendError",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vidsparse' has no attribute {name!r}")
