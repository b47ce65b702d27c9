"""EfficientAD's ImageNet penalty images (arXiv 2303.14535, Algorithm 1; reference
``penalty_transform``): an auxiliary data source, ``<DATASET_DIR>/imagenette2/train``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from anomalyzoo.data.transforms import grayscale, image_to_tensor, load_rgb_image


class PenaltyImages(Dataset):
    """ImageNet penalty images (Algorithm 1): resized to 2x the input size, grayscale with
    p = 0.3, centre-cropped back to the input size (reference ``penalty_transform``); [0, 1] tensors."""

    def __init__(self, files: list[Path], img_size: int) -> None:
        self.files, self.img_size = files, img_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = image_to_tensor(load_rgb_image(self.files[index]), 2 * self.img_size, normalize=False)
        if torch.rand(()) < 0.3:
            image = grayscale(image[None])[0].expand(3, -1, -1).contiguous()
        offset = self.img_size // 2  # centre of a 2s x 2s image
        return image[:, offset:offset + self.img_size, offset:offset + self.img_size]
