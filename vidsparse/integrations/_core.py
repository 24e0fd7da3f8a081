"""Architecture-independent part of the processors: per-call state, masks with text, the call.

No diffusers import here. A processor (``_wan.py``, ``_cogvideox.py``, ``_hunyuan_video.py``)
computes q, k, v exactly as the stock processor does, hands them to :meth:`SparseLayer.attend`
in the model's token order and (B, S, H, D) layout, and finishes exactly as stock.

Data flow
    The layer's masker (``SparseConfig.method``) predicts a :class:`~vidsparse.MaskPlan` from the
    video tokens; :func:`vidsparse.plan.append_dense_tokens` extends it over the text tokens;
    :func:`vidsparse.block_sparse_attention` runs it and returns the output in the model's order.

Text tokens (CogVideoX, HunyuanVideo)
    The attention order is ``[video (in the plan's order); text]`` whatever the model's order
    (CogVideoX puts text first). Every query block and key block that contains a text token is
    kept whole: text queries attend to everything, every query attends to all text keys, and
    only video->video blocks are sparsified. Because text comes last, no padding is needed when
    n_video is not a multiple of the block sizes: the one block that holds both the last video
    tokens and the first text tokens is simply kept.

Key padding (HunyuanVideo)
    HunyuanVideo masks padded text keys with a boolean ``[B, 1, 1, N]`` mask that is True on a
    prefix of ``[video; text]``. Since text is last in attention order, the valid keys are a
    prefix too, so the call simply drops the padded keys (k_len < q_len): exact, with no token
    mask needed. Batch elements with different text lengths run as separate calls.
"""

from __future__ import annotations

import torch

from ..api import block_sparse_attention
from ..config import SparseConfig
from ..plan import append_dense_tokens
from .sparse_stats import SparseStats, Timer

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
      the model's patch size (handed to the masker);
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
        self._key_lens = (None, None)
        self.routes: dict = {}  # context parallelism: exchange tables of grid-only token orders (all layers)

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
    """One patched self-attention layer: its masker, options and state, and the sparse call.

    Args:
        state: the shared :class:`RunState`.
        model_name: "transformer" or "transformer_2" (for records).
        layer: layer index.
        options: this layer's masker options, resolved and validated (``SparseConfig.resolved_options``).
    """

    def __init__(self, state: RunState, model_name: str, layer: int, options: dict):
        self.state = state
        self.model_name = model_name
        self.layer = layer
        self.masker = state.config.masker
        self.masker_state = self.masker.new_state()  # per layer, owned here (e.g. cached centroids)
        if isinstance(self.masker_state, dict):
            self.masker_state["layer"] = layer
        self._options = {"cpu": options}

    def options_on(self, device, heads: tuple[int, int] | None = None) -> dict:
        """The options with per-head tensors moved to ``device`` (once per device).

        ``heads``: (first, last + 1) of the heads this call attends (a Ulysses rank's share under
        context parallelism); per-head (H,) tensors are sliced to them.
        """
        key = str(device) if heads is None else (str(device), heads)
        if key not in self._options:
            cpu = self._options["cpu"]
            if not any(isinstance(v, torch.Tensor) for v in cpu.values()):
                # nothing to move, and no new cache entry: a compiled first call that added one
                # would fail its own guard on this dict at the next call (one recompilation)
                return cpu
            span = slice(None) if heads is None else slice(*heads)
            mv = lambda x: x[span].to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
            self._options[key] = {k: mv(v) for k, v in cpu.items()}
        return self._options[key]

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

    def record(self, fields: dict, marks) -> None:
        """Append a statistics record of a sparse call (``marks``: the Timer marks of its phases)."""
        self.state.stats._append(self._base_record(dense=False) | fields, marks=marks)

    def notify(self, info: dict, plan) -> None:
        """Hand a sparse call's plan to the mask callback, if one is set."""
        if self.state.mask_callback is not None:
            self.state.mask_callback(self._base_record(dense=False) | info, plan)

    def plan(self, q_video: torch.Tensor, k_video: torch.Tensor, heads: tuple[int, int] | None = None):
        """The masker's plan for the video tokens, (B, N, H, D) in the model's order (``heads``: as
        in :meth:`options_on`)."""
        cfg, grid = self.state.config, self.state.grid
        options = self.options_on(q_video.device, heads)
        if grid is None and self.masker.grid_needed(options):
            raise RuntimeError(
                f"vidsparse: the {cfg.method!r} masker with these options needs the latent grid, which the "
                "transformer's forward pre-hook records; call the transformer module itself (model(...)), "
                "not model.forward(...)"
            )
        if grid is not None and grid[0] * grid[1] * grid[2] != q_video.shape[1]:
            raise RuntimeError(f"vidsparse: the latent grid {grid} recorded for this forward has "
                               f"{grid[0] * grid[1] * grid[2]} tokens but the attention got {q_video.shape[1]} video tokens")
        # options were validated for this layer's heads at patch time (SparseConfig.resolved_options)
        return self.masker.plan(
            q_video.transpose(1, 2), k_video.transpose(1, 2), grid=grid, state=self.masker_state,
            block_q=cfg.block_q, block_k=cfg.block_k, options=options,
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        n_text: int = 0,
        text_first: bool = False,
        key_len: int | None = None,
        heads: tuple[int, int] | None = None,
        extra: dict | None = None,
    ) -> torch.Tensor:
        """Block-sparse self-attention in the model's token order.

        Args:
            q, k, v: (B, S, H, D) after projections, norms and RoPE, S = n_video + n_text, in the
                model's order (text first if ``text_first``, else text last).
            n_text: text tokens in the sequence (kept dense as queries and keys).
            text_first: the model's order is [text; video].
            key_len: attend only the first ``key_len`` keys (drops padded text keys, which come
                last in the model's order); default all S.
            heads: (first, last + 1) of the model's heads that q, k, v hold (a Ulysses rank's
                share under context parallelism, see ``context_parallel``); default all.
            extra: fields added to the statistics record and the callback's info.
        Returns:
            o: (B, S, H, D) in q's dtype, in the model's token order.
        """
        st, cfg = self.state, self.state.config
        b, s, h, _ = q.shape
        n_video = s - n_text
        video = slice(n_text, s) if text_first else slice(0, n_video)
        if key_len is not None and key_len < s:
            k, v = k[:, :key_len], v[:, :key_len]
        k_len = k.shape[1]

        timer = Timer(q.device) if cfg.collect_stats else None
        m0 = timer.mark() if timer else None
        video_plan = self.plan(q[:, video], k[:, video], heads)
        plan = append_dense_tokens(video_plan, n_text, extra_first=text_first, k_len=k_len)
        m1 = timer.mark() if timer else None
        o = block_sparse_attention(q, k, v, plan, layout="bnhd", backend=cfg.backend)
        extra = extra or {}
        if timer:
            m2 = timer.mark()
            self.record(extra | {
                "batch": b, "heads": h, "q_len": s, "k_len": k_len, "n_video": n_video, "n_text": n_text,
                "block_q": cfg.block_q, "block_k": cfg.block_k,
                "sparsity": 1.0 - plan.mask.dense.float().mean(),
                "video_sparsity": 1.0 - video_plan.mask.dense.float().mean(),
                "head_sparsity": 1.0 - plan.mask.dense.float().mean(dim=(0, 2, 3)),
            }, (m0, m1, m2))
        if st.mask_callback is not None:
            self.notify(extra | {
                "n_video": n_video, "n_text": n_text, "text_first": text_first, "q_len": s, "k_len": k_len,
                "video_plan": video_plan,
            }, plan)
        return o
