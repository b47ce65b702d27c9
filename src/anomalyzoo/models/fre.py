"""FRE: "FRE: A Fast Method For Anomaly Detection And Segmentation"
(Ndiour, Ahuja, Genc & Tickoo, BMVC 2023; https://papers.bmvc2023.org/0614.pdf).

Normal images' deep features lie close to a low-dimensional linear subspace; a feature tensor
that does not is anomalous. FRE learns that subspace with a shallow linear autoencoder and
scores a test image by its *feature reconstruction error*: how far its features lie from their
projection back from the subspace. It is the fast, trainable successor of DFM's PCA subspace.

- Features (the paper's method): one layer of a frozen ImageNet CNN (ResNet50 ``layer3`` by default),
  average-pooled with a 2 x 2 kernel (stride 2) to shrink the tensor, as in the authors'
  reference implementation (anomalib ``Fre``, ``pooling_kernel_size=2``).
- Transform (the paper's method): the pooled tensor of one image, C x h x w, is flattened into ONE vector
  x of dimension D = C*h*w (anomalib's default ``input_dim=65536`` is ResNet50 layer3 at
  256 px: 1024 x 8 x 8 after pooling), and a tied linear autoencoder maps it to a latent of
  ``latent_dim`` = 220 and back: ``x_hat = W^T (W x + b_enc) + b_dec``. The subspace therefore
  couples positions and channels, as the paper's PCA/autoencoder on the full feature vector
  does; it is *not* a per-position channel autoencoder. D is fixed by the backbone, layer,
  pooling and image size, so the model needs the input size when it is built (a dry run).
- ``latent_dim`` must be smaller than D: with latent_dim >= D a linear autoencoder can learn
  the identity and every error is ~0. We raise a clear error instead of silently shrinking it.
  (EfficientNet-Lite0 layer3 at 128 px gives D = 112 x 4 x 4 = 1792 > 220; only very small
  inputs, e.g. 32 px, hit the error.)
- Loss: mean squared error between x and x_hat (anomalib, ``nn.MSELoss``); optimiser Adam,
  lr 1e-3 (anomalib's default), over the autoencoder only.
- Scores (the paper's FRE and its segmentation map): the squared error ``(x - x_hat)^2`` is reshaped back to C x h x w and
  summed over the channels, giving the anomaly map on the pooled grid, upsampled bilinearly to
  the input size; the image score is the FRE itself, ``||x - x_hat||^2``, i.e. the *sum* of the
  pooled map (anomalib ``FREModel.forward``: ``score = sum(anomaly_map)``), not its maximum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor, dryrun_find_featuremap_dims
from anomalyzoo.models.components.trainer import BaseTrainer
from anomalyzoo.models.components.variants import ModelVariant


class TiedAutoencoder(nn.Module):
    """Shallow linear autoencoder with tied weights: encode ``W x + b_enc``, decode
    ``W^T z + b_dec``. One weight matrix, as in the authors' implementation (anomalib
    ``TiedAE``); Xavier-uniform initialisation, zero biases."""

    def __init__(self, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        if not 0 < latent_dim < input_dim:
            raise ValueError(
                f"latent_dim must be in 1..{input_dim - 1} (below the feature dimension {input_dim}, or the "
                f"autoencoder can learn the identity and every reconstruction error is zero), got {latent_dim}"
            )
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        self.weight = nn.Parameter(torch.empty(latent_dim, input_dim))
        nn.init.xavier_uniform_(self.weight)
        self.encoder_bias = nn.Parameter(torch.zeros(latent_dim))
        self.decoder_bias = nn.Parameter(torch.zeros(input_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, input_dim) -> reconstruction (N, input_dim)."""
        latent = F.linear(features, self.weight, self.encoder_bias)
        return F.linear(latent, self.weight.t(), self.decoder_bias)


class FreModel(nn.Module):
    """Frozen features -> tied linear autoencoder; eval ``forward`` returns scores and maps."""

    def __init__(
        self,
        backbone: str = "resnet50",
        layer: str = "layer3",
        input_size: tuple[int, int] = (256, 256),
        pooling_kernel_size: int = 2,
        latent_dim: int = 220,
        pretrained: bool = True,
        input_normalized: bool = True,
    ) -> None:
        super().__init__()
        if pooling_kernel_size < 1:
            raise ValueError(f"pooling_kernel_size must be >= 1, got {pooling_kernel_size}")
        self.layer = layer
        self.pooling_kernel_size = pooling_kernel_size
        self.feature_extractor = TimmFeatureExtractor(backbone, [layer], pretrained=pretrained,
                                                      input_normalized=input_normalized)
        dims = dryrun_find_featuremap_dims(self.feature_extractor, input_size, [layer])[layer]
        height, width = dims["resolution"]
        pooled = (height // pooling_kernel_size, width // pooling_kernel_size)
        if min(pooled) < 1:
            raise ValueError(f"{backbone} {layer} gives a {height}x{width} grid at input {input_size}: "
                             f"too small for pooling_kernel_size {pooling_kernel_size}")
        self.feature_shape: tuple[int, int, int] = (int(dims["num_features"]), *pooled)
        input_dim = self.feature_shape[0] * pooled[0] * pooled[1]
        self.autoencoder = TiedAutoencoder(input_dim, latent_dim)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen layer features, average-pooled: (B, C, h, w)."""
        features = self.feature_extractor(images)[self.layer]
        if self.pooling_kernel_size > 1:
            features = F.avg_pool2d(features, kernel_size=self.pooling_kernel_size)
        if tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(f"FRE was built for pooled features {self.feature_shape} but got {tuple(features.shape[1:])}: "
                             "images must have the size the model was built for (train_config.img_size)")
        return features

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flattened features x, reconstruction x_hat), both (B, C*h*w)."""
        features = self.pooled_features(images).flatten(1)
        return features, self.autoencoder(features)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features, reconstruction = self.reconstruct(images)
        squared_error = (features - reconstruction).pow(2).reshape(-1, *self.feature_shape)
        pooled_map = squared_error.sum(dim=1)  # (B, h, w): error summed over channels
        pred_score = pooled_map.sum(dim=(-2, -1))  # ||x - x_hat||^2, the image's FRE
        anomaly_map = F.interpolate(pooled_map[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return {"pred_score": pred_score, "anomaly_map": anomaly_map}


class FreTrainer(BaseTrainer):
    """Fits the tied autoencoder to the pooled features of normal images."""

    model_class = FreModel

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """Adam, lr 1e-3, on the autoencoder only (anomalib's default); no schedule."""
        return torch.optim.Adam(self.model.autoencoder.parameters(), lr=1e-3), None

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        features, reconstruction = self.model.reconstruct(batch["image"])
        return {"loss": F.mse_loss(reconstruction, features)}


VARIANTS = {
    "fre": ModelVariant(
        trainer=FreTrainer, family="distillation",
        train={"num_epochs": 50, "batch_size": 16, "img_size": 256, "normalize": True},  # SPEC sec. 7
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64, "num_epochs": 1, "batch_size": 4},
    ),
}
