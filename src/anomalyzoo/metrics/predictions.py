"""What evaluating a model on a split produces: per-image scores and labels, and per-pixel maps
and masks, as numpy arrays on the CPU. The trainer makes them; metrics and reports read them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Predictions:
    """Everything evaluation produces, as numpy arrays on the CPU."""

    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,) 0 normal, 1 anomalous
    anomaly_maps: np.ndarray | None  # (N, H, W) float32, None for image-level models
    masks: np.ndarray | None  # (N, H, W) uint8, None when the dataset has no masks
    paths: list[str] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    model_seconds: float = 0.0  # time spent in validation_step (the model), not in loading

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.model_seconds / max(len(self.scores), 1)
