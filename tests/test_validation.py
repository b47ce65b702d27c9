"""The validation split: held-out normal *training* images for validation, early stopping and the
label-free threshold; the test split is read only by the final evaluation."""

import json
from pathlib import Path

import pytest
import torch

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders, split_validation, validation_count
from anomalyzoo.models.components.trainer import BaseTrainer

FAST = {"backbone": "resnet18", "pretrained": False, "img_size": 64}


def test_split_is_seeded_disjoint_and_from_the_training_images(synthetic_dataset_dir):
    train_loader, _ = get_dataloaders("mvtec", "synthetic_texture", img_size=32, batch_size=4, dataset_dir=synthetic_dataset_dir)
    whole = len(train_loader.dataset)
    first_train, first_val = split_validation(train_loader, 0.25, seed=3)
    second_train, second_val = split_validation(train_loader, 0.25, seed=3)
    _, other_val = split_validation(train_loader, 0.25, seed=4)
    assert len(first_val.dataset) == round(0.25 * whole) and len(first_train.dataset) == whole - round(0.25 * whole)
    assert first_val.dataset.indices == second_val.dataset.indices  # same seed, same split
    assert first_val.dataset.indices != other_val.dataset.indices
    assert set(first_val.dataset.indices).isdisjoint(first_train.dataset.indices)
    assert sorted(first_val.dataset.indices + first_train.dataset.indices) == list(range(whole))
    assert all("/train/good/" in first_val.dataset[i]["path"] for i in range(len(first_val.dataset)))
    assert first_val.dataset.has_masks == train_loader.dataset.has_masks
    assert split_validation(train_loader, 0.0, seed=3) == (train_loader, None)


def test_validation_count_bounds():
    assert validation_count(209, 0.1) == 21  # MVTec bottle: 21 held out, 188 trained on
    assert validation_count(5, 0.01) == 1  # at least one
    assert validation_count(2, 0.9) == 1  # at least one left to train on
    assert validation_count(100, 0.0) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        validation_count(100, 1.0)
    with pytest.raises(ValueError, match="at least 2 training images"):
        validation_count(1, 0.1)


def test_training_never_sees_the_test_split_and_stores_a_label_free_threshold(synthetic_dataset_dir, tmp_path, monkeypatch):
    evaluated: list[list[str]] = []
    original = BaseTrainer.validation_epoch

    def recording(self, loader):
        predictions = original(self, loader)
        evaluated.append(list(predictions.paths))
        return predictions

    monkeypatch.setattr(BaseTrainer, "validation_epoch", recording)
    result = train("mvtec", "synthetic_texture", "stfpm", num_epochs=2, batch_size=4, validate_every=1,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, max_maps=0, progress=False, **FAST)
    # epochs 1 and 2 validate, then calibrate: all on held-out training normals; then the test split, once
    assert len(evaluated) == 4
    assert all("/train/good/" in path for call in evaluated[:3] for path in call)
    assert all(len(call) == result["num_val_images"] for call in evaluated[:3])
    assert all("/test/" in path for path in evaluated[3])
    assert result["num_val_images"] == 2 and result["num_train_images"] == 22  # 24 normals, val_fraction 0.1
    history = torch.load(result["checkpoint"], weights_only=True)["history"]
    assert [sorted(k for k in record if k.startswith("val_")) for record in history] == [["val_loss", "val_score"]] * 2
    assert all(record["val_loss"] > 0 for record in history)

    statistics = result["normal_statistics"]
    assert result["threshold_source"] == "normal_val_p99" and result["threshold"] == statistics["image_threshold"]
    assert statistics["num_images"] == 2 and statistics["image_min"] <= result["threshold"] <= statistics["image_max"]
    assert 0.0 <= result["normal_threshold_fpr"] <= 1.0 and 0.0 <= result["normal_threshold_recall"] <= 1.0
    run_dir = Path(result["output_dir"])
    report = next(run_dir.glob("results_*_thresholds.txt")).read_text()
    assert "normal_val_p99" in report and "f1_optimal" in report
    assert f"predict uses: normal_val_p99 = {result['threshold']:.6g}" in report
    assert "2 normal training images held out" in report
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["threshold_source"] == "normal_val_p99" and stored["num_val_images"] == 2


def test_without_a_validation_split_the_threshold_says_it_came_from_test_labels(synthetic_dataset_dir, tmp_path):
    result = train("mvtec", "synthetic_texture", "padim", val_fraction=0.0, dataset_dir=synthetic_dataset_dir,
                   output_dir=tmp_path, max_maps=0, progress=False, **FAST)
    assert result["num_val_images"] == 0 and result["num_train_images"] == 24
    assert result["threshold_source"] == "f1_optimal" and result["threshold"] == result["image_f1_threshold"]
    assert result["normal_threshold"] is None


def test_early_stopping_monitors_validation_not_test_labels(synthetic_dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="val_loss"):
        train("mvtec", "synthetic_texture", "stfpm", num_epochs=2, early_stopping_monitor="image_auroc",
              dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, progress=False, **FAST)
    with pytest.raises(ValueError, match="val_fraction > 0"):
        train("mvtec", "synthetic_texture", "stfpm", num_epochs=2, early_stopping_monitor="val_loss", val_fraction=0.0,
              dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, progress=False, **FAST)
    with pytest.raises(ValueError, match="val_score"):  # PaDiM has no loss to validate
        train("mvtec", "synthetic_texture", "padim", early_stopping_monitor="val_loss",
              dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, progress=False, **FAST)
    result = train("mvtec", "synthetic_texture", "stfpm", num_epochs=6, batch_size=4, early_stopping_monitor="val_loss",
                   early_stopping_patience=1, dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, max_maps=0,
                   progress=False, **FAST)
    history = torch.load(result["checkpoint"], weights_only=True)["history"]
    assert all("val_loss" in record for record in history)  # validated every epoch without validate_every
    losses = [record["val_loss"] for record in history]
    if len(history) < 6:  # it stopped: the last epoch was no improvement on the best before it
        assert losses[-1] >= min(losses[:-1])
    assert (Path(result["output_dir"]) / "checkpoints" / "best.pth").is_file()
