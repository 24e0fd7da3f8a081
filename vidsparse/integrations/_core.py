"""Architecture-independent part of the processors: per-call state, masks with text, the call.

No diffusers import here. A processor (``_wan.py``, ``_cogvideox.py``, ``_hunyuan_video.py``)
computes q, k, v exactly as the stock processor does, hands them to :meth:`SparseLayer.attend`
in the model's token order and (B, S, H, D) layout, and finishes exactly as stock.

Text tokens (CogVideoX, HunyuanVideo)
    The attention runs on ``[video; text]`` (CogVideoX's ``[text; video]`` is reordered; see
    :mod:`vidsparse.integrations.tiling`). The hybrid mask is predicted from the video part only
    (q[:n_video], k[:n_video]), then placed in a mask over the whole sequence in which every
    query block and key block that contains a text token is kept whole. Hence text queries attend
    to everything, every query attends to all text keys, and only video->video blocks are
    sparsified. Because text comes last, no padding is needed when n_video is not a multiple of
    the block sizes: the one block that holds both the last video tokens and the first text
    tokens is simply kept (its video tokens attend densely / are seen by every query).

Key padding (HunyuanVideo)
    HunyuanVideo masks padded text keys with a boolean ``[B, 1, 1, N]`` mask that is True on a
    prefix of ``[video; text]``. Since text is last in attention order, the valid keys are a
    prefix too, so the call simply drops the padded keys (k_len < q_len): exact, with no token
    mask needed. Batch elements with different text lengths run as separate calls.
"""

from __future__ import annotations

import math

import torch

from ..api import block_sparse_attention, predict_mask
from ..mask import BlockMask
from .config import SparseConfig
from .sparse_stats import SparseStats, Timer
from .tiling import choose_tile_shape, invert, sequence_order

__all__ = ["RunState", "SparseLayer"]


