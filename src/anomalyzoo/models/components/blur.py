"""Separable Gaussian smoothing of anomaly maps (PaDiM sec. 3, PatchCore sec. 3.3 use sigma=4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    if kernel_size is None:  # covers +-4 sigma, odd
        kernel_size = 2 * math.ceil(4.0 * sigma) + 1
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


class GaussianBlur2d(nn.Module):
    """Blurs (B, C, H, W) maps channel-wise with reflect padding, so borders are not darkened."""

    def __init__(self, sigma: float = 4.0, kernel_size: int | None = None) -> None:
        super().__init__()
        self.register_buffer("kernel", gaussian_kernel1d(sigma, kernel_size), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        channels = maps.shape[1]
        size = self.kernel.numel()
        pad = size // 2
        horizontal = self.kernel.view(1, 1, 1, size).repeat(channels, 1, 1, 1)
        vertical = self.kernel.view(1, 1, size, 1).repeat(channels, 1, 1, 1)
        mode = "reflect" if min(maps.shape[-2:]) > pad else "replicate"
        maps = F.pad(maps, (pad, pad, pad, pad), mode=mode)
        maps = F.conv2d(maps, horizontal, groups=channels)
        return F.conv2d(maps, vertical, groups=channels)
