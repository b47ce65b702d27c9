"""EfficientAD: "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies"
(Batzner, Heckler, Koenig; arXiv 2303.14535, WACV 2024).

- Patch description network (PDN, sec. 3.1, Tables 6 and 7): four (small) or six (medium)
  convolutions with two 2x2 average poolings, no normalisation layers, 384 output channels; each
  output vector describes a 33x33 patch. Like the reference code (nelson1425/EfficientAD,
  ``padding=False``) the PDN used for anomaly detection has no zero padding, so a 256 px image
  gives a 56x56 map; inputs are in [0, 1] and the PDN applies the ImageNet normalisation itself.
- Teacher: a PDN distilled from a pretrained backbone (sec. 3.1, appendix A "teacher
  pretraining"); loaded from ``BACKBONE_DIR/efficientad/pretrained_teacher_{small,medium}.pth``
  (created by :func:`distill_teacher`, or anomalib's released teacher, whose keys match).
- Student: the same PDN with 2 x 384 outputs; the first half mimics the teacher, the second
  half mimics the autoencoder (sec. 3.3).
- Autoencoder (sec. 3.3, Table 8): six strided convolutions down to a 1x1 code, then bilinear
  upsampling + 4x4 convolutions (dropout 0.2) back up to the PDN's output grid; the decoder's
  intermediate sizes scale with the input (3, 8, 15, 32, 63, 127 at 256 px). The paper only uses
  256 px: below that the 1/32 grid is smaller than the 8x8 bottleneck kernel, and we zero-pad it to
  8x8 (same weights, no change at >= 256 px).
- Training (Algorithm 1): teacher outputs normalised per channel with mean/std over the training
  images; hard-feature loss (sec. 3.2): squared student-teacher differences, mean over those
  >= their 0.999 quantile; plus the ImageNet penalty mean(S(P)^2) on a random ImageNet
  (Imagenette) image P resized to 2x, random grayscale p = 0.3 and a centre crop back to the input
  size (the reference's ``penalty_transform``: Resize(2s), RandomGrayscale(0.3), CenterCrop(s)),
  when ``<run's DATASET_DIR>/imagenette2/train`` exists; without it training goes on without the
  penalty (the paper's ablation), says so once and records it in the results. The autoencoder regresses the normalised
  teacher on an augmented image (appendix: one of brightness/contrast/saturation jitter, factor in
  [0.8, 1.2]); the student's second half regresses the autoencoder on the same image. Adam,
  lr 1e-4, weight decay 1e-5 on student + autoencoder; lr x 0.1 after 95 % of the steps (66,500 of
  70,000 in the paper). The spec's default is 20 epochs; ``num_steps=70000`` (a training option)
  reproduces the paper's schedule: it then defines both the stop and the lr drop.
- Batch size 1 (Algorithm 1 and the reference ``DataLoader(batch_size=1)``): the hard-feature
  quantile is taken over one image's differences, so a larger batch would change the loss, not
  just its speed. Other batch sizes are refused.
- Anomaly maps (Algorithm 1): local map = mean over channels of (T_norm - S[:384])^2, global map =
  mean of (A - S[384:])^2. Each is normalised as 0.1 (m - q_a) / (q_b - q_a) with q_a, q_b the 0.9
  and 0.995 quantiles of that map over held-out training images (the run's validation split,
  ``val_fraction`` 0.1 by default, as the reference's 90/10 ``random_split``); combined = 0.5 local + 0.5 global; image score = its maximum. The map is zero-padded by
  the PDN's border loss (4 output cells, as the reference code does) and resized bilinearly to the
  input.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from anomalyzoo.data.transforms import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, image_to_tensor, load_rgb_image
from anomalyzoo.models.components.backbone import BackboneWeightsNotFound, get_backbone_path, read_state_dict
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig, as_train_config
from anomalyzoo.settings import get_settings

MODEL_SIZES = ("small", "medium")
Q_HARD = 0.999  # sec. 3.2: only the hardest 0.1 % of the feature differences are learned
MAP_QUANTILES = (0.9, 0.995)  # Algorithm 1: q_a and q_b of the map normalisation
LEARNING_RATE = 1e-4  # sec. 4 / reference: Adam lr 1e-4, weight decay 1e-5
WEIGHT_DECAY = 1e-5
LR_DROP_AT = 0.95  # lr x 0.1 after 95 % of the steps (66,500 of 70,000)
PAPER_NUM_STEPS = 70_000  # sec. 4: 70,000 training steps (shown by `anomalyzoo list`)


def teacher_weights_name(model_size: str) -> str:
    """Key of the teacher file in ``BACKBONE_WEIGHT_FILES``."""
    _check_size(model_size)
    return f"efficientad_teacher_{model_size}"


def _check_size(model_size: str) -> None:
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {MODEL_SIZES}, got {model_size!r}")


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) for tensors of any size: torch.quantile refuses
    inputs of more than 16M elements, which a batch of 384x56x56 differences soon exceeds."""
    flat = values.reshape(-1)
    position = q * (flat.numel() - 1)
    low, high = math.floor(position), math.ceil(position)
    low_value = flat.kthvalue(low + 1).values
    if high == low:
        return low_value
    high_value = flat.kthvalue(high + 1).values
    return low_value + (position - low) * (high_value - low_value)


