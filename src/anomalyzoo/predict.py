"""Load a saved run and score new images: ``anomalyzoo predict --checkpoint PATH IMAGES...``."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalyzoo.data.transforms import denormalize, image_to_tensor, load_rgb_image
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig, read_checkpoint
from anomalyzoo.registry import ModelRegistry
from anomalyzoo.report import save_anomaly_map_figure


def load_trainer(checkpoint_path: str | Path, device: str | None = None) -> BaseTrainer:
    """Rebuild the trainer a checkpoint came from and load its state.

    The backbone is built without pretrained weights (``pretrained=False``): the checkpoint holds
    every weight, so predicting needs no backbone file and no network.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    model_type = checkpoint["model_type"]
    model_config = dict(checkpoint["model_config"])
    pretrained = model_config.get("pretrained")
    if "pretrained" in ModelRegistry.get_trainer_class(model_type).option_defaults():
        model_config["pretrained"] = False
    trainer = ModelRegistry.get_trainer(model_type, model_config, TrainConfig.from_dict(checkpoint["train_config"]), device)
    if pretrained is not None:
        trainer.model_options["pretrained"] = pretrained  # record what the run used, not how it was rebuilt
    return trainer.load_model(checkpoint_path)


def choose_threshold(trainer: BaseTrainer, threshold: str | float = "normal") -> tuple[float | None, str]:
    """(value, name) of the decision threshold: ``"normal"`` is the label-free threshold stored at
    training (a percentile of held-out normal scores), ``"f1"`` the F1-optimal one of the test
    evaluation, a number is used as given. Without a stored normal threshold (a run trained with
    val_fraction=0) "normal" falls back to whatever the run stored, and says so."""
    if isinstance(threshold, (int, float)):
        return float(threshold), "given"
    text = str(threshold).strip().lower()
    try:
        return float(text), "given"
    except ValueError:
        pass
    if text == "f1":
        if "f1_optimal" not in trainer.thresholds:
            raise ValueError("this checkpoint stores no F1-optimal threshold (it was saved before a test evaluation)")
        return trainer.thresholds["f1_optimal"], "f1_optimal"
    if text != "normal":
        raise ValueError(f"threshold must be 'normal', 'f1' or a number, got {threshold!r}")
    if trainer.normal_statistics is not None:
        return trainer.normal_statistics.image_threshold, trainer.normal_statistics.threshold_name
    print(f"note: the checkpoint has no label-free threshold (trained with val_fraction=0); using {trainer.threshold_source}")
    return trainer.threshold, trainer.threshold_source or "none"


def predict_images(
    checkpoint_path: str | Path,
    image_paths: Sequence[str | Path],
    output_dir: str | Path,
    device: str | None = None,
    batch_size: int = 8,
    threshold: str | float = "normal",
) -> list[dict[str, Any]]:
    """Score each image; write ``<stem>_anomaly_map.png`` (figure), ``<stem>_anomaly_map.npy``
    and ``scores.csv`` (path, score, normalized score, verdict, threshold) to ``output_dir``.

    ``normalized_score`` is 0.5 at the label-free threshold for every model (see
    ``metrics.normalization``); it is empty for checkpoints trained without a validation split."""
    trainer = load_trainer(checkpoint_path, device)
    threshold_value, threshold_name = choose_threshold(trainer, threshold)
    config = trainer.train_config
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = trainer.map_range if trainer.map_range is not None else (None, None)
    rows: list[dict[str, Any]] = []
    paths = [Path(p) for p in image_paths]
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = torch.stack([image_to_tensor(load_rgb_image(p), config.img_size, config.normalize) for p in chunk])
        output = trainer.predict(images)
        scores = output["pred_score"].float().cpu().numpy()
        maps = output.get("anomaly_map")
        maps = maps.float().cpu().numpy() if maps is not None else None
        for i, path in enumerate(chunk):
            score = float(scores[i])
            verdict = "" if threshold_value is None else ("anomalous" if score >= threshold_value else "normal")
            normalized = "" if trainer.normal_statistics is None else float(trainer.normal_statistics.normalize_scores(score))
            row: dict[str, Any] = {"path": str(path), "score": score, "normalized_score": normalized, "verdict": verdict,
                                   "threshold": threshold_value, "threshold_name": threshold_name, "map": ""}
            if maps is not None:
                np.save(output_dir / f"{path.stem}_anomaly_map.npy", maps[i].astype(np.float32))
                figure = save_anomaly_map_figure(
                    output_dir / f"{path.stem}_anomaly_map.png", denormalize(images[i], config.normalize), maps[i],
                    None, score, threshold=threshold_value, vmin=vmin, vmax=vmax, title=path.name,
                )
                row["map"] = str(figure)
            rows.append(row)
    with open(output_dir / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
