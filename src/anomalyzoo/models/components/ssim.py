"""SSIM (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 2004) as the reconstruction models use it.

A transcription of the ``ssim`` function in DRAEM's ``loss.py`` (VitjanZ/DRAEM; itself the
widely copied pytorch-ssim code), shared by DRAEM and the autoencoder baseline:

- local statistics under a normalised Gaussian window of 11 x 11 pixels, sigma 1.5 (TIP 2004
  sec. III-C), applied to each channel separately with zero padding of ``window_size // 2``, so
  the map has the input's size (borders see the zeros, as in the authors' code);
- ``SSIM = (2 mu1 mu2 + C1)(2 sigma12 + C2) / ((mu1^2 + mu2^2 + C1)(sigma1^2 + sigma2^2 + C2))``
  with ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` (TIP 2004 eq. 13);
- the dynamic range ``L``, when not given, is inferred from ``img1`` exactly as the authors do:
  ``max_val = 255 if max(img1) > 128 else 1``, ``min_val = -1 if min(img1) < -0.5 else 0``.
  DRAEM passes its reconstruction as ``img1``, so ``L`` is 1 for [0, 1] images unless the
  (untrained) reconstruction dips below -0.5; pass ``val_range`` to fix it.

One difference from the authors' helper: it returns the tensor alone (theirs returns
``(value, map)``); :func:`ssim_map` gives the map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW_SIZE = 11  # TIP 2004 sec. III-C; DRAEM loss.py SSIM(window_size=11)
SSIM_SIGMA = 1.5  # TIP 2004 sec. III-C; DRAEM loss.py create_window(..., 1.5)
SSIM_K1 = 0.01  # TIP 2004 eq. 7: C1 = (K1 L)^2
SSIM_K2 = 0.03  # TIP 2004 eq. 9: C2 = (K2 L)^2


def gaussian_window(window_size: int = SSIM_WINDOW_SIZE, sigma: float = SSIM_SIGMA, channels: int = 1,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The separable Gaussian window, normalised to sum 1, as a depthwise kernel (C, 1, k, k)."""
    offsets = torch.arange(window_size, dtype=torch.float64) - window_size // 2
    profile = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    profile = profile / profile.sum()
    window = torch.outer(profile, profile).to(dtype=dtype, device=device)
    return window.expand(channels, 1, window_size, window_size).contiguous()


def inferred_dynamic_range(img1: torch.Tensor) -> float:
    """``L`` as the authors infer it from the first image (see the module docstring)."""
    values = img1.detach()
    max_val = 255.0 if float(values.max()) > 128 else 1.0
    min_val = -1.0 if float(values.min()) < -0.5 else 0.0
    return max_val - min_val


def ssim_map(img1: torch.Tensor, img2: torch.Tensor, window_size: int = SSIM_WINDOW_SIZE,
             val_range: float | None = None) -> torch.Tensor:
    """Local SSIM of two (B, C, H, W) batches: (B, C, H, W), 1 where they agree."""
    if img1.shape != img2.shape or img1.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(img1.shape)} and {tuple(img2.shape)}")
    dynamic_range = inferred_dynamic_range(img1) if val_range is None else float(val_range)
    channels = int(img1.shape[1])  # a constant, also when traced for export (the kernel's shape must be static)
    window = gaussian_window(window_size, SSIM_SIGMA, channels, img1.dtype, img1.device)
    padding = window_size // 2

    def local_mean(values: torch.Tensor) -> torch.Tensor:
        return F.conv2d(values, window, padding=padding, groups=channels)

    mu1, mu2 = local_mean(img1), local_mean(img2)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = local_mean(img1 * img1) - mu1_sq
    sigma2_sq = local_mean(img2 * img2) - mu2_sq
    sigma12 = local_mean(img1 * img2) - mu1_mu2
    c1 = (SSIM_K1 * dynamic_range) ** 2
    c2 = (SSIM_K2 * dynamic_range) ** 2
    return ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))


def ssim(img1: torch.Tensor, img2: torch.Tensor, window_size: int = SSIM_WINDOW_SIZE, size_average: bool = True,
         val_range: float | None = None) -> torch.Tensor:
    """Mean SSIM: a scalar over the whole batch (``size_average``), else one value per image (B,)."""
    values = ssim_map(img1, img2, window_size, val_range)
    return values.mean() if size_average else values.flatten(1).mean(dim=1)


def ssim_loss(img1: torch.Tensor, img2: torch.Tensor, window_size: int = SSIM_WINDOW_SIZE,
              val_range: float | None = None) -> torch.Tensor:
    """``1 - SSIM`` over the batch: the authors' ``SSIM`` loss module (DRAEM ``loss.py``)."""
    return 1.0 - ssim(img1, img2, window_size, size_average=True, val_range=val_range)
