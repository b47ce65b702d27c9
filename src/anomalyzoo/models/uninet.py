"""UniNet: "UniNet: A Contrastive Learning-guided Unified Framework with Feature Selection for
Anomaly Detection" (Wei, Jiang & Xu, CVPR 2025). The paper names the parts (student-teacher
models and a bottleneck, domain-related feature selection, a similarity contrastive loss and a
margin loss, a weighted decision mechanism); every detail below is from the authors' code,
which produced the published numbers (github pangdatangtt/UniNet: ``UniNet_lib/model.py``,
``resnet.py``, ``de_resnet.py``, ``DFS.py``, ``Loss.py``, ``mechanism.py``,
``train_unsupervisedAD.py``, ``main.py``). anomalib's port differs from it (AdamW with amsgrad
and a step schedule, temperature 0.1, a registered learnable theta); we follow the authors.

Structure (``model.py``): two teachers of the same ImageNet backbone (layers 1-3), a bottleneck
and a student decoder.

- Source teacher: frozen, BatchNorm in eval mode (``Teachers.train_eval``).
- Target teacher: a copy of the source that is trained with the student at a tiny learning rate
  (1e-6), BatchNorm in train mode while training.
- Bottleneck (``resnet.py`` ``BN_layer``): Reverse Distillation's multi-scale fusion (layer1
  through two 3x3 stride-2 conv+BN+ReLU, layer2 through one, concatenated with layer3), then
  one ResNet stage of the authors' two-branch blocks (``AttnBottleneck`` with ``halve=2``): the
  input channels are split in halves, each half goes through 3x3 conv+BN+ReLU+3x3 conv+BN (the
  first conv carries the stage's stride; the second branch's convolutions have a bias, being
  the ``merge_kernel`` replacements), the halves are concatenated and a 1x1 conv+BN expands them
  to the embedding, plus the projected shortcut and a ReLU. The 7x7 kernels in that file are
  replaced by 3x3 ones (``merge_kernel``) before any use, and then Kaiming-initialised like
  every convolution (the replacement happens inside the init loop), so the second branch is a
  3x3 twin of the first; we build it so.
- Student (``de_resnet.py``): Reverse Distillation's decoder (``components.resnet_decoder``).
  The spec's "student/teacher wide_resnet50_2" is one ``backbone`` option: the student is the
  reverse of the teacher (``de_wide_resnet50_2``); other backbones get the layout that
  :func:`resnet_layout` gives them (EfficientNet-Lite0: basic blocks, two per stage).
- Both teachers go through the bottleneck and the student in one batch (target first, then
  source). Each teacher is compared with the student's reconstruction of the *other* teacher's
  embedding: source layer k with the student of the target half, target layer k with the
  student of the source half (``UniNet.forward``'s ordering): 6 feature pairs.

Training (``train_unsupervisedAD.py``, ``Loss.py``, ``DFS.py``):

- Domain-related feature selection (DFS): each student map is re-weighted per channel by the
  teacher's spatial softmax times (theta + the teacher's spatial mean) before the loss; the
  teacher is not re-weighted, and nothing is selected at test time. ``DFS.py`` means theta to
  be learnable, ``sigmoid(theta) + 0.5`` clamped at 1 with theta initialised to 0, but the
  parameters are created as ``nn.Parameter(...).to("cuda")``, which returns a plain
  tensor, so they are never registered nor optimised: theta stays clamp(0.5 + 0.5) = 1 in
  every published run. We use theta = 1 (the code's ``domain_related_feature_selection``).
  The weight 1 + mean(t) assumes non-negative (ReLU) teacher features, as every ResNet stage
  gives. EfficientNet stages end in a linear projection: on EfficientNet-Lite0 about a third of
  the channel means are below -1, their weights turn negative and flip the student's channels
  (synthetic texture, 128 px: image AUROC 0.67 after 10 epochs with DFS, 1.0 after 5 without).
  The trainer warns once when it sees this; ``feature_selection=False`` is the remedy.
- Loss per feature pair, summed over the 6 pairs (``losses`` with no mask, the unsupervised
  case): 0.7 * mean(1 - cos) over positions + 0.3 * the similarity contrastive loss (the
  softmax over the teacher's positions of each student position's cosine similarities / T, and
  -log of the matching position's probability) + the margin loss relu(1 - p_ii) on normal
  positions (margin 1). The softmax is computed stably (the authors exponentiate and divide by
  the sum + 1e-8, which is the same for any T where that does not overflow); the 1e-8 inside
  the log is kept.
- Temperature T: the spec's 0.4. The authors' ``main.py`` defaults to ``--T 2`` and
  ``model.py`` replaces it by 0.1 for transistor, pill, cable, bottle, grid and foam; those
  per-category values (and skipping DFS on transistor) are category-name switches we do not
  copy: set ``temperature`` (and ``feature_selection``) per run instead.
- Optimiser: AdamW, betas (0.9, 0.999), weight decay 1e-5; lr 5e-3 for bottleneck + student,
  1e-6 for the target teacher (two AdamW optimisers in the code, one with two parameter groups
  here: the same updates). No schedule, no gradient clipping. The authors train 100 epochs at
  batch 8 and keep the checkpoint with the best test AUPRO (evaluated every 10 epochs, early
  stopping after 3 checks without improvement); model selection on the test set is not done
  here, the last epoch is evaluated.

Scoring (``eval.py``, ``mechanism.py`` ``weighted_decision_mechanism``):

- Per pair, 1 - cos along channels at the feature grid; the anomaly map is the sum of the six,
  each upsampled bilinearly (``align_corners=True``) to the input size. The map is not
  smoothed (the authors' pixel AUROC and AUPRO use it as is).
- Weighted decision mechanism: for each image, the maximum of each of the six maps; of those
  whose softmax probability exceeds the mean probability, the mean, times alpha (0.01), floored
  at beta (3e-5), is the fraction w of pixels kept: the image score is the mean of the top
  int(H * W * w) values of the map smoothed by a Gaussian of sigma 4. Deviations: at least one
  pixel is kept (the authors assert it, which fails at small inputs), all six maxima are used
  when none stands out (equal maxima; the authors' mean of an empty list is NaN), and the
  smoothing reflects at the borders without repeating the edge pixel (scipy's ``reflect``
  repeats it): this only changes values within 16 pixels of the border.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.blur import GaussianBlur2d
from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components.resnet_decoder import (
    ResNetDecoder,
    ResNetLayout,
    conv1x1,
    conv3x3,
    conv_bn_relu,
    init_resnet_weights,
    resize_to,
    resnet_layout,
)
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.components.variants import ModelVariant

COSINE_WEIGHT = 0.7  # lambda in Loss.py: 0.7 * cosine term + 0.3 * contrastive term
MARGIN = 1.0  # margin of the margin loss (model.py loss_computation)
LOG_EPSILON = 1e-8  # Loss.py: -log(p_ii + 1e-8)
DECISION_ALPHA = 0.01  # main.py --alpha: upper limit of the top-k fraction
DECISION_BETA = 3e-5  # main.py --beta: lower limit of the top-k fraction
SCORE_SIGMA = 4.0  # mechanism.py: gaussian_filter(sigma=4) before the top-k mean


class TwoBranchBlock(nn.Module):
    """The authors' bottleneck block (``AttnBottleneck``, ``halve=2``): two 3x3 conv branches on
    the two channel halves, concatenated, expanded by a 1x1 conv, plus the shortcut."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if in_channels % 2 or width % 2:
            raise ValueError(f"TwoBranchBlock splits channels in halves: got {in_channels} in, width {width}")
        half_in, half_width = in_channels // 2, width // 2
        self.branch1 = nn.Sequential(
            conv3x3(half_in, half_width, stride), nn.BatchNorm2d(half_width), nn.ReLU(inplace=True),
            conv3x3(half_width, half_width), nn.BatchNorm2d(half_width))
        # the merge_kernel replacements: 3x3 convolutions with a bias (initialised to zero there)
        self.branch2 = nn.Sequential(
            nn.Conv2d(half_in, half_width, 3, stride, 1), nn.BatchNorm2d(half_width), nn.ReLU(inplace=True),
            nn.Conv2d(half_width, half_width, 3, 1, 1), nn.BatchNorm2d(half_width))
        self.expand = nn.Sequential(conv1x1(width, out_channels), nn.BatchNorm2d(out_channels))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=1)
        out = self.expand(torch.cat([self.branch1(first), self.branch2(second)], dim=1))
        return self.relu(out + self.shortcut(x))


