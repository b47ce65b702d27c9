"""``anomalyzoo report OUTPUT_DIR``: one self-contained HTML page over every run in a folder.

The page needs no server and no network: its images are embedded as ``data:`` URIs, its style and
its few lines of script (click a column header to sort) are inline. It shows

- a leaderboard: models ranked by their mean over the categories, a model x category matrix of
  image AUROC, and every run (model x category x seed) with image AUROC, pixel AUROC, AUPRO, the
  best image F1, fit time and ms per image; each table sorts by any column;
- per run: the facts a reader needs to trust the numbers (threshold and where it came from, epochs,
  image counts, device), the score histogram, the threshold table, and the images the model gets
  most wrong: the highest-scored normal images (the false alarms to expect first) and the
  lowest-scored defects (the ones it hides best), each with its anomaly map and overlay, drawn as
  the run's own figures are (same colour range, same threshold contour);
- per failed run: its error, traceback and the end of its log.

Everything comes from the run folders (:mod:`anomalyzoo.report.runs`): ``metrics.json``, the
histogram PNG, ``thresholds_*.csv`` and ``hardest_*.npz``. A run made before those two files existed
still gets its row, its histogram and its first-image figures, with a note saying what is missing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalyzoo.metrics.thresholds import ThresholdRow
from anomalyzoo.report.figures import anomaly_map_figure, figure_bytes, image_figure
from anomalyzoo.report.run import HARDEST_PER_CLASS, read_thresholds_csv
from anomalyzoo.report.runs import JOB_LOG_FILE, RunRecord, find_runs

REPORT_FILE = "report.html"
EXAMPLE_DPI = 80  # the figures are 16 x 4.4 inches: about 1300 px wide, shown at the page's width
MAX_EMBEDDED_WIDTH = 1000
LOG_TAIL_LINES = 40
_METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "AUPRO"),
            ("image_f1_max", "image F1"))
_COSTS = (("fit_seconds", "fit s"), ("inference_ms_per_image", "ms/img"))

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1d2330; background: #fafbfc; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 2px solid #d8dde6; }
.meta { color: #5a6475; margin-top: 0; }
table { border-collapse: collapse; margin: .6rem 0 1rem; background: white; font-size: .9rem; }
th, td { border: 1px solid #d8dde6; padding: .3rem .55rem; text-align: right; white-space: nowrap; }
th { background: #eef1f6; position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; font-size: .7em; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; font-size: .7em; }
td.text, th.text { text-align: left; }
tr.failed td, tr.interrupted td, tr.running td, tr.pending td { background: #fff1f0; }
.status-done { color: #1a7f37; } .status-failed, .status-interrupted { color: #c0262d; font-weight: 600; }
.status-running, .status-pending { color: #9a6700; }
td.error { min-width: 18rem; max-width: 30rem; white-space: normal; text-align: left; font-size: .8rem; }
details.run { background: white; border: 1px solid #d8dde6; border-radius: 6px; margin: .8rem 0; padding: .4rem .9rem; }
details.run > summary { cursor: pointer; font-size: 1.05rem; font-weight: 600; padding: .3rem 0; }
.facts { columns: 2; font-size: .9rem; margin: .4rem 0; } .facts div { break-inside: avoid; }
.facts b { display: inline-block; min-width: 12rem; font-weight: 500; color: #5a6475; }
figure { margin: .5rem 0 1rem; } figcaption { font-size: .85rem; color: #5a6475; }
img { max-width: 100%; height: auto; border: 1px solid #e3e7ee; }
img.histogram { max-width: 640px; }
tr.used td { font-weight: 700; background: #f0f7ff; }
pre { background: #f3f4f6; padding: .6rem; overflow-x: auto; font-size: .8rem; max-height: 24rem; }
.note { color: #7a5a00; font-size: .9rem; }
"""

