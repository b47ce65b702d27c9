"""Dinomaly's two transformers (arXiv 2405.14325, sec. 3; authors' ``models/uad.py``
``ViTill`` and ``models/vision_transformer.py`` ``Block``).

- :class:`DinoV2Encoder`: timm's DINOv2 ViT (the official architecture and weights, see
  ``loader``) through the shared :class:`TimmFeatureExtractor`, frozen, built for one input size
  (its positional embedding resampled to that grid once). It returns the *token sequences* (class
  token first, then the patches) after the requested blocks, without the final norm: ``ViTill``
  reads ``blocks[i]`` outputs directly.
- :class:`DecoderBlock`: a pre-norm ViT block whose attention is
  :class:`~anomalyzoo.models.components_dinomaly.layers.LinearAttention` (LayerNorm eps 1e-8,
  MLP ratio 4 with GELU, qkv bias, no dropout, drop-path or layer scale: the authors' training
  scripts build ``VitBlock(dim, num_heads, mlp_ratio=4., qkv_bias=True, norm_layer=partial(nn.LayerNorm,
  eps=1e-8), attn=LinearAttention2)``).
- :func:`init_dinomaly_weights`: the scripts' initialisation of the trainable parts: linear
  weights truncated normal (std 0.01, cut at +-0.03), biases 0, LayerNorms (1, 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from timm.layers import Mlp
from torch import nn

from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.components_dinomaly.layers import LinearAttention
from anomalyzoo.models.components_dinomaly.loader import dinov2_architecture, load_official_dinov2, require_dinov2_weights

DECODER_LAYER_NORM_EPS = 1e-8  # authors' training scripts
DECODER_MLP_RATIO = 4.0
INIT_STD, INIT_BOUND = 0.01, 0.03  # trunc_normal_(std=0.01, a=-0.03, b=0.03)


class DinoV2Encoder(nn.Module):
    """Frozen DINOv2 ViT for ``input_size`` = (H, W) inputs (multiples of the patch size 14),
    returning the token sequences after ``blocks`` (0-based, ascending).

    The repository's :class:`TimmFeatureExtractor` does the work: its block-index path on timm's
    ``forward_intermediates`` (raw block outputs, no final norm), the re-normalisation of [0, 1]
    inputs to DINOv2's ImageNet statistics, and the pruning of every block after the last one
    read (ViT-L keeps 19 of its 24). The official weights are loaded into what is kept.
    """

    def __init__(self, encoder_name: str, input_size: tuple[int, int], blocks: Sequence[int],
                 pretrained: bool = True, input_normalized: bool = True) -> None:
        super().__init__()
        architecture = dinov2_architecture(encoder_name)
        self.encoder_name = encoder_name
        self.patch_size = 14
        height, width = input_size
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"DINOv2 needs input sides that are multiples of {self.patch_size}, got {input_size} "
                             "(use img_size 224, 392, 448, ... or 56 for a quick test)")
        self.grid = (height // self.patch_size, width // self.patch_size)
        self.blocks = list(blocks)
        path = require_dinov2_weights(encoder_name) if pretrained else None  # fail before the (slow) build
        self.extractor = TimmFeatureExtractor(architecture.timm_name, self.blocks, pretrained=False,
                                              input_normalized=input_normalized, img_size=(height, width))
        if path is not None:
            load_official_dinov2(self.vit, path, self.grid, full_architecture_state(architecture.timm_name, input_size))
        self.embed_dim = architecture.embed_dim
        self.num_heads = architecture.num_heads
        self.depth = architecture.depth
        self.num_prefix_tokens = self.extractor.num_prefix_tokens  # the class token (no registers)

    @property
    def vit(self) -> nn.Module:
        """The (pruned) timm VisionTransformer."""
        return self.extractor.feature_extractor

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tokens (B, 1 + h * w, D), class token first, after each of ``blocks``."""
        maps, prefix = self.extractor.forward_with_tokens(images)
        return [torch.cat([prefix[b], maps[b].flatten(2).transpose(1, 2)], dim=1) for b in self.blocks]


def full_architecture_state(timm_name: str, input_size: tuple[int, int]) -> dict[str, torch.Size]:
    """Names and shapes of the whole (unpruned) architecture at ``input_size``, built on the meta
    device (nothing allocated): what an official checkpoint must match tensor for tensor."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, img_size=tuple(input_size))
    return {key: value.shape for key, value in model.state_dict().items()}


class DecoderBlock(nn.Module):
    """x + LinearAttention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=DECODER_LAYER_NORM_EPS)
        self.attn = LinearAttention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=DECODER_LAYER_NORM_EPS)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * DECODER_MLP_RATIO), act_layer=nn.GELU)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


def init_dinomaly_weights(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=INIT_STD, a=-INIT_BOUND, b=INIT_BOUND)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
