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
        batch, channels, height, width = maps.shape
        size = self.kernel.numel()
        pad = size // 2
        # every channel as its own single-channel image: the same grouped convolution, with a kernel
        # whose shape does not depend on the input (so the blur exports to ONNX and OpenVINO)
        maps = maps.reshape(batch * channels, 1, height, width)
        mode = "reflect" if min(height, width) > pad else "replicate"
        maps = F.pad(maps, (pad, pad, pad, pad), mode=mode)
        maps = F.conv2d(maps, self.kernel.view(1, 1, 1, size))
        maps = F.conv2d(maps, self.kernel.view(1, 1, size, 1))
        return maps.reshape(batch, channels, height, width)