_SCRIPT = """
function sortKey(cell) {
  const value = cell.dataset.value;
  if (value === undefined || value === "") return null;
  const number = Number(value);
  return Number.isNaN(number) ? value.toLowerCase() : number;
}
function sortTable(table, column, order) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = sortKey(a.cells[column]), y = sortKey(b.cells[column]);
    if (x === null || y === null) return (x === null) - (y === null);  // missing values last, either way
    const c = x < y ? -1 : x > y ? 1 : 0;
    return order === "asc" ? c : -c;
  });
  rows.forEach(row => body.appendChild(row));
  Array.from(table.tHead.rows[0].cells).forEach((th, i) =>
    th.setAttribute("aria-sort", i === column ? (order === "asc" ? "ascending" : "descending") : "none"));
}
document.querySelectorAll("table.sortable").forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach((th, column) => th.addEventListener("click", () =>
    sortTable(table, column, th.getAttribute("aria-sort") === "descending" ? "asc" : "desc")));
  if (table.dataset.sortColumn !== undefined) sortTable(table, Number(table.dataset.sortColumn), table.dataset.sortOrder);
});
function openTarget() {
  const target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
  if (target && target.tagName === "DETAILS") target.open = true;
}
window.addEventListener("hashchange", openTarget);
openTarget();
document.documentElement.dataset.sorted = "yes";
"""


