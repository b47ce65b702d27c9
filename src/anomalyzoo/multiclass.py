"""Multi-class training: ONE model on the union of several categories' normal images, evaluated
on each category's test split (the "unified" protocol of UniAD and Dinomaly, arXiv 2405.14325
sec. 4.1: one model for all 15 MVTec AD categories, metrics per category and their mean).

``train(dataset, ["bottle", "cable"], model)`` (a list where ``train`` takes one category) and
``anomalyzoo train --category bottle cable --multiclass`` come here. It is only data: every
model trains on the pooled images exactly as on one category, so every registry entry works.

Outputs, under ``OUTPUT_DIR/<dataset>/multiclass-<n>/<model>/`` (``n`` the number of categories;
another run of the same size goes to ``<model>-run2``, ... as for one category):

- ``model_<dataset>_multiclass-<n>_<model>_epochs-<N>.pth``: the one checkpoint;
- ``<category>/``: that category's files as a single-category run writes them
  (``results_<dataset>_<category>_<model>_thresholds.txt``, histogram, maps, scores, ``metrics.json``);
- ``summary.csv`` / ``summary.md``: one row per category and their mean; ``metrics.json``: all of it.

Validation (early stopping, the label-free threshold, score normalisation) holds out a seeded
share of the *pooled* normal training images, so the model gets one threshold for every
category, as a deployed multi-class model would. The per-category results list each
category's own F1-optimal threshold beside it.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from anomalyzoo.data import get_dataloaders, split_validation
from anomalyzoo.metrics import compute_metrics
from anomalyzoo.models.components.trainer import TRAIN_KEYS
from anomalyzoo.registry import ModelRegistry
from anomalyzoo.settings import get_settings

SUMMARY_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "image_ap", "pixel_f1_max", "pixel_ap")


def multiclass_name(categories: Sequence[str]) -> str:
    """The run's stand-in for a category in paths and names: ``multiclass-<n>``."""
    return f"multiclass-{len(categories)}"


def check_categories(dataset_type: str, categories: Sequence[str]) -> list[str]:
    categories = [str(c) for c in categories]
    if not categories:
        raise ValueError("Multi-class training needs at least one category, got an empty list")
    duplicates = sorted({c for c in categories if categories.count(c) > 1})
    if duplicates:
        raise ValueError(f"Categories listed twice: {duplicates}")
    if dataset_type == "folder":
        raise ValueError("dataset_type 'folder' has one category per run; multi-class training needs a dataset of "
                         "categories (mvtec, visa, btad, custom)")
    return categories


def pooled_loader(loaders: Sequence[DataLoader], batch_size: int, seed: int) -> DataLoader:
    """One shuffled loader over every category's training images (seeded as a single category's)."""
    first = loaders[0]
    return DataLoader(ConcatDataset([loader.dataset for loader in loaders]), batch_size=batch_size, shuffle=True,
                      drop_last=False, generator=torch.Generator().manual_seed(int(seed)),
                      num_workers=first.num_workers, pin_memory=first.pin_memory,
                      persistent_workers=first.persistent_workers)


