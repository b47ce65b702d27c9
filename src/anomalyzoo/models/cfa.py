"""CFA: "Coupled-hypersphere-based Feature Adaptation for Target-Oriented Anomaly Localization"
(Lee, Lee & Song, IEEE Access 2022, arXiv 2206.04325).

A frozen ImageNet CNN gives locally aware patch features; a small patch descriptor, trained on
the target's normal images only, adapts them so that every normal patch feature falls inside a
small hypersphere around its nearest memorised normal features, while staying out of the
spheres of the next-nearest ("hard negative") ones. The distance of a test patch to its nearest
memorised features is the anomaly map. Every fact below is from the paper and the authors' code
(sungwool/CFA_for_anomaly_localization, ``utils/cfa.py``, ``trainer_cfa.py``,
``utils/coordconv.py``), which produced the published numbers; where the two differ the code wins.

- Features (sec. 3.1): the outputs of layer1-3 (strides 4, 8, 16), each averaged over its 3 x 3
  neighbourhood (``F.avg_pool2d(o, 3, 1, 1)``), the deeper ones upsampled *after* pooling
  bilinearly (align_corners=False) to layer1's grid, concatenated (``Descriptor.forward``;
  anomalib upsamples the unpooled map, the authors the pooled one: we follow the authors).
- Patch descriptor (sec. 3.2): one CoordConv 1x1 layer (Liu et al. 2018): two channels holding
  the row and the column index scaled to [-1, 1] are appended, then a 1x1 convolution maps the
  D channels (+2) to ``D // gamma_d`` (``utils/coordconv.py``, ``Descriptor``).
- Memory bank (sec. 3.3): the authors' code (``_init_centroid``) builds it once, before training,
  with the still untrained descriptor: the mean over the training images of the descriptor's
  feature at each position, one memorised feature per position (h * w of them); the paper's
  ``gamma_c > 1`` compresses it by k-means to ``h * w // gamma_c`` centres (sklearn's KMeans,
  ``max_iter=3000``; here a seeded Lloyd k-means in torch, see :func:`kmeans`). It is not
  updated afterwards (``nn.Parameter(C, requires_grad=False)``). The paper's text describes an
  EMA update over nearest neighbours; with the published ``gamma_c = 1`` the code's running
  mean per position is what ran.
- Loss (sec. 3.2, eq. 3-5; ``_soft_boundary``): with ``d`` the squared distances of a patch to the
  memory, sorted, the K nearest attract (``L_att = mean(max(0, d_1..K - r^2))``) and the next J
  repel (``L_rep = mean(max(0, r^2 - d_K+1..K+J - alpha))``); both are divided by ``nu = 1e-3``.
  K = J = 3, alpha = 0.1, and the radius ``r`` is a *learnable* parameter initialised to 1e-5
  and optimised with the descriptor (``self.r = nn.Parameter(...)``; anomalib keeps it fixed).
  The code slices the repelling distances as ``d[:, :, J:]``, which is ``K+1..K+J`` for its K = J;
  we slice ``K:K+J`` as the paper defines it (identical at the defaults).
- Score (sec. 3.4; ``DSVDD.forward``): the Euclidean distances to the K nearest memorised
  features, weighted by a soft-min over them; the patch score is ``softmin(d)_1 * d_1`` (the
  nearest one's weight times its distance). The map is upsampled bilinearly to the input size and
  smoothed with a Gaussian of sigma 4 (``gaussian_smooth``; scipy's filter there, truncated at
  4 sigma with reflect borders here); the image score is the map's maximum (``cal_img_roc``).
- Optimiser (``trainer_cfa.py``): AdamW(lr 1e-3, weight decay 5e-4, amsgrad) over the descriptor
  and ``r``; the paper trains 30 epochs of batch 4 at 224 px (resize 256, centre crop) and reports
  each category's best epoch *on the test set*; here the spec's 20 epochs, batch 16, 256 px, and
  the last epoch is what is evaluated.

Deviations: the authors' ResNets (``cnn/resnet.py``) move each block's last ReLU to the start of
the next block and return ``leaky_relu`` of the pre-activation stage outputs; we read timm's
standard (post-ReLU) stage outputs, as anomalib does, so that any timm CNN works
(efficientnet_lite0 included; the authors' EfficientNet-B5 branch also rescales its features by
their channel count and doubles the descriptor width, which applies to their B5 extractor only).
The nearest memorised features are searched without gradients and their squared distances
recomputed with gradients (:func:`hypersphere_losses`): the same values and gradients as the
authors' full distance matrix, without holding (B, h*w, h*w) floats for the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from anomalyzoo.models.components.blur import GaussianBlur2d
from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components.nearest_neighbors import nearest_neighbors
from anomalyzoo.models.components.trainer import BaseTrainer
from anomalyzoo.models.components.variants import ModelVariant

NUM_NEAREST = 3  # utils/cfa.py: self.K
NUM_HARD_NEGATIVES = 3  # utils/cfa.py: self.J
RADIUS_INIT = 1e-5  # utils/cfa.py: self.r = nn.Parameter(1e-5 * torch.ones(1))
ALPHA = 0.1  # utils/cfa.py: self.alpha, the repulsion margin
NU = 1e-3  # utils/cfa.py: self.nu, both losses are multiplied by 1 / nu
SIGMA = 4.0  # trainer_cfa.py: gaussian_smooth(heatmaps, sigma=4)
KMEANS_MAX_ITER = 3000  # utils/cfa.py: KMeans(..., max_iter=3000)


# ----------------------------------------------------------------------------- equations
def coordinate_channels(features: torch.Tensor) -> torch.Tensor:
    """``features`` (B, D, h, w) with two more channels: the row index and the column index,
    each scaled to [-1, 1] (``AddCoords``: ``i / (h - 1) * 2 - 1``)."""
    batch, _, height, width = features.shape
    rows = torch.linspace(-1.0, 1.0, height, device=features.device, dtype=features.dtype) if height > 1 \
        else torch.full((1,), -1.0, device=features.device, dtype=features.dtype)
    cols = torch.linspace(-1.0, 1.0, width, device=features.device, dtype=features.dtype) if width > 1 \
        else torch.full((1,), -1.0, device=features.device, dtype=features.dtype)
    row_channel = rows.view(1, 1, height, 1).expand(batch, 1, height, width)
    col_channel = cols.view(1, 1, 1, width).expand(batch, 1, height, width)
    return torch.cat([features, row_channel, col_channel], dim=1)


def hypersphere_losses(patches: torch.Tensor, memory_bank: torch.Tensor, radius: torch.Tensor,
                       num_nearest: int = NUM_NEAREST, num_hard_negatives: int = NUM_HARD_NEGATIVES,
                       alpha: float = ALPHA, nu: float = NU) -> dict[str, torch.Tensor]:
    """Eq. 3-5 at the authors' scale for patch features (N, C) and memory (M, C).

    ``d`` = squared distances to the ``num_nearest + num_hard_negatives`` nearest memorised
    features, ascending; ``L_att = mean(relu(d[:, :K] - r^2)) / nu``,
    ``L_rep = mean(relu(r^2 - d[:, K:K+J] - alpha)) / nu``.
    """
    wanted = num_nearest + num_hard_negatives
    if memory_bank.shape[0] < wanted:
        raise ValueError(f"CFA needs at least K + J = {wanted} memorised features, the memory bank has {memory_bank.shape[0]}")
    with torch.no_grad():
        _, indices = nearest_neighbors(patches.detach(), memory_bank, k=wanted)
    neighbours = memory_bank[indices]  # (N, K + J, C), no gradient: the memory is fixed
    # |f|^2 + |c|^2 - 2 f.c, the authors' form, on the selected pairs only
    squared = (patches * patches).sum(-1, keepdim=True) + (neighbours * neighbours).sum(-1) \
        - 2.0 * torch.einsum("nc,nkc->nk", patches, neighbours)
    radius_squared = radius.pow(2)
    attraction = F.relu(squared[:, :num_nearest] - radius_squared).mean() / nu
    repulsion = F.relu(radius_squared - squared[:, num_nearest:wanted] - alpha).mean() / nu
    return {"loss": attraction + repulsion, "loss_att": attraction, "loss_rep": repulsion}


def soft_min_scores(patches: torch.Tensor, memory_bank: torch.Tensor, num_nearest: int = NUM_NEAREST) -> torch.Tensor:
    """Sec. 3.4: with ``d`` the Euclidean distances (N, K) to the K nearest memorised features,
    ascending, the score ``softmin(d)_1 * d_1`` (N,)."""
    distances, _ = nearest_neighbors(patches, memory_bank, k=num_nearest)
    return F.softmin(distances, dim=-1)[:, 0] * distances[:, 0]


def kmeans(points: torch.Tensor, num_clusters: int, max_iter: int = KMEANS_MAX_ITER, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means (N, C) -> (num_clusters, C), started from a seeded random subset of the
    points, until the assignment stops changing or ``max_iter`` rounds (the authors call sklearn's
    KMeans with its k-means++ start; the centres then differ by the start, not the objective)."""
    if not 1 <= num_clusters <= points.shape[0]:
        raise ValueError(f"k-means needs 1 <= num_clusters <= {points.shape[0]}, got {num_clusters}")
    generator = torch.Generator().manual_seed(int(seed))
    centres = points[torch.randperm(points.shape[0], generator=generator)[:num_clusters].to(points.device)].clone()
    assignment = None
    for _ in range(max_iter):
        _, nearest = nearest_neighbors(points, centres, k=1)
        nearest = nearest[:, 0]
        if assignment is not None and torch.equal(nearest, assignment):
            break
        assignment = nearest
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=num_clusters).to(points.dtype)
        filled = counts > 0  # an empty cluster keeps its centre
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


