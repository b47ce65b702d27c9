"""The generic ``folder`` dataset, as anomalib's users know it: any folders of images.

    normal_dir        normal images (required); subfolders are searched too
    abnormal_dir      one folder or several of defective images (optional); each folder's name
                      is the defect type of its images
    mask_dir          masks of the defective images (optional), paired by file stem, with or
                      without a ``_mask`` suffix (``scratch_01.png`` <- ``scratch_01.png`` or
                      ``scratch_01_mask.png``); any image extension
    normal_test_dir   normal test images (optional); without it a seeded ``normal_split_ratio``
                      of the normal images (default 0.2) is the normal part of the test split

Every image extension in ``IMAGE_EXTENSIONS`` is read; sizes and aspect ratios may vary inside a
category (each image is squashed to ``img_size`` x ``img_size``, as for every dataset type).
Without ``mask_dir`` the category has image-level labels only and pixel metrics are None; with
it, every defective image needs a mask (listed when missing).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from anomalyzoo.data.base import NORMAL_DEFECT_TYPE, DatasetError, Sample, check_split, require_masks
from anomalyzoo.data.images import find_images

FOLDER_OPTIONS = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir", "normal_split_ratio")


@dataclass(frozen=True)
class FolderLayout:
    normal_dir: Path
    abnormal_dirs: tuple[Path, ...] = ()
    mask_dir: Path | None = None
    normal_test_dir: Path | None = None
    normal_split_ratio: float = 0.2

    @classmethod
    def from_options(cls, normal_dir: str | Path | None = None, abnormal_dir: str | Path | Sequence[str | Path] | None = None,
                     mask_dir: str | Path | None = None, normal_test_dir: str | Path | None = None,
                     normal_split_ratio: float = 0.2) -> "FolderLayout":
        if normal_dir is None:
            raise DatasetError("dataset_type 'folder' needs normal_dir=<folder of normal images> "
                               "(and optionally abnormal_dir=, mask_dir=, normal_test_dir=)")
        if abnormal_dir is None:
            abnormal = ()
        elif isinstance(abnormal_dir, (str, Path)):
            abnormal = (Path(abnormal_dir).expanduser(),)
        else:
            abnormal = tuple(Path(folder).expanduser() for folder in abnormal_dir)
        if not 0.0 < normal_split_ratio < 1.0:
            raise DatasetError(f"normal_split_ratio must be in (0, 1), got {normal_split_ratio}")
        return cls(Path(normal_dir).expanduser(), abnormal, Path(mask_dir).expanduser() if mask_dir else None,
                   Path(normal_test_dir).expanduser() if normal_test_dir else None, float(normal_split_ratio))


def _images(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"Folder '{folder}' ({what}) does not exist.")
    images = find_images(folder)
    if not images:
        raise DatasetError(f"Folder '{folder}' ({what}) holds no images (searched recursively).")
    return images


def _mask_index(mask_dir: Path) -> dict[str, Path]:
    """Masks keyed by the stem of the image they belong to (``x_mask.png`` and ``x.png`` -> ``x``)."""
    index: dict[str, Path] = {}
    for path in _images(mask_dir, "the masks"):
        index[path.stem.removesuffix("_mask")] = path
    return index


def folder_samples(layout: FolderLayout, split: str, seed: int) -> list[Sample]:
    """The samples of one split: training = normal images (less the held-out test share when there
    is no ``normal_test_dir``); test = normal test images + every abnormal image."""
    check_split(split)
    normals = _images(layout.normal_dir, "the normal images")
    if layout.normal_test_dir is not None:
        train_normals, test_normals = normals, _images(layout.normal_test_dir, "the normal test images")
    else:
        shuffled = list(normals)
        random.Random(seed).shuffle(shuffled)
        held_out = max(1, round(layout.normal_split_ratio * len(shuffled)))
        if held_out >= len(shuffled):
            raise DatasetError(f"'{layout.normal_dir}' has {len(normals)} normal image(s): too few to hold "
                               f"{layout.normal_split_ratio:.0%} out for testing and train on the rest; "
                               "add images or give normal_test_dir")
        test_normals, train_normals = sorted(shuffled[:held_out]), sorted(shuffled[held_out:])
    if split == "train":
        return [Sample(path, 0, None, NORMAL_DEFECT_TYPE) for path in train_normals]

    samples = [Sample(path, 0, None, NORMAL_DEFECT_TYPE) for path in test_normals]
    masks = _mask_index(layout.mask_dir) if layout.mask_dir is not None else {}
    for folder in layout.abnormal_dirs:
        for path in _images(folder, "defective images"):
            samples.append(Sample(path, 1, masks.get(path.stem), folder.name, mask_nonzero=True))
    if layout.mask_dir is not None:
        require_masks(samples, f"a file in '{layout.mask_dir}' named like its image (optionally with '_mask')")
    return samples
