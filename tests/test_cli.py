import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch

from anomalyzoo.cli import main


def test_list_shows_models_by_family(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "memory:" in out and "patchcore" in out and "epochs=1" in out
    # the paper's step schedule is shown beside the spec's default, never applied silently
    efficientad_line = next(line for line in out.splitlines() if line.strip().startswith("efficientad-small"))
    assert "epochs=20" in efficientad_line
    assert "paper: num_steps=70000" in out and "--set num_steps=70000" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["train", "--dataset", "mvtec", "--category", "bottle", "--model", "patchcor"]) == 2
    assert "Did you mean 'patchcore'" in capsys.readouterr().err


def test_train_then_predict(synthetic_dataset_dir, tmp_path, capsys):
    code = main(["train", "--dataset", "mvtec", "--category", "synthetic_object", "--model", "padim",
                 "--backbone", "resnet18", "--img-size", "64", "--set", "pretrained=False", "--set", "n_features=40",
                 "--dataset-dir", str(synthetic_dataset_dir), "--output-dir", str(tmp_path / "out")])
    assert code == 0
    run_dir = tmp_path / "out" / "mvtec" / "synthetic_object" / "padim"
    checkpoint = run_dir / "model_mvtec_synthetic_object_padim_epochs-1.pth"
    assert checkpoint.is_file()
    images = sorted((synthetic_dataset_dir / "mvtec" / "synthetic_object" / "test" / "good").glob("*.png"))[:2]
    images += sorted((synthetic_dataset_dir / "mvtec" / "synthetic_object" / "test" / "missing").glob("*.png"))[:1]
    assert main(["predict", "--checkpoint", str(checkpoint), *map(str, images), "--output-dir", str(tmp_path / "pred")]) == 0
    with open(tmp_path / "pred" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == list(map(str, images))
    assert all(r["verdict"] in ("normal", "anomalous") for r in rows)
    assert (tmp_path / "pred" / f"{images[0].stem}_anomaly_map.png").is_file()

    # the default threshold is the label-free one stored at training; 0.5 is that threshold
    # on the normalised scale; "f1" and a number are used as asked
    from anomalyzoo.predict import load_trainer

    trainer = load_trainer(checkpoint)
    statistics = trainer.normal_statistics
    assert trainer.threshold_source == "normal_val_p99" and trainer.threshold == statistics.image_threshold
    for row in rows:
        assert row["threshold_name"] == "normal_val_p99"
        assert float(row["threshold"]) == pytest.approx(statistics.image_threshold)
        assert (row["verdict"] == "anomalous") == (float(row["score"]) >= statistics.image_threshold)
        assert (float(row["normalized_score"]) >= 0.5) == (float(row["score"]) >= statistics.image_threshold)
    assert main(["predict", "--checkpoint", str(checkpoint), *map(str, images), "--output-dir", str(tmp_path / "pred_f1"),
                 "--threshold", "f1"]) == 0
    with open(tmp_path / "pred_f1" / "scores.csv") as handle:
        f1_rows = list(csv.DictReader(handle))
    assert {r["threshold_name"] for r in f1_rows} == {"f1_optimal"}
    assert float(f1_rows[0]["threshold"]) == pytest.approx(trainer.thresholds["f1_optimal"])
    assert main(["predict", "--checkpoint", str(checkpoint), str(images[0]), "--output-dir", str(tmp_path / "pred_value"),
                 "--threshold=-1e9"]) == 0
    with open(tmp_path / "pred_value" / "scores.csv") as handle:
        assert next(csv.DictReader(handle))["verdict"] == "anomalous"
    assert main(["predict", "--checkpoint", str(checkpoint), str(images[0]), "--threshold", "best"]) == 2
    assert "threshold must be 'normal', 'f1' or a number" in capsys.readouterr().err


def test_demo_runs_offline_with_the_default_settings(tmp_path, lite0_weights, capsys):
    """README step 1: `anomalyzoo demo --output-dir DIR` trains PatchCore and PaDiM on generated data."""
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0 with ImageNet weights" in out
    outputs = tmp_path / "demo" / "outputs" / "mvtec"
    for category in ("synthetic_texture", "synthetic_object"):
        for model in ("patchcore", "padim"):
            assert (outputs / category / model / "metrics.json").is_file()
    assert (tmp_path / "demo" / "outputs" / "summary.md").is_file()


def test_console_script_is_installed():
    beside_python = os.path.join(os.path.dirname(sys.executable), "anomalyzoo")
    executable = beside_python if os.path.isfile(beside_python) else shutil.which("anomalyzoo")
    if executable is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the `anomalyzoo` console script is not on PATH after `pip install`")
        pytest.skip("package not installed with pip in this environment")
    result = subprocess.run([executable, "list"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "patchcore" in result.stdout


def test_distill_teacher_command_writes_a_teacher_and_never_overwrites_it(synthetic_dataset_dir, lite0_weights, tmp_path, capsys):
    images = synthetic_dataset_dir / "mvtec" / "synthetic_texture" / "train" / "good"
    arguments = ["distill-teacher", "--images", str(images), "--backbone", "efficientnet_lite0", "--num-steps", "2",
                 "--batch-size", "2", "--img-size", "64", "--backbone-dir", str(tmp_path)]
    assert main(arguments) == 0
    teacher = tmp_path / "efficientad" / "pretrained_teacher_small.pth"
    assert teacher.is_file()
    written = teacher.stat().st_mtime_ns
    assert main(arguments) == 2
    assert "already exists" in capsys.readouterr().err
    assert teacher.stat().st_mtime_ns == written


def test_pretrain_dsr_command_writes_the_vq_model_dsr_loads_and_never_overwrites_it(synthetic_dataset_dir, tmp_path, capsys):
    images = synthetic_dataset_dir / "mvtec" / "synthetic_texture" / "train" / "good"
    arguments = ["pretrain-dsr", "--images", str(images), "--num-steps", "1", "--batch-size", "2", "--img-size", "64",
                 "--backbone-dir", str(tmp_path)]
    assert main(arguments) == 0
    vq_file = tmp_path / "dsr" / "vq_model_pretrained_128_4096.pckl"
    assert "DSR VQ-VAE written to" in capsys.readouterr().out
    from anomalyzoo.models.dsr import DsrModel
    from anomalyzoo.settings import set_globals

    set_globals(backbone_dir=tmp_path)
    model = DsrModel(pretrained=True)  # the spec's sizes: 128-d codes, 4096 per codebook
    state = torch.load(vq_file, weights_only=True)
    assert torch.equal(model.vq_model._vq_vae_top.codebook, state["_vq_vae_top._embedding.weight"])
    written = vq_file.stat().st_mtime_ns
    assert main(arguments) == 2
    assert "already exists" in capsys.readouterr().err
    assert vq_file.stat().st_mtime_ns == written
