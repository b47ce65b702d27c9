"""Sweeps: every (category, model, seed) as one job, run in this process, in a pool of processes on
this machine, or on a Ray cluster; resumable and fault tolerant. ``train_models`` and
``anomalyzoo sweep`` are this module.

A sweep's folder (the call's ``output_dir``)::

    sweep.json                         the manifest: every job asked of this folder, its options, its run folder
    <dataset>/<category>/<model>/      one job's run folder: train()'s files (``seed-<s>/`` in front
        sweep_job.json                 when the sweep has several seeds) and the job's record: status
        sweep_job.log                  (pending, running, done, failed), attempts, error, traceback; its
    summary.csv, summary.md            output under the parallel executors; one row per run folder
    .sweep.lock                        locked while a sweep runs here

**Identity and resuming.** A job is (dataset, category, model, seed, options), the options being
every override of the call except ``device`` and ``progress`` (they change where and how loudly a
job runs, not its result). The manifest maps each job's identity to its folder, so a re-run of the
same call finds every job where it left it: a job whose folder holds a readable ``metrics.json``
(``train()`` writes it last) is finished and skipped, unless ``overwrite=True``; every other job
(failed, killed, interrupted, never started) runs again in its folder. A call with other options
makes other jobs, and their folders never replace a run they do not own: the first free one of
``<model>``, ``<model>-run2``, ... as ``train()`` chooses (``overwrite=True`` takes ``<model>``, as
``train(overwrite=True)`` does). Folders are chosen by the driver, before any job starts, and
claimed with a ``sweep_job.json``; without the manifest, a re-run still finds its jobs by the
identity in those records.

**Faults.** A job's exception is caught in the job: its record says failed with the error and the
traceback, and the sweep goes on. A job whose process dies (killed, out of memory, a crash in native
code) cannot say so itself: the driver marks it failed with what the operating system or Ray said
(the exit signal, Ray's error). A sweep that is itself killed leaves its running jobs' records at
"running"; once no sweep holds the folder's lock, the summary reports them as interrupted. No job
is ever left out of the summary.

**Executors.** ``"local"``: one job after the other in this process (what ``train_models`` always
did). ``"process"``: every job in a fresh process (``spawn``: no CUDA or thread state inherited, and
its memory is returned when it ends), ``workers`` at a time; with GPUs, each job sees one GPU
(``CUDA_VISIBLE_DEVICES``), ``1 / gpus_per_run`` jobs per GPU. ``"ray"``: every job is a Ray task
asking for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs on the cluster at ``ray_address``
(``"auto"``: the running cluster; ``None``: a local instance, or the one already initialised in this
process); Ray places them. On a multi-node cluster the output, dataset and backbone folders must be
at the same path on every node (a shared file system), and every node needs anomalyzoo installed.
A parallel job uses ``cpus_per_run`` threads (``torch.set_num_threads``) and writes its output to
its ``sweep_job.log``; the driver shows one progress bar over the jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from anomalyzoo.data.folder import FOLDER_OPTIONS
from anomalyzoo.registry import ModelRegistry
from anomalyzoo.report.runs import (
    JOB_FILE,
    JOB_LOG_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    RunRecord,
    find_runs,
    read_json,
    read_manifest,
    read_run,
    summary_text,
    write_run_summary,
)
from anomalyzoo.settings import get_settings

EXECUTORS = ("local", "process", "ray")
MANIFEST_FORMAT = 1
NOT_IDENTITY = frozenset({"device", "progress"})  # options that change where/how a job runs, not its result
PATH_OPTIONS = frozenset({"dataset_dir", *FOLDER_OPTIONS}) - {"normal_split_ratio"}
RESULT_COLUMNS = ("dataset", "category", "model", "seed", "status", "image_auroc", "pixel_auroc", "pixel_aupro",
                  "image_f1_max", "fit_seconds", "inference_ms_per_image")


class SweepError(ValueError):
    """A sweep that cannot start (bad arguments, a folder another sweep holds); nothing was run."""


@dataclass(frozen=True)
class SweepJob:
    """Everything one job needs, picklable: a worker process or Ray node starts from this alone."""

    job_id: str
    dataset: str
    category: str
    model: str
    seed: int
    options: dict[str, Any]  # train() overrides
    folder: str  # absolute run folder
    settings: dict[str, Any]  # set_globals() of the driver, paths absolute
    device: str | None = None
    environment: dict[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES of a process slot
    threads: int | None = None  # torch threads in a parallel job
    log_to_file: bool = False

    def identity(self) -> dict[str, Any]:
        return {"id": self.job_id, "dataset": self.dataset, "category": self.category, "model": self.model,
                "seed": self.seed}


JobRunner = Callable[[SweepJob], dict[str, Any]]


# ------------------------------------------------------------------------------------------ files
def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    """Write-then-rename: a reader (or a re-run after a kill) sees the old file or the new one, never half."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(content, indent=2, default=str), encoding="utf-8")
    os.replace(temporary, path)


