"""Report layer: figures are written as PNGs, the text report and summary tables hold every row."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyzoo.metrics import compute_metrics, threshold_analysis
from anomalyzoo.report import (
    format_markdown_table,
    save_anomaly_map_figure,
    save_histogram,
    write_summary_tables,
    write_thresholds_report,
)
from anomalyzoo.report.figures import verdict_title

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = np.array([0] * 10 + [1] * 12)
SCORES = np.random.default_rng(0).normal(LABELS.astype(float), 0.6)


def assert_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        return image.size


def test_histogram_is_written_with_thresholds(tmp_path: Path) -> None:
    thresholds = {row.name: row.threshold for row in threshold_analysis(LABELS, SCORES)}
    path = save_histogram(tmp_path / "nested" / "histogram.png", SCORES, LABELS, thresholds, title="mvtec bottle")
    assert path == tmp_path / "nested" / "histogram.png"
    width, height = assert_png(path)
    assert width > 100 and height > 100


def test_histogram_with_one_class_and_equal_scores(tmp_path: Path) -> None:
    assert_png(save_histogram(tmp_path / "h.png", np.full(5, 0.3), np.zeros(5)))


def test_anomaly_map_figure_adds_a_panel_for_the_mask(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:40, 10:30] = True
    anomaly_map = rng.random((64, 64)) * 0.3 + mask
    with_mask = save_anomaly_map_figure(
        tmp_path / "anomaly.png", image, anomaly_map, mask, score=0.9, threshold=0.5, vmin=0.0, vmax=1.3, title="x"
    )
    without_mask = save_anomaly_map_figure(tmp_path / "normal.png", image, anomaly_map, None, score=0.1)
    mask_width, _ = assert_png(with_mask)
    plain_width, _ = assert_png(without_mask)
    assert mask_width > plain_width  # four panels against three


def test_anomaly_map_figure_rejects_mismatched_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image size"):
        save_anomaly_map_figure(tmp_path / "x.png", np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4)), None, 0.0)


def test_verdict_title() -> None:
    assert verdict_title(0.5, 0.5) == "score 0.5000 (threshold 0.5000): ANOMALOUS"
    assert verdict_title(0.4, 0.5, "bottle").endswith("NORMAL")
    assert verdict_title(0.4, None) == "score 0.4000"


def test_thresholds_report_lists_header_metrics_and_rows(tmp_path: Path) -> None:
    metrics = compute_metrics(LABELS, SCORES)
    rows = threshold_analysis(LABELS, SCORES)
    header = {"dataset": "mvtec", "category": "bottle", "model": "patchcore", "epochs": 1, "learning_rate": 1e-5}
    path = write_thresholds_report(tmp_path / "results.txt", metrics, rows, header)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    header_values = {line.split(" : ")[0].strip(): line.split(" : ")[1] for line in lines[2:7]}
    # Small header floats keep their significant digits instead of rounding to 0.0000.
    assert header_values == {
        "dataset": "mvtec",
        "category": "bottle",
        "model": "patchcore",
        "epochs": "1",
        "learning_rate": "1e-05",
    }
    for name, value in metrics.items():
        line = next(line for line in lines if line.startswith(name + " "))
        if value is None:
            assert line.endswith("n/a")
        elif "threshold" not in name:
            assert line.endswith(f"{value:.4f}")
    table_rows = [line for line in lines if line.split() and line.split()[0] in {row.name for row in rows}]
    assert len(table_rows) == len(rows) == 4
    first = table_rows[0].split()
    assert first[0] == rows[0].name and int(first[2]) == rows[0].tp and int(first[5]) == rows[0].fn
    assert "precision" in text and "FPR" in text


def summary_rows() -> list[dict[str, object]]:
    return [
        {"dataset": "mvtec", "category": "bottle", "model": "padim", "image_auroc": 0.987654, "pixel_aupro": None},
        {"dataset": "mvtec", "category": "cable", "model": "patchcore", "image_auroc": 0.9, "pixel_aupro": 0.81234},
        {"dataset": "mvtec", "category": "grid", "model": "draem", "error": "RuntimeError: out of | memory\nat step 3"},
    ]


def test_summary_tables_hold_every_row_and_the_error_column(tmp_path: Path) -> None:
    csv_path, md_path = write_summary_tables(summary_rows(), tmp_path / "summary.csv", tmp_path / "summary.md")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [row["model"] for row in table] == ["padim", "patchcore", "draem"]
    assert list(table[0])[-1] == "error"
    assert table[0]["pixel_aupro"] == "" and table[0]["error"] == ""
    assert float(table[0]["image_auroc"]) == 0.987654  # CSV keeps full precision
    assert table[2]["error"] == "RuntimeError: out of | memory\nat step 3"

    markdown = md_path.read_text(encoding="utf-8")
    lines = markdown.strip().splitlines()
    assert len(lines) == 2 + 3  # header, separator, one line per run
    assert "0.9877" in lines[2] and "—" in lines[2]
    assert "0.8123" in lines[3]
    assert "out of \\| memory at step 3" in lines[4]  # pipe escaped, newline folded
    assert all(line.count(" | ") == lines[0].count(" | ") for line in lines)
    assert markdown.strip() == format_markdown_table(summary_rows(), list(table[0]))


def test_summary_tables_respect_given_columns(tmp_path: Path) -> None:
    columns = ["model", "image_auroc"]
    csv_path, _ = write_summary_tables(summary_rows(), tmp_path / "s.csv", tmp_path / "s.md", columns=columns)
    assert csv_path.read_text(encoding="utf-8").splitlines()[0] == "model,image_auroc"
    assert format_markdown_table(summary_rows(), columns).splitlines()[4].startswith("| draem")
