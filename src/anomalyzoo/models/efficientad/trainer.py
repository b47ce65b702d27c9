"""EfficientAD's training (Algorithm 1 of arXiv 2303.14535): teacher statistics, the student and
autoencoder losses, the lr drop and the map quantiles. The method and every choice are described
in :mod:`anomalyzoo.models.efficientad.model`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomalyzoo.data.images import cycle, find_images
from anomalyzoo.data.penalty import PenaltyImages
from anomalyzoo.data.transforms import grayscale
from anomalyzoo.models.components.schedules import step_drop
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.efficientad.model import (
    LEARNING_RATE,
    LR_DROP_AT,
    MAP_QUANTILES,
    WEIGHT_DECAY,
    EfficientAdModel,
    hard_feature_loss,
    quantile,
)
from anomalyzoo.settings import get_settings


def color_jitter(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Appendix (autoencoder training): per image, one of brightness, contrast or saturation
    jitter (torchvision's ColorJitter(0.2) definitions), with a factor uniform in [0.8, 1.2]."""
    batch = images.shape[0]
    choice = torch.randint(0, 3, (batch,), generator=generator)
    factor = (0.8 + 0.4 * torch.rand(batch, generator=generator)).to(images).view(batch, 1, 1, 1)
    gray = grayscale(images)
    brightness = images * factor
    contrast = factor * images + (1 - factor) * gray.mean(dim=(1, 2, 3), keepdim=True)
    saturation = factor * images + (1 - factor) * gray
    choice = choice.to(images.device).view(batch, 1, 1, 1)
    out = torch.where(choice == 0, brightness, torch.where(choice == 1, contrast, saturation))
    return out.clamp(0.0, 1.0)



