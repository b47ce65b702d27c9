"""A ResNet decoder: the mirror image of a ResNet encoder (Reverse Distillation's student).

Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding"
(arXiv 2201.10703), sec. 3.1 and 4.1: the student decoder D "is symmetric but reversed" to the
teacher encoder E. Each encoder stage halves the grid with a stride-2 3x3 convolution in its
first residual block; the matching decoder stage doubles it with a stride-2 2x2
``ConvTranspose2d`` in that place, and its shortcut is a stride-2 2x2 transposed convolution
+ BN (the mirror of the encoder's 1x1 stride-2 projection). As in the reference code
(hq-deng/RD4AD ``de_resnet.py``) the decoder stages that produce layer3, layer2 and layer1
hold as many blocks as the encoder's layer1, layer2 and layer3 (e.g. 3, 4, 6 for
Wide-ResNet50-2), and ``DeBottleneck`` keeps the encoder's expansion 4 and width per group
(128 for wide ResNets).

Channel widths are arguments (the encoder's actual ``out_dims``) rather than ResNet constants,
so the same decoder mirrors EfficientNet-Lite0's 24/40/112 channels as well as
Wide-ResNet50-2's 256/512/1024. :func:`resnet_layout` says which block and how many of them
a backbone gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def deconv2x2(in_channels: int, out_channels: int, stride: int = 2, groups: int = 1) -> nn.ConvTranspose2d:
    """Doubles the grid exactly (kernel 2, stride 2): the inverse of a stride-2 convolution."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=stride, groups=groups, bias=False)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 stride-2 convolution + BN + ReLU: one downsampling step of Reverse Distillation's
    multi-scale feature fusion (OCBE, sec. 3.2), which UniNet's bottleneck shares."""
    return nn.Sequential(conv3x3(in_channels, out_channels, stride=2), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def resize_to(features: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize when grids differ by rounding (input sizes that are not multiples of the
    embedding stride); a no-op for the usual sizes (256, 128, ...)."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=tuple(size), mode="bilinear", align_corners=False)


class DeBasicBlock(nn.Module):
    """Mirror of ResNet's BasicBlock: (transposed) 3x3 conv, 3x3 conv, residual shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, upsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("DeBasicBlock only supports groups=1 and base_width=64 (as ResNet's BasicBlock)")
        self.conv1 = deconv2x2(in_channels, planes, stride) if stride == 2 else conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class DeBottleneck(nn.Module):
    """Mirror of ResNet's Bottleneck: 1x1 reduce, (transposed) 3x3 at ``width``, 1x1 expand x4."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, upsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = deconv2x2(width, width, stride, groups) if stride == 2 else conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


@dataclass(frozen=True)
class ResNetLayout:
    """Residual block type, blocks per encoder stage (layer1..layer4) and width per group."""

    block: str  # "basic" or "bottleneck"
    blocks_per_stage: tuple[int, int, int, int]
    width_per_group: int = 64


# torchvision/timm ResNet definitions (He et al. 2016, Table 1; Zagoruyko & Komodakis 2016 for wide).
RESNET_LAYOUTS: dict[str, ResNetLayout] = {
    "resnet18": ResNetLayout("basic", (2, 2, 2, 2)),
    "resnet34": ResNetLayout("basic", (3, 4, 6, 3)),
    "resnet50": ResNetLayout("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetLayout("bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetLayout("bottleneck", (3, 8, 36, 3)),
    "wide_resnet50_2": ResNetLayout("bottleneck", (3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ResNetLayout("bottleneck", (3, 4, 23, 3), width_per_group=128),
}

# Any other encoder (EfficientNet, ...) gets resnet18's layout: basic blocks have no 4x channel
# bottleneck, so they work for any channel count (EfficientNet-Lite0's 24/40/112 would give
# bottleneck widths of 6/10/28), and two blocks per stage keep the student small next to a
# small encoder.
DEFAULT_LAYOUT = RESNET_LAYOUTS["resnet18"]


def resnet_layout(backbone: str) -> ResNetLayout:
    """The layout to mirror for ``backbone`` (timm tags such as ``.tv_in1k`` are ignored)."""
    return RESNET_LAYOUTS.get(backbone.split(".")[0], DEFAULT_LAYOUT)


def block_class(layout: ResNetLayout) -> type[DeBasicBlock] | type[DeBottleneck]:
    if layout.block not in ("basic", "bottleneck"):
        raise ValueError(f"Unknown residual block '{layout.block}' (expected 'basic' or 'bottleneck')")
    return DeBottleneck if layout.block == "bottleneck" else DeBasicBlock


def init_resnet_weights(module: nn.Module) -> None:
    """The reference initialisation (torchvision ResNet, RD4AD): Kaiming-normal convolutions,
    BatchNorm at identity. Transposed convolutions keep PyTorch's default, as in the reference."""
    for submodule in module.modules():
        if isinstance(submodule, nn.Conv2d):
            nn.init.kaiming_normal_(submodule.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(submodule, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(submodule.weight, 1.0)
            nn.init.constant_(submodule.bias, 0.0)


class ResNetDecoder(nn.Module):
    """Decodes an embedding (B, embedding_channels, h, w) into features shaped like the encoder's
    layers. ``out_channels`` lists those shallow to deep (layer1, layer2, layer3); every stage
    doubles the grid, so layer3's twin is at 2h and layer1's at 8h -- the encoder's grids when
    the embedding sits one stride below layer3, as Reverse Distillation's OCBE puts it.

    ``forward`` returns the features in the encoder's order (shallow to deep), ready to be
    compared with the encoder layer by layer.
    """

    def __init__(
        self,
        embedding_channels: int,
        out_channels: Sequence[int],
        layout: ResNetLayout = DEFAULT_LAYOUT,
    ) -> None:
        super().__init__()
        block = block_class(layout)
        self.out_channels = list(out_channels)
        stages = []
        in_channels = embedding_channels
        # deepest output first; stage i gets the block count of encoder stage i (reference code)
        for stage_index, channels in enumerate(reversed(self.out_channels)):
            if channels % block.expansion:
                raise ValueError(f"{block.__name__} needs channels divisible by {block.expansion}, got {channels}")
            planes = channels // block.expansion
            upsample = nn.Sequential(deconv2x2(in_channels, channels, stride=2), nn.BatchNorm2d(channels))
            blocks = [block(in_channels, planes, stride=2, upsample=upsample, base_width=layout.width_per_group)]
            blocks += [block(channels, planes, base_width=layout.width_per_group)
                       for _ in range(1, layout.blocks_per_stage[stage_index])]
            stages.append(nn.Sequential(*blocks))
            in_channels = channels
        self.stages = nn.ModuleList(stages)
        init_resnet_weights(self)

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = embedding
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features[::-1]
