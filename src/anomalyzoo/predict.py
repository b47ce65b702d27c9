"""Load a saved run and score new images: ``anomalyzoo predict --checkpoint PATH IMAGES...``."""

from __future__ import annotations

import csv
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalyzoo.data.transforms import denormalize, image_to_tensor, load_rgb_image
from anomalyzoo.models.components.trainer import BaseTrainer, read_checkpoint
from anomalyzoo.registry import ModelRegistry


def load_trainer(checkpoint_path: str | Path, device: str | None = None) -> BaseTrainer:
    """Rebuild the trainer a checkpoint came from and load its state.

    The backbone is built without pretrained weights (``pretrained=False``): the checkpoint holds
    every weight, so predicting needs no backbone file and no network.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    model_type = checkpoint["model_type"]
    model_config = dict(checkpoint["model_config"])
    trainer_class = ModelRegistry.get_trainer_class(model_type)
    if "pretrained" in inspect.signature(trainer_class.__init__).parameters:
        model_config["pretrained"] = False
    train_config = dict(checkpoint["train_config"])
    trainer = ModelRegistry.get_trainer(model_type, model_config, train_config, device)
    trainer.model_config = dict(checkpoint["model_config"])
    return trainer.load_model(checkpoint_path)


def predict_images(
    checkpoint_path: str | Path,
    image_paths: Sequence[str | Path],
    output_dir: str | Path,
    device: str | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Score each image; write ``<stem>_anomaly_map.png`` (figure), ``<stem>_anomaly_map.npy``
    and ``scores.csv`` (path, score, verdict) to ``output_dir``."""
    from anomalyzoo.report import save_anomaly_map_figure

    trainer = load_trainer(checkpoint_path, device)
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
            verdict = "" if trainer.threshold is None else ("anomalous" if score >= trainer.threshold else "normal")
            row: dict[str, Any] = {"path": str(path), "score": score, "verdict": verdict, "map": ""}
            if maps is not None:
                np.save(output_dir / f"{path.stem}_anomaly_map.npy", maps[i].astype(np.float32))
                figure = save_anomaly_map_figure(
                    output_dir / f"{path.stem}_anomaly_map.png", denormalize(images[i], config.normalize), maps[i],
                    None, score, threshold=trainer.threshold, vmin=vmin, vmax=vmax, title=path.name,
                )
                row["map"] = str(figure)
            rows.append(row)
    with open(output_dir / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "score", "verdict", "map"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
