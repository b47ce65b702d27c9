"""Real-data regression tests: every model fast enough on a 2-core CPU, trained on the real MVTec AD
bottle category (../shared/data/mvtec/bottle, 209 normal training images of which 21 are held out
for validation; 83 test images) with the EfficientNet-Lite0 ImageNet weights of the `lite` extra.

The synthetic end-to-end tests are too easy to tell a faithful model from a broken one; these are
not. Each floor sits a little under what was measured (issue 7's closing note and
benchmarks/RESULTS.md), so a change that costs accuracy fails CI. The label-free threshold chosen
on the held-out normals must also work on the real test set.
"""

from __future__ import annotations

from typing import Any

import pytest

from anomalyzoo import train

# model -> (overrides, image AUROC, pixel AUROC, AUPRO floors); None: image-level model (no map)
CASES: dict[str, tuple[dict[str, Any], float, float | None, float | None]] = {
    "padim": ({}, 0.99, 0.975, 0.915),  # measured 0.9960 / 0.9805 / 0.9250
    "patchcore": ({}, 0.99, 0.978, 0.925),  # measured 1.0000 / 0.9836 / 0.9348
    "dfkde": ({}, 0.985, None, None),  # measured 0.9937
    "dfm": ({}, 0.99, 0.925, 0.69),  # measured 1.0000 / 0.9350 / 0.7091
    "fre": ({"num_epochs": 1}, 0.99, 0.965, 0.885),  # measured 0.9960 / 0.9730 / 0.8989
    "reverse-distillation": ({"num_epochs": 1}, 0.99, 0.97, 0.925),  # measured 1.0000 / 0.9771 / 0.9377
    # one epoch at batch 4 (47 steps at the authors' lr 0.4); at the spec's batch 16 one epoch is
    # only 12 steps, too few for the student to learn anything yet (image AUROC 0.43)
    "stfpm": ({"num_epochs": 1, "batch_size": 4}, 0.99, 0.965, 0.93),  # measured 1.0000 / 0.9760 / 0.9434
}


@pytest.mark.parametrize("model", list(CASES))
def test_model_keeps_its_accuracy_on_real_bottles(model, bottle_dataset_dir, lite0_weights, tmp_path):
    overrides, image_floor, pixel_floor, aupro_floor = CASES[model]
    result = train("mvtec", "bottle", model, dataset_dir=bottle_dataset_dir, output_dir=tmp_path,
                   backbone="efficientnet_lite0", max_maps=0, progress=False, **overrides)
    print(model, {k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "normal_threshold_fpr",
                                         "normal_threshold_recall", "fit_seconds", "inference_ms_per_image")})
    assert result["num_train_images"] == 188 and result["num_val_images"] == 21
    assert result["image_auroc"] >= image_floor
    if pixel_floor is None:
        assert result["pixel_auroc"] is None and result["pixel_aupro"] is None
    else:
        assert result["pixel_auroc"] >= pixel_floor
        assert result["pixel_aupro"] >= aupro_floor
    # the threshold chosen on 21 held-out normal training images, applied to the unseen test set
    assert result["threshold_source"] == "normal_val_p99"
    assert result["normal_threshold_recall"] >= 0.9  # measured 0.94 - 1.0
    assert result["normal_threshold_fpr"] <= 0.3  # measured 0.0 - 0.2 (20 normal test images)
