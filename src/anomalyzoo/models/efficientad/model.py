"""EfficientAD, the networks and losses: "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies"
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
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from anomalyzoo.models.components.backbone import BackboneWeightsNotFound, get_backbone_path, read_state_dict
from anomalyzoo.models.components.unit_range import UnitRange

MODEL_SIZES = ("small", "medium")
Q_HARD = 0.999  # sec. 3.2: only the hardest 0.1 % of the feature differences are learned
MAP_QUANTILES = (0.9, 0.995)  # Algorithm 1: q_a and q_b of the map normalisation
LEARNING_RATE = 1e-4  # sec. 4 / reference: Adam lr 1e-4, weight decay 1e-5
WEIGHT_DECAY = 1e-5
LR_DROP_AT = 0.95  # lr x 0.1 after 95 % of the steps (66,500 of 70,000)
PAPER_NUM_STEPS = 70_000  # sec. 4: 70,000 training steps (shown by `anomalyzoo list`)


def teacher_weights_name(model_size: str) -> str:
    """Key of the teacher file in ``BACKBONE_WEIGHT_FILES``."""
    check_size(model_size)
    return f"efficientad_teacher_{model_size}"


def check_size(model_size: str) -> None:
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
        check_size(model_size)
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
        self.unit_range = UnitRange(input_normalized)

    def train(self, mode: bool = True) -> "EfficientAdModel":
        super().train(mode)
        self.teacher.eval()
        return self

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """The networks take [0, 1] images (they normalise internally); undo the loader's
        ImageNet normalisation when the run was configured with normalize=True."""
        return self.unit_range(images)

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
