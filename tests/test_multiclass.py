"""Multi-class training: one model on two synthetic categories, results per category and their
mean, and one checkpoint that scores both categories as the run did."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from anomalyzoo import train
from anomalyzoo.cli import main
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import compute_metrics
from anomalyzoo.predict import load_trainer

CATEGORIES = ["synthetic_texture", "synthetic_object"]
PADIM_TINY = {"backbone": "resnet18", "pretrained": False, "img_size": 64, "batch_size": 8}


def test_one_model_on_two_categories_reports_each_and_the_mean(synthetic_dataset_dir, tmp_path):
    result = train("mvtec", CATEGORIES, "padim", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path,
                   max_maps=1, progress=False, **PADIM_TINY)
    run_dir = tmp_path / "mvtec" / "multiclass-2" / "padim"
    assert Path(result["output_dir"]) == run_dir
    assert result["categories"] == CATEGORIES and set(result["per_category"]) == set(CATEGORIES)
    # one model, trained on the union of both categories' normal images
    single = [get_dataloaders("mvtec", c, img_size=64, batch_size=8, dataset_dir=synthetic_dataset_dir)[0] for c in CATEGORIES]
    assert result["num_train_images"] + result["num_val_images"] == sum(len(loader.dataset) for loader in single)
    checkpoints = list(run_dir.glob("model_mvtec_multiclass-2_padim_epochs-*.pth"))
    assert len(checkpoints) == 1 and Path(result["checkpoint"]) == checkpoints[0]

    restored = load_trainer(result["checkpoint"], device="cpu")
    for category in CATEGORIES:
        row = result["per_category"][category]
        category_dir = run_dir / category
        assert (category_dir / f"results_mvtec_{category}_padim_thresholds.txt").is_file()
        assert json.loads((category_dir / "metrics.json").read_text())["image_auroc"] == row["image_auroc"]
        # the checkpoint scores this category's test images as the run did, and the metrics follow from them
        _, test_loader = get_dataloaders("mvtec", category, img_size=64, batch_size=8, dataset_dir=synthetic_dataset_dir)
        predictions = restored.validation_epoch(test_loader)
        metrics = compute_metrics(predictions.labels, predictions.scores, predictions.masks, predictions.anomaly_maps)
        for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            assert metrics[key] == pytest.approx(row[key], abs=1e-9), (category, key)
        with (category_dir / f"scores_mvtec_{category}_padim.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        score_column = next(k for k in rows[0] if "score" in k)
        np.testing.assert_allclose([float(r[score_column]) for r in rows], predictions.scores, rtol=1e-5)

    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        expected = np.mean([result["per_category"][c][key] for c in CATEGORIES])
        assert result[key] == pytest.approx(expected)
    with (run_dir / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert [row["category"] for row in summary] == [*CATEGORIES, "mean"]
    assert float(summary[-1]["image_auroc"]) == pytest.approx(result["image_auroc"])
    assert (run_dir / "summary.md").read_text().count("|") > 10


def test_a_string_category_keeps_the_single_category_run(synthetic_dataset_dir, tmp_path):
    result = train("mvtec", "synthetic_object", "padim", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path,
                   max_maps=0, progress=False, **PADIM_TINY)
    assert Path(result["output_dir"]) == tmp_path / "mvtec" / "synthetic_object" / "padim"
    assert "per_category" not in result


def test_bad_category_lists_are_refused(synthetic_dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        train("mvtec", [], "padim", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path)
    with pytest.raises(ValueError, match="twice"):
        train("mvtec", ["synthetic_object", "synthetic_object"], "padim", dataset_dir=synthetic_dataset_dir,
              output_dir=tmp_path)


def test_cli_multiclass_flag_trains_one_model(synthetic_dataset_dir, tmp_path, capsys):
    code = main(["train", "--dataset", "mvtec", "--category", *CATEGORIES, "--model", "padim", "--multiclass",
                 "--backbone", "resnet18", "--img-size", "64", "--batch-size", "8", "--set", "pretrained=False",
                 "--set", "progress=False", "--set", "max_maps=0", "--dataset-dir", str(synthetic_dataset_dir), "--output-dir", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "mvtec" / "multiclass-2" / "padim" / "summary.csv").is_file()
    assert not (tmp_path / "mvtec" / "synthetic_texture").exists()  # not one model per category
    assert "mean" in capsys.readouterr().out