# ----------------------------------------------------------------------------------- small parts
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_file_uri(path: Path, max_width: int = MAX_EMBEDDED_WIDTH) -> str:
    """A PNG file as a data URI; figures wider than ``max_width`` are scaled down to it (as JPEG)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if image.width <= max_width:
            return data_uri(data, "image/png")
        height = round(image.height * max_width / image.width)
        buffer = io.BytesIO()
        image.convert("RGB").resize((max_width, height), Image.LANCZOS).save(buffer, format="JPEG", quality=85)
    return data_uri(buffer.getvalue(), "image/jpeg")


def run_anchor(record: RunRecord) -> str:
    return "run-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", record.relative).strip("-")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _format(value: Any, key: str) -> str:
    number = _number(value)
    if number is None:
        return "—" if value is None else _e(value)
    if key in ("fit_seconds", "inference_ms_per_image"):
        return f"{number:.2f}" if number < 100 else f"{number:.0f}"
    return f"{number:.4f}"


def _cell(value: Any, key: str, colour: bool = False) -> str:
    number = _number(value)
    style = ""
    if colour and number is not None:  # 0.5 (chance) red to 1.0 green
        hue = 120 * min(max((number - 0.5) / 0.5, 0.0), 1.0)
        style = f' style="background: hsl({hue:.0f}, 65%, 84%)"'
    sort_value = "" if number is None else repr(number)
    return f'<td data-value="{sort_value}"{style}>{_format(value, key)}</td>'


def _text_cell(value: Any, css: str = "text") -> str:
    text = "" if value is None else str(value)
    return f'<td class="{css}" data-value="{_e(text)}">{_e(text) or "—"}</td>'


def _header(columns: Sequence[tuple[str, bool]]) -> str:
    return "<thead><tr>" + "".join(f'<th class="{"text" if text else ""}">{_e(name)}</th>'
                                   for name, text in columns) + "</tr></thead>"


def _mean(values: list[Any]) -> float | None:
    numbers = [n for n in (_number(v) for v in values) if n is not None]
    return sum(numbers) / len(numbers) if numbers else None


def _category_label(record: RunRecord, several_datasets: bool) -> str:
    return f"{record.dataset}/{record.category}" if several_datasets else str(record.category)


# ------------------------------------------------------------------------------------- leaderboard
def model_table(records: list[RunRecord]) -> str:
    """Models ranked by the mean over their finished runs (all categories and seeds)."""
    models = list(dict.fromkeys(str(r.model) for r in records))
    keys = [key for key, _ in _METRICS + _COSTS]
    columns = [("model", True), ("runs done", False)] + [(f"mean {name}", False) for _, name in _METRICS + _COSTS]
    rows = []
    for model in models:
        runs = [r for r in records if str(r.model) == model]
        done = [r for r in runs if r.status == "done"]
        cells = [_text_cell(model), f'<td data-value="{len(done)}">{len(done)} / {len(runs)}</td>']
        cells += [_cell(_mean([r.metrics.get(key) for r in done]), key, colour=key in dict(_METRICS)) for key in keys]
        rows.append(f'<tr data-model="{_e(model)}">' + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="models" data-sort-column="2" data-sort-order="desc">{_header(columns)}'
            f'<tbody>{"".join(rows)}</tbody></table>')


def matrix_table(records: list[RunRecord], several_datasets: bool, key: str = "image_auroc") -> str:
    """Model x category, each cell the mean over seeds of ``key`` ("failed" where no run finished)."""
    models = list(dict.fromkeys(str(r.model) for r in records))
    categories = list(dict.fromkeys(_category_label(r, several_datasets) for r in records))
    columns = [("model", True)] + [(category, False) for category in categories] + [("mean", False)]
    rows = []
    for model in models:
        cells, means = [_text_cell(model)], []
        for category in categories:
            runs = [r for r in records if str(r.model) == model and _category_label(r, several_datasets) == category]
            value = _mean([r.metrics.get(key) for r in runs if r.status == "done"])
            if value is None and runs and any(r.status != "done" for r in runs):
                cells.append('<td data-value="" class="status-failed">failed</td>')
            else:
                cells.append(_cell(value, key, colour=True))
            means.append(value)
        cells.append(_cell(_mean(means), key, colour=True))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="matrix" data-sort-column="{len(columns) - 1}" data-sort-order="desc">'
            f'{_header(columns)}<tbody>{"".join(rows)}</tbody></table>')


def runs_table(records: list[RunRecord]) -> str:
    """One row per run, linked to its section."""
    columns = [("dataset", True), ("category", True), ("model", True), ("seed", False), ("status", True)]
    columns += [(name, False) for _, name in _METRICS + _COSTS] + [("error", True)]
    rows = []
    for record in records:
        metrics = record.metrics or {}
        link = f'<a href="#{_e(run_anchor(record))}">{_e(record.model)}</a>'
        cells = [_text_cell(record.dataset), _text_cell(record.category),
                 f'<td class="text" data-value="{_e(record.model)}">{link}</td>',
                 f'<td data-value="{"" if record.seed is None else record.seed}">{_e("—" if record.seed is None else record.seed)}</td>',
                 _text_cell(record.status, f"text status-{record.status}")]
        cells += [_cell(metrics.get(key), key, colour=key in dict(_METRICS)) for key, _ in _METRICS + _COSTS]
        error = " ".join(str(record.error or "").split())
        cells.append(f'<td class="error" data-value="{_e(error)}" title="{_e(error)}">{_e(error[:160])}</td>')
        rows.append(f'<tr class="{_e(record.status)}" data-run="{_e(record.relative)}">' + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="runs" data-sort-column="5" data-sort-order="desc">{_header(columns)}'
            f'<tbody>{"".join(rows)}</tbody></table>')


# ---------------------------------------------------------------------------------------- one run
def _first(folder: Path, pattern: str) -> Path | None:
    matches = sorted(folder.glob(pattern))
    return matches[0] if matches else None


def read_threshold_rows(folder: Path) -> list[ThresholdRow] | None:
    """The run's threshold table: its CSV, else the table in its results text (older runs)."""
    table = _first(folder, "thresholds_*.csv")
    if table is not None:
        return read_thresholds_csv(table)
    results = _first(folder, "results_*_thresholds.txt")
    if results is None:
        return None
    rows: list[ThresholdRow] = []
    lines = results.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.split()[:2] == ["name", "threshold"]), None)
    if start is None:
        return None
    for line in lines[start + 2:]:
        fields = line.split()
        if len(fields) != 10:
            break
        try:
            rows.append(ThresholdRow(fields[0], float(fields[1]), *map(int, fields[2:6]), *map(float, fields[6:])))
        except ValueError:
            break
    return rows


def threshold_table(rows: list[ThresholdRow], used: str | None) -> str:
    columns = [("name", True), ("threshold", False), ("TP", False), ("FP", False), ("TN", False), ("FN", False),
               ("precision", False), ("recall", False), ("FPR", False), ("F1", False)]
    body = []
    for row in rows:
        cells = [_text_cell(row.name), f'<td data-value="{row.threshold!r}">{row.threshold:.6g}</td>']
        cells += [f'<td data-value="{value}">{value}</td>' for value in (row.tp, row.fp, row.tn, row.fn)]
        cells += [f'<td data-value="{value!r}">{value:.4f}</td>' for value in (row.precision, row.recall, row.fpr, row.f1)]
        css = ' class="used"' if row.name == used else ""
        body.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    return f'<table class="sortable thresholds">{_header(columns)}<tbody>{"".join(body)}</tbody></table>'


