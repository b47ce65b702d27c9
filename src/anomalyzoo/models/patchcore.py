"""PatchCore: "Towards Total Recall in Industrial Anomaly Detection" (Roth et al., arXiv 2106.08265).

- Locally aware patch features (sec. 3.1, eq. 1-2): each feature map of layer2 and layer3 is
  averaged over its 3x3 neighbourhood (p = 3), layer3 is upsampled bilinearly to layer2's grid,
  and the two are concatenated per position. (The reference code additionally projects each layer
  to 1024 channels by adaptive average pooling; like anomalib we concatenate directly.)
- Memory bank (sec. 3.2, Algorithm 1): greedy k-center coreset of all training patch features,
  10 % of them by default, selected on a random projection (see ``components.k_center_greedy``).
- Scoring (sec. 3.3, eq. 6-7): a test patch's score is the distance to its nearest memory-bank
  feature; the image score is the largest patch score s*, re-weighted by
  ``1 - exp(||m_test* - m*||) / sum_{m in N_b(m*)} exp(||m_test* - m||)`` with b = 9 neighbours of
  the nearest bank feature m* (N_b includes m* itself, as in the reference implementation).
- Anomaly map (sec. 3.3): patch scores upsampled bilinearly (align_corners=False) to the input
  size and smoothed with a Gaussian of sigma = 4 (truncated at 4 sigma, reflect borders as in
  PaDiM; the reference code uses scipy's ``gaussian_filter(sigma=4)``).
- Nearest-neighbour search: exact, as the reference code's ``faiss.IndexFlatL2``. ``knn_backend``
  "torch" (default: chunked matrix products) or "faiss" (faiss-cpu's exact flat index, the
  ``faiss`` extra); either way the returned distances are recomputed directly
  (``components.nearest_neighbors``), so both give the same scores. Exported graphs use the torch
  search.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.blur import GaussianBlur2d
from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components.k_center_greedy import CoresetSelection, greedy_coreset
from anomalyzoo.models.components.nearest_neighbors import KNN_BACKENDS, faiss_index, nearest_neighbors
from anomalyzoo.models.components.trainer import FeatureBankTrainer
from anomalyzoo.models.components.variants import ModelVariant


class PatchcoreModel(nn.Module):
    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        projection_dim: int = 128,
        knn_backend: str = "torch",
        pretrained: bool = True,
        input_normalized: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if knn_backend not in KNN_BACKENDS:
            raise ValueError(f"knn_backend must be one of {KNN_BACKENDS}, got {knn_backend!r}")
        self.layers = list(layers)
        self.knn_backend = knn_backend
        self._faiss: tuple[Any, Any] | None = None  # (memory bank it was built on, index)
        self.coreset_ratio = coreset_ratio
        self.num_neighbors = num_neighbors
        self.projection_dim = projection_dim
        self.seed = seed
        self.feature_extractor = TimmFeatureExtractor(backbone, self.layers, pretrained=pretrained, input_normalized=input_normalized)
        self.feature_pooler = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.blur = GaussianBlur2d(sigma=4.0)
        self.register_buffer("memory_bank", torch.empty(0))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) locally aware patch features on the grid of the first layer."""
        features = self.feature_extractor(images)
        pooled = [self.feature_pooler(features[layer]) for layer in self.layers]
        grid = pooled[0].shape[-2:]
        pooled = [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in pooled]
        return torch.cat(pooled, dim=1)

    @staticmethod
    def flatten(embedding: torch.Tensor) -> torch.Tensor:
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

    def subsample_embedding(self, features: torch.Tensor, progress: bool = False) -> CoresetSelection:
        """The memory bank: a greedy k-center coreset of ``coreset_ratio`` of all training patch
        features (N, D) (sec. 3.2, Algorithm 1), selected on a seeded random projection."""
        coreset_size = max(1, int(round(self.coreset_ratio * features.shape[0])))
        selection = greedy_coreset(features, coreset_size, self.projection_dim, seed=self.seed, progress=progress)
        self.memory_bank = features[selection.indices.to(features.device)].to(self.memory_bank.device)
        return selection

    def search_index(self) -> Any:
        """The faiss index over the memory bank (rebuilt when the bank changes), or None for torch."""
        if self.knn_backend != "faiss":
            return None
        bank = self.memory_bank
        key = (bank.data_ptr(), bank._version, tuple(bank.shape))
        if self._faiss is None or self._faiss[0] != key:
            self._faiss = (key, faiss_index(bank))
        return self._faiss[1]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.memory_bank.numel() == 0:
            raise RuntimeError("PatchCore has no memory bank yet: fit it on normal images first")
        embedding = self.embed(images)
        batch, _, height, width = embedding.shape
        patches = self.flatten(embedding)
        index = self.search_index()
        distances, nn_index = nearest_neighbors(patches, self.memory_bank, k=1, index=index)
        patch_scores = distances[:, 0].reshape(batch, height * width)
        nn_index = nn_index[:, 0].reshape(batch, height * width)
        image_scores = self.reweighted_image_scores(patches.reshape(batch, height * width, -1), patch_scores, nn_index, index)
        score_map = patch_scores.reshape(batch, 1, height, width)
        score_map = F.interpolate(score_map, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"pred_score": image_scores, "anomaly_map": self.blur(score_map)[:, 0]}

    def reweighted_image_scores(self, patches: torch.Tensor, patch_scores: torch.Tensor, nn_index: torch.Tensor,
                                index: Any = None) -> torch.Tensor:
        """Eq. 7: s = (1 - exp||m_test* - m*|| / sum_{N_b(m*)} exp||m_test* - m||) * s*."""
        rows = torch.arange(patches.shape[0], device=patches.device)
        worst = patch_scores.argmax(dim=1)
        max_scores = patch_scores[rows, worst]
        worst_patches = patches[rows, worst]  # m_test*
        nearest_bank = self.memory_bank[nn_index[rows, worst]]  # m*
        k = min(self.num_neighbors, self.memory_bank.shape[0])
        _, support = nearest_neighbors(nearest_bank, self.memory_bank, k=k, index=index)  # N_b(m*), m* first
        support_distances = torch.linalg.vector_norm(worst_patches[:, None, :] - self.memory_bank[support], dim=-1)
        weights = 1.0 - torch.softmax(support_distances, dim=1)[:, 0]
        return weights * max_scores


class PatchcoreTrainer(FeatureBankTrainer):
    """One pass over the training images collects patch features; the model chooses its coreset
    at the end of the epoch (no gradients, no optimiser)."""

    model_class = PatchcoreModel
    supports_tiling = True  # components.tiler: train and score on tiles of large images

    def collect(self, images: torch.Tensor) -> torch.Tensor:
        return PatchcoreModel.flatten(self.model.embed(images))  # (B * h * w, D) patch features

    def fit_features(self, features: torch.Tensor) -> None:
        selection = self.model.subsample_embedding(features, progress=self.train_config.progress)
        self.coreset_note = (f"{len(selection.indices)} of {features.shape[0]} patch features (exact greedy k-center); "
                             f"coverage radius {selection.coverage_radius:.4g} in the "
                             f"{min(self.model.projection_dim, features.shape[1])}-d random projection")

    def run_notes(self) -> dict[str, str]:
        note = getattr(self, "coreset_note", None)
        return {"coreset": note} if note else {}


VARIANTS = {
    "patchcore": ModelVariant(
        trainer=PatchcoreTrainer, family="memory",
        train={"num_epochs": 1, "batch_size": 8, "img_size": 256, "normalize": True},  # SPEC sec. 7
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64},
    ),
}
