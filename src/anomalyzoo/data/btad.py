"""BTAD layout (beanTech Anomaly Detection, Mishra et al. 2021)::

    <root>/<01|02|03>/train/ok/*.bmp|png
    <root>/<01|02|03>/test/ok/
    <root>/<01|02|03>/test/ko/
    <root>/<01|02|03>/ground_truth/ko/<image stem>.png   (or .bmp: the products differ)
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


def btad_samples(root: Path, category: str, split: str) -> list[Sample]:
    """The samples of one split: normal ('ok') first, then defective ('ko'), each sorted by name."""
    check_split(split)
    folder = category_dir(Path(root), category, what="product")
    if split == "train":
        images = require_images(folder / "train" / "ok", "the normal training images")
        return [Sample(path, 0, None, NORMAL_DEFECT_TYPE) for path in images]

    # A missing 'ok/' or 'ko/' is allowed; one that exists but is empty is most likely a copy that failed.
    ok_images, ko_images = (
        require_images(sub, f"the {what} test images (or remove the folder)") if sub.is_dir() else []
        for sub, what in ((folder / "test" / "ok", "normal"), (folder / "test" / "ko", "defective"))
    )
    samples = [Sample(path, 0, None, NORMAL_DEFECT_TYPE) for path in ok_images]
    masks = index_by_stem(folder / "ground_truth" / "ko")
    samples += [Sample(path, 1, masks.get(path.stem), "ko") for path in ko_images]
    if not samples:
        raise DatasetError(
            f"No test images in '{folder / 'test'}'; expected 'ok/' (normal) and 'ko/' (defective) "
            f"subfolders holding .bmp/.png images."
        )
    require_masks(samples, f"'{folder / 'ground_truth' / 'ko'}/<image stem>.png' or '.bmp'")
    return samples
