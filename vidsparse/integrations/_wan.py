"""Sparse self-attention processor for diffusers' ``WanTransformer3DModel`` (Wan 2.1 and 2.2).

Installed on each block's ``attn1`` only. Everything up to the attention call (fused or separate
QKV projections, RMSNorm across heads, interleaved RoPE) and after it (output projection and
dropout) is the stock ``WanAttnProcessor``'s computation; calls that are not plain video
self-attention (cross-attention, an attention mask, dense warm-up) go to ``super().__call__``.

Under diffusers' context parallelism (``transformer.enable_parallelism``) the processor receives
its rank's chunk of the video tokens and ``context_parallel.attend_parallel`` does the Ulysses or
ring exchange with the mesh diffusers hands it in ``_parallel_config``; dense warm-up calls go to
the stock processor under Ulysses alone and run vidsparse's ring with every block kept under ring.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

try:  # private in diffusers 0.42 (handles fused to_qkv); pinned via the "diffusers" extra
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections
except ImportError as exc:  # pragma: no cover - only on an unsupported diffusers version
    raise ImportError(
        "vidsparse's Wan processor needs diffusers 0.42.x (transformer_wan._get_qkv_projections)"
    ) from exc

from . import context_parallel
from ._core import SparseLayer
from ._processor import adopt_backend_settings

__all__ = ["WanSparseAttnProcessor"]


def _rope_interleaved(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on (B, S, H, D): channel pairs (2i, 2i+1) rotate by angle i.

    freqs_cos / freqs_sin: (1, S, 1, D) with each angle's cos/sin repeated on both channels of
    the pair (even entries are used for cos, odd for sin, as the model lays them out).
    """
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out.type_as(x)


class WanSparseAttnProcessor(WanAttnProcessor):
    """``WanAttnProcessor`` whose self-attention is SpargeAttention2 block-sparse attention.

    Args:
        layer: the layer's :class:`~vidsparse.integrations._core.SparseLayer`.
        original: the stock processor it replaces (its backend settings are copied, so dense
            fallbacks behave exactly as before).
    """

    def __init__(self, layer: SparseLayer, original: WanAttnProcessor | None = None):
        super().__init__()
        self.vidsparse_layer = layer
        adopt_backend_settings(self, original)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        layer = self.vidsparse_layer
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        topo = context_parallel.topology(self._parallel_config)
        dense = layer.dense_now()
        if dense and (topo is None or topo.ring.size == 1):  # stock: diffusers' own Ulysses under CP
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rope_interleaved(query, *rotary_emb)
            key = _rope_interleaved(key, *rotary_emb)

        if topo is None:
            hidden_states = layer.attend(query, key, value)
        else:
            hidden_states = context_parallel.attend_parallel(layer, query, key, value, topo, dense=dense)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states