def update_job_record(folder: Path, **values: Any) -> dict[str, Any]:
    record, _ = read_json(folder / JOB_FILE)
    record = {**(record or {}), **values}
    write_json_atomic(folder / JOB_FILE, record)
    return record


@contextlib.contextmanager
def sweep_lock(root: Path) -> Iterator[None]:
    """Hold ``root/.sweep.lock`` for the sweep: a second sweep into the same folder is refused (it
    would run the same jobs twice). The lock is released when this process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; run one sweep per folder at a time
        yield
        return
    with (root / LOCK_FILE).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SweepError(f"A sweep is already running in {root} ({holder}). Wait for it to end, or give this sweep "
                             "another output folder.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------- jobs
def canonical_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options as JSON would store them (paths absolute), so equal calls give equal identities."""
    resolved: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in PATH_OPTIONS:
            value = [str(Path(v).expanduser().resolve()) for v in value] if isinstance(value, (list, tuple)) \
                else str(Path(value).expanduser().resolve())
        resolved[key] = value
    return json.loads(json.dumps(resolved, sort_keys=True, default=str))


def job_id(dataset: str, category: str, model: str, seed: int, options: dict[str, Any]) -> str:
    """``<dataset>/<category>/<model>/seed-<s>/<hash of the options>``: readable, and unique per identity."""
    identity = {key: value for key, value in options.items() if key not in NOT_IDENTITY}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{dataset}/{category}/{model}/seed-{seed}/{digest}"


