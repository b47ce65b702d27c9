"""What every dataset type produces: a list of :class:`Sample` (files and labels, no pixels),
and the one :class:`AnomalyDataset` that turns samples into batch dicts.

Each layout module (mvtec, visa, btad, custom) only has to find files and pair them with
labels and masks; loading, resizing and checking images happens here, the same for all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from anomalyzoo.data.transforms import (
    IMAGE_EXTENSIONS,
    image_to_tensor,
    load_rgb_image,
    read_binary_mask,
    resize_and_crop_mask,
)

SPLITS = ("train", "test")
NORMAL_DEFECT_TYPE = "good"  # defect_type of every normal sample, whatever the dataset calls its folder


class DatasetError(ValueError):
    """The dataset on disk does not match the layout its loader expects."""


@dataclass
class Sample:
    """One image of a split. ``label`` is 0 (normal) or 1 (anomalous); ``mask_path`` is the
    pixel mask of an anomalous image in datasets that have masks, else None.
    ``mask_nonzero`` says how to binarise that mask: any non-zero pixel (VisA) or the upper
    half of the value range (MVTec, BTAD: 0/255 masks)."""

    image_path: Path
    label: int
    mask_path: Path | None
    defect_type: str
    mask_nonzero: bool = False


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"Unknown split '{split}'; expected one of {SPLITS}.")


def category_dir(root: Path, category: str, what: str = "category") -> Path:
    """``root/<category>``, or a DatasetError that lists what does exist."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"Dataset folder '{root}' does not exist. Set the dataset directory with "
            f"set_globals(dataset_dir=...) (or ANOMALYZOO_DATASET_DIR) so that it contains "
            f"'{root.name}/<{what}>/'."
        )
    folder = root / category
    if not folder.is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        listing = ", ".join(available) if available else "none"
        raise DatasetError(f"{what.capitalize()} '{category}' not found in '{root}'. Available: {listing}.")
    return folder


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name. Hidden files are skipped: macOS
    leaves '._name.png' resource forks beside copied images, which are not images."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        path for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def require_images(folder: Path, expected: str) -> list[Path]:
    """:func:`list_images`, but an empty or missing folder is a DatasetError saying what belongs there."""
    images = list_images(folder)
    if not images:
        state = "is empty" if Path(folder).is_dir() else "does not exist"
        raise DatasetError(
            f"Folder '{folder}' {state}; expected {expected} "
            f"(extensions: {', '.join(IMAGE_EXTENSIONS)})."
        )
    return images


def index_by_stem(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` keyed by file name without extension (for mask look-up)."""
    return {path.stem: path for path in list_images(folder)}


def require_masks(samples: Iterable[Sample], expected: str) -> None:
    """Every anomalous sample needs a mask file; list the ones that do not have one."""
    missing = [s.image_path for s in samples if s.label == 1 and (s.mask_path is None or not s.mask_path.is_file())]
    if missing:
        shown = "\n  ".join(str(path) for path in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DatasetError(
            f"{len(missing)} defective image(s) have no mask file (expected {expected}):\n  {shown}{more}"
        )


class AnomalyDataset(Dataset):
    """Samples -> batch dicts, the one format every trainer reads::

        image        float32 (3, S, S), [0, 1] or ImageNet-normalised
        label        int64 scalar, 0 normal / 1 anomalous
        mask         float32 (S, S), {0, 1}; all zeros for normal images and mask-less datasets
        path         str, the image file
        defect_type  str, 'good' for normal images
    """

    def __init__(self, samples: list[Sample], img_size: int, normalize: bool, has_masks: bool,
                 crop_pct: float = 1.0) -> None:
        self.samples = list(samples)
        self.img_size = int(img_size)
        self.crop_pct = float(crop_pct)  # < 1: resize to img_size / crop_pct, then centre-crop (image and mask)
        self.normalize = bool(normalize)
        self.has_masks = bool(has_masks)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([sample.label for sample in self.samples], dtype=np.int64)

    def _mask(self, sample: Sample, image_size: tuple[int, int]) -> np.ndarray:
        size = (self.img_size, self.img_size)
        if not self.has_masks or sample.label == 0:
            return np.zeros(size, dtype=np.uint8)
        if sample.mask_path is None:
            raise DatasetError(f"Defective image '{sample.image_path}' has no mask file.")
        mask = read_binary_mask(sample.mask_path, nonzero=sample.mask_nonzero)
        mask_size = (mask.shape[1], mask.shape[0])
        if mask_size != image_size:
            raise DatasetError(
                f"Mask '{sample.mask_path}' is {mask_size[0]}x{mask_size[1]} but its image "
                f"'{sample.image_path}' is {image_size[0]}x{image_size[1]} (width x height); "
                f"a mask must have its image's size. Re-export the mask or fix the pairing."
            )
        return resize_and_crop_mask(mask, self.img_size, self.crop_pct)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        img = load_rgb_image(sample.image_path)
        mask = self._mask(sample, img.size)
        return {
            "image": image_to_tensor(img, self.img_size, self.normalize, self.crop_pct),
            "label": torch.tensor(int(sample.label), dtype=torch.int64),
            "mask": torch.from_numpy(mask.astype(np.float32)),
            "path": str(sample.image_path),
            "defect_type": sample.defect_type,
        }

    def __repr__(self) -> str:
        n_anomalous = int(self.labels.sum()) if self.samples else 0
        return (
            f"{type(self).__name__}({len(self)} images: {len(self) - n_anomalous} normal, "
            f"{n_anomalous} anomalous; img_size={self.img_size}, normalize={self.normalize}, "
            f"has_masks={self.has_masks})"
        )
