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
  channels and compared by their squared distance ``||t_hat_ij - s_hat_ij||^2``; a layer's loss
  is the mean over its h_l x w_l positions, and the total is the sum over layers (alpha_l = 1).
  The paper prints a factor 1/2 and leaves the batch reduction open; we follow the authors'
  code (gdwang08/STFPM ``train_val``: ``torch.sum((t - s) ** 2, 1).mean()`` per layer), i.e. no
  1/2 and the *mean* over the images of the batch, the scale their SGD lr 0.4 was tuned for.
  (anomalib sums over the batch with the 1/2, which multiplies the step by batch/2.)
- Anomaly map (sec. 3.2): per layer the same squared distance at every position, brought to the
  first layer's grid bilinearly and *multiplied* over the layers (sec. 3.2; the
  authors' ``test`` multiplies at layer1's 64x64 grid, and anomalib multiplies too), then
  upsampled bilinearly to the input size. The image score is the maximum of the map (sec. 3.2).
- Optimiser (sec. 4.1): SGD, lr 0.4, momentum 0.9, weight decay 1e-4, over the student only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components.trainer import BaseTrainer
from anomalyzoo.models.components.variants import ModelVariant


def normalized_squared_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``||t_hat - s_hat||^2`` at every position (eq. 1, authors' scale): (B, C, h, w) x2 -> (B, h, w).

    Both feature maps are L2-normalised along the channels first, so the value lies in [0, 4]
    and equals ``2 * (1 - cos(t, s))``.
    """
    teacher = F.normalize(teacher, p=2, dim=1)
    student = F.normalize(student, p=2, dim=1)
    return (teacher - student).pow(2).sum(dim=1)


def stfpm_loss(teacher_features: dict[str, torch.Tensor], student_features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 2 at the authors' scale: sum over layers of the per-position distance averaged over
    the batch and the layer's h x w positions."""
    loss = torch.zeros((), device=next(iter(teacher_features.values())).device)
    for layer, teacher in teacher_features.items():
        loss = loss + normalized_squared_distance(teacher, student_features[layer]).mean()
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
        """Product over layers of the per-position distance on the first layer's grid, upsampled
        to ``size``: (B, H, W)."""
        grid = teacher_features[self.layers[0]].shape[-2:]
        product: torch.Tensor | None = None
        for layer in self.layers:
            distance = normalized_squared_distance(teacher_features[layer], student_features[layer])[:, None]
            if distance.shape[-2:] != grid:
                distance = F.interpolate(distance, size=grid, mode="bilinear", align_corners=False)
            product = distance if product is None else product * distance
        assert product is not None
        return F.interpolate(product, size=size, mode="bilinear", align_corners=False)[:, 0]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_features, student_features = self.features(images)
        anomaly_map = self.anomaly_map(teacher_features, student_features, tuple(images.shape[-2:]))
        return {"pred_score": anomaly_map.amax(dim=(-2, -1)), "anomaly_map": anomaly_map}


class StfpmTrainer(BaseTrainer):
    """Trains the student to match the frozen teacher on normal images."""

    model_class = StfpmModel
    supports_tiling = True  # components.tiler: train and score on tiles of large images

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """Sec. 4.1: SGD(lr 0.4, momentum 0.9, weight decay 1e-4) on the student, no schedule."""
        return torch.optim.SGD(self.model.student.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4), None

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        teacher_features, student_features = self.model.features(batch["image"])
        return {"loss": stfpm_loss(teacher_features, student_features)}


VARIANTS = {
    "stfpm": ModelVariant(
        trainer=StfpmTrainer, family="distillation",
        train={"num_epochs": 50, "batch_size": 16, "img_size": 256, "normalize": True},  # SPEC sec. 7
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64, "num_epochs": 1, "batch_size": 4},
        paper={"num_epochs": 100, "batch_size": 32},  # gdwang08/STFPM main.py defaults, sec. 4.1
    ),
}
