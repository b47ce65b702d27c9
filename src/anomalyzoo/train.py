"""train() and train_models(): one model on one category, or every model on every category.

Each run writes, under ``OUTPUT_DIR/<dataset>/<category>/<model>/`` (spec sec. 5):
``model_..._epochs-N.pth``, ``results_..._thresholds.txt``, ``histogram_..._scores.png``,
``image_..._{normal,anomaly}_0001.png`` and ``metrics.json``, and for the HTML report
``scores_...csv``, ``thresholds_...csv`` and ``hardest_...npz``. An existing run folder is never
overwritten unless ``overwrite=True``: the new run goes to ``<model>-run2``, ``-run3``, ...
``train_models`` runs its (category, model, seed) jobs through :mod:`anomalyzoo.sweep`.
"""

from __future__ import annotations

import gc
import json
import math
import random
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from anomalyzoo.data import FOLDER_OPTIONS, get_dataloaders, move_labelled_anomalies, split_validation
from anomalyzoo.data.transforms import denormalize
from anomalyzoo.metrics import compute_metrics, evaluate_threshold
from anomalyzoo.models.components.trainer import TRAIN_KEYS, BaseTrainer, Predictions, TrainConfig
from anomalyzoo.registry import ModelRegistry
from anomalyzoo.report.run import (
    HARDEST_PER_CLASS,
    hardest_indices,
    save_hardest_examples,
    write_scores_csv,
    write_thresholds_csv,
)
from anomalyzoo.settings import get_settings

RESULT_METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "image_ap", "pixel_f1_max", "pixel_ap")


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def clear_dataloader(*loaders: DataLoader | None) -> None:
    """Shut down the worker processes of persistent-worker loaders."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        if loader is not None:
            loader._iterator = None


def clear_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def print_memory() -> None:
    print(f"CPU peak RSS: {peak_rss_mb():.0f} MiB")
    if torch.cuda.is_available():
        allocated = torch.cuda.memory_allocated() / 2**20
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"GPU allocated: {allocated:.0f} MiB (peak {peak:.0f} MiB)")


def split_overrides(model_type: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], TrainConfig]:
    """Registry defaults with per-run overrides: training keys go to TrainConfig, the rest to the model."""
    train_values = ModelRegistry.get_train_config(model_type)
    model_overrides = {}
    for key, value in overrides.items():
        if value is None:
            continue
        (train_values if key in TRAIN_KEYS else model_overrides)[key] = value
    train_values.setdefault("seed", get_settings().seed)
    return model_overrides, TrainConfig.from_dict(train_values)


def run_name(dataset_type: str, category: str, model_type: str) -> str:
    return f"{dataset_type}_{category.replace('/', '_')}_{model_type}"


def choose_run_dir(base: Path, overwrite: bool, resume: bool) -> Path:
    """The folder for this run: ``base`` when free (or when asked to overwrite/resume), else
    the first free ``base-runN`` so another run's outputs are never replaced."""
    candidates = [base] + sorted(base.parent.glob(f"{base.name}-run*"), key=lambda p: int(p.name.rsplit("run", 1)[-1] or 0))
    if resume:
        resumable = [p for p in candidates if (p / "checkpoints" / "last.pth").is_file()]
        if not resumable:
            raise FileNotFoundError(f"Nothing to resume: no checkpoints/last.pth under {base} or its -runN siblings. "
                                    "Start the run without resume first (a model without epochs has nothing to resume).")
        return resumable[-1]
    if overwrite or not base.exists() or not any(base.iterdir()):
        return base
    number = 2
    while (base.parent / f"{base.name}-run{number}").exists():
        number += 1
    return base.parent / f"{base.name}-run{number}"


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def collect_images(loader: DataLoader, indices: Sequence[int], normalize: bool) -> dict[int, np.ndarray]:
    dataset = loader.dataset
    return {i: denormalize(dataset[i]["image"], normalize) for i in indices}


def save_outputs(trainer: BaseTrainer, predictions: Predictions, metrics: dict[str, Any], test_loader: DataLoader,
                 run_dir: Path, name: str, header: dict[str, Any], max_maps: int) -> None:
    trainer.save_results(run_dir / f"results_{name}_thresholds.txt", metrics, predictions, header)
    trainer.save_histogram(run_dir / f"histogram_{name}_scores.png", predictions, title=name)
    write_scores_csv(run_dir / f"scores_{name}.csv", predictions, trainer.threshold)
    write_thresholds_csv(run_dir / f"thresholds_{name}.csv", predictions, trainer.thresholds)
    worst_normal, hidden_anomalous = hardest_indices(predictions, min(HARDEST_PER_CLASS, max_maps))
    hardest_images = collect_images(test_loader, worst_normal + hidden_anomalous, trainer.train_config.normalize)
    save_hardest_examples(run_dir / f"hardest_{name}.npz", predictions, hardest_images, worst_normal, hidden_anomalous,
                          trainer.threshold, trainer.map_range)
    if predictions.anomaly_maps is None or max_maps <= 0:
        return
    chosen = [i for label in (0, 1) for i in np.flatnonzero(predictions.labels == label)[:max_maps]]
    images = collect_images(test_loader, chosen, trainer.train_config.normalize)
    full = [images.get(i) for i in range(len(predictions.labels))]
    trainer.save_maps(run_dir, f"image_{name}", predictions, full, max_per_class=max_maps)


