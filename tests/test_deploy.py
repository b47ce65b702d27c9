"""Export (ONNX, OpenVINO, TorchScript) and the exported graphs' agreement with the torch model.

Every exportable registry entry, trained on its tiny configuration: its ONNX graph run by ONNX
Runtime and by OpenVINO scores a batch (of another size than the traced one) as the torch model
does, maps included, within 1e-4 relative. The deployment packages are the ``deploy`` extra:
required in CI, skipped elsewhere when missing."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyzoo import ModelRegistry
from anomalyzoo.deploy import (EXPORT_RTOL, NOT_EXPORTABLE, ExportError, export, export_trainer, load_exported,
                               relative_gap)

sys.path.insert(0, str(Path(__file__).parent))
from test_registry_contract import loaders, tiny_trainer  # noqa: E402

EXPORTABLE = [name for name in ModelRegistry.list_models() if name not in NOT_EXPORTABLE]


@pytest.fixture(scope="module", autouse=True)
def deploy_packages() -> None:
    for module in ("onnx", "onnxruntime", "openvino"):
        try:
            importlib.import_module(module)
        except ImportError:
            message = f"{module} is not installed (pip install '.[deploy]')"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message + " (required in CI)")
            pytest.skip(message)


def fitted_tiny(name: str, dataset_dir: Path):
    trainer, train_values = tiny_trainer(name)
    trainer.model_type = name
    train_loader, val_loader, test_loader = loaders(dataset_dir, train_values)
    trainer.fit(train_loader, val_loader)
    trainer.calibrate(val_loader)
    dataset = test_loader.dataset
    picks = [0, len(dataset) // 2, len(dataset) - 1]  # normal and defective images, 3 (the export traced 2)
    images = torch.stack([dataset[i]["image"] for i in picks])
    return trainer, images


def assert_same_outputs(got: dict[str, np.ndarray], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == {key for key in ("pred_score", "anomaly_map") if expected.get(key) is not None}, what
    for key, values in got.items():
        reference = expected[key].float().cpu().numpy()
        assert values.shape == reference.shape, (what, key)
        assert relative_gap(values, reference) <= EXPORT_RTOL, (what, key, relative_gap(values, reference))


@pytest.mark.parametrize("name", EXPORTABLE)
def test_onnx_graph_scores_as_torch_in_onnxruntime_and_openvino(name, synthetic_dataset_dir, tmp_path):
    trainer, images = fitted_tiny(name, synthetic_dataset_dir)
    expected = trainer.predict(images)
    export_trainer(trainer, "onnx", tmp_path, verify=False)
    for backend in ("onnxruntime", "openvino"):
        exported = load_exported(tmp_path, backend, num_threads=1)
        assert_same_outputs(exported.score(images), expected, f"{name} {backend}")
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["model"] == name and metadata["img_size"] == trainer.train_config.img_size
    assert metadata["normalize"] == trainer.train_config.normalize
    assert metadata["threshold"] == trainer.threshold and metadata["thresholds"] == trainer.thresholds
    assert metadata["normal_statistics"] == trainer.normal_statistics.as_dict()
    assert metadata["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("name", sorted(NOT_EXPORTABLE))
def test_a_model_that_cannot_be_exported_says_why(name, tmp_path):
    trainer, _ = tiny_trainer(name)
    trainer.model_type = name
    for export_format in ("onnx", "openvino"):
        with pytest.raises(ExportError, match=f"{name} cannot be exported to {export_format}: .{{20,}}torchscript works"):
            export_trainer(trainer, export_format, tmp_path)
    assert not any(tmp_path.iterdir())


def test_openvino_ir_and_torchscript_exports_from_a_checkpoint(synthetic_dataset_dir, tmp_path):
    trainer, images = fitted_tiny("padim", synthetic_dataset_dir)
    expected = trainer.predict(images)
    checkpoint = trainer.save_model(tmp_path / "model.pth")
    for export_format, model_file in (("openvino", "model.xml"), ("torchscript", "model.pt")):
        path = export(checkpoint, export_format)  # verified on export
        assert path == tmp_path / f"export_{export_format}" / model_file and path.is_file()
        if export_format == "openvino":
            assert path.with_suffix(".bin").stat().st_size > 4 * trainer.model.gaussian.inv_covariance.numel()  # fp32
        assert_same_outputs(load_exported(path.parent).score(images), expected, export_format)


def test_export_refuses_a_graph_that_scores_differently(synthetic_dataset_dir, tmp_path, monkeypatch):
    """The check on export is real: a graph whose scores differ (here by 1e-3) is an error."""
    import anomalyzoo.deploy as deploy

    trainer, _ = fitted_tiny("padim", synthetic_dataset_dir)
    original = deploy.ExportedModel.score
    monkeypatch.setattr(deploy.ExportedModel, "score",
                        lambda self, images: {k: v * (1 + 1e-3) for k, v in original(self, images).items()})
    with pytest.raises(ExportError, match="relative"):
        export_trainer(trainer, "onnx", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing left to deploy by mistake


def test_predict_on_every_backend_gives_the_checkpoints_scores_and_verdicts(synthetic_dataset_dir, tmp_path, capsys):
    """`anomalyzoo export` then `anomalyzoo predict --backend ...` on a folder (recursively, in
    batches): the same scores, verdicts and maps as the torch checkpoint."""
    import shutil

    from anomalyzoo.cli import main

    trainer, _ = fitted_tiny("patchcore", synthetic_dataset_dir)
    checkpoint = trainer.save_model(tmp_path / "run" / "model.pth")
    test_dir = synthetic_dataset_dir / "mvtec" / "synthetic_object" / "test"
    images = tmp_path / "images"
    for target, source in (("a/0.png", "good/000.png"), ("a/sub/1.png", "missing/000.png"), ("b/2.png", "good/001.png"),
                           ("b/deeper/still/3.png", "scratch/000.png"), ("4.png", "spot/000.png")):
        (images / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(test_dir / source, images / target)
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    runs = {"torch": checkpoint, "onnxruntime": tmp_path / "onnx", "openvino": tmp_path / "onnx",
            "onnxruntime-from-checkpoint": checkpoint}
    results = {}
    for label, model in runs.items():
        output = tmp_path / f"pred_{label}"
        assert main(["predict", "--checkpoint", str(model), str(images), "--backend", label.split("-")[0],
                     "--batch-size", "2", "--output-dir", str(output), "--num-threads", "1"]) == 0
        results[label] = read_rows(output)
    reference = results.pop("torch")
    assert len(reference) == 5  # recursive, three batches
    for label, rows in results.items():
        assert [row["path"] for row in rows] == [row["path"] for row in reference], label
        assert [row["verdict"] for row in rows] == [row["verdict"] for row in reference], label
        scores, expected = (np.array([float(row["score"]) for row in table]) for table in (rows, reference))
        assert relative_gap(scores, expected) <= EXPORT_RTOL, label
        for row, reference_row in zip(rows, reference):
            got_map, expected_map = (np.load(Path(r["map"]).with_suffix(".npy")) for r in (row, reference_row))
            assert relative_gap(got_map, expected_map) <= EXPORT_RTOL, label
    assert "exported" in capsys.readouterr().out  # the on-the-fly export says so


def read_rows(folder: Path) -> list[dict[str, str]]:
    import csv

    with open(folder / "scores.csv") as handle:
        return list(csv.DictReader(handle))


def test_a_tiled_model_exports_with_its_tiling(synthetic_dataset_dir, tmp_path):
    train_values = {"img_size": 64, "batch_size": 4, "tiling": [32, 16], "progress": False}
    trainer = ModelRegistry.get_trainer("stfpm", {"backbone": "resnet18", "pretrained": False}, train_values, device="cpu")
    train_loader, val_loader, test_loader = loaders(synthetic_dataset_dir, {**train_values, "normalize": True})
    trainer.fit(train_loader, val_loader, num_epochs=1)
    images = next(iter(test_loader))["image"][:3]
    expected = trainer.predict(images)
    assert expected["anomaly_map"].shape == (3, 64, 64)
    export_trainer(trainer, "onnx", tmp_path)  # verified on export
    assert json.loads((tmp_path / "metadata.json").read_text())["tiling"] == [32, 16]
    assert_same_outputs(load_exported(tmp_path, "onnxruntime", num_threads=1).score(images), expected, "tiled stfpm")
