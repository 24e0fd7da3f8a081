"""Sparse processors for diffusers' ``CogVideoXTransformer3DModel`` (each block's ``attn1``).

CogVideoX runs one self-attention over ``[text; video]`` (text first) and returns the two parts
separately. The projections (separate or fused ``to_qkv``), LayerNorm q/k norms and RoPE on the
video part are the stock processors' computation; only the ``scaled_dot_product_attention`` call
is replaced by block-sparse attention in which text tokens are always kept (see
``vidsparse.integrations._core``). Calls with an ``attention_mask`` or during dense warm-up go to
``super().__call__``.

Context parallelism: diffusers 0.42 defines no ``_cp_plan`` for this model (and its processors take
no ``_parallel_config``); the patched model's forward pre-hook refuses a model with one.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from ._core import SparseLayer

__all__ = ["CogVideoXSparseAttnProcessor", "FusedCogVideoXSparseAttnProcessor"]


class _CogVideoXSparseMixin:
    """The sparse path shared by the separate-QKV and fused-QKV processors."""

    vidsparse_layer: SparseLayer

    # ``original`` (the processor replaced) is unused; kept for a uniform constructor
    def __init__(self, layer: SparseLayer, original=None):
        super().__init__()
        self.vidsparse_layer = layer

    # the signature must match the stock one: Attention.forward filters kwargs by it
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None or encoder_hidden_states is None or self.vidsparse_layer.dense_now():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self._sparse_call(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

    def _qkv(self, attn, hidden_states):  # overridden for fused projections
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

    def _sparse_call(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]

        query, key, value = self._qkv(attn, hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, S, D)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # RoPE on the video tokens only, as stock
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        out = self.vidsparse_layer.attend(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            n_text=text_seq_length, text_first=True,
        )  # (B, S, H, D)
        out = out.reshape(batch_size, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        encoder_hidden_states, hidden_states = out.split([text_seq_length, out.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states


class CogVideoXSparseAttnProcessor(_CogVideoXSparseMixin, CogVideoXAttnProcessor2_0):
    """``CogVideoXAttnProcessor2_0`` with block-sparse video->video attention.

    Args:
        layer: the layer's :class:`~vidsparse.integrations._core.SparseLayer`.
        original: the processor it replaces (unused; kept for a uniform constructor).
    """


class FusedCogVideoXSparseAttnProcessor(_CogVideoXSparseMixin, FusedCogVideoXAttnProcessor2_0):
    """``FusedCogVideoXAttnProcessor2_0`` (after ``fuse_qkv_projections()``) with block-sparse
    video->video attention."""

    def _qkv(self, attn, hidden_states):
        qkv = attn.to_qkv(hidden_states)
        return torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
