"""VisA layout on a tiny tree: the split comes from split_csv/1cls.csv, not from the folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyzoo.data import DatasetError, get_dataloaders, get_datasets
from anomalyzoo.data.visa import visa_samples

SIZE = 24


def _save(path: Path, pixels: np.ndarray, format: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=format)


def _write_csv(path: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)


def make_visa(dataset_dir: Path, category: str = "candle", relative_to_category: bool = False) -> Path:
    """Normal 0000-0005, Anomaly 0000-0002 (JPG images, PNG masks storing the label value 1 as VisA does).
    The CSV puts normals 0-3 in train, normals 4-5 and every anomaly in test: a split no folder shows."""
    root = dataset_dir / "visa"
    folder = root / category
    for i in range(6):
        _save(folder / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", np.full((SIZE, SIZE, 3), 40 + i, np.uint8), "JPEG")
    for i in range(3):
        _save(folder / "Data" / "Images" / "Anomaly" / f"{i:04d}.JPG", np.full((SIZE, SIZE, 3), 200, np.uint8), "JPEG")
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[SIZE // 2:] = 1  # bottom half, value 1 (not 255)
        _save(folder / "Data" / "Masks" / "Anomaly" / f"{i:04d}.png", mask)
    (folder / "image_anno.csv").write_text("image,label,mask\n")
    prefix = "" if relative_to_category else f"{category}/"
    rows = [(category, "train" if i < 4 else "test", "normal", f"{prefix}Data/Images/Normal/{i:04d}.JPG", "")
            for i in range(6)]
    rows += [(category, "test", "anomaly", f"{prefix}Data/Images/Anomaly/{i:04d}.JPG", f"{prefix}Data/Masks/Anomaly/{i:04d}.png")
             for i in range(3)]
    rows += [("capsules", "train", "normal", "capsules/Data/Images/Normal/0000.JPG", "")]  # another object: ignored
    _write_csv(folder / "split_csv" / "1cls.csv", rows)
    return folder


def test_split_labels_and_masks_come_from_the_csv(tmp_path):
    folder = make_visa(tmp_path)
    train = visa_samples(tmp_path / "visa", "candle", "train")
    assert [s.image_path for s in train] == [folder / "Data" / "Images" / "Normal" / f"{i:04d}.JPG" for i in range(4)]
    assert all(s.label == 0 and s.mask_path is None for s in train)
    test = visa_samples(tmp_path / "visa", "candle", "test")
    assert [s.label for s in test] == [0, 0, 1, 1, 1]
    assert [s.defect_type for s in test] == ["good", "good", "anomaly", "anomaly", "anomaly"]
    assert test[2].mask_path == folder / "Data" / "Masks" / "Anomaly" / "0000.png"


def test_dataloaders_shapes_and_value_one_masks_are_binarised(tmp_path):
    make_visa(tmp_path)
    train_loader, test_loader = get_dataloaders("visa", "candle", img_size=16, batch_size=8, normalize=False,
                                                dataset_dir=tmp_path, num_workers=0, seed=0)
    (train_batch,) = list(train_loader)
    assert train_batch["image"].shape == (4, 3, 16, 16) and train_batch["mask"].sum() == 0
    (batch,) = list(test_loader)
    assert batch["image"].shape == (5, 3, 16, 16) and batch["mask"].shape == (5, 16, 16)
    assert batch["label"].tolist() == [0, 0, 1, 1, 1]
    masks = batch["mask"]
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert masks[2:, 8:].eq(1).all() and masks[2:, :8].eq(0).all() and masks[:2].eq(0).all()
    assert torch.all((batch["image"] >= 0) & (batch["image"] <= 1))


def test_paths_relative_to_the_category_folder_also_work(tmp_path):
    folder = make_visa(tmp_path, relative_to_category=True)
    test = visa_samples(tmp_path / "visa", "candle", "test")
    assert test[-1].image_path == folder / "Data" / "Images" / "Anomaly" / "0002.JPG"
    assert test[-1].mask_path == folder / "Data" / "Masks" / "Anomaly" / "0002.png"


def test_shared_csv_at_the_visa_root_is_used_when_the_category_has_none(tmp_path):
    folder = make_visa(tmp_path)
    (folder / "split_csv" / "1cls.csv").rename(tmp_path / "visa" / "1cls.csv")
    (folder / "split_csv").rmdir()
    (tmp_path / "visa" / "split_csv").mkdir()
    (tmp_path / "visa" / "1cls.csv").rename(tmp_path / "visa" / "split_csv" / "1cls.csv")
    train_set, test_set = get_datasets("visa", "candle", dataset_dir=tmp_path)
    assert len(train_set) == 4 and test_set.labels.tolist() == [0, 0, 1, 1, 1]


def test_missing_csv_missing_columns_and_missing_files_are_clear_errors(tmp_path):
    folder = make_visa(tmp_path)
    csv_path = folder / "split_csv" / "1cls.csv"
    (folder / "Data" / "Masks" / "Anomaly" / "0001.png").unlink()
    with pytest.raises(DatasetError, match=r"(?s)1 file\(s\) listed.*Masks/Anomaly/0001\.png"):
        get_datasets("visa", "candle", dataset_dir=tmp_path)
    csv_path.write_text("object,split,label,image\ncandle,train,normal,x.JPG\n")
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['mask'\]"):
        get_datasets("visa", "candle", dataset_dir=tmp_path)
    csv_path.unlink()
    with pytest.raises(DatasetError, match="1cls.csv"):
        get_datasets("visa", "candle", dataset_dir=tmp_path)


def test_object_without_rows_and_bad_labels_are_clear_errors(tmp_path):
    folder = make_visa(tmp_path)
    (tmp_path / "visa" / "pcb1").mkdir()
    (tmp_path / "visa" / "pcb1" / "split_csv").mkdir()
    (folder / "split_csv" / "1cls.csv").replace(tmp_path / "visa" / "pcb1" / "split_csv" / "1cls.csv")
    with pytest.raises(DatasetError, match=r"no 'train' rows for object 'pcb1'.*candle, capsules"):
        get_datasets("visa", "pcb1", dataset_dir=tmp_path)
    _write_csv(folder / "split_csv" / "1cls.csv", [("candle", "train", "weird", "candle/Data/Images/Normal/0000.JPG", "")])
    with pytest.raises(DatasetError, match=r"line 2: label 'weird'"):
        get_datasets("visa", "candle", dataset_dir=tmp_path)


def test_anomalous_image_in_the_train_split_is_an_error(tmp_path):
    folder = make_visa(tmp_path)
    _write_csv(folder / "split_csv" / "1cls.csv", [
        ("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
        ("candle", "train", "anomaly", "candle/Data/Images/Anomaly/0000.JPG", "candle/Data/Masks/Anomaly/0000.png"),
    ])
    with pytest.raises(DatasetError, match=r"line 3: anomalous image .*Anomaly/0000\.JPG' is in the train split"):
        get_datasets("visa", "candle", dataset_dir=tmp_path)
