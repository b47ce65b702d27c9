"""Dinomaly's two transformers (arXiv 2405.14325, sec. 3.2-3.4; authors' ``models/uad.py``
``ViTill`` and ``models/vision_transformer.py`` ``Block``).

- :class:`DinoV2Encoder`: timm's DINOv2 ViT (the official architecture and weights, see
  ``loader``), frozen, built for one input size (its positional embedding resampled to that grid
  once). It returns the *token sequences* (class token first, then the patches) after the
  requested blocks, without the final norm: ``ViTill`` reads ``blocks[i]`` outputs directly.
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

from anomalyzoo.models.components_dinomaly.layers import LinearAttention
from anomalyzoo.models.components_dinomaly.loader import dinov2_architecture, load_official_dinov2, require_dinov2_weights

DECODER_LAYER_NORM_EPS = 1e-8  # authors' training scripts
DECODER_MLP_RATIO = 4.0
INIT_STD, INIT_BOUND = 0.01, 0.03  # trunc_normal_(std=0.01, a=-0.03, b=0.03)


class DinoV2Encoder(nn.Module):
    """Frozen DINOv2 ViT for ``input_size`` = (H, W) inputs (multiples of the patch size 14)."""

    def __init__(self, encoder_name: str, input_size: tuple[int, int], pretrained: bool = True) -> None:
        super().__init__()
        architecture = dinov2_architecture(encoder_name)
        self.encoder_name = encoder_name
        self.patch_size = 14
        height, width = input_size
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"DINOv2 needs input sides that are multiples of {self.patch_size}, got {input_size} "
                             "(use img_size 224, 392, 448, ... or 56 for a quick test)")
        self.grid = (height // self.patch_size, width // self.patch_size)
        path = require_dinov2_weights(encoder_name) if pretrained else None  # fail before the (slow) build
        self.vit = timm.create_model(architecture.timm_name, pretrained=False, img_size=(height, width))
        if path is not None:
            load_official_dinov2(self.vit, path, self.grid)
        self.embed_dim = architecture.embed_dim
        self.num_heads = architecture.num_heads
        self.depth = len(self.vit.blocks)
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)  # the class token (no registers)
        self.vit.eval()
        for parameter in self.vit.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "DinoV2Encoder":
        super().train(mode)
        self.vit.eval()  # frozen: always in inference mode
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Tokens (B, 1 + h * w, D) after each of ``blocks`` (0-based, ascending), stopping at the last."""
        tokens = self.vit.norm_pre(self.vit.patch_drop(self.vit._pos_embed(self.vit.patch_embed(images))))
        wanted = set(blocks)
        outputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.vit.blocks[: max(blocks) + 1]):
            tokens = block(tokens)
            if index in wanted:
                outputs[index] = tokens
        return [outputs[i] for i in blocks]


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