class EfficientAdTrainer(BaseTrainer):
    """Algorithm 1: teacher statistics at fit start, student + autoencoder training, map
    quantiles on the held-out validation images (the run's validation split) at fit end."""

    model_class = EfficientAdModel
    # Algorithm 1 and the reference train on one image per step, on [0, 1] images
    train_defaults = {"batch_size": 1, "normalize": False}
    scheduler_interval = "step"  # the lr drop happens after 95 % of the *steps*

    def __init__(self, *, imagenet_dir: str | Path | None = None, train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        self.imagenet_dir = str(imagenet_dir) if imagenet_dir is not None else None  # a Path would not load with weights_only
        super().__init__(train_config, device, **model_options)
        if self.train_config.batch_size != 1:
            raise ValueError(
                f"EfficientAD trains on one image per step (Algorithm 1; the hard-feature loss takes the 0.999 "
                f"quantile of one image's differences), so batch_size must be 1, got {self.train_config.batch_size}")
        self.penalty_iterator: Iterator[torch.Tensor] | None = None
        self.penalty_note = ""
        self.quantiles_stale = False

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam over student + autoencoder (lr 1e-4, weight decay 1e-5); lr x 0.1 once 95 % of the
        planned steps are done (``num_steps`` when given, else the epochs' steps)."""
        parameters = list(self.model.student.parameters()) + list(self.model.autoencoder.parameters())
        optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        # read self.total_steps at every step: a resumed run builds the optimiser before fit() knows it
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step))
        return optimizer, scheduler

    def lr_factor(self, step: int) -> float:
        """0.1 from 95 % of the planned steps on (sec. 4: step 66,500 of 70,000), else 1."""
        return step_drop(LR_DROP_AT * self.total_steps)(step)

    # ------------------------------------------------------------- data
    def penalty_folder(self) -> Path:
        """``imagenet_dir``, else ``<the run's DATASET_DIR>/imagenette2/train``."""
        if self.imagenet_dir is not None:
            return Path(self.imagenet_dir).expanduser()
        return Path(self.dataset_dir or get_settings().dataset_dir) / "imagenette2" / "train"

    def penalty_images(self) -> Iterator[torch.Tensor] | None:
        folder = self.penalty_folder()
        files = find_images(folder) if folder.is_dir() else []
        if not files:
            self.penalty_note = (f"off: no images under {folder}; trained without the ImageNet penalty (the paper's "
                                 "ablation). Put Imagenette (imagenette2/train) in DATASET_DIR to enable it")
            return None
        self.penalty_note = f"on: {len(files)} images from {folder}"
        loader = DataLoader(PenaltyImages(files, self.train_config.img_size), batch_size=1, shuffle=True,
                            generator=torch.Generator().manual_seed(self.train_config.seed),
                            num_workers=get_settings().num_workers)
        return cycle(loader)

    def run_notes(self) -> dict[str, str]:
        return {"imagenet_penalty": self.penalty_note} if self.penalty_note else {}

    # ------------------------------------------------------------- Algorithm 1
    @torch.no_grad()
    def on_fit_start(self) -> None:
        """Per-channel mean and std of the teacher's outputs over the training images."""
        if self.valid_loader is None:
            raise ValueError("EfficientAD normalises its maps with quantiles of held-out training images: "
                             "set val_fraction > 0 (default 0.1)")
        mean, std = teacher_channel_statistics(self.model, self.train_loader, self.device)
        self.model.teacher_mean.copy_(mean)
        self.model.teacher_std.copy_(std)
        self.penalty_iterator = self.penalty_images()
        tqdm.write(f"EfficientAD ImageNet penalty {self.penalty_note}")

    def training_loss(self, batch: dict[str, Any], penalty_images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Algorithm 1: L_ST = L_hard + L_penalty, L_AE and L_STAE; the total is their sum."""
        model, channels = self.model, self.model.out_channels
        images = model.to_unit_range(batch["image"])
        teacher = model.normalized_teacher(images)
        student = model.student(images)[:, :channels]
        loss_hard = hard_feature_loss(teacher, student)
        loss_penalty = torch.zeros((), device=images.device)
        if penalty_images is not None:
            loss_penalty = (model.student(penalty_images)[:, :channels] ** 2).mean()
        augmented = color_jitter(images)
        teacher_augmented = model.normalized_teacher(augmented)
        autoencoder = model.autoencoder(augmented, teacher_augmented.shape[-2:])
        student_augmented = model.student(augmented)[:, channels:]
        loss_ae = ((teacher_augmented - autoencoder) ** 2).mean()
        # not detached: as in the reference code, L_STAE also pulls the autoencoder towards the student
        loss_stae = ((autoencoder - student_augmented) ** 2).mean()
        loss_st = loss_hard + loss_penalty
        return {"loss": loss_st + loss_ae + loss_stae, "loss_st": loss_st, "loss_hard": loss_hard,
                "loss_penalty": loss_penalty, "loss_ae": loss_ae, "loss_stae": loss_stae}

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        penalty_images = next(self.penalty_iterator).to(self.device) if self.penalty_iterator is not None else None
        losses = self.training_loss(batch, penalty_images)
        self.optimize(losses["loss"])
        self.quantiles_stale = True
        return {key: float(value.detach()) for key, value in losses.items()}

    @torch.no_grad()
    def compute_map_quantiles(self) -> None:
        """q_a = 0.9 and q_b = 0.995 quantiles of each map over the held-out training images."""
        self.model.eval()
        self.model.quantiles.copy_(map_quantiles(self.model, self.valid_loader, self.device))
        self.quantiles_stale = False

    def on_validation_start(self) -> None:
        if self.quantiles_stale and self.valid_loader is not None:
            self.compute_map_quantiles()

    def on_fit_end(self) -> None:
        if self.quantiles_stale and self.valid_loader is not None:
            self.compute_map_quantiles()


@torch.no_grad()
def teacher_channel_statistics(model: EfficientAdModel, loader: DataLoader,
                               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (1, C, 1, 1) of the teacher's outputs over every position of every
    image (reference ``teacher_normalization``: the mean, then the root of the mean squared
    deviation; accumulated in float64)."""
    count, total, total_sq = 0, None, None
    for batch in loader:
        images = model.to_unit_range(batch["image"].to(device))
        features = model.teacher(images).double()
        sums, sums_sq = features.sum(dim=(0, 2, 3)), (features ** 2).sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        total_sq = sums_sq if total_sq is None else total_sq + sums_sq
        count += features.shape[0] * features.shape[2] * features.shape[3]
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(0).sqrt()
    return mean.view(1, -1, 1, 1).float(), std.view(1, -1, 1, 1).float().clamp_min(1e-6)


@torch.no_grad()
def map_quantiles(model: EfficientAdModel, loader: DataLoader, device: torch.device) -> torch.Tensor:
    """(q_a, q_b) of the local map then of the global map, over every cell of every image."""
    local_maps, global_maps = [], []
    for batch in loader:
        images = model.to_unit_range(batch["image"].to(device))
        local_map, global_map = model.raw_maps(images)
        local_maps.append(local_map.flatten())
        global_maps.append(global_map.flatten())
    local_all, global_all = torch.cat(local_maps), torch.cat(global_maps)
    q_a, q_b = MAP_QUANTILES
    return torch.stack([quantile(local_all, q_a), quantile(local_all, q_b), quantile(global_all, q_a), quantile(global_all, q_b)])
