"""Sweeps (anomalyzoo.sweep): 2 models x 2 synthetic categories under the local, process and Ray
executors give the same metrics; finished jobs are skipped on a re-run, failed, killed and
interrupted ones are reported and then retried until the sweep is complete."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from anomalyzoo import train_models
from anomalyzoo.cli import main
from anomalyzoo.data.synthetic import make_synthetic_dataset
from anomalyzoo.report.runs import find_runs
from anomalyzoo.sweep import SweepError, SweepJob, gpu_slots, run_job, run_sweep

CATEGORIES = ["sweep_texture", "sweep_object"]
MODELS = ["padim", "dfm"]  # the two cheapest models with anomaly maps (one pass over the images, no optimiser)
FAST = {"backbone": "resnet18", "pretrained": False, "img_size": 64, "max_maps": 1}
COMPARED = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep_data")
    for category, kind in zip(CATEGORIES, ("texture", "object")):
        make_synthetic_dataset(root / "mvtec", category=category, kind=kind, n_train=12, n_test_good=4,
                               n_test_defect=6, image_size=64, seed=3)
    return root


@pytest.fixture(scope="module")
def local_sweep(data_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The reference: today's serial loop, in this process, on one torch thread as every parallel job
    below runs (cpus_per_run=1). Float sums split over a different number of threads differ in their
    last bits (on CI's 2 cores dfm's pixel AUROC moved by 3e-5), and this compares executors, not BLAS
    thread counts."""
    root = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return root, train_models("mvtec", CATEGORIES, MODELS, output_dir=root, dataset_dir=data_dir, **FAST)
    finally:
        torch.set_num_threads(threads)


def metrics_by_job(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(row["category"], row["model"]): {key: row[key] for key in COMPARED} for row in rows}


def assert_same_metrics(rows: list[dict], reference: list[dict]) -> None:
    assert [row["status"] for row in rows] == ["done"] * 4
    measured, expected = metrics_by_job(rows), metrics_by_job(reference)
    assert measured.keys() == expected.keys()
    for job, values in expected.items():
        assert measured[job] == pytest.approx(values, rel=1e-6, abs=1e-9), job


def mtimes(root: Path) -> dict[str, int]:
    return {path.parent.relative_to(root).as_posix(): path.stat().st_mtime_ns for path in root.rglob("metrics.json")}