class UniNetBottleneck(nn.Module):
    """``BN_layer``: multi-scale fusion of (C1, C2, C3) to layer3's grid, then one stage of
    :class:`TwoBranchBlock` (layer4's block count, first block stride 2) to 2 x C3 channels."""

    def __init__(self, in_channels: Sequence[int], layout: ResNetLayout) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"UniNet's bottleneck fuses exactly three teacher layers, got channels {list(in_channels)}")
        c1, c2, c3 = in_channels
        self.fuse_layer1 = nn.Sequential(conv_bn_relu(c1, c2), conv_bn_relu(c2, c3))
        self.fuse_layer2 = conv_bn_relu(c2, c3)
        self.out_channels = 2 * c3
        # Bottleneck stages: planes = out / 4 at width planes * width_per_group / 64 (1024 for
        # Wide-ResNet50-2); basic stages: width = out
        if layout.block == "bottleneck":
            width = self.out_channels // 4 * layout.width_per_group // 64
        else:
            width = self.out_channels
        blocks = [TwoBranchBlock(3 * c3, width, self.out_channels, stride=2)]
        blocks += [TwoBranchBlock(self.out_channels, width, self.out_channels) for _ in range(1, layout.blocks_per_stage[3])]
        self.embedding = nn.Sequential(*blocks)
        init_resnet_weights(self)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        layer1, layer2, layer3 = features
        grid = layer3.shape[-2:]
        fused = torch.cat([resize_to(self.fuse_layer1(layer1), grid), resize_to(self.fuse_layer2(layer2), grid), layer3], dim=1)
        return self.embedding(fused)