# ----------------------------------------------------------------------------- model
class CoordConv2d(nn.Module):
    """``utils/coordconv.py`` ``CoordConv2d``: coordinate channels, then a convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(coordinate_channels(features))


class CfaModel(nn.Module):
    """Frozen backbone, trainable patch descriptor and radius, fixed memory bank."""

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        gamma_c: int = 1,
        gamma_d: int = 1,
        num_nearest: int = NUM_NEAREST,
        num_hard_negatives: int = NUM_HARD_NEGATIVES,
        alpha: float = ALPHA,
        radius: float = RADIUS_INIT,
        pretrained: bool = True,
        input_normalized: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if gamma_c < 1 or gamma_d < 1:
            raise ValueError(f"gamma_c and gamma_d are compression factors >= 1, got {gamma_c}, {gamma_d}")
        self.layers = list(layers)
        self.gamma_c, self.gamma_d = int(gamma_c), int(gamma_d)
        self.num_nearest, self.num_hard_negatives, self.alpha = int(num_nearest), int(num_hard_negatives), float(alpha)
        self.seed = seed
        self.feature_extractor = TimmFeatureExtractor(backbone, self.layers, pretrained=pretrained,
                                                      requires_grad=False, input_normalized=input_normalized)
        channels = sum(self.feature_extractor.out_dims)
        self.descriptor = CoordConv2d(channels, channels // self.gamma_d, kernel_size=1)
        self.radius = nn.Parameter(torch.full((1,), float(radius)))
        self.register_buffer("memory_bank", torch.empty(0))  # (M, C) once built
        self.blur = GaussianBlur2d(sigma=SIGMA)

    @property
    def has_memory_bank(self) -> bool:
        return self.memory_bank.numel() > 0

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Sec. 3.1: 3x3-averaged layer outputs on layer1's grid, concatenated: (B, D, h, w)."""
        features = self.feature_extractor(images)
        pooled = [F.avg_pool2d(features[layer], kernel_size=3, stride=1, padding=1) for layer in self.layers]
        grid = pooled[0].shape[-2:]
        pooled = [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False)
                  for p in pooled]
        return torch.cat(pooled, dim=1)

    def target_features(self, images: torch.Tensor) -> torch.Tensor:
        """The descriptor's target-oriented features (B, C, h, w)."""
        return self.descriptor(self.patch_features(images))

    @staticmethod
    def flatten(features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B * h * w, C), position-major per image."""
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])

    @torch.no_grad()
    def build_memory_bank(self, image_batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Sec. 3.3 as ``_init_centroid`` does it: the mean target feature at each position over
        every training image, (h * w, C); k-means to ``h * w // gamma_c`` centres for gamma_c > 1."""
        total: torch.Tensor | None = None
        count = 0
        for images in image_batches:
            features = self.target_features(images)
            total = features.sum(dim=0) if total is None else total + features.sum(dim=0)
            count += features.shape[0]
        if total is None:
            raise ValueError("CFA builds its memory bank from the training images, and none were given")
        memory = self.flatten((total / count)[None])
        if self.gamma_c > 1:
            memory = kmeans(memory, max(1, memory.shape[0] // self.gamma_c), seed=self.seed)
        self.memory_bank = memory.detach()
        return self.memory_bank

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The coupled-hypersphere loss (eq. 3-5) of a batch of normal images."""
        self.require_memory_bank()
        patches = self.flatten(self.target_features(images))
        return hypersphere_losses(patches, self.memory_bank, self.radius, self.num_nearest,
                                  self.num_hard_negatives, self.alpha)

    def require_memory_bank(self) -> None:
        if not self.has_memory_bank:
            raise RuntimeError("CFA has no memory bank yet: build it from the normal training images first "
                               "(CfaTrainer does this when training starts)")

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.require_memory_bank()
        features = self.target_features(images)
        batch, _, height, width = features.shape
        scores = soft_min_scores(self.flatten(features), self.memory_bank, self.num_nearest)
        score_map = scores.reshape(batch, 1, height, width)
        score_map = F.interpolate(score_map, size=images.shape[-2:], mode="bilinear", align_corners=False)
        anomaly_map = self.blur(score_map)[:, 0]
        return {"pred_score": anomaly_map.amax(dim=(-2, -1)), "anomaly_map": anomaly_map}


class CfaTrainer(BaseTrainer):
    """Builds the memory bank from the training images when training starts, then trains the
    descriptor and the radius on the coupled-hypersphere loss."""

    model_class = CfaModel

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """``trainer_cfa.py``: AdamW(lr 1e-3, weight decay 5e-4, amsgrad) over descriptor and r."""
        parameters = [*self.model.descriptor.parameters(), self.model.radius]
        return torch.optim.AdamW(parameters, lr=1e-3, weight_decay=5e-4, amsgrad=True), None

    def on_train_start(self) -> None:
        """The memory bank comes from the untrained descriptor, once (``DSVDD.__init__``); a
        resumed run has it from its checkpoint."""
        if self.model.has_memory_bank:
            return
        if self.train_loader is None:
            raise RuntimeError("CfaTrainer needs its train_loader to build the memory bank")
        in_order = DataLoader(self.train_loader.dataset, batch_size=self.train_loader.batch_size, shuffle=False,
                              num_workers=self.train_loader.num_workers)
        was_training = self.model.training
        self.model.eval()
        self.model.build_memory_bank(batch["image"].to(self.device) for batch in in_order)
        self.model.train(was_training)

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.losses(batch["image"])


VARIANTS = {
    "cfa": ModelVariant(
        trainer=CfaTrainer, family="adaptation",
        train={"num_epochs": 20, "batch_size": 16, "img_size": 256, "normalize": True},  # SPEC sec. 7
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64, "num_epochs": 1, "batch_size": 4},
        paper={"num_epochs": 30, "batch_size": 4, "img_size": 224},  # trainer_cfa.py (224 = crop of 256)
    ),
}
