"""DSR's two training stages (``train_dsr.py``): the synthetic data of each stage and the trainer.
The method and its deviations are described in :mod:`anomalyzoo.models.dsr.model`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

from anomalyzoo.models.components.focal_loss import focal_loss
from anomalyzoo.models.components.perlin import ROTATION_DEGREES, perlin_mask, uniform
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.dsr.model import DsrModel

IMAGE_LOSS_WEIGHT = 10.0  # total_recon_loss = ... + loss_l2_recon_img * 10
LEARNING_RATE = 2e-4  # README: --lr 0.0002
STAGE_ONE_LR_MILESTONE = 0.8  # MultiStepLR([int(epochs * 0.80)], gamma=0.1)
STAGE_ONE_LR_GAMMA = 0.1
UPSAMPLING_SHARE = 1 / 3  # E epochs of stage one, then E // 2 of the upsampling module
STAGE_ONE_ROTATION_PROBABILITY = 0.4  # TrainWholeImageDataset: torch.rand(1) > 0.6
STAGE_TWO_ROTATION_PROBABILITY = 0.3  # MVTecImageAnomTrainDataset: torch.rand(1) > 0.7
NO_ANOMALY_PROBABILITY = 0.5  # both data sets: no_anomaly > 0.5
COLOUR_BETA_MAX = 0.8  # beta = torch.rand(1) * 0.8
PAPER_NUM_STEPS = 150_000  # (100 + 50) epochs x 8,000 draws / batch 8


# ----------------------------------------------------------------------------- training data
def rotate_some(images: torch.Tensor, probability: float) -> torch.Tensor:
    """Each image rotated by U(-90, 90) degrees with ``probability`` (bilinear, zeros outside:
    ``iaa.Affine(rotate=(-90, 90))``)."""
    rotated = []
    for image in images:
        if float(torch.rand(())) < probability:
            image = TF.rotate(image, uniform(*ROTATION_DEGREES), interpolation=InterpolationMode.BILINEAR, fill=0.0)
        rotated.append(image)
    return torch.stack(rotated)


def perlin_masks(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(B, 1, H, W) Perlin masks, each left empty with p = 0.5."""
    masks = []
    for _ in range(batch):
        mask = perlin_mask(height, width)
        if float(torch.rand(())) < NO_ANOMALY_PROBABILITY:
            mask = torch.zeros_like(mask)
        masks.append(mask)
    return torch.stack(masks)[:, None].to(device)


def stage_one_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TrainWholeImageDataset(perlin_augment=True)``: (images, 40 % rotated; Perlin masks)."""
    images = rotate_some(images, STAGE_ONE_ROTATION_PROBABILITY)
    return images, perlin_masks(images.shape[0], *images.shape[-2:], images.device)


def stage_two_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``MVTecImageAnomTrainDataset``: (images with uniform-colour Perlin anomalies, masks)."""
    images = rotate_some(images, STAGE_TWO_ROTATION_PROBABILITY)
    masks = perlin_masks(images.shape[0], *images.shape[-2:], images.device)
    colours = torch.rand(images.shape[0], 3, 1, 1).to(images)
    beta = (torch.rand(images.shape[0], 1, 1, 1) * COLOUR_BETA_MAX).to(images)
    augmented = images * (1 - masks) + (1 - beta) * colours * masks + beta * images * masks
    return augmented, masks


# ----------------------------------------------------------------------------- trainer
class DsrTrainer(BaseTrainer):
    """Stage one (restriction modules, object-specific decoder, detection module on latent
    anomalies) for the first two thirds of the steps, then the upsampling module."""

    model_class = DsrModel
    scheduler_interval = "step"

    def __init__(self, *, train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        super().__init__(train_config, device, **model_options)
        self.announced_stage_two = False

    def stage_one_modules(self) -> list[nn.Module]:
        model = self.model
        return [model.subspace_restriction_lo, model.subspace_restriction_hi, model.image_reconstruction,
                model.anomaly_detection]

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam 2e-4: four stage-one groups (x 0.1 from 80 % of stage one) and the upsampling module."""
        groups = [{"params": module.parameters(), "lr": LEARNING_RATE} for module in self.stage_one_modules()]
        groups.append({"params": self.model.upsampling.parameters(), "lr": LEARNING_RATE})
        optimizer = torch.optim.Adam(groups)
        factors = [self.stage_one_lr_factor] * 4 + [lambda step: 1.0]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)

    def planned_total_steps(self) -> int:
        """Steps of the current fit, else of the configured schedule (a loss outside fit())."""
        if self.total_steps:
            return self.total_steps
        return self.train_config.num_steps or self.train_config.num_epochs

    def stage_one_steps(self) -> int:
        total = self.planned_total_steps()
        return total - int(total * UPSAMPLING_SHARE)

    def stage_one_lr_factor(self, step: int) -> float:
        return STAGE_ONE_LR_GAMMA if step >= int(STAGE_ONE_LR_MILESTONE * self.stage_one_steps()) else 1.0

    def in_stage_two(self) -> bool:
        return self.global_step >= self.stage_one_steps()

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = self.model.to_network_input(batch["image"])
        if self.in_stage_two():
            if self.model.training and not self.announced_stage_two:
                tqdm.write(f"DSR stage two from step {self.global_step + 1}: training the upsampling module")
                self.announced_stage_two = True
            augmented, masks = stage_two_batch(images)
            upsampled = self.model.detect(augmented).upsampled_logits
            loss = focal_loss(torch.softmax(upsampled, dim=1), masks)
            return {"loss": loss, "loss_upsampling_focal": loss}
        images, masks = stage_one_batch(images)
        outputs = self.model.stage_one(images, masks)
        terms = {
            "loss_focal": focal_loss(torch.softmax(outputs.detection_logits, dim=1), outputs.target_masks),
            "loss_feature_top": F.mse_loss(outputs.restored_top, outputs.normal_top),
            "loss_feature_bottom": F.mse_loss(outputs.restored_bottom, outputs.normal_bottom),
            "loss_image": F.mse_loss(images, outputs.object_specific),
        }
        total = (terms["loss_focal"] + terms["loss_feature_top"] + terms["loss_feature_bottom"]
                 + IMAGE_LOSS_WEIGHT * terms["loss_image"])
        return {"loss": total, **terms}

    def run_notes(self) -> dict[str, str]:
        total = self.planned_total_steps()
        return {"stages": f"steps 1-{self.stage_one_steps()}: stage one; {self.stage_one_steps() + 1}-{total}: "
                          "upsampling module (the authors' 100 + 50 epochs, scaled)"}