def summary_rows(root: Path) -> list[dict]:
    with (root / "summary.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def kill_once(marker_dir: str, victim: str, job: SweepJob) -> dict:
    """Fault injection: the victim job's process dies by SIGKILL (as the kernel's OOM killer does it)
    the first time it runs; every other job, and the victim's retry, is the real run_job."""
    marker = Path(marker_dir) / "killed"
    if job.job_id.startswith(victim) and not marker.exists():
        marker.write_text(job.job_id)
        os.kill(os.getpid(), signal.SIGKILL)
    return run_job(job)


def test_local_sweep_records_its_jobs_and_skips_them_when_run_again(local_sweep, data_dir):
    root, rows = local_sweep
    assert [(row["category"], row["model"], row["status"]) for row in rows] == \
        [(c, m, "done") for c in CATEGORIES for m in MODELS]
    padim_texture = rows[0]
    assert padim_texture["image_auroc"] >= 0.9 and padim_texture["pixel_auroc"] >= 0.9  # measured 1.0 / 0.98
    manifest = json.loads((root / "sweep.json").read_text())
    assert [job["folder"] for job in manifest["jobs"]] == [f"mvtec/{c}/{m}" for c in CATEGORIES for m in MODELS]
    assert {row["status"] for row in summary_rows(root)} == {"done"} and len(summary_rows(root)) == 4
    for job in manifest["jobs"]:
        record = json.loads((root / job["folder"] / "sweep_job.json").read_text())
        assert record["id"] == job["id"] and record["status"] == "done" and record["attempts"] == 1

    before = mtimes(root)
    again = train_models("mvtec", CATEGORIES, MODELS, output_dir=root, dataset_dir=data_dir, **FAST)
    assert mtimes(root) == before  # nothing ran again
    assert metrics_by_job(again) == metrics_by_job(rows)

    # the summary is rebuilt from the run folders alone
    written = (root / "summary.csv").read_text()
    (root / "summary.csv").unlink()
    (root / "summary.md").unlink()
    assert main(["summary", str(root)]) == 0
    assert (root / "summary.csv").read_text() == written and (root / "summary.md").is_file()


def test_other_options_make_new_jobs_that_never_replace_the_first(local_sweep, data_dir):
    root, rows = local_sweep
    before = mtimes(root)
    other = train_models("mvtec", CATEGORIES[:1], ["padim"], output_dir=root, dataset_dir=data_dir,
                         **{**FAST, "n_features": 20})
    assert other[0]["status"] == "done" and other[0]["output_dir"].endswith("mvtec/sweep_texture/padim-run2")
    assert all(mtimes(root)[folder] == mtime for folder, mtime in before.items())
    # overwrite=True runs a finished job again, in its own folder
    again = train_models("mvtec", CATEGORIES[:1], ["padim"], output_dir=root, dataset_dir=data_dir, overwrite=True,
                         **FAST)
    assert again[0]["output_dir"] == rows[0]["output_dir"]
    assert mtimes(root)["mvtec/sweep_texture/padim"] > before["mvtec/sweep_texture/padim"]
    assert again[0]["image_auroc"] == rows[0]["image_auroc"]  # same seed, same result
    assert len(json.loads((root / "sweep.json").read_text())["jobs"]) == 5


def test_a_failed_job_is_reported_and_retried_until_the_sweep_is_complete(data_dir, tmp_path):
    root = tmp_path / "sweep"
    dataset_dir = tmp_path / "data"
    (dataset_dir / "mvtec").mkdir(parents=True)
    (dataset_dir / "mvtec" / CATEGORIES[0]).symlink_to(data_dir / "mvtec" / CATEGORIES[0])
    rows = train_models("mvtec", CATEGORIES, ["padim"], output_dir=root, dataset_dir=dataset_dir, **FAST)
    assert rows[0]["status"] == "done"
    assert rows[1]["status"] == "failed" and CATEGORIES[1] in rows[1]["error"]
    failed = next(row for row in summary_rows(root) if row["status"] == "failed")
    assert failed["category"] == CATEGORIES[1] and CATEGORIES[1] in failed["error"]
    record = json.loads((Path(rows[1]["output_dir"]) / "sweep_job.json").read_text())
    assert record["status"] == "failed" and "Traceback" in record["traceback"]

    (dataset_dir / "mvtec" / CATEGORIES[1]).symlink_to(data_dir / "mvtec" / CATEGORIES[1])  # the data is fixed
    finished = mtimes(root)
    rows = train_models("mvtec", CATEGORIES, ["padim"], output_dir=root, dataset_dir=dataset_dir, **FAST)
    assert [row["status"] for row in rows] == ["done", "done"]
    assert mtimes(root)[f"mvtec/{CATEGORIES[0]}/padim"] == finished[f"mvtec/{CATEGORIES[0]}/padim"]
    assert json.loads((Path(rows[1]["output_dir"]) / "sweep_job.json").read_text())["attempts"] == 2
    assert {row["status"] for row in summary_rows(root)} == {"done"}


def test_process_sweep_matches_local_and_survives_a_killed_job(local_sweep, data_dir, tmp_path):
    _, reference = local_sweep
    root = tmp_path / "sweep"
    victim = f"mvtec/{CATEGORIES[1]}/padim/"
    runner = partial(kill_once, str(tmp_path), victim)
    rows = run_sweep("mvtec", CATEGORIES, MODELS, output_dir=root, executor="process", workers=2, job_runner=runner,
                     dataset_dir=data_dir, **FAST)
    statuses = {(row["category"], row["model"]): row["status"] for row in rows}
    assert statuses.pop((CATEGORIES[1], "padim")) == "failed" and set(statuses.values()) == {"done"}
    killed = next(row for row in rows if row["status"] == "failed")
    assert "killed by SIGKILL" in killed["error"]
    assert "killed by SIGKILL" in next(row for row in summary_rows(root) if row["status"] == "failed")["error"]

    finished = mtimes(root)
    rows = run_sweep("mvtec", CATEGORIES, MODELS, output_dir=root, executor="process", workers=2,
                     dataset_dir=data_dir, **FAST)
    assert {folder: mtimes(root)[folder] for folder in finished} == finished  # only the killed job ran again
    assert_same_metrics(rows, reference)
    assert {row["status"] for row in summary_rows(root)} == {"done"}
    log = (root / "mvtec" / CATEGORIES[0] / "padim" / "sweep_job.log").read_text()
    assert "training images" in log  # a parallel job's output goes to its log


def stalled_train(marker: str, *args, **kwargs) -> dict:
    """Stands in for train() in the killed-sweep test: says it started, then never finishes."""
    Path(marker).write_text("started")
    time.sleep(600)
    raise AssertionError("the sweep should have been killed")


def test_a_killed_sweep_leaves_its_jobs_reported_as_interrupted(data_dir, tmp_path):
    root, marker = tmp_path / "sweep", tmp_path / "started"
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from functools import partial; "
              "import test_sweep as t; from anomalyzoo.sweep import run_sweep; "
              f"sys.modules['anomalyzoo.train'].train = partial(t.stalled_train, {str(marker)!r}); "
              f"run_sweep('mvtec', {CATEGORIES!r}, ['padim'], output_dir={str(root)!r}, dataset_dir={str(data_dir)!r}, "
              "**t.FAST)")
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert driver.poll() is None, driver.stderr.read().decode()
            assert time.monotonic() < deadline, "the sweep did not start its first job"
            time.sleep(0.2)
    finally:
        driver.kill()  # the sweep dies with its first job running and its second not started
        driver.wait()
    records = {record.category: record for record in find_runs(root)}
    assert records[CATEGORIES[0]].status == "interrupted" and "still running" in records[CATEGORIES[0]].error
    assert records[CATEGORIES[1]].status == "interrupted" and "before this job started" in records[CATEGORIES[1]].error
    assert main(["summary", str(root)]) == 1  # not complete
    assert {row["status"] for row in summary_rows(root)} == {"interrupted"}
    rows = train_models("mvtec", CATEGORIES, ["padim"], output_dir=root, dataset_dir=data_dir, **FAST)
    assert [row["status"] for row in rows] == ["done", "done"]


