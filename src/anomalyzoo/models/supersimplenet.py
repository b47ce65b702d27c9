"""SuperSimpleNet: "Unifying Unsupervised and Supervised Learning for Fast and Reliable Surface
Defect Detection" (Rolih, Fucka & Skocaj, ICPR 2024, arXiv 2408.03143).

A frozen ImageNet CNN gives upscaled patch features; a linear feature adaptor maps them to a space
where synthetic anomalies are made by adding Gaussian noise to the features inside Perlin-shaped
masks; a segmentation head learns to find the noised positions and a classification head to say
whether an image has any. Trained on normal images (unsupervised) or on normal images plus a few
images with real, labelled defects (supervised): the same network, losses and synthesis.
Facts from the paper and the authors' code (blaz-r/SuperSimpleNet: ``model/supersimplenet.py``,
``model/feature_extractor.py``, ``common/loss.py``, ``train.py``), which produced the published
numbers (anomalib's port was read too):

- Features (sec. 3.1, ``FeatureExtractor``): layer2 and layer3 of the backbone, each resized
  bilinearly (align_corners=True) to *twice* layer2's grid (stride 4), concatenated, then
  averaged over 3 x 3 neighbourhoods (``AvgPool2d(3, 1, 1)``).
- Feature adaptor (sec. 3.2): a 1x1 convolution with as many channels out as in.
- Anomaly synthesis (sec. 3.3, ``AnomalyGenerator``): the batch of adapted features is duplicated
  (2B); each copy gets a binary Perlin mask (noise drawn at the next power of two of the feature
  grid with ``2^a x 2^b`` lattice cells, a, b in {0..5}, resized bilinearly to the grid and
  thresholded at ``perlin_threshold``: 0.2 for MVTec, 0.6 for VisA and the supervised sets), which
  is emptied for half of the copies (``no_anomaly="empty"``); inside the mask N(0, 0.015^2) noise is
  added to every channel. The target mask is the union of the real mask (downsampled bilinearly and
  binarised at 0.5) and the Perlin mask, the target label 1 if that union has any pixel. In the
  supervised configuration noise is kept off the real defects (``overlap=False``).
- Segmentation-detection module (sec. 3.4, ``Discriminator``): segmentation head 1x1 conv to 1024,
  BatchNorm, LeakyReLU(0.2), 1x1 conv to 1 (no bias); classification head on [features, map]:
  5x5 conv to 128, BatchNorm, ReLU, then global max and mean of that and of the map into a linear
  layer (258 -> 1). Unsupervised, the map enters the classification head detached (``stop_grad``);
  supervised, gradients flow (``run_sup``: ``stop_grad=False``). Xavier-normal conv/linear
  weights, BatchNorm weights 1.
- Losses (sec. 3.5, ``train.py``): ``L = L_trunc-l1(map) + L_focal(map) + L_focal(score)`` with
  the truncated L1 ``mean(max(0, m + 0.5))`` over normal positions plus ``mean(max(0, 0.5 - m))``
  over anomalous ones, and the focal loss with gamma 4 and no alpha (``common/loss.py``, DeSTSeg's).
- Output (``AnomalyMapGenerator``, ``test``): the map logits upsampled bilinearly to the image and
  smoothed by a Gaussian (sigma 4, kernel 25); the image score is ``sigmoid`` of the classification
  logit (the paper's detection score).
- Optimiser (sec. 4.1, ``get_optimizers``): AdamW, adaptor lr 1e-4 (AdamW's default weight decay),
  segmentation and classification heads lr 2e-4 with weight decay 1e-5; MultiStepLR with gamma 0.4
  at 80 % and 90 % of the epochs. The paper trains 300 epochs of batch 32; the spec's defaults
  are 50 epochs of batch 16. Supervised runs clip the gradient norm at 1 (``clip_grad=True``).

Supervised mode on datasets that keep every defect in the test split (``supersimplenet-supervised``;
the authors' supervised runs are on KSDD2 and SensumSODF, which have labelled training defects):
a seeded ``labelled_anomaly_fraction`` (default 50 %) of each defect type's test images moves,
with its masks, to the training set and leaves the test set; every metric is computed on the
images that remain (see ``anomalyzoo.data.move_labelled_anomalies``; the run's results say so).
The noise is in feature units: the paper's sigma 0.015 was chosen for WideResNet-50's layer2+3.
EfficientNet-Lite0's upscaled features are much larger (MVTec bottle at 256 px: std 6.0, median
per-channel std 4.6), so with that backbone the same sigma is a far smaller perturbation and the
heads need many more steps to learn it; ``noise_std`` can be scaled with the backbone.

Deviations: the authors' supervised loader balances each epoch (every labelled defect, flipped
three ways, and as many normal images chosen by inverse retrieval frequency); here an epoch is
every normal training image and every labelled defect once, shuffled, without flips. The focal
loss is computed from the logits (``binary_cross_entropy_with_logits``): the authors' value
except where their BCE on probabilities clamps ``log`` at -100.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.blur import GaussianBlur2d
from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components.perlin import numpy_rng, rand_perlin_2d_np
from anomalyzoo.models.components.trainer import BaseTrainer
from anomalyzoo.models.components.variants import ModelVariant

NOISE_STD = 0.015  # train.py: "noise_std": 0.015
PERLIN_THRESHOLD_MVTEC = 0.2  # train.py run_unsup: perlin_thr 0.2 for MVTec (0.6 for VisA)
PERLIN_SCALE_EXPONENTS = (0, 6)  # AnomalyGenerator: perlin_range=(0, 6), 2 ** randint(0, 6)
NO_ANOMALY_PROBABILITY = 0.5  # generate_perlin: chance_anomaly > 0.5 empties the mask
TRUNCATION = 0.5  # train.py: th = 0.5 of the truncated L1
FOCAL_GAMMA = 4.0  # common/loss.py: focal_loss(gamma=4), alpha=-1 (none)
SEG_HIDDEN = 1024  # Discriminator: hidden_dim=1024
CLS_CHANNELS = 128  # Discriminator: _conv_block(..., out_chanels=128, kernel_size=5)
CLS_KERNEL = 5
MAP_SIGMA = 4.0  # AnomalyMapGenerator(sigma=4): kernel 2 * ceil(3 * 4) + 1 = 25
ADAPTOR_LR, HEAD_LR, HEAD_WEIGHT_DECAY = 1e-4, 2e-4, 1e-5  # train.py run_unsup / get_optimizers
LR_GAMMA, LR_MILESTONES = 0.4, (0.8, 0.9)  # MultiStepLR(milestones=[0.8 E, 0.9 E], gamma=0.4)


# ----------------------------------------------------------------------------- losses
def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """``common/loss.py`` on ``sigmoid(logits)``: mean of ``BCE(p, t) * (1 - p_t)^gamma`` with
    ``p_t = p t + (1 - p)(1 - t)``, no alpha weighting."""
    targets = targets.to(logits.dtype)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    probabilities = torch.sigmoid(logits)
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    return (cross_entropy * (1 - p_t) ** gamma).mean()


def truncated_l1_loss(map_logits: torch.Tensor, masks: torch.Tensor, truncation: float = TRUNCATION) -> torch.Tensor:
    """``train.py``: ``mean(max(0, m + th))`` over normal positions plus ``mean(max(0, th - m))``
    over anomalous ones (a term with no positions is 0)."""
    normal, anomalous = map_logits[masks == 0], map_logits[masks > 0]
    zero = map_logits.new_zeros(())
    normal_term = F.relu(normal + truncation).mean() if normal.numel() else zero
    anomalous_term = F.relu(truncation - anomalous).mean() if anomalous.numel() else zero
    return normal_term + anomalous_term


def supersimplenet_losses(map_logits: torch.Tensor, score_logits: torch.Tensor, masks: torch.Tensor,
                          labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sec. 3.5: ``L_trunc-l1(map) + L_focal(map) + L_focal(score)``, each term named."""
    terms = {
        "loss_trunc_l1": truncated_l1_loss(map_logits, masks),
        "loss_focal_map": sigmoid_focal_loss(map_logits, masks),
        "loss_focal_score": sigmoid_focal_loss(score_logits, labels),
    }
    return {"loss": sum(terms.values()), **terms}


