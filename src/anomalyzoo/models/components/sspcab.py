"""SSPCAB: "Self-Supervised Predictive Convolutional Attentive Block for Anomaly Detection"
(Ristea, Madan, Ionescu, Nasrollahi, Khan, Moeslund & Shah, CVPR 2022, arXiv 2111.09099).

A drop-in layer (output shape = input shape) that learns to predict each position from its
context only, plus a loss that asks it to reproduce its own input:

- Masked convolution (sec. 3): the receptive field is four ``k' x k'`` sub-kernels
  ``K_1..K_4`` in the corners of a ``(2k' + 2d + 1)``-wide window whose centre ``M`` is masked;
  ``d`` (dilation) is the gap between ``M`` and the sub-kernels. Implemented as in the authors'
  ``sspcab_torch.py``: zero-pad by ``k' + d`` and apply one ``k' x k'`` convolution to each of
  the four corner-shifted crops, then sum. The sum passes a ReLU (authors' code; anomalib's
  ``SSPCAB`` leaves it out, we follow the authors). Defaults ``k' = 1``, ``d = 1``: the best of
  the paper's ablation (Table 1) and the authors' defaults.
- Channel attention (sec. 3): a squeeze-and-excitation block: global average pooling, a
  reduction to ``C / r`` channels with ReLU, back to ``C`` with a sigmoid, and channel-wise
  rescaling; ``r = 8`` (authors' default).
- Loss (sec. 3): ``L_SSPCAB = (G(X) - X)^2``, the mean squared error between the block's output
  ``G(X)`` and its input ``X``, added to the host model's loss with a weight ``lambda``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_DIM = 1  # k', Table 1 ablation and sspcab_torch.py default
DILATION = 1  # d, Table 1 ablation and sspcab_torch.py default
REDUCTION_RATIO = 8  # r of the SE block, sspcab_torch.py default


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) channel attention with reduction ratio ``r``."""

    def __init__(self, channels: int, reduction_ratio: int = REDUCTION_RATIO) -> None:
        super().__init__()
        reduced = channels // reduction_ratio
        if reduced < 1:
            raise ValueError(f"channels ({channels}) must be at least the reduction ratio ({reduction_ratio})")
        self.fc1 = nn.Linear(channels, reduced)
        self.fc2 = nn.Linear(reduced, channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        squeezed = features.mean(dim=(2, 3))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(squeezed))))
        return features * scale[:, :, None, None]


class SSPCAB(nn.Module):
    """Masked convolution (centre hidden) + channel attention; (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, kernel_dim: int = KERNEL_DIM, dilation: int = DILATION,
                 reduction_ratio: int = REDUCTION_RATIO) -> None:
        super().__init__()
        self.pad = kernel_dim + dilation
        # a corner crop leaves out this many rows/columns of the padded input on the far side
        self.border = kernel_dim + 2 * dilation + 1
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=kernel_dim)  # K_1, top left
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=kernel_dim)  # K_2, bottom left
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=kernel_dim)  # K_3, top right
        self.conv4 = nn.Conv2d(channels, channels, kernel_size=kernel_dim)  # K_4, bottom right
        self.attention = ChannelAttention(channels, reduction_ratio)

    def masked_convolution(self, features: torch.Tensor) -> torch.Tensor:
        """ReLU of the four corner sub-kernels' sum: position p never sees itself."""
        padded = F.pad(features, (self.pad,) * 4)
        b = self.border
        response = (self.conv1(padded[..., :-b, :-b]) + self.conv2(padded[..., b:, :-b])
                    + self.conv3(padded[..., :-b, b:]) + self.conv4(padded[..., b:, b:]))
        return F.relu(response)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.attention(self.masked_convolution(features))


def sspcab_loss(block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
    """Sec. 3: mean squared error between the block's output and its input (neither detached, as
    in the authors' usage note and anomalib)."""
    return F.mse_loss(block_output, block_input)