def test_a_second_sweep_into_a_running_sweeps_folder_is_refused(data_dir, tmp_path):
    def nested(job: SweepJob) -> dict:
        with pytest.raises(SweepError, match="already running"):
            run_sweep("mvtec", CATEGORIES[:1], ["padim"], output_dir=tmp_path, dataset_dir=data_dir, **FAST)
        return {"id": job.job_id, "status": "failed", "error": "checked"}

    rows = run_sweep("mvtec", CATEGORIES[:1], ["padim"], output_dir=tmp_path, job_runner=nested,
                     dataset_dir=data_dir, **FAST)
    assert rows[0]["status"] == "failed" and rows[0]["error"] == "checked"  # what the runner said is recorded


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(SweepError, match="executor"):
        run_sweep("mvtec", ["a"], ["padim"], output_dir=tmp_path, executor="slurm")
    with pytest.raises(SweepError, match="seeds= or seed="):
        run_sweep("mvtec", ["a"], ["padim"], output_dir=tmp_path, seeds=[1, 2], seed=3)
    with pytest.raises(SweepError, match="gpus_per_run"):
        gpu_slots(2, 2)
    assert gpu_slots(2, 0.5) == ["0", "0", "1", "1"] and gpu_slots(1, 1) == ["0"]
    assert not any(tmp_path.iterdir())


def test_seeds_are_jobs_of_their_own(data_dir, tmp_path):
    rows = train_models("mvtec", CATEGORIES[:1], ["padim"], output_dir=tmp_path, seeds=[1, 2], dataset_dir=data_dir,
                        **FAST)
    assert [row["seed"] for row in rows] == [1, 2]
    assert [Path(row["output_dir"]).relative_to(tmp_path).as_posix() for row in rows] == \
        [f"seed-{s}/mvtec/{CATEGORIES[0]}/padim" for s in (1, 2)]
    stored = [json.loads((Path(row["output_dir"]) / "metrics.json").read_text()) for row in rows]
    assert [metrics["train_config"]["seed"] for metrics in stored] == [1, 2]


# ------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with 2 CPUs, started once for this module (a few seconds), no network."""
    try:
        import ray
    except ImportError:
        message = "ray is not installed (pip install '.[ray]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (required in CI)")
        pytest.skip(message)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the fault-injecting runner lives in this test module, which Ray's workers cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def test_ray_sweep_matches_local_and_survives_a_crashed_worker(ray_instance, local_sweep, data_dir, tmp_path):
    _, reference = local_sweep
    root = tmp_path / "sweep"
    victim = f"mvtec/{CATEGORIES[0]}/dfm/"
    rows = run_sweep("mvtec", CATEGORIES, MODELS, output_dir=root, executor="ray", job_runner=partial(kill_once, str(tmp_path), victim),
                     dataset_dir=data_dir, **FAST)
    killed = [row for row in rows if row["status"] != "done"]
    assert [(row["category"], row["model"]) for row in killed] == [(CATEGORIES[0], "dfm")]
    assert "WorkerCrashedError" in killed[0]["error"] or "died" in killed[0]["error"]
    rows = run_sweep("mvtec", CATEGORIES, MODELS, output_dir=root, executor="ray", dataset_dir=data_dir, **FAST)
    assert_same_metrics(rows, reference)
    assert ray_instance.is_initialized()  # the sweep used the instance it found and left it running


def test_sweep_command_runs_then_skips_and_summary_says_complete(data_dir, tmp_path, capsys):
    arguments = ["sweep", "--dataset", "mvtec", "--category", CATEGORIES[0], "--model", "padim", "--img-size", "64",
                 "--backbone", "resnet18", "--set", "pretrained=False", "--set", "max_maps=1",
                 "--dataset-dir", str(data_dir), "--output-dir", str(tmp_path)]
    assert main(arguments) == 0
    assert "0 finished before (skipped), 1 to run" in capsys.readouterr().out
    assert main(arguments) == 0
    assert "1 finished before (skipped), 0 to run" in capsys.readouterr().out
    assert main(["summary", str(tmp_path)]) == 0
    assert "1 run(s): 1 done" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses an unknown executor
        main([*arguments, "--executor", "slurm"])
