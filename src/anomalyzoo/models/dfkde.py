"""DFKDE: Deep Feature Kernel Density Estimation (anomalib's ``Dfkde``; no paper of its own).

The method, as anomalib's ``KDEClassifier`` defines it:
- Features: the last stage (``layer4``) of an ImageNet-pretrained CNN, global-average-pooled to one
  vector per image (several layers are concatenated along the channels).
- PCA to 16 components (``n_pca_components``), fitted on the training vectors.
- Scaling of the PCA coefficients: ``"scale"`` divides every vector by the largest norm seen in
  training (so training vectors lie in the unit ball); ``"norm"`` makes each vector unit length.
- A Gaussian KDE with Scott's bandwidth (``components.gaussian_kde``) over at most 40,000 training
  vectors (``max_training_points``; a seeded random subset when there are more).
- Score: the negative log-likelihood of the test vector under the KDE. anomalib then squashes the
  log-likelihood with a fixed sigmoid ``1 / (1 + exp(0.05 (log p - 12)))``; that map is strictly
  decreasing in ``log p``, so the NLL ranks the images identically and keeps the scores'
  spread visible (the sigmoid saturates at 1 for most images of a foreign category).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components.gaussian_kde import GaussianKDE
from anomalyzoo.models.components.pca import PCA
from anomalyzoo.models.components.trainer import FeatureBankTrainer, TrainConfig
from anomalyzoo.models.components.variants import ModelVariant

FEATURE_SCALING_METHODS = ("scale", "norm")


class DfkdeModel(nn.Module):
    """Image-level only: ``forward`` returns ``pred_score`` and no ``anomaly_map``."""

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[str] = ("layer4",),
        n_pca_components: int = 16,
        feature_scaling_method: str = "scale",
        pretrained: bool = True,
        input_normalized: bool = True,
    ) -> None:
        super().__init__()
        if feature_scaling_method not in FEATURE_SCALING_METHODS:
            raise ValueError(f"feature_scaling_method must be one of {FEATURE_SCALING_METHODS}, got {feature_scaling_method!r}")
        self.layers = list(layers)
        self.feature_scaling_method = feature_scaling_method
        self.feature_extractor = TimmFeatureExtractor(backbone, self.layers, pretrained=pretrained, input_normalized=input_normalized)
        self.pca = PCA(n_components=int(n_pca_components))
        self.kde = GaussianKDE()
        self.register_buffer("max_length", torch.empty(0))  # largest training norm, for "scale"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) globally average-pooled features of the chosen layers."""
        features = self.feature_extractor(images)
        return torch.cat([F.adaptive_avg_pool2d(features[layer], 1).flatten(1) for layer in self.layers], dim=1)

    def scale(self, coefficients: torch.Tensor) -> torch.Tensor:
        if self.feature_scaling_method == "norm":
            return coefficients / torch.linalg.vector_norm(coefficients, dim=1, keepdim=True).clamp_min(1e-12)
        return coefficients / self.max_length

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        """``embeddings`` (N, C) of the (already subsampled) normal training images."""
        needed = self.pca.n_components + 1
        if embeddings.shape[0] < needed:
            raise ValueError(f"DFKDE with {self.pca.n_components} PCA components needs at least {needed} training "
                             f"images (a {self.pca.n_components}-d KDE needs an invertible covariance), got {embeddings.shape[0]}")
        coefficients = self.pca.fit_transform(embeddings)
        self.max_length = torch.linalg.vector_norm(coefficients, dim=1).max().reshape(1)
        self.kde.fit(self.scale(coefficients))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.kde.is_fitted:
            raise RuntimeError("DFKDE is not fitted yet: fit it on normal images first")
        coefficients = self.scale(self.pca.transform(self.embed(images)))
        return {"pred_score": -self.kde.log_density(coefficients)}


class DfkdeTrainer(FeatureBankTrainer):
    """One pass collects a pooled feature vector per training image; PCA and the KDE are fitted at
    the end of the epoch (no gradients, no optimiser). ``max_training_points`` caps the KDE's
    samples (a seeded subset), as anomalib does."""

    model_class = DfkdeModel

    def __init__(self, *, max_training_points: int = 40000, train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        if max_training_points < 1:
            raise ValueError(f"max_training_points must be >= 1, got {max_training_points}")
        self.max_training_points = max_training_points
        super().__init__(train_config, device, **model_options)

    def collect(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)  # (B, C) pooled vectors

    def fit_features(self, embeddings: torch.Tensor) -> None:
        if embeddings.shape[0] > self.max_training_points:
            generator = torch.Generator().manual_seed(self.train_config.seed)
            keep = torch.randperm(embeddings.shape[0], generator=generator)[:self.max_training_points]
            embeddings = embeddings[keep.sort().values]
        self.model.fit(embeddings.to(self.device))


VARIANTS = {
    "dfkde": ModelVariant(
        trainer=DfkdeTrainer, family="memory",
        train={"num_epochs": 1, "batch_size": 8, "img_size": 256, "normalize": True},  # SPEC sec. 7
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64},
    ),
}
