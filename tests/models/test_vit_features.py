"""The block-index path of TimmFeatureExtractor for vision transformers (ViT/DINOv2, DeiT, CaiT).

Random weights, the smallest timm model of each family and inputs of a few patches: the point is
the plumbing (which block, which tokens, which shape), which random weights exercise as well as
pretrained ones. Each extractor is built once per module because a ViT build costs about a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from anomalyzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from anomalyzoo.models.components.feature_extractor import (
    TimmFeatureExtractor,
    block_index,
    dryrun_find_featuremap_dims,
    probe_backbone,
)


@dataclass(frozen=True)
class Family:
    backbone: str
    layers: list
    image_size: tuple[int, int]  # (H, W), non-square so that H and W cannot be swapped unnoticed
    blocks: list[int]  # the absolute block each layer must resolve to
    dim: int
    patch: int
    prefix_tokens: int  # prefix tokens forward_with_tokens returns (0: it refuses)
    kwargs: dict = field(default_factory=dict)


FAMILIES = {
    # DINOv2-style ViT: patch 14, one class token; -1 is block 11
    "dinov2": Family("vit_small_patch14_dinov2", [3, -1], (28, 42), [3, 11], 384, 14, 1),
    # DeiT: class + distillation token; "blocks.3" and -9 are the same block
    "deit": Family("deit_tiny_distilled_patch16_224", ["block1", "blocks.3", -9], (32, 48), [1, 3, 3], 192, 16, 2),
    # CaiT: fixed input size, no prefix token in its patch blocks; final norm and [0, 1] inputs
    "cait": Family(
        "cait_xxs24_224", [1, "blocks.-1"], (32, 48), [1, 23], 192, 16, 0,
        kwargs={"img_size": (32, 48), "input_normalized": False, "final_norm": True},
    ),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # random weights only: nothing may reach for the hub


@pytest.fixture(scope="module")
def extractors():
    """Builds each family's extractor on first use and keeps it for the module."""
    built: dict[str, TimmFeatureExtractor] = {}

    def get(name: str) -> TimmFeatureExtractor:
        if name not in built:
            family = FAMILIES[name]
            torch.manual_seed(0)
            built[name] = TimmFeatureExtractor(family.backbone, family.layers, pretrained=False, **family.kwargs)
        return built[name]

    return get


def images_for(family: Family, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, *family.image_size, generator=generator)