def example_figures(path: Path, max_examples: int) -> dict[str, list[tuple[str, str]]]:
    """From ``hardest_*.npz``: ``{"worst-normal": [(data URI, caption)], "hidden-defect": [...]}``."""
    with np.load(path, allow_pickle=False) as stored:
        data = {key: stored[key] for key in stored.files}
    threshold = float(data["threshold"])
    threshold = None if math.isnan(threshold) else threshold
    vmin, vmax = (None, None) if np.isnan(data["map_range"]).any() else map(float, data["map_range"])
    figures: dict[str, list[tuple[str, str]]] = {"worst-normal": [], "hidden-defect": []}
    for i in range(len(data["index"])):
        label = int(data["label"][i])
        kind = "hidden-defect" if label == 1 else "worst-normal"
        if len(figures[kind]) >= max_examples:
            continue
        name = Path(str(data["path"][i])).name
        mask = data["mask"][i] if "mask" in data and label == 1 else None
        score = float(data["score"][i])
        if "anomaly_map" in data:
            figure = anomaly_map_figure(data["image"][i], data["anomaly_map"][i], mask, score, threshold, vmin, vmax, name)
        else:
            figure = image_figure(data["image"][i], mask, score, threshold, name)
        rank = len(figures[kind]) + 1
        what = "highest-scored normal image" if label == 0 else "lowest-scored defect"
        caption = f"{what} #{rank}: {data['path'][i]} (score {score:.6g})"
        figures[kind].append((data_uri(figure_bytes(figure, "jpeg", EXAMPLE_DPI), "image/jpeg"), caption))
    return figures


def _facts(record: RunRecord) -> str:
    metrics = record.metrics or {}
    facts = {
        "threshold (used by predict)": (f"{metrics['threshold']:.6g} ({metrics.get('threshold_source')})"
                                         if _number(metrics.get("threshold")) is not None else None),
        "false alarms / recall at it": (f"{metrics['normal_threshold_fpr']:.3f} / {metrics['normal_threshold_recall']:.3f}"
                                         if _number(metrics.get("normal_threshold_fpr")) is not None else None),
        "image AP / pixel AP": " / ".join(_format(metrics.get(k), k) for k in ("image_ap", "pixel_ap")),
        "epochs / steps": f"{metrics.get('num_epochs')} / {metrics.get('num_steps')}",
        "images train / val / test": (f"{metrics.get('num_train_images')} / {metrics.get('num_val_images')} / "
                                      f"{metrics.get('num_test_images')}"),
        "img size / seed": f"{(metrics.get('train_config') or {}).get('img_size')} / {record.seed}",
        "fit / inference": f"{_format(metrics.get('fit_seconds'), 'fit_seconds')} s / "
                           f"{_format(metrics.get('inference_ms_per_image'), 'inference_ms_per_image')} ms per image",
        "peak memory": (f"{metrics['peak_memory_mb']:.0f} MiB" if _number(metrics.get("peak_memory_mb")) else None),
        "device": metrics.get("device"),
        "folder": str(record.folder),
    }
    for key, value in (metrics.get("notes") or {}).items():
        facts[str(key)] = value
    return '<div class="facts">' + "".join(f"<div><b>{_e(k)}</b> {_e(v)}</div>" for k, v in facts.items()
                                           if v is not None) + "</div>"


def _figures(kind: str, items: list[tuple[str, str]]) -> str:
    return "".join(f'<figure><img data-kind="{kind}" src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'
                   for uri, caption in items)


