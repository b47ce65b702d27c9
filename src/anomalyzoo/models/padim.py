"""PaDiM: "A Patch Distribution Modeling Framework for Anomaly Detection and Localization"
(Defard et al., arXiv 2011.08785).

- Embedding (sec. 3.1): activations of layer1-3 of a pretrained CNN; deeper maps are upsampled
  (nearest) to layer1's grid and concatenated per position.
- Random dimensionality reduction (sec. 3.2 and Table 1): a fixed random subset of the channels,
  100 for ResNet18-sized embeddings (448 channels) and 550 for Wide-ResNet50 (1792); we keep 550
  for embeddings of >= 1000 channels and at most 100 otherwise (EfficientNet-Lite0 has 176).
- Per-position multivariate Gaussian with covariance regularised by 0.01 * I (eq. 1).
- Score (sec. 3.3, eq. 2): Mahalanobis distance at each position; the map is upsampled
  bilinearly (align_corners=False) to the input and smoothed with a Gaussian of sigma = 4
  (kernel truncated at 4 sigma, as the authors' ``scipy.ndimage.gaussian_filter(sigma=4)``); the
  image score is its max. At the borders we reflect without repeating the edge pixel, like
  anomalib's blur; the authors' scipy default repeats it, which changes only the outer 16 px.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.blur import GaussianBlur2d
from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components.multi_variate_gaussian import MultiVariateGaussian
from anomalyzoo.models.components.trainer import FeatureBankTrainer
from anomalyzoo.models.components.variants import ModelVariant


def default_num_features(total_channels: int) -> int:
    """Paper Table 1: d = 100 for ResNet18 (448 ch), d = 550 for WRN-50-2 (1792 ch)."""
    return 550 if total_channels >= 1000 else min(100, total_channels)


class PadimModel(nn.Module):
    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        n_features: int | None = None,
        pretrained: bool = True,
        input_normalized: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.layers = list(layers)
        self.feature_extractor = TimmFeatureExtractor(backbone, self.layers, pretrained=pretrained, input_normalized=input_normalized)
        total = sum(self.feature_extractor.out_dims)
        n_features = n_features or default_num_features(total)
        if not 0 < n_features <= total:
            raise ValueError(f"n_features must be in 1..{total} for {backbone} {self.layers}, got {n_features}")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("channel_index", torch.randperm(total, generator=generator)[:n_features].sort().values)
        self.gaussian = MultiVariateGaussian()
        self.blur = GaussianBlur2d(sigma=4.0)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) embedding on layer1's grid, restricted to the random channel subset."""
        features = self.feature_extractor(images)
        maps = [features[layer] for layer in self.layers]
        grid = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="nearest") for m in maps]
        return torch.cat(maps, dim=1).index_select(1, self.channel_index)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.gaussian.mean.numel() == 0:
            raise RuntimeError("PaDiM is not fitted yet: fit it on normal images first")
        embedding = self.embed(images)
        batch, _, height, width = embedding.shape
        distances = self.gaussian.mahalanobis(embedding.reshape(batch, embedding.shape[1], -1))
        score_map = distances.reshape(batch, 1, height, width)
        score_map = F.interpolate(score_map, size=images.shape[-2:], mode="bilinear", align_corners=False)
        anomaly_map = self.blur(score_map)[:, 0]
        return {"pred_score": anomaly_map.amax(dim=(-2, -1)), "anomaly_map": anomaly_map}


class PadimTrainer(FeatureBankTrainer):
    """Collects embeddings of the normal images in one pass, then fits the Gaussians."""

    model_class = PadimModel
    supports_tiling = True  # components.tiler: train and score on tiles of large images

    def collect(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images).flatten(2)  # (B, d, h * w)

    def fit_features(self, features: torch.Tensor) -> None:
        self.model.gaussian.fit(features.to(self.device))


VARIANTS = {
    "padim": ModelVariant(
        trainer=PadimTrainer, family="memory",
        train={"num_epochs": 1, "batch_size": 4, "img_size": 256, "normalize": True},  # SPEC sec. 7
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64},
    ),
}
