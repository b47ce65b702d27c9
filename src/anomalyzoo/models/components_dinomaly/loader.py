"""Official DINOv2 checkpoints (facebookresearch/dinov2, ``dinov2_vit{s,b,l}14_pretrain.pth``)
into timm's ViT, at any input size.

Where the file lives: ``BACKBONE_DIR/dinov2_vit_{small,base,large}_14/dinov2_vit{s,b,l}14_pretrain.pth``
(``BACKBONE_WEIGHT_FILES`` in ``components.backbone``). Nothing is downloaded: a missing file is a
:class:`BackboneWeightsNotFound` naming the path, the official URL and ``pretrained=False``.

Key layout. DINOv2's ``DinoVisionTransformer`` (``dinov2/models/vision_transformer.py``) stores
``cls_token``, ``pos_embed`` (1, 1 + 37 * 37, D: trained at 518 px), ``mask_token`` (1, D),
``patch_embed.proj.*``, ``blocks.<i>.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma}.*`` and ``norm.*``; built with ``block_chunks > 0`` the blocks are
``blocks.<chunk>.<i>.*`` with ``i`` the global block index. timm's ``vit_*_patch14_dinov2``
has the same names and shapes, except that

- ``mask_token`` is only used by DINOv2's masked-image training and has no place in timm's
  model: it is the one key dropped;
- ``pos_embed`` is resampled to the grid of the input size the model is built for
  (:func:`interpolate_pos_embed`), once, at load time.

Every other tensor must find its counterpart with the same shape, and every timm tensor must be
filled: anything else is an error that names the keys.

Positional embedding (DINOv2 ``interpolate_pos_encoding`` with the authors' settings in
Dinomaly's ``models/vit_encoder.py``: ``interpolate_offset=0.1``, ``interpolate_antialias=False``):
the 37 x 37 patch embeddings are resized bicubically with the *scale factor*
``(grid + 0.1) / 37`` per side (not to a target size: the offset avoids a floating-point
off-by-one, dino issue #8, and changes the sampling positions slightly), the class token's
embedding is kept. Done once here, the encoder adds exactly what the authors' encoder adds on
every forward at that input size; at 518 px (37 x 37) it is the checkpoint's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.backbone import BackboneWeightsNotFound, get_backbone_path, read_state_dict

PRETRAIN_GRID = 37  # 518 px / patch 14: the grid DINOv2's pos_embed was trained for
INTERPOLATE_OFFSET = 0.1  # Dinomaly models/vit_encoder.py: interpolate_offset=0.1
DROPPED_KEYS = ("mask_token",)  # DINOv2's masked-image-modelling token, unused at inference
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{code}14/dinov2_vit{code}14_pretrain.pth"


@dataclass(frozen=True)
class DinoV2Architecture:
    timm_name: str  # timm's architecture with the official model's layout
    code: str  # s / b / l in the official file names
    embed_dim: int
    num_heads: int
    depth: int


DINOV2_ARCHITECTURES: dict[str, DinoV2Architecture] = {
    "dinov2_vit_small_14": DinoV2Architecture("vit_small_patch14_dinov2", "s", 384, 6, 12),
    "dinov2_vit_base_14": DinoV2Architecture("vit_base_patch14_dinov2", "b", 768, 12, 12),
    "dinov2_vit_large_14": DinoV2Architecture("vit_large_patch14_dinov2", "l", 1024, 16, 24),
}

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def dinov2_architecture(name: str) -> DinoV2Architecture:
    if name not in DINOV2_ARCHITECTURES:
        raise ValueError(f"Unknown DINOv2 encoder '{name}'; expected one of {sorted(DINOV2_ARCHITECTURES)}")
    return DINOV2_ARCHITECTURES[name]


def dinov2_weights_path(name: str) -> Path:
    """Where ``name``'s official checkpoint is expected under BACKBONE_DIR."""
    dinov2_architecture(name)
    return get_backbone_path(name)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + M * M, D) -> (1, prefix + h * w, D) for a (h, w) patch grid, as DINOv2 does
    (bicubic, scale factor (h + 0.1) / M and (w + 0.1) / M, no antialiasing); unchanged at (M, M)."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"pos_embed holds {patches.shape[1]} patch positions, not a square grid")
    height, width = grid
    if (height, width) == (side, side):
        return pos_embed
    dim = patches.shape[-1]
    square = patches.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((height + INTERPOLATE_OFFSET) / side, (width + INTERPOLATE_OFFSET) / side)
    resized = F.interpolate(square, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(resized.shape[-2:]) != (height, width):
        raise RuntimeError(f"pos_embed interpolation gave grid {tuple(resized.shape[-2:])}, expected {(height, width)}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, height * width, dim).to(pos_embed.dtype)
    return torch.cat([prefix, resized], dim=1)


def official_to_timm(state: dict[str, torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """An official DINOv2 state dict in timm's names, its pos_embed resampled to ``grid``."""
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in DROPPED_KEYS:
            continue
        key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)  # blocks.<chunk>.<i>. -> blocks.<i>.
        if key in mapped:
            raise ValueError(f"Two tensors of the DINOv2 checkpoint map to '{key}'")
        mapped[key] = value
    if "pos_embed" not in mapped:
        raise ValueError("The DINOv2 checkpoint has no 'pos_embed'")
    mapped["pos_embed"] = interpolate_pos_embed(mapped["pos_embed"], grid)
    return mapped


def load_official_dinov2(model: nn.Module, path: Path, grid: tuple[int, int],
                         architecture: dict[str, torch.Size] | None = None) -> None:
    """Fill timm ViT ``model`` (built for ``grid``) from the official checkpoint at ``path``.

    Every tensor of the checkpoint must match a tensor of the whole ``architecture`` (names and
    shapes; ``model``'s own when not given) and every tensor of ``model`` must be filled, or the
    error names the keys and the file. ``model`` may be pruned (blocks after the last one read,
    the final norm): the checkpoint's tensors for the removed parts are then checked, not loaded.
    """
    state = official_to_timm(read_state_dict(path), grid)
    target = model.state_dict()
    reference = architecture if architecture is not None else {k: v.shape for k, v in target.items()}
    unexpected = sorted(set(state) - set(reference))
    missing = sorted(set(reference) - set(state))
    wrong_shape = sorted(k for k in set(state) & set(reference) if state[k].shape != reference[k])
    if unexpected or missing or wrong_shape:
        details = [f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                   f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                   f"{len(wrong_shape)} of another shape (e.g. {[(k, tuple(state[k].shape), tuple(reference[k])) for k in wrong_shape[:2]]})" if wrong_shape else ""]
        raise ValueError(
            f"{path} does not fit timm's '{getattr(model, 'default_cfg', {}).get('architecture', type(model).__name__)}': "
            f"{'; '.join(d for d in details if d)}. Is it the official DINOv2 checkpoint of this size "
            "(without registers)?"
        )
    unfilled = sorted(set(target) - set(state))
    if unfilled:
        raise ValueError(f"{path} leaves {unfilled[:3]} of the encoder unfilled")
    model.load_state_dict({key: state[key] for key in target}, strict=True)


def require_dinov2_weights(name: str) -> Path:
    """The checkpoint path of ``name``, or a :class:`BackboneWeightsNotFound` saying where to put what."""
    path = dinov2_weights_path(name)
    if path.is_file():
        return path
    url = OFFICIAL_URL.format(code=dinov2_architecture(name).code)
    raise BackboneWeightsNotFound(
        f"No DINOv2 weights for encoder '{name}': {path} does not exist. Download the official "
        f"checkpoint {url} to {path} (set the folder with set_globals(backbone_dir=...) or "
        "ANOMALYZOO_BACKBONE_DIR), or pass pretrained=False for random weights."
    )
