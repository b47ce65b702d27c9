"""Reverse Distillation: "Anomaly Detection via Reverse Distillation from One-Class Embedding"
(Deng & Li, CVPR 2022, arXiv 2201.10703).

A frozen pretrained teacher encoder E, a trainable one-class bottleneck embedding (OCBE) and a
student decoder D that must reconstruct E's multi-scale features from the compact embedding
alone. Trained on normal images only, D fails to reproduce E's features where the input is
anomalous; the disagreement is the anomaly map.

- Teacher E (sec. 3.1, 4.1): layer1-3 of an ImageNet backbone (Wide-ResNet50-2 by default),
  frozen, BatchNorm in eval mode.
- OCBE (sec. 3.2, Fig. 3): multi-scale feature fusion (MFF) brings layer1 (two 3x3 stride-2
  conv+BN+ReLU) and layer2 (one) to layer3's grid and concatenates them with layer3; the
  one-class embedding block (OCE) is one ResNet stage (the encoder's layer4 architecture, first
  block stride 2) mapping the 3 x C3 fused channels to the 2 x C3-channel embedding. (The
  reference's "AttnBottleneck" has no attention in its forward pass: it is timm's Bottleneck.)
- Student D (sec. 3.1): a ResNet decoder mirroring E (``components.resnet_decoder``).
- Channel widths come from the encoder's actual ``out_dims`` (C1, C2, C3). For a ResNet this
  reproduces the paper exactly (MFF: C1 -> C2 -> C3 and C2 -> C3; embedding 2 x C3 = layer4's
  width; the encoder's block type, block counts, expansion 4 and wide width per group 128). Any
  other encoder (EfficientNet-Lite0: 24/40/112) gets the same wiring with resnet18's layout:
  basic blocks, 2 per stage and 2 in the OCE, embedding 2 x C3 (224 for Lite0).
- Loss (eq. 2 as trained by the authors): for each scale k, 1 - cos between the *flattened*
  feature maps vec(f_E^k) and vec(f_D^k) of each image (one cosine per image and scale), averaged
  over the batch and summed over the scales: RD4AD's ``loss_fucntion`` (``a.view(B, -1)``), which
  produced the published numbers, and anomalib's ``ReverseDistillationLoss``. Eq. 2 as printed
  averages a cosine per *position*; the authors' repository (issue #22) reports that form losing
  about 7 points of image AUROC on carpet, so it is not offered. The anomaly map (below) is
  per position either way.
- Anomaly map (eq. 3, sec. 4.1): per scale 1 - cos along channels, upsampled bilinearly to the
  input size, summed over scales ("add"; "multiply" is eq. 3 with a product as in the reference
  ``amap_mode='mul'``), smoothed with a Gaussian of sigma 4; the image score is its maximum.
- Optimiser (sec. 4.1): Adam over OCBE + decoder, lr 0.005, betas (0.5, 0.999), no schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from anomalyzoo.models.components.blur import GaussianBlur2d
from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components.resnet_decoder import (
    ResNetDecoder,
    ResNetLayout,
    conv1x1,
    conv_bn_relu,
    init_resnet_weights,
    resize_to,
    resnet_layout,
)
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.components.variants import ModelVariant

ANOMALY_MAP_MODES = ("add", "multiply")


class OneClassBottleneckEmbedding(nn.Module):
    """OCBE (sec. 3.2): multi-scale feature fusion, then the one-class embedding block.

    ``in_channels`` are the encoder's (C1, C2, C3) on grids 4h, 2h and h. The output has ``out_channels = 2 * C3`` channels at half
    layer3's resolution (layer4's shape for a ResNet).
    """

    def __init__(self, in_channels: Sequence[int], layout: ResNetLayout) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"OCBE fuses exactly three encoder layers, got channels {list(in_channels)}")
        c1, c2, c3 = in_channels
        # MFF: layer1 -> layer2's width -> layer3's width; layer2 -> layer3's width
        self.fuse_layer1 = nn.Sequential(conv_bn_relu(c1, c2), conv_bn_relu(c2, c3))
        self.fuse_layer2 = conv_bn_relu(c2, c3)
        # OCE: one ResNet stage (layer4's block type and count), first block stride 2
        self.out_channels = 2 * c3
        block = Bottleneck if layout.block == "bottleneck" else BasicBlock
        if self.out_channels % block.expansion:
            raise ValueError(f"{block.__name__} needs {self.out_channels} channels divisible by {block.expansion}")
        planes = self.out_channels // block.expansion
        width_kwargs = {"base_width": layout.width_per_group} if layout.block == "bottleneck" else {}
        downsample = nn.Sequential(conv1x1(3 * c3, self.out_channels, stride=2), nn.BatchNorm2d(self.out_channels))
        blocks = [block(3 * c3, planes, stride=2, downsample=downsample, **width_kwargs)]
        blocks += [block(self.out_channels, planes, **width_kwargs) for _ in range(1, layout.blocks_per_stage[3])]
        self.one_class_embedding = nn.Sequential(*blocks)
        init_resnet_weights(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        layer1, layer2, layer3 = features
        grid = layer3.shape[-2:]
        fused = torch.cat([resize_to(self.fuse_layer1(layer1), grid), resize_to(self.fuse_layer2(layer2), grid), layer3], dim=1)
        return self.one_class_embedding(fused)


def distillation_loss(encoder_features: Sequence[torch.Tensor], decoder_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over scales of the batch mean of 1 - cos(vec(f_E^k), vec(f_D^k)), each image's feature
    map flattened to one vector (RD4AD's training loss, see the module doc)."""
    loss = encoder_features[0].new_zeros(())
    for teacher, student in zip(encoder_features, decoder_features, strict=True):
        loss = loss + (1.0 - F.cosine_similarity(teacher.flatten(1), student.flatten(1), dim=1)).mean()
    return loss