def mean_metrics(per_category: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The mean over categories of each summary metric (None where some category has none)."""
    means: dict[str, float | None] = {}
    for key in SUMMARY_KEYS:
        values = [row.get(key) for row in per_category.values()]
        usable = [float(v) for v in values if v is not None and np.isfinite(v)]
        means[key] = float(np.mean(usable)) if usable and len(usable) == len(values) else None
    return means


def write_summary(run_dir: Path, per_category: dict[str, dict[str, Any]], mean: dict[str, float | None]) -> None:
    rows = [{"category": c, **{k: row.get(k) for k in SUMMARY_KEYS}} for c, row in per_category.items()]
    rows.append({"category": "mean", **mean})
    with (run_dir / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["category", *SUMMARY_KEYS])
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = ["| category | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
    lines += [f"| {row['category']} | " + " | ".join(cell(row[k]) for k in SUMMARY_KEYS) + " |" for row in rows]
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")


def train_multiclass(
    dataset_type: str,
    categories: Sequence[str],
    model_type: str,
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
    """One ``model_type`` on the union of ``categories``; metrics per category and their mean
    (see the module docstring). ``overrides`` as for :func:`anomalyzoo.train.train`."""
    from anomalyzoo.train import (  # the single-category helpers, shared so both write the same files
        _json_value,
        choose_run_dir,
        normal_threshold_results,
        peak_rss_mb,
        run_name,
        save_outputs,
        set_seed,
        split_overrides,
    )

    ModelRegistry.get(model_type)
    categories = check_categories(dataset_type, categories)
    model_overrides, train_config = split_overrides(model_type, overrides)
    set_seed(train_config.seed)
    settings = get_settings()
    group = multiclass_name(categories)
    base_dir = Path(output_dir or settings.output_dir) / dataset_type / group / model_type
    run_dir = Path(run_dir) if run_dir is not None else choose_run_dir(base_dir, overwrite, resume)
    run_dir.mkdir(parents=True, exist_ok=True)

    loaders = {c: get_dataloaders(dataset_type, c, img_size=train_config.img_size, batch_size=train_config.batch_size,
                                  normalize=train_config.normalize, dataset_dir=dataset_dir, seed=train_config.seed,
                                  crop_pct=train_config.crop_pct)
               for c in categories}
    pooled = pooled_loader([train for train, _ in loaders.values()], train_config.batch_size, train_config.seed)
    train_loader, val_loader = split_validation(pooled, train_config.val_fraction, train_config.seed)
    num_val_images = len(val_loader.dataset) if val_loader is not None else 0
    print(f"{model_type} on {len(categories)} categories ({', '.join(categories)}): {len(train_loader.dataset)} "
          f"training images, {num_val_images} held out for validation")
    trainer = ModelRegistry.get_trainer(model_type, model_overrides, train_config, device)
    trainer.dataset_dir = Path(dataset_dir if dataset_dir is not None else settings.dataset_dir).expanduser()
    checkpoint_dir = run_dir / "checkpoints" if trainer.uses_optimizer else None
    if resume:
        trainer.load_model(run_dir / "checkpoints" / "last.pth", restore_rng=True)

    start = time.perf_counter()
    trainer.fit(train_loader, val_loader, checkpoint_dir=checkpoint_dir)
    if val_loader is not None:
        trainer.calibrate(val_loader)
    fit_seconds = time.perf_counter() - start

    predictions = {c: trainer.validation_epoch(test) for c, (_, test) in loaders.items()}
    metrics = {c: compute_metrics(p.labels, p.scores, p.masks, p.anomaly_maps) for c, p in predictions.items()}
    pooled_labels = np.concatenate([p.labels for p in predictions.values()])
    pooled_scores = np.concatenate([p.scores for p in predictions.values()])
    pooled_f1 = compute_metrics(pooled_labels, pooled_scores, None, None)["image_f1_threshold"]
    if trainer.threshold is None:  # no validation split: the pooled test set's F1-optimal threshold
        trainer.threshold, trainer.threshold_source = pooled_f1, "f1_optimal"
    if trainer.map_range is None:
        maps = [p.anomaly_maps for p in predictions.values() if p.anomaly_maps is not None]
        if maps:
            trainer.map_range = (float(min(m.min() for m in maps)), float(max(m.max() for m in maps)))

    per_category: dict[str, dict[str, Any]] = {}
    for category, (_, test_loader) in loaders.items():
        category_dir = run_dir / category.replace("/", "_")
        category_dir.mkdir(parents=True, exist_ok=True)
        prediction, metric = predictions[category], metrics[category]
        trainer.thresholds["f1_optimal"] = metric["image_f1_threshold"]  # this category's, for its report
        row = {"dataset": dataset_type, "category": category, "model": model_type, "multiclass": categories,
               **{key: metric.get(key) for key in SUMMARY_KEYS},
               "threshold": trainer.threshold, "threshold_source": trainer.threshold_source,
               **normal_threshold_results(trainer, prediction),
               "image_f1_threshold": metric.get("image_f1_threshold"),
               "num_test_images": len(test_loader.dataset),
               "inference_ms_per_image": prediction.ms_per_image}
        header = {"dataset": dataset_type, "category": category, "model": model_type,
                  "trained_on": f"one model on the normal images of {len(categories)} categories: {', '.join(categories)}",
                  "num_epochs": trainer.epoch, "fit_seconds": fit_seconds, "device": str(trainer.device),
                  "model_config": trainer.model_config, "seed": train_config.seed, "img_size": train_config.img_size}
        save_outputs(trainer, prediction, metric, test_loader, category_dir, run_name(dataset_type, category, model_type),
                     header, max_maps)
        row = {k: _json_value(v) for k, v in row.items()}
        (category_dir / "metrics.json").write_text(json.dumps(row, indent=2, default=str))
        per_category[category] = row
    trainer.thresholds["f1_optimal"] = pooled_f1
    checkpoint = trainer.save_model(run_dir / f"model_{run_name(dataset_type, group, model_type)}_epochs-{trainer.epoch}.pth")

    mean = mean_metrics(per_category)
    write_summary(run_dir, per_category, mean)
    result: dict[str, Any] = {
        "dataset": dataset_type, "category": group, "categories": categories, "model": model_type,
        **mean,  # the headline numbers of a multi-class run are the means over its categories
        "per_category": per_category,
        "threshold": trainer.threshold, "threshold_source": trainer.threshold_source,
        "num_epochs": trainer.epoch, "num_steps": trainer.global_step, "fit_seconds": fit_seconds,
        "inference_ms_per_image": float(np.mean([p.ms_per_image for p in predictions.values()])),
        "peak_memory_mb": peak_rss_mb(),
        "num_train_images": len(train_loader.dataset), "num_val_images": num_val_images,
        "num_test_images": sum(len(test.dataset) for _, test in loaders.values()),
        "model_config": trainer.model_config,
        "train_config": {k: getattr(train_config, k) for k in TRAIN_KEYS},
        "device": str(trainer.device), "output_dir": str(run_dir), "checkpoint": str(checkpoint),
    }
    result = {k: _json_value(v) for k, v in result.items()}
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    return result
