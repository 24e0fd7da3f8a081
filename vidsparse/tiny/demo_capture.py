"""What ``vidsparse demo`` measures while it samples: the dense self-attention time, the sampler's
wall time, and the block masks vidsparse predicted for one layer."""

from __future__ import annotations

import time

from ..utils import sync

__all__ = ["DenseAttentionTimer", "timed_sample", "MaskCapture"]


class DenseAttentionTimer:
    """Times the stock Wan processor's self-attention calls (``dispatch_attention_fn`` with as
    many keys as queries; cross-attention to the 7 condition tokens is not counted).

    While active, ``diffusers.models.transformers.transformer_wan.dispatch_attention_fn`` is
    wrapped; the original is restored on exit. CUDA calls are timed with events, read at the end.
    """

    def __init__(self, device):
        self.device = device
        self.marks = []

    def __enter__(self):
        import diffusers.models.transformers.transformer_wan as tw

        from vidsparse.integrations.sparse_stats import Timer

        self._module, self._orig = tw, tw.dispatch_attention_fn
        timer = Timer(self.device)
        orig, marks = self._orig, self.marks

        def timed(query, key, *args, **kwargs):
            if query.shape[1] != key.shape[1]:  # (B, N, H, D): cross-attention
                return orig(query, key, *args, **kwargs)
            start = timer.mark()
            out = orig(query, key, *args, **kwargs)
            marks.append((start, timer.mark()))
            return out

        tw.dispatch_attention_fn = timed
        return self

    def __exit__(self, *exc):
        self._module.dispatch_attention_fn = self._orig
        return False

    def total_ms(self) -> float:
        from vidsparse.integrations.sparse_stats import Timer

        return sum(Timer.elapsed_ms(a, b) for a, b in self.marks)


def timed_sample(model, cond, noise, *, desc: str, progress: bool, device, **sampler):
    """:func:`vidsparse.tiny.flow.sample` with a progress bar over the network calls.

    Args:
        model: the diffusers Wan transformer (patched or not).
        cond: (B, 7, text_dim) condition embeddings; noise: (B, 3, T, H, W) initial noise.
        desc, progress: the bar's label, and whether to show it.
        device: for the synchronisation around the timed region.
        sampler: ``steps``, ``guidance_scale``, ``guidance_interval``, ``eta``, ``shift``, ``device``.

    Returns:
        ((B, 3, T, H, W) video clamped to [-1, 1], wall seconds of the sampling).
    """
    from tqdm.auto import tqdm

    from vidsparse.tiny import flow

    bar = tqdm(total=sampler["steps"], desc=desc, unit="step", disable=not progress, dynamic_ncols=True, leave=True)

    def tick(*_):
        bar.update(1)  # returns None: the hook must not replace the output

    hook = model.register_forward_hook(tick)
    try:
        sync(device)
        t0 = time.perf_counter()
        video = flow.sample(model, cond, noise=noise, progress=False, **sampler)
        sync(device)
        seconds = time.perf_counter() - t0
    finally:
        hook.remove()
        bar.close()
    return video.clamp(-1, 1), seconds


class MaskCapture:
    """``set_mask_callback`` target: keeps, for one layer, the mask of sample 0 at every step.

    The masks stay on their device until :meth:`masks` is read (no GPU sync while sampling).
    """

    def __init__(self, layer: int):
        self.layer = layer
        self._by_step: dict[int, tuple] = {}  # step -> (dense (1, H, NQB, NKB) bool, geometry)

    def __call__(self, info, mask) -> None:
        if info.get("layer") != self.layer or info.get("call", 0) != 0:
            return
        video = info.get("video_mask")
        video = mask if video is None else video
        video = getattr(video, "mask", video)  # a MaskPlan: its BlockMask (the demo's masks are in raster order)
        step = info.get("step")
        step = len(self._by_step) if step is None else int(step)
        # sample 0: with classifier-free guidance the batch is [conditional; unconditional]
        self._by_step[step] = (video.dense[:1].clone(), (video.block_q, video.block_k, video.q_len, video.k_len))

    def masks(self) -> dict:
        """step -> BlockMask of sample 0 (all heads), on the CPU."""
        from vidsparse.mask import BlockMask

        out = {}
        for step, (dense, (bq, bk, lq, lk)) in sorted(self._by_step.items()):
            out[step] = BlockMask.from_dense(dense.cpu(), block_q=bq, block_k=bk, q_len=lq, k_len=lk)
        return out