# ----------------------------------------------------------------------------- anomaly synthesis
def next_power_of_two(number: int) -> int:
    return 1 << (int(number) - 1).bit_length()


def perlin_feature_mask(height: int, width: int, threshold: float) -> torch.Tensor:
    """``generate_perlin`` for one copy: (1, h, w) binary, emptied with probability 1/2."""
    low, high = PERLIN_SCALE_EXPONENTS
    res = (2 ** int(torch.randint(low, high, (1,))), 2 ** int(torch.randint(low, high, (1,))))
    shape = (next_power_of_two(height), next_power_of_two(width))
    noise = torch.from_numpy(rand_perlin_2d_np(shape, res, numpy_rng())).float()
    noise = F.interpolate(noise[None, None], size=(height, width), mode="bilinear", align_corners=False)[0]
    mask = (noise > threshold).float()
    if float(torch.rand(1)) > NO_ANOMALY_PROBABILITY:
        mask = torch.zeros_like(mask)
    return mask


class SyntheticFeatures(NamedTuple):
    features: torch.Tensor  # (2B, C, h, w), noised inside the Perlin masks
    masks: torch.Tensor  # (2B, 1, h, w) {0, 1}: real defects and noised positions
    labels: torch.Tensor  # (2B,) {0, 1}


def add_feature_anomalies(features: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                          perlin_threshold: float = PERLIN_THRESHOLD_MVTEC, noise_std: float = NOISE_STD,
                          overlap: bool = True) -> SyntheticFeatures:
    """Sec. 3.3 (``AnomalyGenerator.forward`` with ``bad=True``): duplicate the batch, add
    N(0, noise_std^2) inside a Perlin mask per copy (outside real defects unless ``overlap``),
    and update masks and labels. Draws from the global torch RNG (a checkpoint resumes it)."""
    batch, _, height, width = features.shape
    features, masks, labels = torch.cat((features, features)), torch.cat((masks, masks)), torch.cat((labels, labels))
    noise = torch.normal(0.0, noise_std, size=features.shape).to(features.device)
    noise_mask = torch.ones(2 * batch, 1, height, width, device=features.device)
    if not overlap:
        noise_mask = noise_mask * (1 - masks)
    perlin = torch.stack([perlin_feature_mask(height, width, perlin_threshold) for _ in range(2 * batch)])
    noise_mask = noise_mask * perlin.to(features.device)
    masks = ((masks + noise_mask) > 0).to(features.dtype)
    labels = ((labels.to(features.dtype) + masks.flatten(1).amax(dim=1)) > 0).to(features.dtype)
    return SyntheticFeatures(features + noise * noise_mask, masks, labels)


def downsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``train.py``: (B, H, W) masks resized bilinearly to the feature grid and binarised at 0.5."""
    resized = F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return (resized >= 0.5).float()


# ----------------------------------------------------------------------------- model
def init_weights(module: nn.Module) -> None:
    """``init_weights``: Xavier-normal conv and linear weights, BatchNorm weights 1."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.constant_(module.weight, 1.0)


class SegmentationDetectionModule(nn.Module):
    """Sec. 3.4: segmentation head (map logits) and classification head (one logit per image)."""

    def __init__(self, channels: int, stop_grad: bool) -> None:
        super().__init__()
        self.stop_grad = stop_grad
        self.seg_head = nn.Sequential(
            nn.Conv2d(channels, SEG_HIDDEN, kernel_size=1), nn.BatchNorm2d(SEG_HIDDEN), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(SEG_HIDDEN, 1, kernel_size=1, bias=False),
        )
        self.cls_conv = nn.Sequential(
            nn.Conv2d(channels + 1, CLS_CHANNELS, kernel_size=CLS_KERNEL, padding="same"),
            nn.BatchNorm2d(CLS_CHANNELS), nn.ReLU(inplace=True),
        )
        self.cls_fc = nn.Linear(2 * CLS_CHANNELS + 2, 1)
        self.apply(init_weights)

    def head_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(segmentation head, classification head) parameters, two optimiser groups."""
        return list(self.seg_head.parameters()), [*self.cls_conv.parameters(), *self.cls_fc.parameters()]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        map_logits = self.seg_head(features)  # (B, 1, h, w)
        map_for_cls = map_logits.detach() if self.stop_grad else map_logits
        cls_features = self.cls_conv(torch.cat((features, map_for_cls), dim=1))
        pooled = torch.cat((cls_features.amax(dim=(-2, -1)), cls_features.mean(dim=(-2, -1)),
                            map_for_cls.amax(dim=(-2, -1)), map_for_cls.mean(dim=(-2, -1))), dim=1)
        return map_logits, self.cls_fc(pooled)[:, 0]


class SupersimplenetModel(nn.Module):
    """Upscaled features, adaptor, segmentation-detection module; eval ``forward`` returns
    scores and maps, :meth:`training_outputs` the logits on synthetic anomalies."""

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        perlin_threshold: float = PERLIN_THRESHOLD_MVTEC,
        noise_std: float = NOISE_STD,
        stop_grad: bool = True,
        overlap: bool = True,
        pretrained: bool = True,
        input_normalized: bool = True,
    ) -> None:
        super().__init__()
        self.layers = list(layers)
        self.perlin_threshold, self.noise_std, self.overlap = float(perlin_threshold), float(noise_std), bool(overlap)
        self.feature_extractor = TimmFeatureExtractor(backbone, self.layers, pretrained=pretrained,
                                                      requires_grad=False, input_normalized=input_normalized)
        channels = sum(self.feature_extractor.out_dims)
        self.feature_pooler = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.adaptor = nn.Conv2d(channels, channels, kernel_size=1)
        init_weights(self.adaptor)
        self.segdec = SegmentationDetectionModule(channels, stop_grad)
        self.blur = GaussianBlur2d(sigma=MAP_SIGMA, kernel_size=2 * math.ceil(3 * MAP_SIGMA) + 1)

    def upscaled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Sec. 3.1: every layer at twice the first layer's grid, concatenated, 3x3-averaged."""
        features = self.feature_extractor(images)
        height, width = features[self.layers[0]].shape[-2:]
        upscaled = [F.interpolate(features[layer], size=(2 * height, 2 * width), mode="bilinear", align_corners=True)
                    for layer in self.layers]
        return self.feature_pooler(torch.cat(upscaled, dim=1))

    def adapted_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.adaptor(self.upscaled_features(images))

    def training_outputs(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, SyntheticFeatures]:
        """(map logits (2B, 1, h, w), score logits (2B,), the synthetic batch with its targets)
        for images (B, 3, H, W), their masks (B, H, W) and labels (B,)."""
        adapted = self.adapted_features(images)
        grid_masks = downsample_masks(masks, tuple(adapted.shape[-2:]))
        synthetic = add_feature_anomalies(adapted, grid_masks, labels, self.perlin_threshold, self.noise_std, self.overlap)
        map_logits, score_logits = self.segdec(synthetic.features)
        return map_logits, score_logits, synthetic

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        map_logits, score_logits = self.segdec(self.adapted_features(images))
        anomaly_map = F.interpolate(map_logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"pred_score": torch.sigmoid(score_logits), "anomaly_map": self.blur(anomaly_map)[:, 0]}


