"""vidsparse: trainable block-sparse attention for video diffusion transformers.

Data flows masker -> MaskPlan -> attention backend -> output:

    >>> import vidsparse
    >>> plan = vidsparse.maskers.get("hybrid")(q, k, topk=0.03, topp=0.2)   # MaskPlan (BlockMask + order)
    >>> o = vidsparse.block_sparse_attention(q, k, v, plan)                  # same shape and order as q
    >>> o = vidsparse.sparse_attention(q, k, v, method="hybrid", topk=0.03)  # both in one call
    >>> vidsparse.patch(pipe, vidsparse.SparseConfig(method="hybrid", topk=0.03, topp=0.2))

Integrations (diffusers) are imported lazily, so ``import vidsparse`` only needs torch.
"""

from . import maskers
from .api import block_sparse_attention, sparse_attention
from .config import SparseConfig
from .dispatch import NoBackendError
from .mask import BlockMask
from .maskers import hybrid_block_mask
from .plan import MaskPlan

__version__ = "0.2.0"

_LAZY = {
    "patch": "vidsparse.integrations.diffusers",
    "unpatch": "vidsparse.integrations.diffusers",
    "stats": "vidsparse.integrations.diffusers",
    "is_patched": "vidsparse.integrations.diffusers",
    "reset_steps": "vidsparse.integrations.diffusers",
    "set_mask_callback": "vidsparse.integrations.diffusers",
}

__all__ = [
    "BlockMask",
    "MaskPlan",
    "SparseConfig",
    "maskers",
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