def domain_related_feature_selection(student_features: Sequence[torch.Tensor],
                                     teacher_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """DFS with theta = 1 (see the module doc): s * softmax_hw(t) * (1 + mean_hw(t)), per channel."""
    selected = []
    for student, teacher in zip(student_features, teacher_features, strict=True):
        weights = torch.softmax(teacher.flatten(2), dim=-1).view_as(teacher)
        global_prior = teacher.mean(dim=(-2, -1), keepdim=True)
        selected.append(student * weights * (1.0 + global_prior))
    return selected


def pair_loss(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """``Loss.py`` for one pair of (N, C, H, W) maps, no mask: 0.7 cosine + 0.3 contrastive + margin."""
    student_vectors = F.normalize(student.flatten(2).transpose(1, 2), dim=2)  # (N, HW, C)
    teacher_vectors = F.normalize(teacher.flatten(2).transpose(1, 2), dim=2)
    cosine = (1.0 - (student_vectors * teacher_vectors).sum(dim=2)).mean()
    similarities = student_vectors @ teacher_vectors.transpose(1, 2) / temperature  # (N, HW, HW)
    matching = torch.softmax(similarities, dim=2).diagonal(dim1=1, dim2=2)  # p_ii
    contrastive = -torch.log(matching + LOG_EPSILON).mean()
    margin = F.relu(MARGIN - matching).mean()
    return COSINE_WEIGHT * cosine + (1.0 - COSINE_WEIGHT) * contrastive + margin


def uninet_loss(teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor],
                temperature: float) -> torch.Tensor:
    """Sum of :func:`pair_loss` over the feature pairs."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    loss = teacher_features[0].new_zeros(())
    for teacher, student in zip(teacher_features, student_features, strict=True):
        loss = loss + pair_loss(teacher, student, temperature)
    return loss


def decision_fractions(distance_maps: Sequence[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    """(B,) share of pixels the score averages: max(alpha * mean of the standing-out maxima, beta).

    A map's maximum stands out when its softmax probability over the maps exceeds the mean (1/L).
    """
    maxima = torch.stack([d.flatten(1).amax(dim=1) for d in distance_maps], dim=1)  # (B, L)
    probabilities = torch.softmax(maxima, dim=1)
    selected = (probabilities > probabilities.mean(dim=1, keepdim=True)).to(maxima.dtype)
    selected = selected + (1.0 - selected.amax(dim=1, keepdim=True))  # none stands out: all of them
    mean_selected = (maxima * selected).sum(dim=1) / selected.sum(dim=1)
    return torch.clamp(mean_selected * alpha, min=beta)


def top_fraction_mean(maps: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """(B,) mean of the top int(H * W * fraction) values of each (H, W) map, at least one."""
    flat = maps.flatten(1)
    # k per image as a tensor (a sorted prefix mask, not topk(k) per row), so that the graph traces
    # for ONNX / OpenVINO with any batch; float64 so that floor(H * W * f) is Python's int() of it
    counts = torch.clamp(torch.floor(fractions.to(torch.float64) * flat.shape[1]), min=1).to(flat.dtype)
    ranked = flat.sort(dim=1, descending=True).values
    kept = torch.arange(flat.shape[1], device=flat.device)[None, :] < counts[:, None]
    return (ranked * kept).sum(dim=1) / counts


class UniNetModel(nn.Module):
    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        decision_alpha: float = DECISION_ALPHA,
        decision_beta: float = DECISION_BETA,
        pretrained: bool = True,
        input_normalized: bool = True,
    ) -> None:
        super().__init__()
        self.layers = list(layers)
        self.decision_alpha = decision_alpha
        self.decision_beta = decision_beta
        self.source_teacher = TimmFeatureExtractor(backbone, self.layers, pretrained=pretrained, input_normalized=input_normalized)
        strides = self.source_teacher.strides
        if len(strides) != 3 or strides[1] != 2 * strides[0] or strides[2] != 2 * strides[1]:
            raise ValueError(f"UniNet needs three consecutive teacher layers (e.g. layer1-3), got {self.layers}")
        # the target teacher starts as a copy of the source (train_unsupervisedAD.py) and is trained
        self.target_teacher = copy.deepcopy(self.source_teacher)
        self.target_teacher.requires_grad = True  # train mode follows the model's, gradients flow
        self.target_teacher.requires_grad_(True)
        layout = resnet_layout(backbone)
        self.bottleneck = UniNetBottleneck(self.source_teacher.out_dims, layout)
        self.student = ResNetDecoder(self.bottleneck.out_channels, self.source_teacher.out_dims, layout)
        self.blur = GaussianBlur2d(sigma=SCORE_SIGMA)

    def teacher_student_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The 6 (teacher, student) pairs: [source layers, target layers] and the student's
        reconstructions of [the target's embedding, the source's embedding] (``model.py``)."""
        source_maps, target_maps = self.source_teacher(images), self.target_teacher(images)
        source = [source_maps[layer] for layer in self.layers]
        target = [target_maps[layer] for layer in self.layers]
        both = [torch.cat([t, s], dim=0) for t, s in zip(target, source, strict=True)]
        reconstructed = self.student(self.bottleneck(both))
        reconstructed = [resize_to(r, f.shape[-2:]) for r, f in zip(reconstructed, source, strict=True)]
        batch = images.shape[0]  # not len(): a traced graph (export) keeps the batch dynamic
        from_target = [r[:batch] for r in reconstructed]
        from_source = [r[batch:] for r in reconstructed]
        return source + target, from_target + from_source

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher, student = self.teacher_student_features(images)
        distances = [1.0 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student, strict=True)]
        size = tuple(images.shape[-2:])
        anomaly_map = sum(F.interpolate(d[:, None], size=size, mode="bilinear", align_corners=True)[:, 0] for d in distances)
        fractions = decision_fractions(distances, self.decision_alpha, self.decision_beta)
        scores = top_fraction_mean(self.blur(anomaly_map[:, None])[:, 0], fractions)
        return {"pred_score": scores, "anomaly_map": anomaly_map}


