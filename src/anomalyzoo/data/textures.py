"""Anomaly-source images for DRAEM's synthetic anomalies (arXiv 2108.07610 sec. 3.3): the
Describable Textures Dataset (DTD) under ``<DATASET_DIR>/dtd/images/<texture>/`` (the source of
the paper's experiments and of the authors' README), or, when that folder is missing, crops of
the training images themselves (:func:`training_image_crops`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from anomalyzoo.data.transforms import image_to_tensor, load_rgb_image

DTD_IMAGES = Path("dtd") / "images"  # SPEC sec. 3: auxiliary data <DATASET_DIR>/dtd/images/<texture>/
# fallback crops cover this share of the source image's area: upscaled 2x to 4x to the full
# size, so the pasted content is the product seen at a foreign scale (then recoloured)
CROP_AREA_RANGE = (1 / 16, 1 / 4)


def dtd_folder(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir).expanduser() / DTD_IMAGES


class TextureImages(Dataset):
    """Texture files as [0, 1] tensors (3, img_size, img_size), resized without cropping (the
    authors' ``cv2.resize`` to the training size; ours antialiases, see ``image_to_tensor``)."""

    def __init__(self, files: list[Path], img_size: int) -> None:
        self.files, self.img_size = files, img_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return image_to_tensor(load_rgb_image(self.files[index]), self.img_size, normalize=False)


def training_image_crops(images: torch.Tensor, generator: torch.Generator | None = None,
                         area_range: tuple[float, float] = CROP_AREA_RANGE) -> torch.Tensor:
    """The fallback anomaly source: for image i of the batch, a random square crop of image
    i + 1 (cyclically; itself when the batch holds one) covering a share of its area drawn from
    ``area_range``, resized bilinearly to the full size. (B, 3, H, W) -> (B, 3, H, W)."""
    batch, _, height, width = images.shape
    crops = []
    for index in range(batch):
        source = images[(index + 1) % batch]
        area = area_range[0] + (area_range[1] - area_range[0]) * float(torch.rand((), generator=generator))
        side_y = max(1, round(math.sqrt(area) * height))
        side_x = max(1, round(math.sqrt(area) * width))
        top = int(torch.randint(0, height - side_y + 1, (), generator=generator))
        left = int(torch.randint(0, width - side_x + 1, (), generator=generator))
        crop = source[None, :, top:top + side_y, left:left + side_x]
        crops.append(F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0])
    return torch.stack(crops)
