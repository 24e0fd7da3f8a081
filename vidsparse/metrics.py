"""Frame-quality metrics between two videos (sparse against dense samples, samples against data).

torchmetrics is imported only inside the functions, so ``import vidsparse`` stays light.
"""

from __future__ import annotations

import torch

__all__ = ["video_psnr_ssim"]


def video_psnr_ssim(pred: torch.Tensor, ref: torch.Tensor, *, data_range: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-video PSNR (dB) and SSIM of ``pred`` against ``ref``, averaged over frames.

    Args:
        pred, ref: (B, C, T, H, W) videos of the same shape, pixel values spanning
            ``data_range`` (2.0 for the tiny model's [-1, 1] pixels; clamp samples first).
        data_range: max - min of the pixel range.

    Returns:
        (psnr, ssim), each a float32 (B,) tensor on the CPU. PSNR is computed from the MSE over the
        whole video (identical videos give +inf); SSIM (Gaussian window 11, sigma 1.5) is the mean
        over the frames of each video.

    Raises:
        ValueError: shapes differ or are not 5-D, or ``data_range`` is not positive.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn

    if pred.dim() != 5 or pred.shape != ref.shape:
        raise ValueError(
            f"pred and ref must be (B, C, T, H, W) videos of one shape, got {tuple(pred.shape)} and {tuple(ref.shape)}"
        )
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    pred = pred.detach().float().cpu()
    ref = ref.detach().float().cpu()
    b, c, t, h, w = pred.shape
    mse = (pred - ref).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(data_range**2 / mse)  # mse == 0 -> +inf
    frames = lambda v: v.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # noqa: E731
    ssim = ssim_fn(frames(pred), frames(ref), data_range=data_range, reduction="none").reshape(b, t).mean(1)
    return psnr, ssim.float()