def _timestep_value(timestep) -> float | None:
    """One number per forward: the largest timestep in the batch (Wan 2.2 TI2V passes a
    (B, seq) map whose conditioning frame is 0; the max is the step's timestep)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().max())
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


class RunState:
    """State shared by the processors of one ``patch`` call (one or two transformers).

    Set by the transformer's forward pre-hook before every forward:

    * ``grid``: the latent token grid (T, H, W) of this forward, from ``hidden_states``' shape and
      the model's patch size (needed by ``token_order="tiled"``);
    * step tracking (only when ``dense_steps > 0`` or ``collect_stats``, because reading the
      timestep synchronises with the GPU once per forward): the timestep is compared with the
      previous forward's. Equal: the same denoising step (the second CFG call, or Wan 2.2's
      other expert never sees an equal one); lower: the next step; higher (or the first forward
      ever): a new generation, step 0. So steps count *distinct timestep values per generation*,
      whatever the number of transformer calls per step. :meth:`reset_steps` forces a new
      generation at the next forward.
    """

    def __init__(self, config: SparseConfig):
        self.config = config
        self.stats = SparseStats()
        self.tracks_steps = config.dense_steps > 0 or config.collect_stats
        self.mask_callback = None
        self.generation = -1  # incremented when a generation starts
        self.reset_steps()
        self.grid: tuple[int, int, int] | None = None
        self.forwards = 0
        self._orders: dict = {}
        self._key_lens = (None, None)

    def reset_steps(self) -> None:
        """Forget the step count: the next forward starts a new generation at step 0."""
        self.step: int | None = None
        self.timestep: float | None = None
        self.call = 0

    def begin_forward(self, timestep, grid: tuple[int, int, int] | None) -> None:
        self.forwards += 1
        self.grid = grid
        self._key_lens = (None, None)
        if not self.tracks_steps:
            return
        t = _timestep_value(timestep)
        if t is None:
            self.step, self.timestep, self.call = None, None, 0
            return
        if self.step is None or self.timestep is None or t > self.timestep:
            self.generation += 1
            self.step, self.call = 0, 0
        elif t == self.timestep:
            self.call += 1
        else:
            self.step += 1
            self.call = 0
        self.timestep = t

    # ------------------------------------------------------------------------- token orders
    def order(self, n_video: int, n_text: int, text_first: bool, device) -> tuple | None:
        """(perm, inverse) on ``device`` for the attention order, or None for the identity."""
        tiled = self.config.token_order == "tiled"
        grid = tile = None
        if tiled:
            grid = self.grid
            if grid is None:
                raise RuntimeError(
                    "vidsparse: token_order='tiled' needs the latent grid, which the transformer's forward "
                    "pre-hook records; call the transformer module itself (model(...)), not model.forward(...)"
                )
            if math.prod(grid) != n_video:
                raise RuntimeError(
                    f"vidsparse: the latent grid {grid} recorded for this forward has {math.prod(grid)} tokens "
                    f"but the attention got {n_video} video tokens"
                )
            tile = self.config.tile_shape or choose_tile_shape(grid, self.config.block_q)
        key = (n_video, n_text, text_first, grid, tile, str(device))
        if key not in self._orders:
            perm = sequence_order(n_video, n_text, text_first=text_first, grid=grid, tile=tile)
            self._orders[key] = None if perm is None else (perm.to(device), invert(perm).to(device))
        return self._orders[key]

    # ------------------------------------------------------------------------ key padding
    def key_lengths(self, attention_mask, batch: int, seq_len: int, n_video: int) -> list[int] | None:
        """Valid keys per batch element for a prefix key-padding mask, else None (not supported).

        ``attention_mask`` must be boolean with B * seq_len elements (e.g. [B, 1, 1, N]), True on
        a prefix of at least the video tokens. The result is cached for this forward (every
        block receives the same mask tensor).
        """
        if attention_mask is None:
            return [seq_len] * batch
        cached_mask, cached = self._key_lens
        if cached_mask is attention_mask:
            return cached
        lens = None
        m = attention_mask
        if m.dtype == torch.bool and m.numel() == batch * seq_len:
            m = m.reshape(batch, seq_len)
            counts = m.sum(dim=1)
            prefix = torch.arange(seq_len, device=m.device)[None, :] < counts[:, None]
            if torch.equal(m, prefix):
                lens = [int(c) for c in counts.tolist()]
                if min(lens) < n_video:
                    lens = None
        self._key_lens = (attention_mask, lens)
        return lens


class SparseLayer:
    """One patched self-attention layer: its Top-k/Top-p values and the sparse call.

    Args:
        state: the shared :class:`RunState`.
        model_name: "transformer" or "transformer_2" (for records).
        layer: layer index.
        topk, topp: this layer's values (float, None or an (H,) tensor), already validated.
    """

    def __init__(self, state: RunState, model_name: str, layer: int, topk, topp):
        self.state = state
        self.model_name = model_name
        self.layer = layer
        self._fractions = {"cpu": (topk, topp)}

    def _fractions_on(self, device):
        key = str(device)
        if key not in self._fractions:
            topk, topp = self._fractions["cpu"]
            mv = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
            self._fractions[key] = (mv(topk), mv(topp))
        return self._fractions[key]

    def dense_now(self) -> bool:
        """True during dense warm-up steps; records the dense call when collecting stats."""
        st, cfg = self.state, self.state.config
        if cfg.dense_steps == 0:
            return False
        if st.step is None:
            raise RuntimeError(
                "vidsparse: SparseConfig.dense_steps needs step tracking, which reads the timestep in the "
                "transformer's forward pre-hook; call the transformer module itself (model(...)) with a "
                "timestep, not model.forward(...) or a block directly"
            )
        if st.step >= cfg.dense_steps:
            return False
        if cfg.collect_stats:
            st.stats._append(self._base_record(dense=True) | {"sparsity": 0.0, "video_sparsity": 0.0})
        return True

    def _base_record(self, *, dense: bool) -> dict:
        st = self.state
        return {
            "model": self.model_name, "layer": self.layer, "step": st.step, "call": st.call,
            "generation": st.generation, "timestep": st.timestep, "dense": dense,
        }

    def _compose(self, video_mask: BlockMask, n_video: int, q_len: int, k_len: int) -> BlockMask:
        """Mask over [video; text] from the video mask: blocks touching text are kept whole."""
        bq, bk = video_mask.block_q, video_mask.block_k
        b, h = video_mask.shape[:2]
        nq, nk = -(-q_len // bq), -(-k_len // bk)
        rq, rk = n_video // bq, n_video // bk  # query / key blocks made of video tokens only
        dense = torch.ones(b, h, nq, nk, dtype=torch.bool, device=video_mask.device)
        dense[:, :, :rq, :rk] = video_mask.dense[:, :, :rq, :rk]
        return BlockMask.from_dense(dense, block_q=bq, block_k=bk, q_len=q_len, k_len=k_len)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        n_text: int = 0,
        text_first: bool = False,
        key_len: int | None = None,
    ) -> torch.Tensor:
        """Block-sparse self-attention in the model's token order.

        Args:
            q, k, v: (B, S, H, D) after projections, norms and RoPE, S = n_video + n_text, in the
                model's order (text first if ``text_first``, else text last).
            n_text: text tokens in the sequence (kept dense as queries and keys).
            text_first: the model's order is [text; video].
            key_len: attend only the first ``key_len`` keys of the attention order
                [video; text] (drops padded text keys); default all S.
        Returns:
            o: (B, S, H, D) in q's dtype, in the model's token order.
        """
        st, cfg = self.state, self.state.config
        b, s, h, _ = q.shape
        n_video = s - n_text
        order = st.order(n_video, n_text, text_first, q.device)
        if order is not None:
            perm = order[0]
            q, k, v = q.index_select(1, perm), k.index_select(1, perm), v.index_select(1, perm)
        if key_len is not None and key_len < s:
            k, v = k[:, :key_len], v[:, :key_len]
        k_len = k.shape[1]
        topk, topp = self._fractions_on(q.device)

        timer = Timer(q.device) if cfg.collect_stats else None
        m0 = timer.mark() if timer else None
        video_mask = predict_mask(
            q[:, :n_video], k[:, :n_video], topk=topk, topp=topp, block_q=cfg.block_q, block_k=cfg.block_k,
            keep_diagonal=cfg.keep_diagonal, keep_sink=cfg.keep_sink, layout="bnhd",
        )
        mask = video_mask if (n_video == s and k_len == s) else self._compose(video_mask, n_video, s, k_len)
        m1 = timer.mark() if timer else None
        o = block_sparse_attention(q, k, v, mask, layout="bnhd", backend=cfg.backend)
        if timer:
            m2 = timer.mark()
            rec = self._base_record(dense=False) | {
                "batch": b, "heads": h, "q_len": s, "k_len": k_len, "n_video": n_video, "n_text": n_text,
                "block_q": cfg.block_q, "block_k": cfg.block_k,
                "sparsity": 1.0 - mask.dense.float().mean(),
                "video_sparsity": 1.0 - video_mask.dense.float().mean(),
                "head_sparsity": 1.0 - mask.dense.float().mean(dim=(0, 2, 3)),
            }
            st.stats._append(rec, marks=(m0, m1, m2))
        if st.mask_callback is not None:
            info = self._base_record(dense=False) | {
                "n_video": n_video, "n_text": n_text, "text_first": text_first, "q_len": s, "k_len": k_len,
                "perm": None if order is None else order[0], "video_mask": video_mask,
            }
            st.mask_callback(info, mask)
        if order is not None:
            o = o.index_select(1, order[1])
        return o
