"""Custom datasets: data_rgb/normal + data_rgb/<defect_type>, metadata in the file names
('{category} {freq} {dimming}[_{extra}].png'), data_info.csv written on first use, a seeded split."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyzoo.data import DatasetError, get_dataloaders, get_datasets, split_custom_category
from anomalyzoo.data.custom import DATA_INFO_COLUMNS, custom_samples, parse_custom_filename, split_normals

NORMAL_NAMES = [f"pattern1 {freq} {dim}.png" for freq in (60, 120) for dim in (50, 100, 150, 200, 250)]
NORMAL_NAMES += ["design_A 80 150_v2.png", "design_A 80 200.png", "design_A 90 150_v2.png"]
DEFECT_NAMES = {"line": ["pattern1 60 100.png", "pattern1 120 200_retake.png"], "mura": ["pattern1 60 50.png", "design_A 80 150.png"]}


def _save(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(path)


def make_custom(dataset_dir: Path, dataset: str = "panel_a") -> Path:
    data_rgb = dataset_dir / "custom" / dataset / "data_rgb"
    for name in NORMAL_NAMES:
        _save(data_rgb / "normal" / name, 100)
    for defect, names in DEFECT_NAMES.items():
        for name in names:
            _save(data_rgb / defect / name, 200)
    return data_rgb


def test_parse_filename_fields():
    assert parse_custom_filename("pattern1 60 100.png") == {"category": "pattern1", "freq": 60, "dimming": 100, "extra": None}
    assert parse_custom_filename("design_A 80 150_v2.png") == {"category": "design_A", "freq": 80, "dimming": 150, "extra": "v2"}
    assert parse_custom_filename(Path("x/y/p 1 2_a_b.bmp"))["extra"] == "a_b"


@pytest.mark.parametrize("name", ["image001.png", "pattern1_60_100.png", "pattern1 60.png", "pattern1  60 100.png",
                                  "pattern1 sixty 100.png", "pattern1 60 100 x.png", "pattern1 60 100_.png"])
def test_invalid_names_are_rejected_naming_the_file(name):
    with pytest.raises(DatasetError, match=f"'{name}' breaks the naming rule"):
        parse_custom_filename(name)


def test_invalid_name_in_the_dataset_is_reported_with_its_path(tmp_path):
    data_rgb = make_custom(tmp_path)
    _save(data_rgb / "normal" / "image001.png")
    _save(data_rgb / "line" / "pattern1 60.png")
    with pytest.raises(DatasetError, match=r"(?s)2 file\(s\) break the naming rule.*line/pattern1 60\.png.*normal/image001\.png"):
        get_datasets("custom", "panel_a/pattern1", dataset_dir=tmp_path)


def test_data_info_csv_is_written_on_first_use(tmp_path):
    data_rgb = make_custom(tmp_path)
    assert not (data_rgb / "data_info.csv").exists()
    get_datasets("custom", "panel_a/pattern1", dataset_dir=tmp_path, seed=0)
    with (data_rgb / "data_info.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == DATA_INFO_COLUMNS
        rows = {row["path"]: row for row in reader}
    assert len(rows) == len(NORMAL_NAMES) + 4
    assert rows["normal/design_A 80 150_v2.png"] == {
        "path": "normal/design_A 80 150_v2.png", "category": "design_A", "freq": "80", "dimming": "150",
        "extra": "v2", "defect_type": "good", "label": "0"}
    assert rows["line/pattern1 120 200_retake.png"] == {
        "path": "line/pattern1 120 200_retake.png", "category": "pattern1", "freq": "120", "dimming": "200",
        "extra": "retake", "defect_type": "line", "label": "1"}


def test_data_info_csv_is_rewritten_when_the_files_change(tmp_path):
    data_rgb = make_custom(tmp_path)
    get_datasets("custom", "panel_a/pattern1", dataset_dir=tmp_path, seed=0)
    (data_rgb / "mura" / "pattern1 60 50.png").rename(data_rgb / "line" / "pattern1 60 50.png")
    _, test_set = get_datasets("custom", "panel_a/pattern1", dataset_dir=tmp_path, seed=0)
    assert sorted(s.defect_type for s in test_set.samples if s.label == 1) == ["line", "line", "line"]
    text = (data_rgb / "data_info.csv").read_text()
    assert "line/pattern1 60 50.png" in text and "mura/pattern1 60 50.png" not in text


def test_category_selects_rows_and_every_defect_is_test(tmp_path):
    make_custom(tmp_path)
    train_set, test_set = get_datasets("custom", "panel_a/pattern1", dataset_dir=tmp_path, seed=0)
    names = [s.image_path.name for s in train_set.samples + test_set.samples]
    assert all(name.startswith("pattern1 ") for name in names)
    assert len(train_set) + len(test_set) == 10 + 3
    assert all(s.label == 0 and s.defect_type == "good" for s in train_set.samples)
    defects = [(s.image_path.parent.name, s.image_path.name) for s in test_set.samples if s.label == 1]
    assert sorted(defects) == [("line", "pattern1 120 200_retake.png"), ("line", "pattern1 60 100.png"), ("mura", "pattern1 60 50.png")]
    assert [s.label for s in test_set.samples].count(0) == 2  # 20 % of 10 normals
    # the train and test normals are disjoint and together are all the normals
    normals = {s.image_path for s in train_set.samples} | {s.image_path for s in test_set.samples if s.label == 0}
    assert len(normals) == 10
    # no masks: every mask is empty
    assert not test_set.has_masks and test_set[len(test_set) - 1]["mask"].sum() == 0


def test_normal_split_is_reproducible_under_a_seed(tmp_path):
    make_custom(tmp_path)

    def test_normals(seed: int) -> list[str]:
        _, test_set = get_datasets("custom", "panel_a/pattern1", dataset_dir=tmp_path, seed=seed)
        return [s.image_path.name for s in test_set.samples if s.label == 0]

    first = test_normals(0)
    assert test_normals(0) == first
    assert any(test_normals(seed) != first for seed in (1, 2, 3, 4))
    train, test = split_normals(10, seed=7, test_ratio=0.3)
    assert len(test) == 3 and sorted(np.concatenate([train, test]).tolist()) == list(range(10))
    assert split_normals(1, seed=0, test_ratio=0.2)[1].size == 0  # a single normal image trains
    assert split_normals(2, seed=0, test_ratio=0.01)[1].size == 1  # two or more: one each side at least


def test_dataloaders_for_a_custom_category(tmp_path):
    make_custom(tmp_path)
    train_loader, test_loader = get_dataloaders("custom", "design_A", custom_dataset="panel_a", img_size=8, batch_size=4,
                                                normalize=False, dataset_dir=tmp_path, num_workers=0, seed=0)
    (train_batch,) = list(train_loader)
    (test_batch,) = list(test_loader)
    assert train_batch["image"].shape == (2, 3, 8, 8) and train_batch["label"].tolist() == [0, 0]
    assert test_batch["image"].shape == (2, 3, 8, 8) and test_batch["mask"].shape == (2, 8, 8)
    assert test_batch["label"].tolist() == [0, 1] and test_batch["defect_type"] == ["good", "mura"]
    assert test_batch["image"][1].max().item() == pytest.approx(200 / 255)


def test_category_argument_forms_and_errors(tmp_path):
    assert split_custom_category("panel_a/pattern1", None) == ("panel_a", "pattern1")
    assert split_custom_category("pattern1", "panel_a") == ("panel_a", "pattern1")
    assert split_custom_category("panel_a/pattern1", "panel_a") == ("panel_a", "pattern1")
    with pytest.raises(DatasetError, match="names custom dataset 'panel_a' but custom_dataset='panel_b'"):
        split_custom_category("panel_a/pattern1", "panel_b")
    with pytest.raises(DatasetError, match="'<dataset>/<category>'"):
        split_custom_category("pattern1", None)
    make_custom(tmp_path)
    with pytest.raises(DatasetError, match=r"No images of category 'pattern9'.*Categories found: design_A, pattern1"):
        get_datasets("custom", "panel_a/pattern9", dataset_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"Custom dataset 'panel_z' not found.*Available: panel_a"):
        get_datasets("custom", "panel_z/pattern1", dataset_dir=tmp_path)


def test_missing_normal_folder_and_category_without_normals_are_clear_errors(tmp_path):
    data_rgb = make_custom(tmp_path)
    _save(data_rgb / "line" / "onlybad 60 100.png")
    with pytest.raises(DatasetError, match="Category 'onlybad' has no normal images"):
        custom_samples(tmp_path / "custom", "panel_a", "onlybad", "train", seed=0)
    for path in (data_rgb / "normal").iterdir():
        path.unlink()
    (data_rgb / "normal").rmdir()
    with pytest.raises(DatasetError, match="has no 'normal/' folder"):
        get_datasets("custom", "panel_a/pattern1", dataset_dir=tmp_path)
