"""The HTML report (anomalyzoo.report.html) over a real sweep: every run has its row and its
images, the page is self-contained, and it loads (scripts included) in a real headless Chromium."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyzoo import train_models
from anomalyzoo.cli import main
from anomalyzoo.data.synthetic import make_synthetic_dataset
from anomalyzoo.report.html import read_threshold_rows, write_html_report
from anomalyzoo.report.run import read_thresholds_csv
from anomalyzoo.report.runs import find_runs

CATEGORIES = ["report_texture", "report_object"]
MODELS = ["padim", "dfkde"]  # one with anomaly maps, one that scores whole images only
FAST = {"backbone": "resnet18", "pretrained": False, "img_size": 64, "max_maps": 2}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory) -> Path:
    """2 models x 2 categories that finish, and a third category whose data is missing (2 failed jobs)."""
    data = tmp_path_factory.mktemp("report_data")
    for category, kind in zip(CATEGORIES, ("texture", "object")):
        make_synthetic_dataset(data / "mvtec", category=category, kind=kind, n_train=20, n_test_good=4,
                               n_test_defect=6, image_size=64, seed=5)
    root = tmp_path_factory.mktemp("report_sweep")
    rows = train_models("mvtec", [*CATEGORIES, "report_missing"], MODELS, output_dir=root, dataset_dir=data, **FAST)
    assert [row["status"] for row in rows] == ["done"] * 4 + ["failed"] * 2
    return root


class PageParser(HTMLParser):
    """Collects what a reader would check: the rows of each table, each run's section and its images."""

    def __init__(self) -> None:
        super().__init__()
        self.table_rows: dict[str, list[dict]] = {}
        self.sections: dict[str, dict] = {}
        self.links: list[str] = []
        self._table: str | None = None
        self._row: dict | None = None
        self._section: str | None = None
        self._text_target: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        for name in ("src", "href"):
            if attributes.get(name):
                self.links.append(attributes[name])
        if tag == "table" and attributes.get("id"):
            self._table = attributes["id"]
            self.table_rows[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = {"attrs": attributes, "cells": []}
        elif tag == "td" and self._row is not None:
            self._row["cells"].append("")
        elif tag == "details" and attributes.get("data-run") is not None:
            self._section = attributes["data-run"]
            self.sections[self._section] = {"images": [], "text": []}
        elif tag == "img" and self._section is not None:
            self.sections[self._section]["images"].append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            if self._row["cells"]:
                self.table_rows[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._row["cells"]:
            self._row["cells"][-1] += data
        if self._section is not None:
            self.sections[self._section]["text"].append(data)


def parse(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    return parser


def decode_image(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header[:40]
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image


def test_the_page_has_every_runs_row_and_images_and_nothing_from_outside(sweep_root):
    path = write_html_report(sweep_root)
    assert path == sweep_root / "report.html"
    page = parse(path.read_text(encoding="utf-8"))
    records = find_runs(sweep_root)
    assert len(records) == 6
    run_rows = {row["attrs"]["data-run"]: row for row in page.table_rows["runs"]}
    assert set(run_rows) == {record.relative for record in records} == set(page.sections)
    assert {row["attrs"].get("data-model") for row in page.table_rows["models"]} == set(MODELS)
    assert [row["cells"][0] for row in page.table_rows["matrix"]] == MODELS
    assert all("failed" in row["cells"] for row in page.table_rows["matrix"])  # the missing category's column
    for record in records:
        row, section = run_rows[record.relative], page.sections[record.relative]
        kinds = [image["data-kind"] for image in section["images"]]
        if record.status == "failed":
            assert "report_missing" in row["cells"][-1] and "failed" in row["cells"]
            assert any("report_missing" in text for text in section["text"]) and not kinds
            continue
        assert f"{record.metrics['image_auroc']:.4f}" in row["cells"]
        assert kinds.count("histogram") == 1
        assert kinds.count("worst-normal") == 2 and kinds.count("hidden-defect") == 2  # max_maps=2
        sizes = {image["data-kind"]: decode_image(image["src"]).size for image in section["images"]}
        assert sizes["histogram"][0] > 300
        # a map model's figure has image, map, overlay (and mask); an image-level model's only image (and mask)
        wide = record.model == "padim"
        assert (sizes["hidden-defect"][0] > 2 * sizes["hidden-defect"][1]) == wide
        assert any("normal_val_p99" in text for text in section["text"])  # the threshold table
    assert page.links and all(link.startswith(("data:image/", "#")) for link in page.links)


def test_the_run_folders_hold_the_scores_and_hardest_images_the_report_draws(sweep_root):
    record = next(r for r in find_runs(sweep_root) if r.model == "padim")
    with next(record.folder.glob("scores_*.csv")).open(newline="") as handle:
        scores = list(csv.DictReader(handle))
    assert len(scores) == record.metrics["num_test_images"] == 10
    threshold = record.metrics["threshold"]
    for row in scores:
        assert row["verdict"] == ("anomalous" if float(row["score"]) >= threshold else "normal")
    normal = sorted((float(r["score"]) for r in scores if r["label"] == "0"), reverse=True)
    anomalous = sorted(float(r["score"]) for r in scores if r["label"] == "1")
    with np.load(next(record.folder.glob("hardest_*.npz"))) as hardest:
        assert hardest["score"].tolist() == pytest.approx(normal[:2] + anomalous[:2])
        assert hardest["image"].shape == (4, 64, 64, 3) and hardest["anomaly_map"].shape == (4, 64, 64)
        assert hardest["mask"][2:].any() and float(hardest["threshold"]) == pytest.approx(threshold)
    # the threshold table in CSV is the one in the results text
    from_text = read_threshold_rows(record.folder)
    assert from_text is not None
    results_rows = read_thresholds_csv(next(record.folder.glob("thresholds_*.csv")))
    assert [row.name for row in results_rows][-1] == "normal_val_p99"
    assert [(row.name, row.tp, row.fp, row.tn, row.fn) for row in results_rows] == \
        [(row.name, row.tp, row.fp, row.tn, row.fn) for row in from_text]


def test_a_run_made_before_the_report_files_existed_still_gets_its_row_and_figures(sweep_root, tmp_path):
    record = next(r for r in find_runs(sweep_root) if r.model == "padim")
    old_run = tmp_path / "mvtec" / "bottle" / "padim"
    shutil.copytree(record.folder, old_run)
    for pattern in ("scores_*.csv", "thresholds_*.csv", "hardest_*.npz", "sweep_job.*"):
        for path in old_run.glob(pattern):
            path.unlink()
    rows = read_threshold_rows(old_run)  # parsed from the results text
    assert [row.name for row in rows] == [row.name for row in read_thresholds_csv(next(record.folder.glob("thresholds_*.csv")))]
    page = parse(write_html_report(tmp_path).read_text(encoding="utf-8"))
    section = page.sections["mvtec/bottle/padim"]
    assert [image["data-kind"] for image in section["images"]] == ["histogram", "first-images", "first-images",
                                                                   "first-images", "first-images"]
    assert any("hardest_*.npz" in text for text in section["text"])


def test_report_command_writes_the_page_and_opens_it(sweep_root, tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda uri: opened.append(uri) or True)
    output = tmp_path / "page.html"
    assert main(["report", str(sweep_root), "--output", str(output), "--open"]) == 0
    assert output.is_file() and opened == [output.resolve().as_uri()]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2  # a clear error, not a blank page


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        binary = shutil.which(name)
        if binary:
            return binary
    pytest.skip("Chromium is not installed, so the report was checked as HTML only: `apt-get install -y chromium` "
                "(.ci/run installs it where apt-get can) to load it in a real browser")


def run_chromium(binary: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000",
                             "--virtual-time-budget=5000", *arguments], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_the_page_loads_in_a_real_browser_sorts_its_tables_and_shows_them(sweep_root, chromium, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(sweep_root, root)
    # one more run folder, found after the sweep's own (failed) jobs: in the page's HTML its row comes
    # last, so only the page's script, sorting by image AUROC on load, can move it up among the values
    extra = root / "mvtec" / "zz_extra" / "padim"
    extra.mkdir(parents=True)
    (extra / "metrics.json").write_text(json.dumps({"dataset": "mvtec", "category": "zz_extra", "model": "padim",
                                                    "image_auroc": 0.25, "train_config": {"seed": 1}}))
    path = write_html_report(root)
    served = [row["cells"][5] for row in parse(path.read_text(encoding="utf-8")).table_rows["runs"]]
    assert served[-3:] == ["—", "—", "0.2500"]
    dom = run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", path.resolve().as_uri()).stdout
    assert 'data-sorted="yes"' in dom  # the page's script ran to its end
    page = parse(dom)
    # on load the runs are sorted by image AUROC, best first, runs without a value last
    values = [row["cells"][5] for row in page.table_rows["runs"]]
    numbers = [float(value) for value in values if value != "—"]
    assert numbers == sorted(numbers, reverse=True) and len(numbers) == 5 and values[5:] == ["—", "—"]
    assert numbers[-1] == 0.25
    uri = path.resolve().as_uri()
    screenshot = tmp_path / "report.png"
    run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={screenshot}", uri)
    with Image.open(screenshot) as image:
        assert image.size == (1400, 1000)
        pixels = np.asarray(image.convert("RGB"))
    # the leaderboard's coloured cells (green for AUROC 1.0) and dark text are on the first screen
    green = (pixels[..., 1] > pixels[..., 0] + 40) & (pixels[..., 1] > pixels[..., 2] + 20)
    dark = pixels.max(axis=-1) < 80
    assert green.sum() > 2000 and dark.sum() > 2000
