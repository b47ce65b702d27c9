"""`predict` on folders: recursive, outputs that mirror the inputs and never collide or overwrite,
unreadable images reported without losing the rest."""

import csv
import shutil
from pathlib import Path

import pytest

from anomalyzoo import train
from anomalyzoo.cli import main
from anomalyzoo.data import ImageReadError
from anomalyzoo.predict import predict_images


@pytest.fixture(scope="module")
def checkpoint(synthetic_dataset_dir, tmp_path_factory) -> Path:
    result = train("mvtec", "synthetic_object", "padim", dataset_dir=synthetic_dataset_dir,
                   output_dir=tmp_path_factory.mktemp("run"), backbone="resnet18", pretrained=False, img_size=64,
                   progress=False, max_maps=0)
    return Path(result["checkpoint"])


@pytest.fixture()
def image_tree(synthetic_dataset_dir, tmp_path) -> Path:
    """line_a/000.png, line_a/sub/000.png, line_b/000.png: the same file name three times."""
    test_dir = synthetic_dataset_dir / "mvtec" / "synthetic_object" / "test"
    root = tmp_path / "images"
    for target, source in (("line_a/000.png", "good/000.png"), ("line_a/sub/000.png", "missing/000.png"),
                           ("line_b/000.png", "good/001.png")):
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(test_dir / source, root / target)
    return root


def read_scores(folder: Path) -> list[dict[str, str]]:
    with open(folder / "scores.csv") as handle:
        return list(csv.DictReader(handle))


def test_folders_are_searched_recursively_and_outputs_mirror_them(checkpoint, image_tree, tmp_path):
    rows = predict_images(checkpoint, [image_tree / "line_a", image_tree / "line_b"], tmp_path / "out", progress=False)
    assert [Path(r["path"]).relative_to(image_tree).as_posix() for r in rows] == ["line_a/000.png", "line_a/sub/000.png",
                                                                                   "line_b/000.png"]
    maps = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*_anomaly_map.png"))
    assert maps == ["line_a/000_anomaly_map.png", "line_a/sub/000_anomaly_map.png", "line_b/000_anomaly_map.png"]
    assert len(list((tmp_path / "out").rglob("*_anomaly_map.npy"))) == 3
    assert [r["map"] for r in read_scores(tmp_path / "out")] == [r["map"] for r in rows]
    # the missing-part image scores above both normal ones
    assert rows[1]["score"] > max(rows[0]["score"], rows[2]["score"])


def test_the_same_file_name_given_twice_gets_two_maps(checkpoint, image_tree, tmp_path):
    files = [image_tree / "line_a" / "000.png", image_tree / "line_b" / "000.png"]
    predict_images(checkpoint, files, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*_anomaly_map.png")) == ["000-2_anomaly_map.png", "000_anomaly_map.png"]


def test_a_second_run_goes_to_a_new_folder_unless_overwrite(checkpoint, image_tree, tmp_path, capsys):
    arguments = ["predict", "--checkpoint", str(checkpoint), str(image_tree), "--output-dir", str(tmp_path / "out")]
    assert main(arguments) == 0
    assert main(arguments) == 0
    assert (tmp_path / "out-2" / "scores.csv").is_file()
    assert f"written to {tmp_path / 'out-2'}" in capsys.readouterr().out
    assert main(arguments + ["--overwrite"]) == 0
    assert not (tmp_path / "out-3").exists()
    assert len(read_scores(tmp_path / "out")) == 3


def test_an_unreadable_image_is_reported_and_the_rest_are_scored(checkpoint, image_tree, tmp_path, capsys):
    (image_tree / "line_b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = predict_images(checkpoint, [image_tree], tmp_path / "out", progress=False)
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert len(rows) == 4 and len(broken) == 1
    assert broken[0]["verdict"] == "error" and "broken.png" in broken[0]["error"]
    assert all(r["error"] == "" and r["verdict"] in ("normal", "anomalous") for r in rows if r is not broken[0])
    assert "broken.png" in {Path(r["path"]).name for r in read_scores(tmp_path / "out") if r["error"]}
    with pytest.raises(ImageReadError, match="broken.png"):
        predict_images(checkpoint, [image_tree], tmp_path / "strict", strict=True, progress=False)
    assert main(["predict", "--checkpoint", str(checkpoint), str(image_tree), "--output-dir", str(tmp_path / "cli")]) == 1
    assert "1 image(s) could not be read" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(checkpoint), str(image_tree), "--strict",
                 "--output-dir", str(tmp_path / "cli_strict")]) == 2