def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor, q_hard: float = Q_HARD) -> torch.Tensor:
    """Sec. 3.2 / Algorithm 1: D = (T_norm - S)^2; L_hard = mean of the D >= quantile(D, q_hard)."""
    distance = (teacher - student) ** 2
    d_hard = quantile(distance.detach(), q_hard)
    return distance[distance >= d_hard].mean()


# --------------------------------------------------------------------------- networks
class PatchDescriptionNetwork(nn.Module):
    """PDN of Table 6 (small) or Table 7 (medium). Layer names follow anomalib's, so its released
    teacher state dicts load as they are. ``padding=True`` (kernel-size-dependent zero padding)
    is only used to distil the teacher, whose output grid must then be exactly input/4."""

    def __init__(self, model_size: str = "small", out_channels: int = 384, padding: bool = False) -> None:
        super().__init__()
        _check_size(model_size)
        self.model_size = model_size
        pad = 1 if padding else 0
        if model_size == "small":
            self.conv1 = nn.Conv2d(3, 128, kernel_size=4, padding=3 * pad)
            self.conv2 = nn.Conv2d(128, 256, kernel_size=4, padding=3 * pad)
            self.conv3 = nn.Conv2d(256, 256, kernel_size=3, padding=1 * pad)
            self.conv4 = nn.Conv2d(256, out_channels, kernel_size=4)
        else:
            self.conv1 = nn.Conv2d(3, 256, kernel_size=4, padding=3 * pad)
            self.conv2 = nn.Conv2d(256, 512, kernel_size=4, padding=3 * pad)
            self.conv3 = nn.Conv2d(512, 512, kernel_size=1)
            self.conv4 = nn.Conv2d(512, 512, kernel_size=3, padding=1 * pad)
            self.conv5 = nn.Conv2d(512, out_channels, kernel_size=4)
            self.conv6 = nn.Conv2d(out_channels, out_channels, kernel_size=1)
        self.avgpool1 = nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * pad)
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * pad)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, 3, H, W) -> (B, out_channels, h, w)."""
        x = (images - self.mean) / self.std
        x = self.avgpool1(F.relu(self.conv1(x)))
        x = self.avgpool2(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        if self.model_size == "small":
            return self.conv4(x)
        x = F.relu(self.conv4(x))
        x = F.relu(self.conv5(x))
        return self.conv6(x)


class Autoencoder(nn.Module):
    """Table 8. The decoder's intermediate sizes are those of the reference code for a 256 px
    encoder input (3, 8, 15, 32, 63, 127 before each 4x4 conv with padding 2), scaled with it."""

    def __init__(self, out_channels: int = 384) -> None:
        super().__init__()
        self.encoder = nn.ModuleList([
            nn.Conv2d(3, 32, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(32, 32, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(32, 64, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(64, 64, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(64, 64, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(64, 64, kernel_size=8),
        ])
        self.decoder = nn.ModuleList([nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2) for _ in range(6)])
        self.dropout = nn.Dropout(p=0.2)
        self.head1 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.head2 = nn.Conv2d(64, out_channels, kernel_size=3, padding=1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        """[0, 1] images -> (B, out_channels, *output_size): the PDN grid of these images."""
        height, width = images.shape[-2:]
        x = (images - self.mean) / self.std
        for index, conv in enumerate(self.encoder):
            if index == len(self.encoder) - 1 and min(x.shape[-2:]) < conv.kernel_size[0]:
                # below 256 px the 1/32 grid is smaller than the 8x8 bottleneck kernel: zero-pad
                # it to 8x8 (a no-op at the paper's 256 px; keeps the weights' shapes)
                pad_y, pad_x = max(0, conv.kernel_size[0] - x.shape[-2]), max(0, conv.kernel_size[1] - x.shape[-1])
                x = F.pad(x, (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2))
            x = conv(x)
            if index < len(self.encoder) - 1:
                x = F.relu(x)
        sizes = [(height // 64 - 1, width // 64 - 1), (height // 32, width // 32), (height // 16 - 1, width // 16 - 1),
                 (height // 8, width // 8), (height // 4 - 1, width // 4 - 1), (height // 2 - 1, width // 2 - 1)]
        sizes = [(max(1, h), max(1, w)) for h, w in sizes]
        for size, conv in zip(sizes, self.decoder):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = self.dropout(F.relu(conv(x)))
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
        return self.head2(F.relu(self.head1(x)))


def load_teacher_weights(teacher: PatchDescriptionNetwork, model_size: str) -> Path:
    """Load the distilled teacher from BACKBONE_DIR, or say exactly how to create it."""
    path = get_backbone_path(teacher_weights_name(model_size))
    if not path.is_file():
        raise BackboneWeightsNotFound(
            f"EfficientAD needs a pretrained {model_size} teacher at {path}, which does not exist. "
            f"Create it with `anomalyzoo distill-teacher --images DIR --model-size {model_size}` "
            f"(or anomalyzoo.models.efficientad.distill_teacher(image_dir, model_size='{model_size}')), "
            "or put anomalib's pretrained_teacher_{small,medium}.pth there (set the folder with "
            "set_globals(backbone_dir=...) or ANOMALYZOO_BACKBONE_DIR)."
        )
    state = read_state_dict(path)
    try:
        teacher.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} does not hold a {model_size} EfficientAD teacher (PDN state dict): {error}") from error
    return path


class EfficientAdModel(nn.Module):
    """Teacher, student and autoencoder plus the statistics Algorithm 1 computes after training."""

    def __init__(
        self,
        model_size: str = "small",
        teacher_out_channels: int = 384,
        padding: bool = False,
        pretrained: bool = True,
        input_normalized: bool = False,
    ) -> None:
        super().__init__()
        self.model_size = model_size
        self.out_channels = teacher_out_channels
        self.padding = padding
        self.input_normalized = input_normalized
        self.teacher = PatchDescriptionNetwork(model_size, teacher_out_channels, padding)
        if pretrained:
            load_teacher_weights(self.teacher, model_size)
        self.teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.student = PatchDescriptionNetwork(model_size, 2 * teacher_out_channels, padding)
        self.autoencoder = Autoencoder(teacher_out_channels)
        self.register_buffer("teacher_mean", torch.zeros(1, teacher_out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, teacher_out_channels, 1, 1))
        # q_a, q_b of the local (student-teacher) and global (autoencoder-student) maps; NaN until fitted
        self.register_buffer("quantiles", torch.full((4,), float("nan")))
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "EfficientAdModel":
        super().train(mode)
        self.teacher.eval()
        return self

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """The networks take [0, 1] images (they normalise internally); undo the loader's
        ImageNet normalisation when the run was configured with normalize=True."""
        return images * self.image_std + self.image_mean if self.input_normalized else images

    @torch.no_grad()
    def normalized_teacher(self, images: torch.Tensor) -> torch.Tensor:
        return (self.teacher(images) - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local, global) maps (B, 1, h, w) on the PDN grid for [0, 1] images, not yet normalised."""
        teacher = self.normalized_teacher(images)
        student = self.student(images)
        autoencoder = self.autoencoder(images, teacher.shape[-2:])
        local_map = ((teacher - student[:, : self.out_channels]) ** 2).mean(dim=1, keepdim=True)
        global_map = ((autoencoder - student[:, self.out_channels:]) ** 2).mean(dim=1, keepdim=True)
        return local_map, global_map

    @property
    def is_normalized(self) -> bool:
        return not bool(torch.isnan(self.quantiles).any())

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = self.to_unit_range(images)
        local_map, global_map = self.raw_maps(images)
        if self.is_normalized:
            st_start, st_end, ae_start, ae_end = self.quantiles
            local_map = 0.1 * (local_map - st_start) / (st_end - st_start)
            global_map = 0.1 * (global_map - ae_start) / (ae_end - ae_start)
        combined = 0.5 * local_map + 0.5 * global_map
        pred_score = combined.flatten(1).max(dim=1).values
        # the unpadded PDN loses a border of (H/4 - h)/2 output cells on each side (4 for any
        # size): pad it back with zeros, then resize to the input (reference code)
        border_y = max(0, (images.shape[-2] // 4 - combined.shape[-2]) // 2)
        border_x = max(0, (images.shape[-1] // 4 - combined.shape[-1]) // 2)
        combined = F.pad(combined, (border_x, border_x, border_y, border_y))
        anomaly_map = F.interpolate(combined, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"pred_score": pred_score, "anomaly_map": anomaly_map[:, 0]}


# --------------------------------------------------------------------------- augmentations
def _grayscale(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def color_jitter(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Appendix (autoencoder training): per image, one of brightness, contrast or saturation
    jitter (torchvision's ColorJitter(0.2) definitions), with a factor uniform in [0.8, 1.2]."""
    batch = images.shape[0]
    choice = torch.randint(0, 3, (batch,), generator=generator)
    factor = (0.8 + 0.4 * torch.rand(batch, generator=generator)).to(images).view(batch, 1, 1, 1)
    gray = _grayscale(images)
    brightness = images * factor
    contrast = factor * images + (1 - factor) * gray.mean(dim=(1, 2, 3), keepdim=True)
    saturation = factor * images + (1 - factor) * gray
    choice = choice.to(images.device).view(batch, 1, 1, 1)
    out = torch.where(choice == 0, brightness, torch.where(choice == 1, contrast, saturation))
    return out.clamp(0.0, 1.0)


def find_images(folders: str | Path | Sequence[str | Path]) -> list[Path]:
    """Every image file under the folder(s), recursively, sorted."""
    if isinstance(folders, (str, Path)):
        folders = [folders]
    files: list[Path] = []
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"Image folder {folder} does not exist")
        files.extend(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                     and not p.name.startswith("."))
    return sorted(files)


class PenaltyImages(Dataset):
    """ImageNet penalty images (Algorithm 1): resized to 2x the input size, grayscale with
    p = 0.3, centre-cropped back to the input size (reference ``penalty_transform``); [0, 1] tensors."""

    def __init__(self, files: list[Path], img_size: int) -> None:
        self.files, self.img_size = files, img_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = image_to_tensor(load_rgb_image(self.files[index]), 2 * self.img_size, normalize=False)
        if torch.rand(()) < 0.3:
            image = _grayscale(image[None])[0].expand(3, -1, -1).contiguous()
        offset = self.img_size // 2  # centre of a 2s x 2s image
        return image[:, offset:offset + self.img_size, offset:offset + self.img_size]


def _cycle(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


# --------------------------------------------------------------------------- trainer
class EfficientAdTrainer(BaseTrainer):
    """Algorithm 1: teacher statistics at fit start, student + autoencoder training, map
    quantiles on the held-out validation images at fit end."""

    def __init__(
        self,
        model_size: str = "small",
        teacher_out_channels: int = 384,
        padding: bool = False,
        imagenet_dir: str | Path | None = None,
        pretrained: bool = True,
        train_config: TrainConfig | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(train_config, TrainConfig):  # EfficientAD's own loop defaults under any given keys
            train_config = as_train_config({"batch_size": 1, "normalize": False, **(train_config or {})})
        _check_size(model_size)
        if train_config.batch_size != 1:
            raise ValueError(
                f"EfficientAD trains on one image per step (Algorithm 1; the hard-feature loss takes the 0.999 "
                f"quantile of one image's differences), so batch_size must be 1, got {train_config.batch_size}")
        model = EfficientAdModel(model_size, teacher_out_channels, padding, pretrained, input_normalized=train_config.normalize)
        super().__init__(model, train_config, device)
        self.imagenet_dir = Path(imagenet_dir).expanduser() if imagenet_dir is not None else None
        self.total_steps = 0
        self.train_loader: DataLoader | None = None
        self.quantile_loader: DataLoader | None = None
        self.penalty_iterator: Iterator[torch.Tensor] | None = None
        self.penalty_note = ""
        self.quantiles_stale = False

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """Adam over student + autoencoder; the lr drop (x0.1 after 95 % of the steps) is applied
        per step in :meth:`train_step`, so there is no per-epoch scheduler."""
        parameters = list(self.model.student.parameters()) + list(self.model.autoencoder.parameters())
        return torch.optim.Adam(parameters, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY), None

    # ------------------------------------------------------------- data
    def penalty_folder(self) -> Path:
        """``imagenet_dir``, else ``<the run's DATASET_DIR>/imagenette2/train``."""
        if self.imagenet_dir is not None:
            return self.imagenet_dir
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
        return _cycle(loader)

    def fit(self, train_loader: DataLoader, valid_loader: DataLoader | None = None, num_epochs: int | None = None,
            checkpoint_dir: str | Path | None = None) -> list[dict[str, Any]]:
        if valid_loader is None:
            raise ValueError("EfficientAD normalises its maps with quantiles of held-out training images: "
                             "set val_fraction > 0 (default 0.1)")
        self.train_loader, self.quantile_loader = train_loader, valid_loader
        self.total_steps = self.planned_steps(train_loader, num_epochs)
        return super().fit(train_loader, valid_loader, num_epochs, checkpoint_dir)

    def run_notes(self) -> dict[str, str]:
        return {"imagenet_penalty": self.penalty_note} if self.penalty_note else {}

    # ------------------------------------------------------------- Algorithm 1
    @torch.no_grad()
    def on_fit_start(self) -> None:
        """Per-channel mean and std of the teacher's outputs over the training images."""
        assert self.train_loader is not None, "call fit() with the training loader"
        mean, std = teacher_channel_statistics(self.model, self.train_loader, self.device)
        self.model.teacher_mean.copy_(mean)
        self.model.teacher_std.copy_(std)
        self.penalty_iterator = self.penalty_images()
        tqdm.write(f"EfficientAD ImageNet penalty {self.penalty_note}")

    def current_lr(self) -> float:
        return LEARNING_RATE * (0.1 if self.global_step >= LR_DROP_AT * self.total_steps else 1.0)

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
        for group in self.optimizer.param_groups:
            group["lr"] = self.current_lr()
        self.optimize(losses["loss"])
        self.quantiles_stale = True
        return {key: float(value.detach()) for key, value in losses.items()}

    @torch.no_grad()
    def compute_map_quantiles(self) -> None:
        """q_a = 0.9 and q_b = 0.995 quantiles of each map over the held-out training images."""
        assert self.quantile_loader is not None
        self.model.eval()
        self.model.quantiles.copy_(map_quantiles(self.model, self.quantile_loader, self.device))
        self.quantiles_stale = False

    def on_validation_start(self) -> None:
        if self.quantiles_stale and self.quantile_loader is not None:
            self.compute_map_quantiles()

    def on_fit_end(self) -> None:
        if self.quantiles_stale and self.quantile_loader is not None:
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


# --------------------------------------------------------------------------- teacher distillation
class DistillationImages(Dataset):
    """One image at two sizes: ``img_size`` for the PDN and ``2 * img_size`` for the backbone,
    so that the backbone's stride-8 grid equals the padded PDN's stride-4 grid (reference
    pretraining: 512 px for the WideResNet, 256 px for the PDN). Grayscale with p = 0.1."""

    def __init__(self, files: list[Path], img_size: int, augment: bool = True) -> None:
        self.files, self.img_size, self.augment = files, img_size, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_rgb_image(self.files[index])
        if self.augment and torch.rand(()) < 0.1:
            image = image.convert("L").convert("RGB")
        return image_to_tensor(image, self.img_size, False), image_to_tensor(image, 2 * self.img_size, False)


class DistillationTarget(nn.Module):
    """Backbone patch features projected to ``out_channels`` by a fixed linear map, as in the
    reference pretraining (PatchCore's aggregation): each layer's features are averaged over
    3x3 neighbourhoods, brought to the first layer's grid bilinearly, pooled over channels to
    1024 each (adaptive average pooling), and the concatenation pooled to ``out_channels``.

    Both poolings are linear along the channels, so they are folded into one
    (sum of channels, out_channels) matrix: one small matmul per position instead of
    materialising 1024-channel vectors for every position."""

    def __init__(self, backbone: str, layers: Sequence[str], out_channels: int = 384, embed_dim: int = 1024) -> None:
        super().__init__()
        from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor

        self.extractor = TimmFeatureExtractor(backbone, layers, pretrained=True, input_normalized=False)
        self.layers, self.out_channels, self.embed_dim = list(layers), out_channels, embed_dim
        self.register_buffer("projection", channel_pooling_matrix(self.extractor.out_dims, embed_dim, out_channels), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.extractor(images)
        grid = features[self.layers[0]].shape[-2:]
        aggregated = []
        for layer in self.layers:
            feature = F.avg_pool2d(features[layer], kernel_size=3, stride=1, padding=1)
            if feature.shape[-2:] != grid:
                feature = F.interpolate(feature, size=grid, mode="bilinear", align_corners=False)
            aggregated.append(feature)
        return torch.einsum("bchw,co->bohw", torch.cat(aggregated, dim=1), self.projection).contiguous()


def channel_pooling_matrix(channels: Sequence[int], embed_dim: int, out_channels: int) -> torch.Tensor:
    """The linear map of "adaptive-average-pool each layer's channels to ``embed_dim``, concatenate,
    adaptive-average-pool to ``out_channels``", as a (sum(channels), out_channels) matrix."""
    def pooling(size_in: int, size_out: int) -> torch.Tensor:  # row i: what input i contributes to each output
        return F.adaptive_avg_pool1d(torch.eye(size_in, dtype=torch.float64)[:, None, :], size_out)[:, 0, :]

    per_layer = torch.block_diag(*[pooling(c, embed_dim) for c in channels])  # (sum c, L * embed_dim)
    return (per_layer @ pooling(len(channels) * embed_dim, out_channels)).float()


def distill_teacher(
    image_dir: str | Path | Sequence[str | Path],
    model_size: str = "small",
    backbone: str = "wide_resnet50_2",
    layers: Sequence[str] = ("layer2", "layer3"),
    output_path: str | Path | None = None,
    num_steps: int = 10000,
    batch_size: int = 8,
    img_size: int = 256,
    lr: float = 1e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Pretrain an EfficientAD teacher PDN (paper appendix A) and save its state dict where
    :class:`EfficientAdModel` looks for it.

    The PDN (with padding, so its grid is img_size/4) regresses the per-channel normalised,
    384-channel projection of a pretrained backbone's layer2+layer3 features, computed on the
    same image at twice the size (MSE, Adam with weight decay 1e-5). The paper distils
    WideResNet-101 for 60,000 steps of 16 ImageNet images; any folder of natural images works.
    """
    _check_size(model_size)
    output_path = Path(output_path) if output_path is not None else get_backbone_path(teacher_weights_name(model_size))
    if output_path.exists() and not overwrite:
        raise FileExistsError(f"{output_path} already exists; pass overwrite=True (--overwrite) to replace it")
    files = find_images(image_dir)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {image_dir}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    random.seed(seed)
    settings = get_settings()
    target_network = DistillationTarget(backbone, layers).to(device).eval()
    pdn = PatchDescriptionNetwork(model_size, 384, padding=True).to(device)

    # per-channel statistics of the targets (over up to 1000 images, no augmentation)
    statistics_files = files if len(files) <= 1000 else random.Random(seed).sample(files, 1000)
    loader = DataLoader(DistillationImages(statistics_files, img_size, augment=False), batch_size=batch_size,
                        num_workers=settings.num_workers)
    count, total, total_sq = 0, 0.0, 0.0
    for _, large in tqdm(loader, desc="teacher target statistics", disable=not progress, leave=False):
        target = target_network(large.to(device)).double()
        total = total + target.sum(dim=(0, 2, 3))
        total_sq = total_sq + (target ** 2).sum(dim=(0, 2, 3))
        count += target.shape[0] * target.shape[2] * target.shape[3]
    mean = (total / count).float().view(1, -1, 1, 1)
    std = (total_sq / count - (total / count) ** 2).clamp_min(0).sqrt().float().view(1, -1, 1, 1).clamp_min(1e-6)

    optimizer = torch.optim.Adam(pdn.parameters(), lr=lr, weight_decay=1e-5)
    loader = DataLoader(DistillationImages(files, img_size), batch_size=batch_size, shuffle=True, drop_last=len(files) > batch_size,
                        generator=torch.Generator().manual_seed(seed), num_workers=settings.num_workers)
    batches = _cycle(loader)
    pdn.train()
    bar = tqdm(range(num_steps), desc=f"distill {model_size} teacher", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        small, large = next(batches)
        target = (target_network(large.to(device)) - mean) / std
        prediction = pdn(small.to(device))
        if prediction.shape[-2:] != target.shape[-2:]:
            target = F.interpolate(target, size=prediction.shape[-2:], mode="bilinear", align_corners=False)
        loss = ((prediction - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in pdn.state_dict().items()}
    temporary = output_path.with_suffix(output_path.suffix + ".tmp")
    torch.save(state, temporary)
    temporary.replace(output_path)
    return output_path