def run_section(record: RunRecord, max_examples: int, open_section: bool) -> str:
    metrics = record.metrics or {}
    headline = f"{record.model} on {record.dataset}/{record.category}, seed {record.seed}: {record.status}"
    if record.status == "done":
        headline += " — " + ", ".join(f"{name} {_format(metrics.get(key), key)}" for key, name in _METRICS[:3])
    parts = [f'<details class="run" id="{_e(run_anchor(record))}" data-run="{_e(record.relative)}"'
             f'{" open" if open_section else ""}><summary>{_e(headline)}</summary>']
    if record.status != "done":
        parts.append(f'<p class="status-{_e(record.status)}">{_e(record.error or record.status)}</p>')
        trace = (record.job or {}).get("traceback")
        if trace:
            parts.append(f"<details><summary>traceback</summary><pre>{_e(trace)}</pre></details>")
        log = record.folder / JOB_LOG_FILE
        if log.is_file():
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:])
            parts.append(f"<details><summary>end of {JOB_LOG_FILE}</summary><pre>{_e(tail)}</pre></details>")
        parts.append(f'<div class="facts"><div><b>folder</b> {_e(record.folder)}</div></div></details>')
        return "".join(parts)
    parts.append(_facts(record))
    histogram = _first(record.folder, "histogram_*_scores.png")
    if histogram is not None:
        parts.append(f'<h4>Score histogram</h4><figure><img class="histogram" data-kind="histogram" '
                     f'src="{image_file_uri(histogram)}" alt="score histogram"></figure>')
    rows = read_threshold_rows(record.folder)
    if rows:
        parts.append("<h4>Thresholds</h4>" + threshold_table(rows, metrics.get("threshold_source")))
        parts.append('<p class="note">f1_optimal, normal_p95/p99 and zero_miss are chosen on the test labels (what was '
                     'possible); normal_val_p* on held-out normal training images only (what to expect when deployed). '
                     'The bold row is the one predict uses.</p>')
    hardest = _first(record.folder, "hardest_*.npz")
    if hardest is not None:
        figures = example_figures(hardest, max_examples)
        parts.append("<h4>Highest-scored normal images (false alarms first)</h4>"
                     + (_figures("worst-normal", figures["worst-normal"]) or '<p class="note">no normal test image</p>'))
        parts.append("<h4>Best-hidden defects (lowest-scored anomalous images)</h4>"
                     + (_figures("hidden-defect", figures["hidden-defect"]) or '<p class="note">no defective test image</p>'))
    else:
        first = sorted(record.folder.glob("image_*_normal_*.png"))[:max_examples] + \
            sorted(record.folder.glob("image_*_anomaly_*.png"))[:max_examples]
        parts.append('<p class="note">This run has no hardest_*.npz (made by an older anomalyzoo, or with max_maps=0): '
                     'the first test images of each class are shown instead.</p>')
        parts.append(_figures("first-images", [(image_file_uri(path), path.name) for path in first]))
    parts.append("</details>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ page
def render_report(records: list[RunRecord], title: str, max_examples: int = HARDEST_PER_CLASS) -> str:
    several_datasets = len({r.dataset for r in records}) > 1
    counts: dict[str, int] = {}
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    count_text = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no runs"
    open_sections = len(records) <= 8
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{len(records)} run(s): {_e(count_text)}. Written {time.strftime("%Y-%m-%d %H:%M")}. '
        "Click a column header to sort.</p>",
        "<h2>Leaderboard</h2><h3>Models (mean over their finished runs)</h3>", model_table(records),
        "<h3>Image AUROC, model x category</h3>", matrix_table(records, several_datasets),
        "<h3>Every run</h3>", runs_table(records),
        "<h2>Runs</h2>",
        *(run_section(record, max_examples, open_sections) for record in records),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
            + "\n".join(body) + f"<script>{_SCRIPT}</script></body></html>\n")


def write_html_report(root: str | Path, output: str | Path | None = None,
                      max_examples: int = HARDEST_PER_CLASS) -> Path:
    """Write the report of every run under ``root`` to ``output`` (default ``root/report.html``;
    the page is derived from the run folders, so an older one is replaced)."""
    root = Path(root)
    records = find_runs(root)
    if not records:
        raise FileNotFoundError(f"No runs under {root}: a run folder holds metrics.json (or a sweep's sweep_job.json). "
                                "Give the OUTPUT_DIR of a sweep or of train() runs.")
    output = Path(output) if output is not None else root / REPORT_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_report(records, f"anomalyzoo report: {root.resolve().name}", max_examples),
                      encoding="utf-8")
    return output