def anomaly_map(
    encoder_features: Sequence[torch.Tensor],
    decoder_features: Sequence[torch.Tensor],
    image_size: tuple[int, int],
    mode: str = "add",
) -> torch.Tensor:
    """Eq. 3 before smoothing: (B, 1, H, W) per-scale 1 - cos, upsampled to ``image_size`` and
    summed ("add") or multiplied ("multiply") over scales."""
    if mode not in ANOMALY_MAP_MODES:
        raise ValueError(f"anomaly_map_mode must be one of {ANOMALY_MAP_MODES}, got {mode!r}")
    batch = encoder_features[0].shape[0]
    combined = encoder_features[0].new_full((batch, 1, *image_size), 0.0 if mode == "add" else 1.0)
    for teacher, student in zip(encoder_features, decoder_features, strict=True):
        distance = 1.0 - F.cosine_similarity(teacher, student, dim=1)[:, None]
        distance = F.interpolate(distance, size=image_size, mode="bilinear", align_corners=False)
        combined = combined + distance if mode == "add" else combined * distance
    return combined


class ReverseDistillationModel(nn.Module):
    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        anomaly_map_mode: str = "add",
        pretrained: bool = True,
        input_normalized: bool = True,
    ) -> None:
        super().__init__()
        if anomaly_map_mode not in ANOMALY_MAP_MODES:
            raise ValueError(f"anomaly_map_mode must be one of {ANOMALY_MAP_MODES}, got {anomaly_map_mode!r}")
        self.layers = list(layers)
        self.anomaly_map_mode = anomaly_map_mode
        self.encoder = TimmFeatureExtractor(backbone, self.layers, pretrained=pretrained, input_normalized=input_normalized)
        strides = self.encoder.strides
        if len(strides) != 3 or strides[1] != 2 * strides[0] or strides[2] != 2 * strides[1]:
            raise ValueError(f"Reverse Distillation needs three consecutive layers (e.g. layer1-3), got {self.layers}")
        layout = resnet_layout(backbone)
        self.bottleneck = OneClassBottleneckEmbedding(self.encoder.out_dims, layout)
        self.decoder = ResNetDecoder(self.bottleneck.out_channels, self.encoder.out_dims, layout)
        self.blur = GaussianBlur2d(sigma=4.0)

    def encode_decode(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher features E(x) (no gradient) and the student's reconstruction D(OCBE(E(x)))."""
        features = self.encoder(images)
        encoder_features = [features[layer] for layer in self.layers]
        decoder_features = self.decoder(self.bottleneck(encoder_features))
        decoder_features = [resize_to(d, e.shape[-2:]) for d, e in zip(decoder_features, encoder_features, strict=True)]
        return encoder_features, decoder_features

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        encoder_features, decoder_features = self.encode_decode(images)
        score_map = anomaly_map(encoder_features, decoder_features, tuple(images.shape[-2:]), self.anomaly_map_mode)
        smoothed = self.blur(score_map)[:, 0]
        return {"pred_score": smoothed.amax(dim=(-2, -1)), "anomaly_map": smoothed}


class ReverseDistillationTrainer(BaseTrainer):
    """Trains OCBE + decoder to reproduce the frozen encoder's features on normal images (eq. 2)."""

    model_class = ReverseDistillationModel
    supports_tiling = True  # components.tiler: train and score on tiles of large images

    def __init__(self, *, learning_rate: float = 0.005, train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        self.learning_rate = learning_rate
        super().__init__(train_config, device, **model_options)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """Sec. 4.1: Adam, lr 0.005, betas (0.5, 0.999), over OCBE and decoder only."""
        parameters = [*self.model.bottleneck.parameters(), *self.model.decoder.parameters()]
        return torch.optim.Adam(parameters, lr=self.learning_rate, betas=(0.5, 0.999)), None

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        encoder_features, decoder_features = self.model.encode_decode(batch["image"])
        return {"loss": distillation_loss(encoder_features, decoder_features)}


VARIANTS = {
    "reverse-distillation": ModelVariant(
        trainer=ReverseDistillationTrainer, family="distillation",
        train={"num_epochs": 50, "batch_size": 8, "img_size": 256, "normalize": True},  # SPEC sec. 7
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64, "num_epochs": 1, "batch_size": 4},
        paper={"num_epochs": 200, "batch_size": 16},  # RD4AD main.py
    ),
}
