"""A label-free threshold and a score normalisation, both from held-out *normal* images only.

Every model scores on its own scale (a Mahalanobis distance, a cosine distance, a negative
log-density...), so a raw score of 3.2 means nothing across models. After fitting, the trainer
scores the validation normals (a seeded share of the training images, never the test split) and
keeps:

- the **normal threshold**: the ``percentile``-th percentile of their image scores (99 by default:
  about 1 % of normal images flagged); no defect label is needed to choose it;
- the **pixel threshold**: the same percentile of each validation image's largest map value, so a
  map pixel above it is hotter than the hottest pixel of 99 % of normal images;
- the range (min, max) of the normal scores and map values.

``min_max_normalize`` then maps a raw value ``v`` to ``clip((v - threshold) / (max - min) + 0.5, 0, 1)``
(anomalib's min-max normalisation centred on the threshold): 0.5 is the decision boundary for
every model, values above 0.5 are anomalous, and the spread of normal scores sets the scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class NormalStatistics:
    percentile: float
    num_images: int
    image_threshold: float
    image_min: float
    image_max: float
    pixel_threshold: float | None = None
    pixel_min: float | None = None
    pixel_max: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "NormalStatistics":
        return cls(**values)

    @property
    def threshold_name(self) -> str:
        return f"normal_val_p{self.percentile:g}"

    def normalize_scores(self, scores: np.ndarray) -> np.ndarray:
        return min_max_normalize(scores, self.image_threshold, self.image_min, self.image_max)

    def normalize_maps(self, maps: np.ndarray) -> np.ndarray:
        if self.pixel_threshold is None or self.pixel_min is None or self.pixel_max is None:
            raise ValueError("these statistics were computed without anomaly maps")
        return min_max_normalize(maps, self.pixel_threshold, self.pixel_min, self.pixel_max)

    def map_display_range(self) -> tuple[float, float] | None:
        """Raw map values that normalise to 0 and 1: a colour scale on which the pixel threshold
        sits in the middle, the same for every image."""
        if self.pixel_threshold is None or self.pixel_min is None or self.pixel_max is None:
            return None
        half_span = 0.5 * _span(self.pixel_min, self.pixel_max, self.pixel_threshold)
        return self.pixel_threshold - half_span, self.pixel_threshold + half_span


def _span(minimum: float, maximum: float, threshold: float) -> float:
    """max - min, kept positive when every normal score is the same."""
    span = float(maximum) - float(minimum)
    return span if span > 0 else max(abs(float(threshold)), 1.0) * 1e-6


def min_max_normalize(values: np.ndarray | float, threshold: float, minimum: float, maximum: float) -> np.ndarray:
    """``clip((values - threshold) / (maximum - minimum) + 0.5, 0, 1)``: the threshold maps to 0.5."""
    normalized = (np.asarray(values, dtype=np.float64) - threshold) / _span(minimum, maximum, threshold) + 0.5
    return np.clip(normalized, 0.0, 1.0)


def normal_statistics(scores: np.ndarray, anomaly_maps: np.ndarray | None, percentile: float = 99.0) -> NormalStatistics:
    """Thresholds and ranges of the scores (N,) and maps (N, H, W) of N normal images."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("normal statistics need at least one normal image")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"threshold_percentile must be in (0, 100], got {percentile}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("the model gave non-finite scores on normal validation images")
    values: dict[str, Any] = {
        "percentile": float(percentile),
        "num_images": int(scores.size),
        "image_threshold": float(np.percentile(scores, percentile)),
        "image_min": float(scores.min()),
        "image_max": float(scores.max()),
    }
    if anomaly_maps is not None:
        maps = np.asarray(anomaly_maps, dtype=np.float64).reshape(scores.size, -1)
        values.update(
            pixel_threshold=float(np.percentile(maps.max(axis=1), percentile)),
            pixel_min=float(maps.min()),
            pixel_max=float(maps.max()),
        )
    return NormalStatistics(**values)
