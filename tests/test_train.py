import json

import pytest

from anomalyzoo import train, train_models
from anomalyzoo.registry import UnknownModelError

FAST = {"backbone": "resnet18", "pretrained": False, "img_size": 64}


def test_train_writes_every_output_and_metrics_json(synthetic_dataset_dir, tmp_path):
    result = train("mvtec", "synthetic_texture", "padim", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, **FAST)
    run_dir = tmp_path / "mvtec" / "synthetic_texture" / "padim"
    assert result["output_dir"] == str(run_dir)
    name = "mvtec_synthetic_texture_padim"
    for filename in (f"model_{name}_epochs-1.pth", f"results_{name}_thresholds.txt", f"histogram_{name}_scores.png",
                     f"image_{name}_normal_0001.png", f"image_{name}_anomaly_0001.png", "metrics.json"):
        assert (run_dir / filename).is_file(), filename
    stored = json.loads((run_dir / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "threshold", "fit_seconds",
                "inference_ms_per_image", "output_dir"):
        assert key in stored and stored[key] == result[key]
    report = (run_dir / f"results_{name}_thresholds.txt").read_text()
    assert "f1_optimal" in report and "zero_miss" in report


def test_overrides_reach_the_model_and_the_loop(synthetic_dataset_dir, tmp_path):
    result = train("mvtec", "synthetic_texture", "patchcore", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path,
                   coreset_ratio=0.05, layers=["layer2"], batch_size=3, **FAST)
    assert result["model_config"]["coreset_ratio"] == 0.05 and result["model_config"]["layers"] == ["layer2"]
    assert result["train_config"]["batch_size"] == 3 and result["train_config"]["img_size"] == 64


def test_a_second_run_never_overwrites_the_first(synthetic_dataset_dir, tmp_path):
    first = train("mvtec", "synthetic_texture", "padim", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, **FAST)
    second = train("mvtec", "synthetic_texture", "padim", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, **FAST)
    assert second["output_dir"].endswith("padim-run2") and first["output_dir"] != second["output_dir"]
    third = train("mvtec", "synthetic_texture", "padim", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path,
                  overwrite=True, **FAST)
    assert third["output_dir"] == first["output_dir"]


def test_same_seed_same_result(synthetic_dataset_dir, tmp_path):
    runs = [train("mvtec", "synthetic_texture", "patchcore", dataset_dir=synthetic_dataset_dir,
                  output_dir=tmp_path / str(i), seed=5, **FAST) for i in range(2)]
    assert runs[0]["image_auroc"] == runs[1]["image_auroc"] and runs[0]["pixel_aupro"] == runs[1]["pixel_aupro"]


def test_unknown_model_fails_before_any_work(tmp_path):
    with pytest.raises(UnknownModelError, match="Did you mean 'padim'"):
        train("mvtec", "bottle", "padin", output_dir=tmp_path)


def test_train_models_goes_on_past_a_failure_and_writes_a_summary(synthetic_dataset_dir, tmp_path):
    rows = train_models("mvtec", ["synthetic_texture", "no_such_category"], ["padim"], output_dir=tmp_path,
                        dataset_dir=synthetic_dataset_dir, **FAST)
    assert "error" not in rows[0]
    assert rows[0]["image_auroc"] >= 0.95 and rows[0]["pixel_auroc"] >= 0.9  # measured 1.0 / 0.98 (random resnet18)
    assert "no_such_category" in rows[1]["error"]
    assert "no_such_category" in (tmp_path / "summary.md").read_text()