def normal_threshold_results(trainer: BaseTrainer, predictions: Predictions) -> dict[str, Any]:
    """The label-free threshold and what it does on the test set (None without a validation split)."""
    statistics = trainer.normal_statistics
    if statistics is None:
        return {"normal_threshold": None, "normal_threshold_fpr": None, "normal_threshold_recall": None}
    row = evaluate_threshold(predictions.labels, predictions.scores, statistics.image_threshold, statistics.threshold_name)
    return {"normal_threshold": statistics.image_threshold, "normal_threshold_fpr": row.fpr,
            "normal_threshold_recall": row.recall, "normal_statistics": statistics.as_dict()}


def train(
    dataset_type: str,
    category: str | Sequence[str],
    model_type: str,
    num_epochs: int | None = None,
    batch_size: int | None = None,
    img_size: int | None = None,
    normalize: bool | None = None,
    *,
    output_dir: str | Path | None = None,
    dataset_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    device: str | None = None,
    max_maps: int = 5,
    run_dir: str | Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train ``model_type`` on one category and evaluate it on the test split.

    Every argument overrides the registry's default for this run: training keys (num_epochs,
    batch_size, img_size, normalize, seed, validate_every, ...) and model keys (backbone,
    layers, coreset_ratio, ...). For ``dataset_type="folder"`` the folders are keywords too
    (``normal_dir``, ``abnormal_dir``, ``mask_dir``, ``normal_test_dir``, ``normal_split_ratio``)
    and ``category`` names the run. ``run_dir`` names the exact folder to write (a sweep assigns
    and records its jobs' folders); without it the folder is chosen as the module docstring says.
    Returns the metrics and run facts (also in metrics.json).

    A list of categories trains ONE model on all of their normal images and reports each
    category and the mean (:mod:`anomalyzoo.multiclass`, under ``<dataset>/multiclass-<n>/<model>/``).
    """
    if not isinstance(category, str):
        from anomalyzoo.multiclass import train_multiclass

        return train_multiclass(dataset_type, category, model_type, num_epochs=num_epochs, batch_size=batch_size,
                                img_size=img_size, normalize=normalize, output_dir=output_dir, dataset_dir=dataset_dir,
                                overwrite=overwrite, resume=resume, device=device, max_maps=max_maps, run_dir=run_dir,
                                **overrides)
    ModelRegistry.get(model_type)  # unknown names fail before any work
    overrides = {"num_epochs": num_epochs, "batch_size": batch_size, "img_size": img_size, "normalize": normalize, **overrides}
    folder_options = {key: overrides.pop(key) for key in FOLDER_OPTIONS if key in overrides}
    if folder_options and dataset_type != "folder":  # never drop a folder the user named
        raise ValueError(f"{sorted(folder_options)} apply to dataset_type 'folder', not '{dataset_type}'")
    model_overrides, train_config = split_overrides(model_type, overrides)
    set_seed(train_config.seed)
    settings = get_settings()
    name = run_name(dataset_type, category, model_type)
    base_dir = Path(output_dir or settings.output_dir) / dataset_type / category / model_type
    run_dir = Path(run_dir) if run_dir is not None else choose_run_dir(base_dir, overwrite, resume)
    run_dir.mkdir(parents=True, exist_ok=True)

    train_loader, test_loader = get_dataloaders(
        dataset_type, category, img_size=train_config.img_size, batch_size=train_config.batch_size,
        normalize=train_config.normalize, dataset_dir=dataset_dir, seed=train_config.seed,
        folder_options=folder_options or None, crop_pct=train_config.crop_pct,
    )
    # validation = a seeded share of the *normal training* images; the test split is only read
    # by the final evaluation below
    train_loader, val_loader = split_validation(train_loader, train_config.val_fraction, train_config.seed)
    num_val_images = len(val_loader.dataset) if val_loader is not None else 0
    print(f"{model_type}: {len(train_loader.dataset)} training images, {num_val_images} held out for validation "
          f"(val_fraction={train_config.val_fraction})")
    trainer = ModelRegistry.get_trainer(model_type, model_overrides, train_config, device)
    notes: dict[str, str] = {}
    labelled_fraction = float(getattr(trainer, "labelled_anomaly_fraction", 0.0))
    if labelled_fraction > 0:  # supervised models: labelled defects leave the test split for training
        train_loader, test_loader, notes["labelled_anomalies"] = move_labelled_anomalies(
            train_loader, test_loader, labelled_fraction, train_config.seed)
        print(notes["labelled_anomalies"])
    trainer.dataset_dir = Path(dataset_dir if dataset_dir is not None else settings.dataset_dir).expanduser()
    checkpoint_dir = run_dir / "checkpoints" if trainer.uses_optimizer else None
    if resume:
        trainer.load_model(run_dir / "checkpoints" / "last.pth", restore_rng=True)
        print(f"Resuming {model_type} from epoch {trainer.epoch} in {run_dir}")

    start = time.perf_counter()
    trainer.fit(train_loader, val_loader, checkpoint_dir=checkpoint_dir)
    if val_loader is not None:
        trainer.calibrate(val_loader)  # label-free threshold and score normalisation
    fit_seconds = time.perf_counter() - start

    predictions = trainer.validation_epoch(test_loader)
    metrics = compute_metrics(predictions.labels, predictions.scores, predictions.masks, predictions.anomaly_maps)
    trainer.thresholds["f1_optimal"] = metrics["image_f1_threshold"]
    if trainer.threshold is None:  # no validation split: the only threshold left needs the test labels
        trainer.threshold, trainer.threshold_source = metrics["image_f1_threshold"], "f1_optimal"
    if trainer.map_range is None and predictions.anomaly_maps is not None:
        trainer.map_range = (float(predictions.anomaly_maps.min()), float(predictions.anomaly_maps.max()))
    checkpoint = trainer.save_model(run_dir / f"model_{name}_epochs-{trainer.epoch}.pth")
    model_results = trainer.model_test_results(test_loader)

    result: dict[str, Any] = {
        "dataset": dataset_type, "category": category, "model": model_type,
        **{key: metrics.get(key) for key in RESULT_METRIC_KEYS},
        "threshold": trainer.threshold,
        "threshold_source": trainer.threshold_source,
        **normal_threshold_results(trainer, predictions),
        "image_f1_threshold": metrics.get("image_f1_threshold"),
        "pixel_f1_threshold": metrics.get("pixel_f1_threshold"),
        "anomaly_maps": predictions.anomaly_maps is not None,
        "num_epochs": trainer.epoch,
        "num_steps": trainer.global_step,
        "notes": {**notes, **trainer.run_notes()},
        "model_results": model_results or None,
        "fit_seconds": fit_seconds,
        "inference_ms_per_image": predictions.ms_per_image,
        "peak_memory_mb": peak_rss_mb(),
        "gpu_peak_memory_mb": torch.cuda.max_memory_allocated(trainer.device) / 2**20 if trainer.device.type == "cuda" else None,
        "num_train_images": len(train_loader.dataset),
        "num_val_images": num_val_images,
        "num_test_images": len(test_loader.dataset),
        "model_config": trainer.model_config,
        "train_config": {k: getattr(train_config, k) for k in TRAIN_KEYS},
        "device": str(trainer.device),
        "output_dir": str(run_dir),
        "checkpoint": str(checkpoint),
    }
    header = {k: result[k] for k in ("dataset", "category", "model", "num_epochs", "fit_seconds", "inference_ms_per_image", "device")}
    header.update(model_config=trainer.model_config, seed=train_config.seed, img_size=train_config.img_size,
                  num_train_images=len(train_loader.dataset),
                  validation=f"{num_val_images} normal training images held out (val_fraction={train_config.val_fraction}, "
                             f"seed {train_config.seed}); the test split is used only for this evaluation")
    header.update(notes)
    header.update(trainer.run_notes())
    header.update(model_results)
    if predictions.anomaly_maps is None:
        header["pixel_metrics"] = "n/a: this model scores whole images and makes no anomaly map"
    elif predictions.masks is None:
        header["pixel_metrics"] = "n/a: the dataset has no ground-truth masks"
    save_outputs(trainer, predictions, metrics, test_loader, run_dir, name, header, max_maps)
    result = {k: _json_value(v) for k, v in result.items()}
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    clear_dataloader(train_loader, test_loader)
    return result


def train_models(
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
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Every model on every category (and seed): one job each, run by ``executor`` ("local": one
    after the other in this process; "process": a pool of processes on this machine; "ray": a Ray
    cluster, ``ray_address`` as for ``ray.init``, each job asking for ``cpus_per_run`` CPUs and
    ``gpus_per_run`` GPUs). A failure is reported and the rest go on. ``output_dir`` is the sweep's
    folder: re-running the same call skips the finished jobs (``overwrite=True`` runs them again)
    and retries the failed ones. Ends with ``summary.csv`` / ``summary.md`` in that folder; returns
    one row per job. See :mod:`anomalyzoo.sweep`."""
    from anomalyzoo.sweep import run_sweep

    return run_sweep(dataset_type, categories, model_types, output_dir=output_dir, seeds=seeds, executor=executor,
                     ray_address=ray_address, workers=workers, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                     overwrite=overwrite, **overrides)