def backbone_input(extractor: TimmFeatureExtractor, family: Family, images: torch.Tensor) -> torch.Tensor:
    """The re-normalisation worked out from the backbone's pretrained_cfg, not from the buffers."""
    cfg = extractor.feature_extractor.pretrained_cfg
    target_mean, target_std = (torch.tensor(cfg[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    if family.kwargs.get("input_normalized", True):
        images = images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (images - target_mean) / target_std


@torch.no_grad()
def manual_block_outputs(
    extractor: TimmFeatureExtractor, family: Family, images: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{block: (map, prefix tokens)} by running the blocks one by one, without forward_intermediates."""
    model = extractor.feature_extractor
    grid_h, grid_w = family.image_size[0] // family.patch, family.image_size[1] // family.patch
    x = model.patch_embed(backbone_input(extractor, family, images))
    x = model.norm_pre(model._pos_embed(x)) if isinstance(model, VisionTransformer) else x + model.pos_embed
    outputs = {}
    for i, block in enumerate(model.blocks):
        x = block(x)
        y = model.norm(x) if extractor.final_norm else x
        prefix = y.shape[1] - grid_h * grid_w  # tokens that are not patches
        spatial = y[:, prefix:].reshape(y.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2)
        outputs[i] = (spatial, y[:, :prefix])
    return outputs


@pytest.mark.parametrize("name", FAMILIES)
def test_transformer_maps_have_the_patch_grid_shape(extractors, name):
    family, extractor = FAMILIES[name], extractors(name)
    height, width = family.image_size
    assert extractor.is_transformer
    assert extractor.out_dims == [family.dim] * len(family.layers)
    assert extractor.strides == [family.patch] * len(family.layers)
    features = extractor(images_for(family))
    assert list(features) == family.layers  # keyed by the specs as given
    for layer in family.layers:
        assert features[layer].shape == (2, family.dim, height // family.patch, width // family.patch)
    dims = dryrun_find_featuremap_dims(extractor, family.image_size, family.layers)
    assert dims[family.layers[0]] == {"num_features": family.dim, "resolution": (height // family.patch, width // family.patch)}


@pytest.mark.parametrize("name", FAMILIES)
def test_transformer_maps_equal_a_manual_run_of_the_blocks(extractors, name):
    family, extractor = FAMILIES[name], extractors(name)
    images = images_for(family)
    features = extractor(images)
    expected = manual_block_outputs(extractor, family, images)
    for layer, block in zip(family.layers, family.blocks):
        torch.testing.assert_close(features[layer], expected[block][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_negative_and_named_layers_resolve_to_blocks(extractors, name):
    family, extractor = FAMILIES[name], extractors(name)
    assert extractor.block_indices == family.blocks
    # blocks after the last requested one are cut off: they would only cost memory
    assert len(extractor.feature_extractor.blocks) == max(family.blocks) + 1


def test_block_index_forms():
    assert [block_index(spec, 12) for spec in (0, 11, -1, -12, "block3", "blocks.3", "block-2")] == [0, 11, 11, 0, 3, 3, 10]


def test_repeated_blocks_give_the_same_map(extractors):
    features = extractors("deit")(images_for(FAMILIES["deit"]))
    assert torch.equal(features["blocks.3"], features[-9])
    assert not torch.equal(features["block1"], features["blocks.3"])


@pytest.mark.parametrize("name", ["dinov2", "deit"])
def test_prefix_tokens_are_returned_when_asked(extractors, name):
    family, extractor = FAMILIES[name], extractors(name)
    images = images_for(family)
    maps, tokens = extractor.forward_with_tokens(images)
    expected = manual_block_outputs(extractor, family, images)
    assert extractor.num_prefix_tokens == family.prefix_tokens
    assert list(tokens) == family.layers
    for layer, block in zip(family.layers, family.blocks):
        assert tokens[layer].shape == (2, family.prefix_tokens, family.dim)
        torch.testing.assert_close(tokens[layer], expected[block][1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(maps[layer], expected[block][0], rtol=1e-4, atol=1e-5)


def test_cait_has_no_block_tokens_to_return(extractors):
    with pytest.raises(ValueError, match="no prefix tokens"):
        extractors("cait").forward_with_tokens(images_for(FAMILIES["cait"]))


@pytest.mark.parametrize(
    ("backbone", "layers", "kwargs", "message"),
    [
        ("vit_tiny_patch16_224", [12], {}, "out of range for a backbone with 12 blocks"),
        ("vit_tiny_patch16_224", [0, -13], {}, "out of range"),
        ("vit_tiny_patch16_224", ["layer3"], {}, "block indices"),
        ("cait_xxs24_224", [True], {}, "ints or 'blockN'"),
        ("resnet18", [2], {}, "Layer names must look like"),
        ("resnet18", ["layer2"], {"img_size": 64}, "apply to vision transformers"),
        ("vit_tiny_patch16_224", [], {}, "at least one layer"),
    ],
)
def test_bad_layers_are_clear_value_errors(backbone, layers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimmFeatureExtractor(backbone, layers, pretrained=False, **kwargs)


def test_cnn_path_is_unchanged():
    torch.manual_seed(0)
    extractor = TimmFeatureExtractor("resnet18", ["layer2"], pretrained=False)
    images = torch.rand(2, 3, 32, 48)
    features = extractor(images)
    assert not extractor.is_transformer
    assert list(features) == ["layer2"] and features["layer2"].shape == (2, 128, 4, 6)
    assert extractor.strides == [8] and extractor.out_dims == [128]
    net = extractor.feature_extractor
    with torch.no_grad():
        x = net.maxpool(net.act1(net.bn1(net.conv1(images * extractor.input_scale + extractor.input_shift))))
        expected = net.layer2(net.layer1(x))
    torch.testing.assert_close(features["layer2"], expected)
    with pytest.raises(ValueError, match="no prefix tokens"):
        extractor.forward_with_tokens(images)


def test_frozen_transformer_stays_frozen(extractors):
    family, extractor = FAMILIES["dinov2"], extractors("dinov2")
    assert not any(parameter.requires_grad for parameter in extractor.parameters())
    extractor.train()
    assert extractor.training and not extractor.feature_extractor.training
    images = images_for(family).requires_grad_(True)
    assert not extractor(images)[-1].requires_grad
    extractor.eval()


def test_trainable_transformer_gets_gradients_and_trains():
    torch.manual_seed(0)
    extractor = TimmFeatureExtractor("deit_tiny_distilled_patch16_224", ["block0"], pretrained=False, requires_grad=True)
    extractor.train()
    assert extractor.feature_extractor.training
    assert isinstance(extractor.feature_extractor.norm, torch.nn.Identity)  # final_norm off: not kept
    extractor(torch.rand(1, 3, 32, 32))["block0"].square().mean().backward()
    assert extractor.feature_extractor.blocks[0].mlp.fc2.weight.grad is not None
    assert extractor.feature_extractor.patch_embed.proj.weight.grad.abs().sum() > 0


def test_probe_is_cached_and_leaves_the_rng_alone():
    state = torch.get_rng_state()
    probe = probe_backbone("vit_tiny_patch16_384")
    assert torch.equal(torch.get_rng_state(), state)
    assert probe.token_transformer and probe.num_blocks == 12 and probe.dynamic_img_size
    assert probe_backbone("vit_tiny_patch16_384") is probe
    assert not probe_backbone("resnet18").token_transformer
