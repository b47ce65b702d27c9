"""The synthetic MVTec-layout generator: right layout, masks that match their images, defects only
inside their masks, and the same bytes from the same seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyzoo.data import DatasetError, get_dataloaders
from anomalyzoo.data.synthetic import DEFECT_TYPES, _object, _paint_defect, _texture, make_synthetic_dataset


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_layout_and_masks_match_images(tmp_path, kind):
    folder = make_synthetic_dataset(tmp_path / "mvtec", category="tiny", kind=kind, n_train=4, n_test_good=2,
                                    n_test_defect=6, image_size=48, seed=0)
    assert folder == tmp_path / "mvtec" / "tiny"
    assert sorted(p.name for p in (folder / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png", "003.png"]
    assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(["good", *DEFECT_TYPES])
    for defect in DEFECT_TYPES:
        images = sorted((folder / "test" / defect).iterdir())
        assert [p.name for p in images] == ["000.png", "001.png"]  # 6 defects cycle through the 3 types
        for image_path in images:
            mask_path = folder / "ground_truth" / defect / f"{image_path.stem}_mask.png"
            image, mask = _pixels(image_path), _pixels(mask_path)
            assert image.shape == (48, 48, 3) and image.dtype == np.uint8
            assert mask.shape == (48, 48) and set(np.unique(mask).tolist()) == {0, 255}
            assert 0 < (mask > 0).mean() < 0.25  # a local defect, not empty, not the whole image


@pytest.mark.parametrize("kind, render", [("texture", _texture), ("object", _object)])
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_painting_changes_pixels_only_inside_the_mask(kind, render, defect):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        image, geometry = render(rng, 64)
        before = image.copy()
        mask = _paint_defect(rng, image, kind, defect, geometry)
        changed = np.abs(image - before).max(axis=2) > 0
        assert mask.dtype == bool and mask.any()
        assert not (changed & ~mask).any()  # nothing outside the mask moved
        visible = np.abs(image - before).max(axis=2)[mask]
        assert np.median(visible) > 30  # and the defect is clearly visible inside it


def test_written_defects_lie_inside_their_masks(tmp_path):
    """End to end on the files: against the closest normal image, defective images differ far
    more inside the mask than outside it (outside is only noise and jitter)."""
    folder = make_synthetic_dataset(tmp_path, category="obj", kind="object", n_train=8, n_test_good=0,
                                    n_test_defect=6, image_size=64, seed=3)
    normals = np.stack([_pixels(p).astype(float) for p in sorted((folder / "train" / "good").iterdir())])
    for defect in DEFECT_TYPES:
        for image_path in sorted((folder / "test" / defect).iterdir()):
            image = _pixels(image_path).astype(float)
            mask = _pixels(folder / "ground_truth" / defect / f"{image_path.stem}_mask.png") > 0
            closest = normals[np.argmin(np.abs(normals - image).mean(axis=(1, 2, 3)))]
            difference = np.abs(image - closest).max(axis=2)
            assert difference[mask].mean() > 5 * difference[~mask].mean(), (defect, image_path.name)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    arguments = dict(kind="texture", n_train=3, n_test_good=1, n_test_defect=3, image_size=40)
    first = _files(make_synthetic_dataset(tmp_path / "a", seed=5, **arguments))
    again = _files(make_synthetic_dataset(tmp_path / "b", seed=5, **arguments))
    other = _files(make_synthetic_dataset(tmp_path / "c", seed=6, **arguments))
    assert first == again
    assert first.keys() == other.keys()
    assert first["train/good/000.png"] != other["train/good/000.png"]


def test_own_folder_is_replaced_a_foreign_one_is_not(tmp_path):
    make_synthetic_dataset(tmp_path, category="cat", n_train=3, n_test_good=1, n_test_defect=3, image_size=32)
    folder = make_synthetic_dataset(tmp_path, category="cat", n_train=2, n_test_good=1, n_test_defect=0, image_size=32)
    assert len(list((folder / "train" / "good").iterdir())) == 2 and not (folder / "ground_truth").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(DatasetError, match="not written by make_synthetic_dataset"):
        make_synthetic_dataset(tmp_path, category="mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"


def test_generated_dataset_loads_through_get_dataloaders(tmp_path):
    make_synthetic_dataset(tmp_path / "mvtec", category="syn", kind="object", n_train=5, n_test_good=3,
                           n_test_defect=6, image_size=64, seed=1)
    train_loader, test_loader = get_dataloaders("mvtec", "syn", img_size=32, batch_size=16, normalize=True,
                                                dataset_dir=tmp_path, num_workers=0, seed=0)
    (train_batch,) = list(train_loader)
    (batch,) = list(test_loader)
    assert train_batch["image"].shape == (5, 3, 32, 32)
    assert batch["image"].shape == (9, 3, 32, 32) and batch["mask"].shape == (9, 32, 32)
    labels = batch["label"]
    assert labels.sum().item() == 6 and sorted(set(batch["defect_type"])) == sorted(["good", *DEFECT_TYPES])
    assert batch["mask"][labels == 1].flatten(1).sum(1).gt(0).all()  # every defect keeps mask pixels at 32 px
    assert batch["mask"][labels == 0].sum() == 0


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        make_synthetic_dataset(tmp_path, kind="fabric")
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_dataset(tmp_path, image_size=16)