def _is_free(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def choose_job_folder(base: Path, identity: str, claimed: set[Path], overwrite: bool) -> Path:
    """A new job's folder: one whose record names this job (the manifest was lost), else the first
    free one of ``base``, ``base-run2``, ... that no other job of the manifest owns (``base`` itself
    with ``overwrite``, unless another job owns it)."""
    existing = [base] + sorted(base.parent.glob(f"{base.name}-run*"), key=lambda p: (len(p.name), p.name))
    for folder in existing:
        record, _ = read_json(folder / JOB_FILE)
        if record and record.get("id") == identity and folder.resolve() not in claimed:
            return folder
    if overwrite and base.resolve() not in claimed:
        return base
    number = 1
    while True:
        folder = base if number == 1 else base.parent / f"{base.name}-run{number}"
        if folder.resolve() not in claimed and _is_free(folder):
            return folder
        number += 1


def worker_settings() -> dict[str, Any]:
    """The driver's set_globals(), paths absolute: workers start with the defaults otherwise."""
    values = get_settings().as_dict()
    for key in ("dataset_dir", "backbone_dir", "output_dir"):
        values[key] = str(Path(values[key]).expanduser().resolve())
    return values


def plan_jobs(root: Path, dataset: str, categories: Sequence[str], models: Sequence[str], seeds: Sequence[int],
              options: dict[str, Any], overwrite: bool) -> list[SweepJob]:
    """The call's jobs, each with its folder: found in the manifest, or chosen and recorded there.
    Writes the manifest and claims every folder before anything runs."""
    manifest = read_manifest(root) or {"format": MANIFEST_FORMAT, "jobs": []}
    entries = {entry["id"]: entry for entry in manifest["jobs"]}
    claimed = {(root / entry["folder"]).resolve() for entry in manifest["jobs"]}
    device = options.pop("device", None)
    identity_options = {k: v for k, v in options.items() if k not in NOT_IDENTITY}
    settings = worker_settings()
    jobs: list[SweepJob] = []
    for category in categories:
        for model in models:
            for seed in seeds:
                identity = job_id(dataset, category, model, seed, identity_options)
                entry = entries.get(identity)
                if entry is None:
                    base = root / (f"seed-{seed}" if len(seeds) > 1 else "") / dataset / category / model
                    folder = choose_job_folder(base, identity, claimed, overwrite)
                    claimed.add(folder.resolve())
                    entry = {"id": identity, "dataset": dataset, "category": category, "model": model, "seed": seed,
                             "options": identity_options, "folder": folder.relative_to(root).as_posix()}
                    entries[identity] = entry
                    manifest["jobs"].append(entry)
                jobs.append(SweepJob(identity, dataset, category, model, seed, dict(options),
                                     str((root / entry["folder"]).resolve()), settings, device=device))
    manifest["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    for job in jobs:
        folder = Path(job.folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / JOB_FILE).is_file():
            update_job_record(folder, **job.identity(), status="pending", attempts=0)
    write_json_atomic(root / MANIFEST_FILE, manifest)
    return jobs


@contextlib.contextmanager
def _output_to(log_path: Path | None) -> Iterator[None]:
    if log_path is None:
        yield
        return
    with log_path.open("a", encoding="utf-8", buffering=1) as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on {socket.gethostname()} =====")
        yield


def run_job(job: SweepJob) -> dict[str, Any]:
    """Run one job where this is called (this process, a pool worker, a Ray worker) and record the
    outcome in its folder. Returns ``{"id", "status": "done"|"failed", "metrics" | "error", "traceback"}``;
    an exception of the run is caught here, so that the sweep goes on."""
    from anomalyzoo.settings import set_globals
    from anomalyzoo.train import clear_memory, train

    set_globals(**job.settings)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    previous, _ = read_json(folder / JOB_FILE)
    started = time.time()
    update_job_record(folder, **job.identity(), status="running", attempts=int((previous or {}).get("attempts", 0)) + 1,
                      started=time.strftime("%Y-%m-%d %H:%M:%S"), host=socket.gethostname(), pid=os.getpid(),
                      error=None, traceback=None)
    with _output_to(folder / JOB_LOG_FILE if job.log_to_file else None):
        try:
            result = train(job.dataset, job.category, job.model, run_dir=folder, seed=job.seed, device=job.device,
                           **job.options)
        except Exception as error:  # the job's failure is the sweep's data, not its end
            trace = traceback.format_exc()
            print(trace, file=sys.stderr)
            message = f"{type(error).__name__}: {error}"
            update_job_record(folder, status="failed", error=message, traceback=trace,
                              seconds=time.time() - started)
            return {"id": job.job_id, "status": "failed", "error": message, "traceback": trace}
        finally:
            clear_memory()
    update_job_record(folder, status="done", seconds=time.time() - started)
    return {"id": job.job_id, "status": "done", "metrics": result}


def crashed(job: SweepJob, message: str, detail: str | None = None) -> dict[str, Any]:
    """Record a job that could not report for itself (its process died) as failed."""
    update_job_record(Path(job.folder), **job.identity(), status="failed", error=message, traceback=detail)
    return {"id": job.job_id, "status": "failed", "error": message, "traceback": detail}


def reconcile(job: SweepJob, outcome: dict[str, Any]) -> dict[str, Any]:
    """Make the job's folder agree with what its runner reported: a reported failure that the record
    does not hold yet is recorded, and a reported success without a readable metrics.json is a failure."""
    folder = Path(job.folder)
    if outcome.get("status") == "done" and read_json(folder / METRICS_FILE)[0] is None:
        return crashed(job, f"the job reported success but left no readable {folder / METRICS_FILE}")
    if outcome.get("status") != "done":
        record, _ = read_json(folder / JOB_FILE)
        if (record or {}).get("status") != "failed":
            return crashed(job, str(outcome.get("error") or "the job failed without saying why"), outcome.get("traceback"))
    return outcome


def describe_exit(exit_code: int | None) -> str:
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        hint = " (the system kills the largest process this way when memory runs out)" if name == "SIGKILL" else ""
        return f"the job's process was killed by {name}{hint} before it reported a result"
    return f"the job's process exited with code {exit_code} before it reported a result"


# -------------------------------------------------------------------------------------- executors
def execute_local(jobs: Sequence[SweepJob], runner: JobRunner) -> Iterator[tuple[SweepJob, dict[str, Any]]]:
    for job in jobs:
        print(f"\n=== {job.dataset}/{job.category}: {job.model} (seed {job.seed}) ===")
        yield job, runner(job)


def gpu_slots(device_count: int, gpus_per_run: float) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each process slot: every GPU ``floor(1 / gpus_per_run)`` times."""
    if gpus_per_run > 1:
        raise SweepError(f"gpus_per_run={gpus_per_run}: a run trains on one device; under the process executor a job "
                         "takes a GPU or a share of one (e.g. 0.5 runs two jobs per GPU).")
    per_gpu = max(1, math.floor(1 / gpus_per_run + 1e-9))
    return [str(gpu) for gpu in range(device_count) for _ in range(per_gpu)]


def worker_main() -> None:
    """A process-executor job: read the driver's ``sys.path``, then ``(runner, job)``, from standard
    input (pickled) and run it. Started as ``python -c ...``, so that the child never imports the
    driver's main script (``multiprocessing``'s spawn would, and a script without an
    ``if __name__ == "__main__":`` guard would then start its sweep again in every child)."""
    import pickle

    stream = sys.stdin.buffer
    sys.path[:] = pickle.load(stream) + [path for path in sys.path]
    runner, job = pickle.load(stream)
    runner(job)


WORKER_COMMAND = "import anomalyzoo.sweep as sweep; sweep.worker_main()"


def _log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _process_outcome(job: SweepJob, exit_code: int | None) -> dict[str, Any]:
    """What a finished job process left in its folder; a process that ended without recording an
    outcome (killed, crashed, failed to start) is recorded as failed here, with the end of its log."""
    folder = Path(job.folder)
    record = read_run(folder, folder.parent, sweep_running=False)
    if record.status == "done" and exit_code == 0:
        return {"id": job.job_id, "status": "done", "metrics": record.metrics}
    job_record = record.job or {}
    if job_record.get("status") == "failed" and record.error and record.status == "failed":
        return {"id": job.job_id, "status": "failed", "error": record.error, "traceback": job_record.get("traceback")}
    tail = _log_tail(folder / JOB_LOG_FILE)
    return crashed(job, describe_exit(exit_code) + (f"; the end of its {JOB_LOG_FILE}: {tail}" if tail else ""))


def execute_processes(jobs: Sequence[SweepJob], runner: JobRunner, workers: int,
                      slots: list[dict[str, Any]]) -> Iterator[tuple[SweepJob, dict[str, Any]]]:
    """Each job in a fresh Python process, at most ``workers`` at a time; a slot is the device and
    environment its job gets. The process writes everything it prints (Python's and native code's
    output) to the job's ``sweep_job.log`` and its outcome to the job's folder; one that dies
    without recording an outcome is a failed job with its exit code or signal as the error."""
    import pickle
    import subprocess

    queue = list(jobs)
    free = list(slots[:workers])
    running: list[tuple[SweepJob, subprocess.Popen, dict[str, Any], Any]] = []
    try:
        while queue or running:
            while queue and free:
                slot = free.pop(0)
                job = replace(queue.pop(0), **slot)
                log = (Path(job.folder) / JOB_LOG_FILE).open("ab")
                environment = {**os.environ, **job.environment}
                if job.threads:
                    environment["OMP_NUM_THREADS"] = str(job.threads)
                process = subprocess.Popen([sys.executable, "-c", WORKER_COMMAND], stdin=subprocess.PIPE, stdout=log,
                                           stderr=subprocess.STDOUT, env=environment, cwd=os.getcwd())
                try:
                    pickle.dump(list(sys.path), process.stdin)
                    pickle.dump((runner, job), process.stdin)
                    process.stdin.close()
                except BrokenPipeError:  # it died at once: its log says why
                    pass
                running.append((job, process, slot, log))
            finished = [entry for entry in running if entry[1].poll() is not None]
            if not finished:
                time.sleep(0.2)
                continue
            for entry in finished:
                running.remove(entry)
                job, process, slot, log = entry
                log.close()
                free.append(slot)
                yield job, _process_outcome(job, process.returncode)
    finally:
        for _, process, _, log in running:  # interrupted: stop what still runs
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()


def call_runner(runner: JobRunner, job: SweepJob) -> dict[str, Any]:
    """The Ray task: the runner travels as an argument (Ray's tasks must be plain functions)."""
    return runner(job)


def execute_ray(jobs: Sequence[SweepJob], runner: JobRunner, cpus_per_run: float,
                gpus_per_run: float) -> Iterator[tuple[SweepJob, dict[str, Any]]]:
    """Every job as a Ray task with its resource request; Ray places and runs them. A task whose
    worker dies is a failed job with Ray's error; Ray does not retry it (a re-run of the sweep does)."""
    import ray

    remote = ray.remote(call_runner).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0,
                                             retry_exceptions=False)
    pending = {remote.remote(runner, job): job for job in jobs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for reference in ready:
                job = pending.pop(reference)
                try:
                    outcome = ray.get(reference)
                except ray.exceptions.RayError as error:
                    text = str(error).strip()
                    first_line = next((line for line in text.splitlines() if line.strip()), type(error).__name__)
                    outcome = crashed(job, f"{type(error).__name__}: {first_line}", text)
                yield job, outcome
    finally:
        for reference in pending:  # interrupted: cancel what has not finished
            ray.cancel(reference, force=True)


@contextlib.contextmanager
def ray_session(ray_address: str | None) -> Iterator[None]:
    """Use the Ray instance this process has already initialised, else connect to ``ray_address``
    (or start a local one when it is None) and shut it down at the end."""
    try:
        import ray
    except ImportError:
        raise SweepError("executor='ray' needs Ray: pip install 'anomalyzoo[ray]'") from None
    if ray.is_initialized():
        yield
        return
    if ray_address is None:
        ray.init(include_dashboard=False)
    else:
        ray.init(address=ray_address)
    try:
        yield
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------ sweep
def _as_list(values: str | int | Sequence[Any]) -> list[Any]:
    return [values] if isinstance(values, (str, int)) else list(values)


def _result_row(record: RunRecord) -> dict[str, Any]:
    row = {key: record.row().get(key) for key in RESULT_COLUMNS}
    row["output_dir"] = str(record.folder)
    if record.status != "done":
        row["error"] = record.error or record.status
    return row


def _progress_note(job: SweepJob, outcome: dict[str, Any]) -> str:
    if outcome["status"] == "done":
        metrics = outcome.get("metrics") or {}
        value = metrics.get("image_auroc")
        return f"done   {job.job_id}: image AUROC {value:.4f}" if isinstance(value, float) else f"done   {job.job_id}"
    return f"FAILED {job.job_id}: {' '.join(str(outcome.get('error')).split())[:300]}"


def run_sweep(
    dataset_type: str,
    categories: str | Sequence[str],
    model_types: str | Sequence[str],
    output_dir: str | Path | None = None,
    *,
    seeds: int | Sequence[int] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
    overwrite: bool = False,
    job_runner: JobRunner = run_job,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Plan, run and summarise a sweep (see the module docstring); returns one row per job of this
    call, in the order categories x models x seeds, with ``error`` on every job that did not finish.
    ``job_runner`` runs one job (:func:`run_job`; a wrapper can inject faults in tests)."""
    if executor not in EXECUTORS:
        raise SweepError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if overrides.get("resume"):
        raise SweepError("resume=True continues one run; a sweep re-runs its unfinished jobs by itself (run it again)")
    overrides.pop("resume", None)
    if "seed" in overrides:
        if seeds is not None:
            raise SweepError("give seeds= or seed=, not both")
        seeds = overrides.pop("seed")
    seeds = [int(seed) for seed in _as_list(get_settings().seed if seeds is None else seeds)]
    categories, model_types = _as_list(categories), _as_list(model_types)
    if not categories or not model_types or not seeds:
        raise SweepError("a sweep needs at least one category, one model and one seed")
    for model in model_types:
        ModelRegistry.get(model)  # unknown names fail before any work
    for name, values in (("categories", categories), ("models", model_types), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise SweepError(f"{name} repeat: {values}")
    for value, name in ((workers, "workers"), (cpus_per_run, "cpus_per_run")):
        if value is not None and value <= 0:
            raise SweepError(f"{name} must be positive, got {value}")
    if gpus_per_run is not None and gpus_per_run < 0:
        raise SweepError(f"gpus_per_run must be >= 0, got {gpus_per_run}")

    root = Path(output_dir or get_settings().output_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    options = canonical_options(overrides)
    with sweep_lock(root):
        jobs = plan_jobs(root, dataset_type, categories, model_types, seeds, options, overwrite)
        to_run = []
        for job in jobs:
            record = read_run(Path(job.folder), root, sweep_running=True)
            if record.status == "done" and not overwrite:
                continue
            (Path(job.folder) / METRICS_FILE).unlink(missing_ok=True)  # a rerun that fails must not look finished
            update_job_record(Path(job.folder), status="queued", error=None, traceback=None)
            to_run.append(job)
        skipped = len(jobs) - len(to_run)
        print(f"sweep {root}: {len(jobs)} job(s), {skipped} finished before (skipped), {len(to_run)} to run "
              f"({executor})")
        try:
            _run_jobs(to_run, executor, job_runner, ray_address, workers, cpus_per_run, gpus_per_run)
        finally:
            # the jobs have ended (or been stopped) here: a record still "running" was interrupted
            every_run = find_runs(root, sweep_running=False)
            by_folder = {record.folder: record for record in every_run}
            records = [by_folder.get(Path(job.folder)) or read_run(Path(job.folder), root, sweep_running=False)
                       for job in jobs]
            csv_path, md_path = write_run_summary(root, every_run)
            print("\n" + summary_text(records))
            print(f"Summary of every run in {root}: {md_path.name}, {csv_path.name}")
    return [_result_row(record) for record in records]


def _run_jobs(jobs: list[SweepJob], executor: str, runner: JobRunner, ray_address: str | None, workers: int | None,
              cpus_per_run: float | None, gpus_per_run: float | None) -> None:
    if not jobs:
        return
    if executor == "local":
        outcomes = execute_local(jobs, runner)
        bar = None
    else:
        cpus = float(cpus_per_run or 1)
        threads = max(1, int(cpus))
        # a process job's whole output goes to its log from the start; a Ray job redirects its own
        jobs = [replace(job, threads=threads, log_to_file=executor == "ray",
                        options={"progress": False, **job.options}) for job in jobs]
        if executor == "process":
            outcomes = execute_processes(jobs, runner, *_process_slots(jobs, workers, cpus, gpus_per_run))
        else:
            outcomes = _ray_outcomes(jobs, runner, ray_address, cpus, gpus_per_run)
        bar = tqdm(total=len(jobs), desc="sweep", unit="job", dynamic_ncols=True)
    failed = 0
    try:
        for job, outcome in outcomes:
            outcome = reconcile(job, outcome)
            failed += outcome["status"] != "done"
            if bar is not None:
                bar.update(1)
                bar.set_postfix(failed=failed)
                bar.write(_progress_note(job, outcome))
            elif outcome["status"] != "done":
                print(_progress_note(job, outcome))
    finally:
        if bar is not None:
            bar.close()


def _asks_for_cpu(jobs: list[SweepJob]) -> bool:
    return str(jobs[0].device or "").startswith("cpu")


def _process_slots(jobs: list[SweepJob], workers: int | None, cpus: float,
                   gpus_per_run: float | None) -> tuple[int, list[dict[str, Any]]]:
    import torch

    device_count = torch.cuda.device_count()
    if gpus_per_run is None:  # GPUs where there are some, unless the call asked for the CPU
        gpus_per_run = 1.0 if device_count and not _asks_for_cpu(jobs) else 0.0
    if gpus_per_run > 0:
        if not device_count:
            raise SweepError(f"gpus_per_run={gpus_per_run} but this machine has no CUDA GPU; use gpus_per_run=0")
        visible = gpu_slots(device_count, gpus_per_run)
        slots = [{"device": jobs[0].device or "cuda", "environment": {"CUDA_VISIBLE_DEVICES": gpu}} for gpu in visible]
    else:
        default = max(1, int((os.cpu_count() or 1) // cpus))
        slots = [{"device": jobs[0].device or "cpu"} for _ in range(workers or default)]
    return min(workers or len(slots), len(slots), len(jobs)), slots


def _ray_outcomes(jobs: list[SweepJob], runner: JobRunner, ray_address: str | None, cpus: float,
                  gpus_per_run: float | None) -> Iterator[tuple[SweepJob, dict[str, Any]]]:
    with ray_session(ray_address):
        import ray

        if gpus_per_run is None:
            gpus_per_run = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and not _asks_for_cpu(jobs) else 0.0
        if gpus_per_run == 0:  # a job given no GPU must not take one Ray did not give it
            jobs = [replace(job, device=job.device or "cpu") for job in jobs]
        yield from execute_ray(jobs, runner, cpus, gpus_per_run)
