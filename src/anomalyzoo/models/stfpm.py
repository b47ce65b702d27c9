"""STFPM: "Student-Teacher Feature Pyramid Matching for Anomaly Detection"
(Wang, Han, Li & Wang, BMVC 2021, arXiv 2103.04257).

A teacher network pretrained on ImageNet and a student of the same architecture, randomly
initialised, see the same image. The student is trained on normal images only to reproduce the
teacher's feature pyramid; where the input is anomalous it has never learnt to follow the
teacher, and the disagreement is the anomaly map.

- Networks (sec. 3.1, 4.1): the first three stages of a ResNet (conv2_x .. conv4_x, our
  ``layer1``-``layer3``); the teacher is frozen (BatchNorm in eval mode, no gradients), the
  student has the same architecture with random weights and is the only thing trained.
- Loss (eq. 1-2): at each position (i, j) of layer l the features are L2-normalised along the
  channels, ``l(i, j) = 0.5 * ||t_hat_ij - s_hat_ij||^2``; a layer's loss is the mean over its
  h_l x w_l positions, and the total is the sum over layers (alpha_l = 1). Over a batch the
  per-image losses are *summed*, as in the authors' code (``MSELoss(reduction="sum")`` scaled by
  ``0.5 / (h * w)``, gdwang08/STFPM) and anomalib: the learning rate 0.4 below was tuned for that
  scale, and a batch mean would divide the effective step by the batch size.
- Anomaly map (sec. 3.2): per layer the same ``0.5 * ||t_hat - s_hat||^2`` at every position,
  upsampled bilinearly to the input size. The paper multiplies the per-layer maps, and so do
  the authors' code and anomalib's ``AnomalyMapGenerator`` (``anomaly_map *= layer_map``); we
  sum them, as the project issue asks: a product is near zero wherever any one layer agrees,
  so a defect seen by only one scale vanishes from the map. The image score is the maximum of
  the map (sec. 3.2).
- Optimiser (sec. 4.1): SGD, lr 0.4, momentum 0.9, weight decay 1e-4, over the student only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig, as_train_config


def pairwise_feature_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``0.5 * ||t_hat - s_hat||^2`` at every position (eq. 1): (B, C, h, w) x2 -> (B, h, w).

    Both feature maps are L2-normalised along the channels first, so the value lies in [0, 2]
    and equals ``1 - cos(t, s)``.
    """
    teacher = F.normalize(teacher, p=2, dim=1)
    student = F.normalize(student, p=2, dim=1)
    return 0.5 * (teacher - student).pow(2).sum(dim=1)


def stfpm_loss(teacher_features: dict[str, torch.Tensor], student_features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 2: sum over layers of the per-position distance averaged over the layer's h x w
    positions, summed over the images of the batch (the authors' scale, see the module doc)."""
    loss = torch.zeros((), device=next(iter(teacher_features.values())).device)
    for layer, teacher in teacher_features.items():
        distance = pairwise_feature_distance(teacher, student_features[layer])  # (B, h, w)
        height, width = distance.shape[-2:]
        loss = loss + distance.sum() / (height * width)
    return loss


class StfpmModel(nn.Module):
    """Teacher and student feature pyramids; eval ``forward`` returns scores and maps."""

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pretrained: bool = True,
        input_normalized: bool = True,
    ) -> None:
        super().__init__()
        self.layers = list(layers)
        # Both networks are submodules, so the state dict (and every checkpoint) holds the
        # teacher too: a trainer rebuilt with pretrained=False gets it back from the file.
        self.teacher = TimmFeatureExtractor(backbone, self.layers, pretrained=pretrained,
                                            requires_grad=False, input_normalized=input_normalized)
        self.student = TimmFeatureExtractor(backbone, self.layers, pretrained=False,
                                            requires_grad=True, input_normalized=input_normalized)

    def features(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(teacher features, student features), each ``{layer: (B, C, h, w)}``."""
        return self.teacher(images), self.student(images)

    def anomaly_map(self, teacher_features: dict[str, torch.Tensor], student_features: dict[str, torch.Tensor],
                    size: tuple[int, int]) -> torch.Tensor:
        """Sum over layers of the per-position distance upsampled to ``size``: (B, H, W)."""
        total: torch.Tensor | None = None
        for layer in self.layers:
            distance = pairwise_feature_distance(teacher_features[layer], student_features[layer])
            distance = F.interpolate(distance[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            total = distance if total is None else total + distance
        assert total is not None
        return total

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_features, student_features = self.features(images)
        anomaly_map = self.anomaly_map(teacher_features, student_features, tuple(images.shape[-2:]))
        return {"pred_score": anomaly_map.amax(dim=(-2, -1)), "anomaly_map": anomaly_map}


class StfpmTrainer(BaseTrainer):
    """Trains the student to match the frozen teacher on normal images."""

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pretrained: bool = True,
        train_config: TrainConfig | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        train_config = as_train_config(train_config)
        model = StfpmModel(backbone, layers, pretrained, input_normalized=train_config.normalize)
        super().__init__(model, train_config, device)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """Sec. 4.1: SGD(lr 0.4, momentum 0.9, weight decay 1e-4) on the student, no schedule."""
        return torch.optim.SGD(self.model.student.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4), None

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        teacher_features, student_features = self.model.features(batch["image"])
        loss = stfpm_loss(teacher_features, student_features)
        self.optimize(loss)
        return {"loss": loss.item()}
