"""Multi-layer feature extraction from any timm backbone, CNN or vision transformer.

Two paths, chosen by the type of the model timm builds (never by its name):

* **CNNs** go through timm's ``features_only`` wrapper. Layer names follow the ResNet
  convention of the original configs (``layer1`` ... ``layer4``) and are resolved by stride so
  that the same config works for EfficientNets: ``layerN`` is the last stage whose output stride
  is ``2 ** (N + 1)`` (layer1 = stride 4, layer3 = stride 16).
* **Vision transformers** (timm's ``VisionTransformer``, which covers ViT, DINOv2 and DeiT, and
  ``Cait``) keep the full model and read block outputs through ``forward_intermediates``. Their
  layers are block indices: an ``int`` (0-based, negative counts from the end as in Python) or a
  string ``"blockN"`` / ``"blocks.N"``. Every block has the same width and the patch grid, so
  each map is ``(B, embed_dim, H / patch, W / patch)``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from timm.models.cait import Cait
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from anomalyzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from anomalyzoo.models.components.backbone import create_backbone

LayerSpec = Union[str, int]
"""A requested layer: ``"layerN"`` for CNNs; a block index or ``"blockN"``/``"blocks.N"`` for transformers."""

# Types, not a capability check: these models' ``forward_intermediates`` index *blocks* over one
# flat token sequence, so every index has the same width and the patch stride. Other timm models
# also have ``blocks``, ``patch_embed`` or ``forward_intermediates`` (Hiera, Swin, every ResNet)
# but index stages of different widths and strides there; they stay on the CNN path.
TOKEN_TRANSFORMERS: tuple[type[nn.Module], ...] = (VisionTransformer, Cait)

_BLOCK_NAME = re.compile(r"^(?:block|blocks\.)(-?\d+)$")


def layer_stride(layer: str) -> int:
    """``layerN`` -> 2 ** (N + 1)."""
    if not isinstance(layer, str) or not layer.startswith("layer") or not layer[5:].isdigit():
        raise ValueError(f"Layer names must look like 'layer1'..'layer4', got {layer!r}")
    return 2 ** (int(layer[5:]) + 1)


def block_index(layer: LayerSpec, num_blocks: int) -> int:
    """The 0-based block a transformer layer spec points at (``-1`` -> ``num_blocks - 1``).

    Raises ValueError naming the accepted forms, so that a CNN-style config ("layer3") or an
    index past the last block fails when the extractor is built rather than deep in timm.
    """
    if isinstance(layer, str):
        match = _BLOCK_NAME.match(layer)
        if match is None:
            raise ValueError(
                f"Transformer layers are block indices: an int (0-based, negative from the end) or "
                f"'blockN' / 'blocks.N', got {layer!r}"
            )
        index = int(match.group(1))
    elif isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
        index = int(layer)
    else:
        raise ValueError(f"Transformer layers are ints or 'blockN' strings, got {layer!r}")
    if not -num_blocks <= index < num_blocks:
        raise ValueError(
            f"Block index {layer!r} is out of range for a backbone with {num_blocks} blocks "
            f"(0..{num_blocks - 1}, or {-num_blocks}..-1 from the end)"
        )
    return index % num_blocks


@dataclass(frozen=True)
class BackboneProbe:
    """What the extractor must know about a backbone before building it with weights."""

    token_transformer: bool  # one of TOKEN_TRANSFORMERS: the block-index path
    num_blocks: int  # transformer blocks (0 for CNNs), to check indices before the real build
    dynamic_img_size: bool  # the model takes ``dynamic_img_size=True`` (ViT/DeiT do, CaiT not)


def _probe_model(backbone: str) -> nn.Module:
    """An uninitialised ``backbone`` to look at. On the meta device nothing is allocated or
    initialised (a fraction of a second even for CaiT-M48); older timm (1.0.3, say) calls ``.item()``
    while building ViTs, which meta tensors refuse, so those fall back to a CPU build. Either way
    the global RNG is left untouched, so that seeded runs do not depend on the cache."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return create_backbone(backbone, pretrained=False)
        except (RuntimeError, NotImplementedError):
            return create_backbone(backbone, pretrained=False)


@functools.lru_cache(maxsize=None)
def probe_backbone(backbone: str) -> BackboneProbe:
    """Which extraction path ``backbone`` takes, once per name and process."""
    model = _probe_model(backbone)
    if not isinstance(model, TOKEN_TRANSFORMERS):
        return BackboneProbe(token_transformer=False, num_blocks=0, dynamic_img_size=False)
    return BackboneProbe(
        token_transformer=True,
        num_blocks=len(model.blocks),
        dynamic_img_size=hasattr(model, "dynamic_img_size"),  # Cait has no such option
    )