class SupersimplenetTrainer(BaseTrainer):
    """Trains adaptor and heads on synthetic feature anomalies (and, with
    ``labelled_anomaly_fraction > 0``, on the labelled defects ``train()`` moves to training)."""

    model_class = SupersimplenetModel

    def __init__(self, train_config: Any = None, device: Any = None, labelled_anomaly_fraction: float = 0.0,
                 max_grad_norm: float | None = None, **model_options: Any) -> None:
        if not 0.0 <= labelled_anomaly_fraction < 1.0:
            raise ValueError(f"labelled_anomaly_fraction must be in [0, 1), got {labelled_anomaly_fraction}")
        # read by train(): the share of each defect type's test images that becomes labelled training data
        self.labelled_anomaly_fraction = float(labelled_anomaly_fraction)
        self.max_grad_norm = max_grad_norm
        super().__init__(train_config, device, **model_options)
        if max_grad_norm is not None and self.train_config.gradient_clip_norm is None:
            # run_sup: clip_grad_norm_(model.parameters(), 1) before every step; an explicit
            # gradient_clip_norm of the run takes precedence
            self.train_config = dataclasses.replace(self.train_config, gradient_clip_norm=float(max_grad_norm))

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        """``get_optimizers``: AdamW in three groups, MultiStepLR(0.8 E, 0.9 E; gamma 0.4)."""
        seg_parameters, cls_parameters = self.model.segdec.head_parameters()
        optimizer = torch.optim.AdamW([
            {"params": self.model.adaptor.parameters(), "lr": ADAPTOR_LR},
            {"params": seg_parameters, "lr": HEAD_LR, "weight_decay": HEAD_WEIGHT_DECAY},
            {"params": cls_parameters, "lr": HEAD_LR, "weight_decay": HEAD_WEIGHT_DECAY},
        ])
        epochs = max(1, math.ceil(self.total_steps / max(len(self.train_loader), 1))) if self.train_loader is not None \
            else self.train_config.num_epochs
        # the authors pass the float milestones 0.8 E and 0.9 E, which the integer epoch counter
        # meets only when they are whole numbers (E = 50: 40 and 45; E = 5: 4 only; E = 1: none)
        milestones = [int(epochs * fraction) for fraction in LR_MILESTONES if float(epochs * fraction).is_integer()]
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=LR_GAMMA)

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        masks = batch.get("mask")
        if masks is None:
            masks = torch.zeros(images.shape[0], *images.shape[-2:], device=images.device)
        labels = batch.get("label")
        if labels is None:
            labels = torch.zeros(images.shape[0], device=images.device)
        map_logits, score_logits, synthetic = self.model.training_outputs(images, masks, labels)
        return supersimplenet_losses(map_logits, score_logits, synthetic.masks, synthetic.labels)


_TRAIN = {"num_epochs": 50, "batch_size": 16, "img_size": 256, "normalize": True}  # SPEC sec. 7
_TINY = {"backbone": "resnet18", "pretrained": False, "img_size": 64, "num_epochs": 1, "batch_size": 4}
_PAPER = {"num_epochs": 300, "batch_size": 32}  # train.py run_unsup / run_sup, sec. 4.1

VARIANTS = {
    "supersimplenet": ModelVariant(
        trainer=SupersimplenetTrainer, family="foundation", train=_TRAIN, tiny=_TINY, paper=_PAPER,
    ),
    "supersimplenet-supervised": ModelVariant(
        trainer=SupersimplenetTrainer, family="foundation",
        # run_sup: gradients from the classification head into the segmentation head, no noise on
        # real defects, gradient norm clipped at 1
        options={"stop_grad": False, "overlap": False, "labelled_anomaly_fraction": 0.5, "max_grad_norm": 1.0},
        train=_TRAIN, tiny=_TINY, paper=_PAPER,
        note="moves a seeded 50% of each defect type's test images (with masks) to training; metrics are on the rest",
    ),
}
