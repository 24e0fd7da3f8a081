"""Sparse processor for diffusers' ``HunyuanVideoTransformer3DModel``.

Installed on the joint attention of every dual-stream block (``transformer_blocks[i].attn``, layer
i) and single-stream block (``single_transformer_blocks[j].attn``, layer num_layers + j); the
text-only token-refiner attention is left alone. HunyuanVideo attends over ``[video; text]``
(video first) with a boolean key-padding mask over the text. The projections (video through
``to_q/k/v``, text through ``add_q/k/v_proj`` in dual-stream blocks), RMSNorms and RoPE on the
video part are the stock ``HunyuanVideoAttnProcessor2_0``'s computation; the attention call is
replaced by block-sparse attention with text always kept, and the padded text keys are dropped
instead of masked (exact; see ``vidsparse.integrations._core``). Calls without text, with a mask
that is not a prefix key-padding mask, or during dense warm-up go to ``super().__call__``.

Context parallelism: diffusers 0.42 defines no ``_cp_plan`` for this model, so a processor that
diffusers hands a ``_parallel_config`` (the caller's own ``cp_plan``) is refused with a clear error.
"""

from __future__ import annotations

import warnings

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from ._core import SparseLayer
from ._processor import adopt_backend_settings, reject_context_parallel

__all__ = ["HunyuanVideoSparseAttnProcessor"]


class HunyuanVideoSparseAttnProcessor(HunyuanVideoAttnProcessor2_0):
    """``HunyuanVideoAttnProcessor2_0`` with block-sparse video->video attention.

    Args:
        layer: the layer's :class:`~vidsparse.integrations._core.SparseLayer`.
        original: the stock processor it replaces (its backend settings are copied).
    """

    def __init__(self, layer: SparseLayer, original: HunyuanVideoAttnProcessor2_0 | None = None):
        super().__init__()
        self.vidsparse_layer = layer
        adopt_backend_settings(self, original)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        reject_context_parallel(self, "HunyuanVideoTransformer3DModel")
        layer = self.vidsparse_layer
        if encoder_hidden_states is None or layer.dense_now():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        batch, n_video = hidden_states.shape[:2]
        n_text = encoder_hidden_states.shape[1]
        key_lens = layer.state.key_lengths(attention_mask, batch, n_video + n_text, n_video)
        if key_lens is None:
            warnings.warn(
                "vidsparse: HunyuanVideo attention_mask is not a boolean prefix key-padding mask; "
                "this call runs dense",
                stacklevel=2,
            )
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        single_stream = attn.add_q_proj is None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:  # RoPE on the video tokens only
            if single_stream:
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-n_text], image_rotary_emb, sequence_dim=1), query[:, -n_text:]], dim=1
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-n_text], image_rotary_emb, sequence_dim=1), key[:, -n_text:]], dim=1
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if not single_stream:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        out = self._attend_groups(layer, query, key, value, n_text, key_lens)
        out = out.flatten(2, 3).to(query.dtype)

        hidden_states, encoder_hidden_states = out[:, :-n_text], out[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    @staticmethod
    def _attend_groups(layer, query, key, value, n_text, key_lens):
        """One sparse call per distinct valid-key length (usually one for the whole batch)."""
        distinct = sorted(set(key_lens))
        if len(distinct) == 1:
            return layer.attend(query, key, value, n_text=n_text, key_len=distinct[0])
        out = torch.empty_like(query)
        lens = torch.tensor(key_lens)
        for kl in distinct:
            idx = torch.nonzero(lens == kl).flatten().to(query.device)
            o = layer.attend(
                query.index_select(0, idx), key.index_select(0, idx), value.index_select(0, idx),
                n_text=n_text, key_len=kl,
            )
            out.index_copy_(0, idx, o)
        return out