@functools.lru_cache(maxsize=None)
def backbone_stage_info(backbone: str) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """(stride of every feature stage, input mean, input std) of a timm CNN backbone. Building the
    probe model costs seconds for large backbones, so it is done once per name and process,
    and it leaves the global RNG untouched so that seeded runs do not depend on the cache."""
    with torch.random.fork_rng(devices=[]):  # the probe's random init must not move the global RNG
        probe = create_backbone(backbone, pretrained=False, features_only=True)
    return tuple(probe.feature_info.reduction()), *input_statistics(probe)


def input_statistics(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone was trained with, from timm's pretrained_cfg (ImageNet if unset)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def returns_prefix_tokens(model: nn.Module) -> bool:
    """Whether ``forward_intermediates`` can hand back the prefix (class, distillation, register)
    tokens of every block. CaiT cannot: its class token joins only after the patch blocks."""
    parameters = inspect.signature(model.forward_intermediates).parameters
    return "return_prefix_tokens" in parameters and getattr(model, "num_prefix_tokens", 0) > 0


class TimmFeatureExtractor(nn.Module):
    """Returns ``{layer: (B, C, H/stride, W/stride)}`` for the requested layers, keyed by the
    layer specs exactly as given (``"layer2"``, ``3``, ``-1``, ``"block3"``).

    ``input_normalized`` says what the images are: ImageNet-normalised (``normalize=True`` in
    the data config) or plain [0, 1]. The extractor re-normalises them to the statistics the
    backbone was trained with (EfficientNet-Lite0, for instance, expects mean 0.5 / std 0.5).

    Transformer-only keyword arguments:

    * ``img_size``: passed to timm, which builds ViT/DeiT/CaiT for a fixed input size. ViT and
      DeiT are also built with ``dynamic_img_size=True`` so they take any input whose sides are
      multiples of the patch size; CaiT only takes ``img_size`` inputs. With pretrained weights
      keep the weights' own size (the default): a different one changes the position embedding.
    * ``final_norm``: apply the backbone's final norm to every block output, as FastFlow and
      AnomalyDINO do; off gives the raw residual stream.

    ``out_dims`` and ``strides`` give channels and stride per requested layer on both paths.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[LayerSpec],
        pretrained: bool = True,
        requires_grad: bool = False,
        input_normalized: bool = True,
        *,
        img_size: int | tuple[int, int] | None = None,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.layers: list[LayerSpec] = list(layers)
        if not self.layers:
            raise ValueError("TimmFeatureExtractor needs at least one layer")
        self.requires_grad = requires_grad
        self.final_norm = final_norm
        probe = probe_backbone(backbone)
        self.is_transformer = probe.token_transformer
        # absolute block per layer, the distinct blocks in forward order, prefix tokens per block
        self.block_indices: list[int] = []
        self._take_indices: list[int] = []
        self.num_prefix_tokens = 0
        if self.is_transformer:
            statistics = self._build_transformer(probe, pretrained, img_size)
        else:
            if img_size is not None or final_norm:
                raise ValueError(f"img_size and final_norm apply to vision transformers, not to CNN '{backbone}'")
            statistics = self._build_cnn(pretrained)
        if not requires_grad:
            self.feature_extractor.eval()
            for parameter in self.feature_extractor.parameters():
                parameter.requires_grad_(False)
        self._register_renormalisation(*statistics, input_normalized=input_normalized)

    def _build_cnn(self, pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """timm's features_only model with one output per ``layerN`` (the stage of its stride)."""
        strides, backbone_mean, backbone_std = backbone_stage_info(self.backbone_name)
        out_indices = []
        for layer in self.layers:
            wanted = layer_stride(layer)
            matches = [i for i, s in enumerate(strides) if s == wanted]
            if not matches:
                raise ValueError(f"Backbone '{self.backbone_name}' has no stage with stride {wanted} for '{layer}'")
            out_indices.append(matches[-1])
        self.feature_extractor = create_backbone(
            self.backbone_name, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices)
        )
        self.out_dims: list[int] = list(self.feature_extractor.feature_info.channels())
        self.strides: list[int] = [strides[i] for i in out_indices]
        return backbone_mean, backbone_std

    def _build_transformer(
        self, probe: BackboneProbe, pretrained: bool, img_size: int | tuple[int, int] | None
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The full timm model, cut after the last requested block: the blocks after it and the
        classifier head would only cost memory (CaiT-M48 is 356M parameters)."""
        # indices are checked against the probe before the (slow) real build
        self.block_indices = [block_index(layer, probe.num_blocks) for layer in self.layers]
        self._take_indices = sorted(set(self.block_indices))
        timm_kwargs: dict[str, object] = {}
        if img_size is not None:
            timm_kwargs["img_size"] = img_size
        if probe.dynamic_img_size:
            timm_kwargs["dynamic_img_size"] = True  # same weights, position embedding resampled per input
        model = create_backbone(self.backbone_name, pretrained=pretrained, **timm_kwargs)
        statistics = input_statistics(model)  # before pruning, which resets the head, not the cfg
        model.prune_intermediate_layers(self._take_indices, prune_norm=not self.final_norm, prune_head=True)
        self.feature_extractor = model
        self.out_dims = [int(model.embed_dim)] * len(self.layers)
        self.strides = [int(model.patch_embed.feat_ratio())] * len(self.layers)
        self.num_prefix_tokens = int(model.num_prefix_tokens) if returns_prefix_tokens(model) else 0
        return statistics

    def _register_renormalisation(
        self, backbone_mean: Sequence[float], backbone_std: Sequence[float], input_normalized: bool
    ) -> None:
        """x_backbone = (x * source_std + source_mean - target_mean) / target_std = x * scale + shift."""
        target_mean = torch.tensor(backbone_mean).view(1, 3, 1, 1)
        target_std = torch.tensor(backbone_std).view(1, 3, 1, 1)
        source_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) if input_normalized else torch.zeros(1, 3, 1, 1)
        source_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) if input_normalized else torch.ones(1, 3, 1, 1)
        self.register_buffer("input_scale", source_std / target_std, persistent=False)
        self.register_buffer("input_shift", (source_mean - target_mean) / target_std, persistent=False)

    def train(self, mode: bool = True) -> "TimmFeatureExtractor":
        super().train(mode)
        if not self.requires_grad:  # a frozen backbone keeps its BatchNorm statistics and no dropout
            self.feature_extractor.eval()
        return self

    def forward(self, images: torch.Tensor) -> dict[LayerSpec, torch.Tensor]:
        """``{layer: (B, C, H/stride, W/stride)}``, the same contract for CNNs and transformers."""
        maps, _tokens = self._extract(images, with_tokens=False)
        return maps

    def forward_with_tokens(
        self, images: torch.Tensor
    ) -> tuple[dict[LayerSpec, torch.Tensor], dict[LayerSpec, torch.Tensor]]:
        """``(maps, tokens)``: the maps of :meth:`forward` and, per layer, the block's prefix tokens
        ``(B, num_prefix_tokens, C)`` (class token first, then distillation/register tokens).

        A separate method so that :meth:`forward` keeps one return type for every caller.
        Raises ValueError for backbones whose blocks carry no prefix tokens (CNNs, CaiT).
        """
        if self.num_prefix_tokens == 0:
            raise ValueError(f"Backbone '{self.backbone_name}' has no prefix tokens in its blocks to return")
        return self._extract(images, with_tokens=True)

    def _extract(
        self, images: torch.Tensor, with_tokens: bool
    ) -> tuple[dict[LayerSpec, torch.Tensor], dict[LayerSpec, torch.Tensor]]:
        images = images * self.input_scale + self.input_shift
        with contextlib.nullcontext() if self.requires_grad else torch.no_grad():
            if not self.is_transformer:
                return dict(zip(self.layers, self.feature_extractor(images))), {}
            return self._transformer_outputs(images, with_tokens)

    def _transformer_outputs(
        self, images: torch.Tensor, with_tokens: bool
    ) -> tuple[dict[LayerSpec, torch.Tensor], dict[LayerSpec, torch.Tensor]]:
        """One pass through the blocks; timm returns the distinct blocks in ascending order, which
        are mapped back to the layers as requested (repeats and any order allowed)."""
        extra = {"return_prefix_tokens": True} if with_tokens else {}
        outputs = self.feature_extractor.forward_intermediates(
            images,
            indices=self._take_indices,
            norm=self.final_norm,
            output_fmt="NCHW",
            intermediates_only=True,
            **extra,
        )
        if not with_tokens:  # timm then returns bare maps
            outputs = [(spatial, None) for spatial in outputs]
        by_block = dict(zip(self._take_indices, outputs))
        per_layer = [(layer, *by_block[i]) for layer, i in zip(self.layers, self.block_indices)]
        maps = {layer: spatial for layer, spatial, _prefix in per_layer}
        tokens = {layer: prefix for layer, _spatial, prefix in per_layer if prefix is not None}
        return maps, tokens


def dryrun_find_featuremap_dims(
    extractor: TimmFeatureExtractor, input_size: tuple[int, int], layers: Sequence[LayerSpec]
) -> dict[LayerSpec, dict[str, object]]:
    """Channels and spatial size of each layer for an input of ``input_size`` (H, W)."""
    device = next(extractor.parameters()).device
    with torch.no_grad():
        features = extractor(torch.zeros(1, 3, *input_size, device=device))
    return {layer: {"num_features": features[layer].shape[1], "resolution": tuple(features[layer].shape[2:])} for layer in layers}
