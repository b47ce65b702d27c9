"""The run folders under an output folder, read back: what the summary tables and the HTML report show.

A run folder is one ``train()`` run (``OUTPUT_DIR/<dataset>/<category>/<model>/``). It holds
``metrics.json`` once the run has finished: ``train()`` writes it last, so a readable
``metrics.json`` is what "finished" means everywhere in the library. A sweep's job
(:mod:`anomalyzoo.sweep`) also keeps ``sweep_job.json`` beside it (status, attempts, error and
traceback) and, under the parallel executors, its output in ``sweep_job.log``; the sweep's folder has
the manifest ``sweep.json`` (every job and its folder) and, while a sweep runs there, holds the lock
on ``.sweep.lock``. Everything here only reads files, so the tables can be rebuilt at any time,
during a sweep too, from what is on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalyzoo.report.summary import format_markdown_table, write_summary_tables

MANIFEST_FILE = "sweep.json"
JOB_FILE = "sweep_job.json"
JOB_LOG_FILE = "sweep_job.log"
LOCK_FILE = ".sweep.lock"
METRICS_FILE = "metrics.json"
SUMMARY_STEM = "summary"

METRIC_COLUMNS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "fit_seconds", "inference_ms_per_image")
SUMMARY_COLUMNS = ("dataset", "category", "model", "seed", "status", *METRIC_COLUMNS, "folder", "error")

# what a job's record says while no sweep holds the folder's lock any more: it never reported back
INTERRUPTED_ERROR = ("interrupted: the job was still running when its sweep stopped (the sweep was killed or "
                     "interrupted); it left no result. Re-run the sweep to run it again.")
NOT_STARTED_ERROR = "interrupted: the sweep stopped before this job started. Re-run the sweep to run it."


def read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(content, None)``, ``(None, None)`` when the file is missing, ``(None, reason)`` when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as error:
        return None, f"{path} cannot be read: {error}"
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"{path} is not valid JSON ({error}): the run was cut off while writing it"
    if not isinstance(content, dict):
        return None, f"{path} does not hold a JSON object"
    return content, None


@dataclass
class RunRecord:
    """One run folder as found on disk: its metrics when finished, its sweep job record when it has one."""

    folder: Path
    relative: str  # folder relative to the output folder (posix), the run's name in tables and the report
    status: str  # done | failed | running | queued | interrupted | pending
    metrics: dict[str, Any] | None
    job: dict[str, Any] | None
    error: str | None = None

    def value(self, key: str) -> Any:
        for source in (self.metrics, self.job):
            if source and source.get(key) is not None:
                return source[key]
        return None

    @property
    def seed(self) -> int | None:
        if self.metrics and isinstance(self.metrics.get("train_config"), dict):
            return self.metrics["train_config"].get("seed")
        return self.job.get("seed") if self.job else None

    @property
    def dataset(self) -> str | None:
        return self.value("dataset")

    @property
    def category(self) -> str | None:
        return self.value("category")

    @property
    def model(self) -> str | None:
        return self.value("model")

    def row(self) -> dict[str, Any]:
        """The run's summary row (:data:`SUMMARY_COLUMNS`)."""
        row: dict[str, Any] = {"dataset": self.dataset, "category": self.category, "model": self.model,
                               "seed": self.seed, "status": self.status}
        row.update({key: (self.metrics or {}).get(key) for key in METRIC_COLUMNS})
        row["folder"] = self.relative
        row["error"] = self.error
        return row


def sweep_is_running(root: Path) -> bool:
    """Whether a sweep holds ``root``'s lock now (the lock dies with its process, so a killed sweep holds none)."""
    lock_path = Path(root) / LOCK_FILE
    if not lock_path.is_file():
        return False
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): a job record saying "running" is taken at its word
        return True
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def read_run(folder: Path, root: Path, manifest_job: dict[str, Any] | None = None,
             sweep_running: bool | None = None) -> RunRecord:
    """The state of one run folder. ``manifest_job`` (the sweep manifest's entry) stands in for the
    job record of a job whose folder holds nothing yet (pending)."""
    folder, root = Path(folder), Path(root)
    relative = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else str(folder)
    metrics, metrics_error = read_json(folder / METRICS_FILE)
    job, job_error = read_json(folder / JOB_FILE)
    job = job or (dict(manifest_job) if manifest_job else None)
    if metrics is not None:
        return RunRecord(folder, relative, "done", metrics, job)
    if metrics_error is not None:
        return RunRecord(folder, relative, "failed", None, job, metrics_error)
    if job_error is not None:
        return RunRecord(folder, relative, "failed", None, job, job_error)
    status = (job or {}).get("status", "pending")
    error = (job or {}).get("error")
    if status in ("running", "queued"):
        if sweep_running is None:
            sweep_running = sweep_is_running(root)
        if not sweep_running:
            status, error = "interrupted", INTERRUPTED_ERROR if status == "running" else NOT_STARTED_ERROR
    elif status == "done":  # the record says done but the metrics are gone: nothing to show
        status, error = "failed", f"{folder / METRICS_FILE} is missing although the job reported success"
    return RunRecord(folder, relative, status, None, job, error)


def read_manifest(root: Path) -> dict[str, Any] | None:
    manifest, error = read_json(Path(root) / MANIFEST_FILE)
    if error is not None:
        raise ValueError(f"{error}. It lists the sweep's jobs and their folders; restore it or remove it "
                         "(the run folders are found without it, and a re-run finds its jobs by their sweep_job.json).")
    return manifest


def find_runs(root: str | Path, sweep_running: bool | None = None) -> list[RunRecord]:
    """Every run under ``root``: the sweep manifest's jobs first, in the order they were asked for,
    then any other run folder (a folder with ``metrics.json`` or ``sweep_job.json``), by path.
    ``sweep_running`` says whether a sweep still runs there (default: whether one holds the lock)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: give the OUTPUT_DIR of a sweep or of train() runs")
    running = sweep_is_running(root) if sweep_running is None else sweep_running
    records: list[RunRecord] = []
    seen: set[Path] = set()
    for job in (read_manifest(root) or {}).get("jobs", []):
        folder = (root / job["folder"]).resolve()
        if folder not in seen:
            seen.add(folder)
            records.append(read_run(folder, root, job, running))
    found = {path.parent.resolve() for name in (METRICS_FILE, JOB_FILE) for path in root.rglob(name)}
    for folder in sorted(found - seen):
        records.append(read_run(folder, root, None, running))
    return records


def write_run_summary(root: str | Path, records: list[RunRecord] | None = None) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.md`` in ``root``: one row per run folder (:func:`find_runs`).
    The tables are derived from the run folders alone, so they are rewritten, never versioned."""
    root = Path(root)
    records = find_runs(root) if records is None else records
    rows = [record.row() for record in records]
    return write_summary_tables(rows, root / f"{SUMMARY_STEM}.csv", root / f"{SUMMARY_STEM}.md", SUMMARY_COLUMNS)


def summary_text(records: list[RunRecord]) -> str:
    """The Markdown table of ``records`` and a count line, as printed at the end of a sweep."""
    rows = [record.row() for record in records]
    counts: dict[str, int] = {}
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    line = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    return format_markdown_table(rows, SUMMARY_COLUMNS) + f"\n{len(records)} run(s): {line or 'none'}"
