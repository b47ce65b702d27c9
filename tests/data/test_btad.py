"""BTAD layout on a tiny tree: train/ok, test/{ok,ko}, ground_truth/ko with .png and .bmp masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyzoo.data import DatasetError, get_dataloaders, get_datasets
from anomalyzoo.data.btad import btad_samples

SIZE = 20


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)  # format from the suffix: .bmp or .png


def make_btad(dataset_dir: Path, product: str = "01") -> Path:
    """train/ok 3 (.bmp), test/ok 2, test/ko 2 (.bmp images; one .png mask, one .bmp mask)."""
    folder = dataset_dir / "btad" / product
    for i in range(3):
        _save(folder / "train" / "ok" / f"{i:04d}.bmp", np.full((SIZE, SIZE, 3), 30 + i, np.uint8))
    for i in range(2):
        _save(folder / "test" / "ok" / f"{i:04d}.bmp", np.full((SIZE, SIZE, 3), 60, np.uint8))
        _save(folder / "test" / "ko" / f"{i:04d}.bmp", np.full((SIZE, SIZE, 3), 220, np.uint8))
    right = np.zeros((SIZE, SIZE), np.uint8)
    right[:, SIZE // 2:] = 255
    _save(folder / "ground_truth" / "ko" / "0000.png", right)
    _save(folder / "ground_truth" / "ko" / "0001.bmp", 255 - right)  # left half
    return folder


def test_samples_pair_png_and_bmp_masks_by_stem(tmp_path):
    folder = make_btad(tmp_path)
    train = btad_samples(tmp_path / "btad", "01", "train")
    assert [s.image_path.name for s in train] == ["0000.bmp", "0001.bmp", "0002.bmp"]
    assert all(s.label == 0 and s.defect_type == "good" for s in train)
    test = btad_samples(tmp_path / "btad", "01", "test")
    assert [(s.image_path.parent.name, s.label, s.defect_type) for s in test] == [
        ("ok", 0, "good"), ("ok", 0, "good"), ("ko", 1, "ko"), ("ko", 1, "ko")]
    assert test[2].mask_path == folder / "ground_truth" / "ko" / "0000.png"
    assert test[3].mask_path == folder / "ground_truth" / "ko" / "0001.bmp"


@pytest.mark.parametrize("normalize", [False, True])
def test_dataloaders_shapes_labels_and_masks(tmp_path, normalize):
    make_btad(tmp_path)
    train_loader, test_loader = get_dataloaders("btad", "01", img_size=8, batch_size=4, normalize=normalize,
                                                dataset_dir=tmp_path, num_workers=0, seed=1)
    assert sum(len(b["label"]) for b in train_loader) == 3
    (batch,) = list(test_loader)
    assert batch["image"].shape == (4, 3, 8, 8) and batch["mask"].shape == (4, 8, 8)
    assert batch["label"].tolist() == [0, 0, 1, 1]
    masks = batch["mask"]
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert masks[:2].eq(0).all()
    assert masks[2, :, 4:].eq(1).all() and masks[2, :, :4].eq(0).all()  # .png mask: right half
    assert masks[3, :, :4].eq(1).all() and masks[3, :, 4:].eq(0).all()  # .bmp mask: left half
    assert (batch["image"].min() < 0) == normalize  # ImageNet normalisation takes dark pixels below 0


def test_missing_product_empty_train_and_missing_masks_are_clear_errors(tmp_path):
    folder = make_btad(tmp_path)
    with pytest.raises(DatasetError, match=r"Product '04' not found.*Available: 01"):
        get_datasets("btad", "04", dataset_dir=tmp_path)
    (folder / "ground_truth" / "ko" / "0001.bmp").unlink()
    with pytest.raises(DatasetError, match=r"(?s)no mask file.*test/ko/0001\.bmp"):
        get_datasets("btad", "01", dataset_dir=tmp_path)
    for path in (folder / "train" / "ok").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"train/ok.*is empty"):
        get_datasets("btad", "01", dataset_dir=tmp_path)


@pytest.mark.parametrize("sub", ["ok", "ko"])
def test_empty_test_folder_is_a_clear_error(tmp_path, sub):
    folder = make_btad(tmp_path)
    for path in (folder / "test" / sub).iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=f"test/{sub}' is empty"):
        get_datasets("btad", "01", dataset_dir=tmp_path)


def test_no_test_folders_is_a_clear_error(tmp_path):
    folder = make_btad(tmp_path)
    for sub in ("ok", "ko"):
        for path in (folder / "test" / sub).iterdir():
            path.unlink()
        (folder / "test" / sub).rmdir()
    with pytest.raises(DatasetError, match="No test images.*expected 'ok/'"):
        get_datasets("btad", "01", dataset_dir=tmp_path)
