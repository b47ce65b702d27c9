"""MVTec AD layout (Bergmann et al., CVPR 2019), also used by :mod:`anomalyzoo.data.synthetic`::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/*.png
    <root>/<category>/ground_truth/<defect_type>/<image stem>_mask.png

A category without any ``ground_truth/`` folder has image-level labels only (common outside the
benchmark): it trains and evaluates with image metrics, and pixel metrics are None. A
``ground_truth/`` folder that exists but lacks some masks is an error that lists them.
"""

from __future__ import annotations

from pathlib import Path

from anomalyzoo.data.base import (
    NORMAL_DEFECT_TYPE,
    DatasetError,
    Sample,
    category_dir,
    check_split,
    index_by_stem,
    require_images,
    require_masks,
)


def mvtec_samples(root: Path, category: str, split: str) -> list[Sample]:
    """The samples of one split, sorted by defect type then file name."""
    check_split(split)
    folder = category_dir(Path(root), category)
    if split == "train":
        images = require_images(folder / "train" / "good", "the normal training images")
        return [Sample(path, 0, None, NORMAL_DEFECT_TYPE) for path in images]

    test_dir = folder / "test"
    defect_dirs = (
        sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) if test_dir.is_dir() else []
    )
    has_ground_truth = (folder / "ground_truth").is_dir()
    samples: list[Sample] = []
    for defect_dir in defect_dirs:
        # An empty folder is most likely a copy that failed; skipping it would quietly evaluate on less.
        is_normal = defect_dir.name == NORMAL_DEFECT_TYPE
        expected = "the normal test images" if is_normal else f"the '{defect_dir.name}' test images (or no folder)"
        images = require_images(defect_dir, expected)
        if is_normal:
            samples += [Sample(path, 0, None, NORMAL_DEFECT_TYPE) for path in images]
            continue
        masks = index_by_stem(folder / "ground_truth" / defect_dir.name) if has_ground_truth else {}
        samples += [Sample(path, 1, masks.get(f"{path.stem}_mask"), defect_dir.name) for path in images]
    if not samples:
        raise DatasetError(
            f"No test images in '{test_dir}'; expected subfolders 'good/' and one per defect "
            f"type (e.g. 'scratch/') holding .png/.jpg images."
        )
    if has_ground_truth:
        require_masks(samples, f"'{folder / 'ground_truth'}/<defect_type>/<image stem>_mask.png'")
    return samples
