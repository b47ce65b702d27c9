"""DFM: Deep Feature Modeling, after "Probabilistic Modeling of Deep Features for
Out-of-Distribution and Adversarial Detection" (Ahuja et al., arXiv 1909.11786), as anomalib
adapts it to anomaly detection (``models/image/dfm``).

- Deep features: the output of one stage of an ImageNet-pretrained CNN (``layer3`` of ResNet-50 by
  default), average-pooled with a 4 x 4 kernel (anomalib's ``pooling_kernel_size = 4``) and
  flattened into one vector per image (C * h * w values): the paper models one feature vector per
  input, and the kept h x w grid lets the reconstruction error be localised.
- Dimensionality reduction: PCA on the training vectors keeping 97 % of the variance
  (``pca_level``), as the paper reduces high-dimensional deep features before density modelling.
- Single-class Gaussian in the PCA space (the paper's class-conditional Gaussian, with the single
  "normal" class). PCA coefficients of the training data are uncorrelated, so the covariance is
  diagonal: one variance per component (anomalib's SVD-based ``SingleClassGaussian`` is the same
  model written in a rotated basis).
- Scores: ``score_type="nll"`` is the negative log-likelihood of the image's PCA coefficients under
  that Gaussian (the paper's score; image level only). ``score_type="fre"`` is the feature
  reconstruction error ``||f - PCA^-1(PCA(f))||^2`` (the subspace score of the same authors'
  follow-up, Ndiour et al., arXiv 2012.04250, anomalib's default). Its per-position part (squared
  error summed over the channels of each cell of the pooled grid) is the anomaly map, upsampled
  bilinearly to the input; the image score is the total error, i.e. the map's sum over the grid,
  as in anomalib.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components.pca import PCA
from anomalyzoo.models.components.trainer import FeatureBankTrainer
from anomalyzoo.models.components.variants import ModelVariant

SCORE_TYPES = ("fre", "nll")


class DiagonalGaussian(nn.Module):
    """A Gaussian with independent coordinates: the density model of PCA coefficients."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("variance", torch.empty(0))

    @torch.no_grad()
    def fit(self, coefficients: torch.Tensor, min_variance: float = 1e-8) -> None:
        """Maximum-likelihood mean and variance of ``coefficients`` (N, k). ``min_variance`` keeps
        a component that happens to be constant on the training data from dividing by zero."""
        self.mean = coefficients.mean(dim=0)
        self.variance = coefficients.var(dim=0, correction=0).clamp_min(min_variance)

    def negative_log_likelihood(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(B, k) -> (B,): -log N(x; mean, diag(variance))."""
        squared = (coefficients - self.mean).square() / self.variance
        dims = coefficients.shape[1]
        return 0.5 * (squared.sum(dim=1) + torch.log(self.variance).sum() + dims * math.log(2 * math.pi))


class DfmModel(nn.Module):
    def __init__(
        self,
        backbone: str = "resnet50",
        layer: str = "layer3",
        pooling_kernel_size: int = 4,
        pca_level: float = 0.97,
        score_type: str = "fre",
        pretrained: bool = True,
        input_normalized: bool = True,
    ) -> None:
        super().__init__()
        if score_type not in SCORE_TYPES:
            raise ValueError(f"score_type must be one of {SCORE_TYPES}, got {score_type!r}")
        if pooling_kernel_size < 1:
            raise ValueError(f"pooling_kernel_size must be >= 1, got {pooling_kernel_size}")
        self.layer = layer
        self.pooling_kernel_size = pooling_kernel_size
        self.score_type = score_type
        self.feature_extractor = TimmFeatureExtractor(backbone, [layer], pretrained=pretrained, input_normalized=input_normalized)
        self.pca = PCA(n_components=pca_level)
        self.gaussian = DiagonalGaussian()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) pooled feature grid; ``flatten(1)`` of it is the per-image feature vector."""
        features = self.feature_extractor(images)[self.layer]
        if self.pooling_kernel_size > 1:
            features = F.avg_pool2d(features, kernel_size=self.pooling_kernel_size)
        return features

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        """``features`` (N, C * h * w): the flattened pooled grids of the normal training images."""
        coefficients = self.pca.fit_transform(features)
        self.gaussian.fit(coefficients)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.pca.is_fitted:
            raise RuntimeError("DFM is not fitted yet: fit it on normal images first")
        return self.score(self.embed(images), output_size=tuple(images.shape[-2:]))

    def score(self, grid: torch.Tensor, output_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Scores of pooled feature grids (B, C, h, w); the FRE map is upsampled to ``output_size``."""
        coefficients = self.pca.transform(grid.flatten(1))
        if self.score_type == "nll":
            return {"pred_score": self.gaussian.negative_log_likelihood(coefficients)}
        reconstruction = self.pca.inverse_transform(coefficients).reshape(grid.shape)
        error_map = (grid - reconstruction).square().sum(dim=1, keepdim=True)  # (B, 1, h, w)
        anomaly_map = F.interpolate(error_map, size=output_size, mode="bilinear", align_corners=False)[:, 0]
        return {"pred_score": error_map.sum(dim=(1, 2, 3)), "anomaly_map": anomaly_map}


class DfmTrainer(FeatureBankTrainer):
    """One pass collects the pooled features of the training images; PCA and the Gaussian are
    fitted at the end of the epoch (no gradients, no optimiser). ``score_type="nll"`` is
    image-level only (no anomaly map, pixel metrics are None)."""

    model_class = DfmModel

    def collect(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images).flatten(1)  # (B, C * h * w) per-image vectors

    def fit_features(self, features: torch.Tensor) -> None:
        self.model.fit(features.to(self.device))


VARIANTS = {
    "dfm": ModelVariant(
        trainer=DfmTrainer, family="adaptation",
        train={"num_epochs": 1, "batch_size": 16, "img_size": 256, "normalize": True},  # SPEC sec. 7
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64},
    ),
}
