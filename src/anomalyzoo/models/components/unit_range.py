"""Loader images back to [0, 1] for the models that work on pixels rather than on a pretrained
backbone's features (EfficientAD, the autoencoder, GANomaly, DRAEM): with ``normalize=True`` the
loader hands them ImageNet-normalised images, which this undoes."""

from __future__ import annotations

import torch
from torch import nn

from anomalyzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD


class UnitRange(nn.Module):
    """``x * std + mean`` when ``input_normalized``, else the images as they are. No state in
    checkpoints (the statistics are non-persistent buffers that follow the device)."""

    def __init__(self, input_normalized: bool) -> None:
        super().__init__()
        self.input_normalized = input_normalized
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.image_std + self.image_mean if self.input_normalized else images
