"""Multi-layer feature extraction from any timm backbone.

Layer names follow the ResNet convention of the original configs (``layer1`` ... ``layer4``),
and are resolved by stride so that the same config works for EfficientNets: ``layerN`` is the
last stage whose output stride is ``2 ** (N + 1)`` (layer1 = stride 4, layer3 = stride 16).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from anomalyzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from anomalyzoo.models.components.backbone import create_backbone


def layer_stride(layer: str) -> int:
    """``layerN`` -> 2 ** (N + 1)."""
    if not layer.startswith("layer") or not layer[5:].isdigit():
        raise ValueError(f"Layer names must look like 'layer1'..'layer4', got '{layer}'")
    return 2 ** (int(layer[5:]) + 1)


@functools.lru_cache(maxsize=None)
def backbone_stage_info(backbone: str) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """(stride of every feature stage, input mean, input std) of a timm backbone. Building the
    probe model costs seconds for large backbones, so it is done once per name and process,
    and it leaves the global RNG untouched so that seeded runs do not depend on the cache."""
    with torch.random.fork_rng(devices=[]):  # the probe's random init must not move the global RNG
        probe = create_backbone(backbone, pretrained=False, features_only=True)
    cfg = getattr(probe, "pretrained_cfg", {}) or {}
    return tuple(probe.feature_info.reduction()), tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


class TimmFeatureExtractor(nn.Module):
    """Returns ``{layer_name: (B, C, H/stride, W/stride)}`` for the requested layers.

    ``input_normalized`` says what the images are: ImageNet-normalised (``normalize=True`` in
    the data config) or plain [0, 1]. The extractor re-normalises them to the statistics the
    backbone was trained with (EfficientNet-Lite0, for instance, expects mean 0.5 / std 0.5).
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        pretrained: bool = True,
        requires_grad: bool = False,
        input_normalized: bool = True,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.layers = list(layers)
        strides, backbone_mean, backbone_std = backbone_stage_info(backbone)
        out_indices = []
        for layer in self.layers:
            wanted = layer_stride(layer)
            matches = [i for i, s in enumerate(strides) if s == wanted]
            if not matches:
                raise ValueError(f"Backbone '{backbone}' has no stage with stride {wanted} for '{layer}'")
            out_indices.append(matches[-1])
        self.feature_extractor = create_backbone(
            backbone, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices)
        )
        self.out_dims: list[int] = list(self.feature_extractor.feature_info.channels())
        self.strides: list[int] = [strides[i] for i in out_indices]
        self.requires_grad = requires_grad
        if not requires_grad:
            self.feature_extractor.eval()
            for parameter in self.feature_extractor.parameters():
                parameter.requires_grad_(False)

        target_mean = torch.tensor(backbone_mean).view(1, 3, 1, 1)
        target_std = torch.tensor(backbone_std).view(1, 3, 1, 1)
        source_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) if input_normalized else torch.zeros(1, 3, 1, 1)
        source_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) if input_normalized else torch.ones(1, 3, 1, 1)
        # x_backbone = (x * source_std + source_mean - target_mean) / target_std = x * scale + shift
        self.register_buffer("input_scale", source_std / target_std, persistent=False)
        self.register_buffer("input_shift", (source_mean - target_mean) / target_std, persistent=False)

    def train(self, mode: bool = True) -> "TimmFeatureExtractor":
        super().train(mode)
        if not self.requires_grad:  # a frozen backbone keeps its BatchNorm statistics
            self.feature_extractor.eval()
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images * self.input_scale + self.input_shift
        if self.requires_grad:
            features = self.feature_extractor(images)
        else:
            with torch.no_grad():
                features = self.feature_extractor(images)
        return dict(zip(self.layers, features))


def dryrun_find_featuremap_dims(
    extractor: TimmFeatureExtractor, input_size: tuple[int, int], layers: Sequence[str]
) -> dict[str, dict[str, object]]:
    """Channels and spatial size of each layer for an input of ``input_size`` (H, W)."""
    device = next(extractor.parameters()).device
    with torch.no_grad():
        features = extractor(torch.zeros(1, 3, *input_size, device=device))
    return {layer: {"num_features": features[layer].shape[1], "resolution": tuple(features[layer].shape[2:])} for layer in layers}