class UniNetTrainer(BaseTrainer):
    """Trains the bottleneck, the student and the target teacher on normal images (module doc)."""

    model_class = UniNetModel

    def __init__(self, *, temperature: float = 0.4, feature_selection: bool = True, learning_rate: float = 5e-3,
                 teacher_learning_rate: float = 1e-6, weight_decay: float = 1e-5,
                 train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.feature_selection = feature_selection
        self.learning_rate = learning_rate
        self.teacher_learning_rate = teacher_learning_rate
        self.weight_decay = weight_decay
        self._warned_signed_priors = False
        super().__init__(train_config, device, **model_options)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """AdamW (0.9, 0.999), weight decay 1e-5: lr 5e-3 for bottleneck + student, 1e-6 for the target teacher."""
        groups = [
            {"params": [*self.model.bottleneck.parameters(), *self.model.student.parameters()], "lr": self.learning_rate},
            {"params": list(self.model.target_teacher.parameters()), "lr": self.teacher_learning_rate},
        ]
        return torch.optim.AdamW(groups, lr=self.learning_rate, betas=(0.9, 0.999), weight_decay=self.weight_decay), None

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        teacher, student = self.model.teacher_student_features(batch["image"])
        if self.feature_selection:
            self.warn_if_signed_priors(teacher)
            student = domain_related_feature_selection(student, teacher)
        return {"loss": uninet_loss(teacher, student, self.temperature)}

    def warn_if_signed_priors(self, teacher_features: Sequence[torch.Tensor]) -> None:
        """DFS's weight 1 + mean(t) assumes ReLU teacher features (every ResNet): once per trainer,
        warn when channel means below -1 make weights negative and flip the student's channels."""
        if self._warned_signed_priors:
            return
        means = torch.cat([t.detach().mean(dim=(-2, -1)).flatten() for t in teacher_features])
        negative = float((means < -1.0).float().mean())
        if negative > 0:
            self._warned_signed_priors = True
            warnings.warn(
                f"UniNet feature selection: {negative:.0%} of the teacher's channel means are below -1, so their "
                f"DFS weights (1 + mean) are negative. The method assumes non-negative (ReLU) features, as ResNets "
                f"give; backbones with signed stage outputs (EfficientNet) learn poorly with it: pass "
                f"feature_selection=False.", stacklevel=2)


VARIANTS = {
    "uninet": ModelVariant(
        trainer=UniNetTrainer, family="foundation",
        train={"num_epochs": 20, "batch_size": 4, "img_size": 256, "normalize": True},  # SPEC sec. 7
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64, "num_epochs": 1, "batch_size": 4},
        paper={"num_epochs": 100, "batch_size": 8},  # authors' main.py defaults
        note="Feature selection (DFS) assumes ReLU teacher features (ResNets); with EfficientNet backbones "
             "pass feature_selection=False. The contrastive loss holds an (H/4 * W/4)^2 similarity matrix per "
             "image and pair: about 13 s per batch of 4 at 256 px on 2 busy CPU cores (EfficientNet-Lite0), under 1 s at 128 px.",
    ),
}
