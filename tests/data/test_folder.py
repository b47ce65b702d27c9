"""Data where users live: image-level labels only, the generic `folder` type, mixed image sizes."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyzoo import train
from anomalyzoo.cli import main
from anomalyzoo.data import DatasetError, get_datasets
from anomalyzoo.data.synthetic import make_synthetic_dataset

FAST = {"backbone": "resnet18", "pretrained": False, "img_size": 64, "progress": False, "max_maps": 1}


@pytest.fixture()
def mvtec_copy(tmp_path) -> Path:
    make_synthetic_dataset(tmp_path / "mvtec", category="parts", kind="object", n_train=12, n_test_good=6,
                           n_test_defect=6, image_size=64, seed=3)
    return tmp_path


def test_mvtec_category_without_ground_truth_has_image_labels_only(mvtec_copy, tmp_path):
    shutil.rmtree(mvtec_copy / "mvtec" / "parts" / "ground_truth")
    _, test = get_datasets("mvtec", "parts", img_size=32, dataset_dir=mvtec_copy)
    assert not test.has_masks and int(test.labels.sum()) == 6
    result = train("mvtec", "parts", "padim", dataset_dir=mvtec_copy, output_dir=tmp_path / "out", **FAST)
    assert result["image_auroc"] >= 0.8  # measured 1.0
    assert result["pixel_auroc"] is None and result["pixel_aupro"] is None
    report = next(Path(result["output_dir"]).glob("results_*_thresholds.txt")).read_text()
    assert "n/a: the dataset has no ground-truth masks" in report


def test_a_ground_truth_folder_missing_some_masks_is_still_an_error(mvtec_copy):
    masks = sorted((mvtec_copy / "mvtec" / "parts" / "ground_truth").rglob("*_mask.png"))
    masks[0].unlink()
    with pytest.raises(DatasetError, match="1 defective image\\(s\\) have no mask file"):
        get_datasets("mvtec", "parts", img_size=32, dataset_dir=mvtec_copy)


def folder_tree(mvtec_root: Path, root: Path, mask_suffix: bool = True) -> dict[str, Path]:
    """A `folder` layout made from the synthetic category: normal/, two defect folders, masks/."""
    source = mvtec_root / "mvtec" / "parts"
    normal = root / "normal"
    shutil.copytree(source / "train" / "good", normal / "batch1")  # a subfolder: searched recursively
    for i, path in enumerate(sorted((source / "test" / "good").glob("*.png"))):
        shutil.copy(path, normal / f"extra_{i}.png")
    abnormal, masks = [], root / "masks"
    masks.mkdir(parents=True)
    for defect_dir in sorted(p for p in (source / "test").iterdir() if p.name != "good"):
        target = root / "defects" / defect_dir.name
        target.mkdir(parents=True)
        abnormal.append(target)
        for path in sorted(defect_dir.glob("*.png")):
            name = f"{defect_dir.name}_{path.stem}"
            Image.open(path).save(target / f"{name}.jpg", quality=95)  # any extension
            mask = source / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
            shutil.copy(mask, masks / (f"{name}_mask.png" if mask_suffix else f"{name}.png"))
    return {"normal_dir": normal, "abnormal_dir": abnormal, "mask_dir": masks}


@pytest.mark.parametrize("mask_suffix", [True, False])
def test_folder_dataset_pairs_masks_by_stem_and_splits_normals(mvtec_copy, tmp_path, mask_suffix):
    folders = folder_tree(mvtec_copy, tmp_path / "tree", mask_suffix)
    train_set, test_set = get_datasets("folder", "parts", img_size=32, seed=1, folder_options=folders)
    assert len(train_set) + sum(1 for s in test_set.samples if s.label == 0) == 18  # 12 + 6 normals
    assert sum(1 for s in test_set.samples if s.label == 0) == round(0.2 * 18)  # seeded 20 % held out
    assert test_set.has_masks and int(test_set.labels.sum()) == 6
    defective = [s for s in test_set.samples if s.label == 1]
    assert all(s.mask_path is not None and s.mask_path.stem.removesuffix("_mask") == s.image_path.stem for s in defective)
    assert {s.defect_type for s in defective} == {p.name for p in folders["abnormal_dir"]}
    item = test_set[[i for i, s in enumerate(test_set.samples) if s.label == 1][0]]
    assert item["mask"].sum() > 0  # the mask was read and paired
    again, _ = get_datasets("folder", "parts", img_size=32, seed=1, folder_options=folders)
    assert [s.image_path for s in again.samples] == [s.image_path for s in train_set.samples]  # seeded


def test_folder_dataset_with_a_normal_test_dir_and_without_masks(mvtec_copy, tmp_path):
    folders = folder_tree(mvtec_copy, tmp_path / "tree")
    test_normals = tmp_path / "tree" / "normal_test"
    shutil.copytree(mvtec_copy / "mvtec" / "parts" / "test" / "good", test_normals)
    options = {"normal_dir": folders["normal_dir"], "abnormal_dir": folders["abnormal_dir"][0], "normal_test_dir": test_normals}
    train_set, test_set = get_datasets("folder", "parts", img_size=32, folder_options=options)
    assert len(train_set) == 18 and sum(1 for s in test_set.samples if s.label == 0) == 6
    assert not test_set.has_masks and int(test_set.labels.sum()) == 2
    with pytest.raises(DatasetError, match="needs normal_dir"):
        get_datasets("folder", "parts", folder_options={})
    with pytest.raises(DatasetError, match="does not exist"):
        get_datasets("folder", "parts", folder_options={"normal_dir": tmp_path / "nowhere"})
    broken = dict(folders)
    next(broken["mask_dir"].iterdir()).unlink()
    with pytest.raises(DatasetError, match="have no mask file"):
        get_datasets("folder", "parts", folder_options=broken)


def test_folder_dataset_trains_from_the_api_and_the_command_line(mvtec_copy, tmp_path):
    folders = folder_tree(mvtec_copy, tmp_path / "tree")
    result = train("folder", "parts", "padim", output_dir=tmp_path / "out", **folders, **FAST)
    assert result["output_dir"] == str(tmp_path / "out" / "folder" / "parts" / "padim")
    assert result["image_auroc"] >= 0.8 and result["pixel_auroc"] >= 0.8  # measured 1.0 / 0.97
    code = main(["train", "--dataset", "folder", "--category", "parts", "--model", "padim", "--backbone", "resnet18",
                 "--img-size", "64", "--set", "pretrained=False", "--normal-dir", str(folders["normal_dir"]),
                 "--abnormal-dir", *map(str, folders["abnormal_dir"]), "--mask-dir", str(folders["mask_dir"]),
                 "--output-dir", str(tmp_path / "cli")])
    assert code == 0
    assert (tmp_path / "cli" / "folder" / "parts" / "padim" / "metrics.json").is_file()


def test_images_of_varying_size_aspect_and_mode_in_one_category(tmp_path):
    """Grayscale 592x247 PNG beside RGB 240x289 JPEG: every image is squashed to img_size."""
    rng = np.random.default_rng(0)
    normal = tmp_path / "normal"
    normal.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (247, 592), dtype=np.uint8), mode="L").save(normal / f"wide_{i}.png")
        Image.fromarray(rng.integers(0, 255, (289, 240, 3), dtype=np.uint8)).save(normal / f"tall_{i}.jpg")
    train_set, test_set = get_datasets("folder", "mixed", img_size=48, seed=0, folder_options={"normal_dir": normal})
    for dataset in (train_set, test_set):
        for index in range(len(dataset)):
            assert dataset[index]["image"].shape == (3, 48, 48)
    assert len(train_set) + len(test_set) == 8
