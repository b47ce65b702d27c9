import numpy as np
import pytest
import torch
from PIL import Image

from anomalyzoo import set_globals
from anomalyzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from anomalyzoo.models.components.backbone import (
    BACKBONE_WEIGHT_FILES,
    BackboneWeightsNotFound,
    create_backbone,
    get_backbone_path,
)
from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor, layer_stride


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach for the hub


def test_weight_table_and_paths(tmp_path):
    assert BACKBONE_WEIGHT_FILES["wide_resnet50_2"] == "wide_resnet50_2.pth"
    assert BACKBONE_WEIGHT_FILES["dinov2_vit_small_14"] == "dinov2_vit_small_14/dinov2_vits14_pretrain.pth"
    assert BACKBONE_WEIGHT_FILES["efficientad_teacher_small"] == "efficientad/pretrained_teacher_small.pth"
    set_globals(backbone_dir=tmp_path)
    assert get_backbone_path("resnet18") == tmp_path / "resnet18.pth"


def test_missing_weights_name_the_file_to_put_where(tmp_path):
    set_globals(backbone_dir=tmp_path)
    with pytest.raises(BackboneWeightsNotFound, match=str(tmp_path / "resnet18.pth")):
        create_backbone("resnet18", features_only=True)
    create_backbone("resnet18", pretrained=False, features_only=True)  # random weights only on request


def test_weights_come_from_backbone_dir(tmp_path):
    set_globals(backbone_dir=tmp_path)
    reference = create_backbone("resnet18", pretrained=False)
    torch.nn.init.constant_(reference.layer2[0].conv1.weight, 0.123)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    features = create_backbone("resnet18", features_only=True, out_indices=(2,))
    assert torch.allclose(features.layer2[0].conv1.weight, torch.full_like(features.layer2[0].conv1.weight, 0.123))


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    set_globals(backbone_dir=tmp_path)
    (tmp_path / "resnet18.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsNotFound, match="Could not read backbone weights"):
        create_backbone("resnet18")


def test_layer_names_resolve_by_stride_for_resnet_and_efficientnet():
    assert [layer_stride(f"layer{i}") for i in (1, 2, 3, 4)] == [4, 8, 16, 32]
    resnet = TimmFeatureExtractor("resnet18", ["layer1", "layer3"], pretrained=False)
    lite = TimmFeatureExtractor("efficientnet_lite0", ["layer2", "layer3"], pretrained=False)
    assert resnet.strides == [4, 16] and resnet.out_dims == [64, 256]
    assert lite.strides == [8, 16] and lite.out_dims == [40, 112]
    features = lite(torch.zeros(1, 3, 64, 64))
    assert features["layer2"].shape == (1, 40, 8, 8) and features["layer3"].shape == (1, 112, 4, 4)
    with pytest.raises(ValueError, match="Layer names must look like"):
        TimmFeatureExtractor("resnet18", ["conv5"], pretrained=False)


def test_extractor_renormalises_to_the_backbone_statistics():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64)
    normalized = (image - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    on_imagenet = TimmFeatureExtractor("efficientnet_lite0", ["layer2"], pretrained=False, input_normalized=True)
    on_unit = TimmFeatureExtractor("efficientnet_lite0", ["layer2"], pretrained=False, input_normalized=False)
    on_unit.load_state_dict(on_imagenet.state_dict())
    assert torch.allclose(on_imagenet(normalized)["layer2"], on_unit(image)["layer2"], atol=1e-4)


def test_lite0_imagenet_weights_label_real_bottles_as_bottles(bottle_dataset_dir, lite0_weights, tmp_path):
    """The mapped package weights are real ImageNet weights: on MVTec bottles they put much more
    probability on bottle/cup classes than random weights do."""
    from torchvision.models import ResNet18_Weights

    set_globals(backbone_dir=tmp_path)  # empty: the package must be the source
    classes = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    wanted = [i for i, name in enumerate(classes) if "bottle" in name or name in ("cup", "pill bottle")]
    folder = bottle_dataset_dir / "mvtec" / "bottle" / "test" / "good"
    images = []
    for path in sorted(folder.glob("*.png"))[:8]:
        array = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
        images.append(torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1))
    batch = torch.stack(images)
    with torch.no_grad():
        pretrained = create_backbone("efficientnet_lite0").eval()(batch).softmax(-1)
        random = create_backbone("efficientnet_lite0", pretrained=False).eval()(batch).softmax(-1)
    bottle_mass = pretrained[:, wanted].sum(1).mean().item()
    assert bottle_mass > 0.1, bottle_mass
    assert bottle_mass > 5 * random[:, wanted].sum(1).mean().item()


def test_resnets_use_the_torchvision_weights_the_papers_used(tmp_path, monkeypatch):
    """timm's default resnet tags are other trainings: the hub is asked for `.tv_in1k`, and that
    layout (`<name>.tv_in1k/model.safetensors`) is read from BACKBONE_DIR too."""
    from safetensors.torch import save_file

    from anomalyzoo.models.components.backbone import backbone_file_candidates, hub_model_name

    assert hub_model_name("resnet18") == "resnet18.tv_in1k"
    assert hub_model_name("resnet50") == "resnet50.tv_in1k"
    assert hub_model_name("wide_resnet50_2") == "wide_resnet50_2.tv_in1k"
    assert hub_model_name("efficientnet_lite0") == "tf_efficientnet_lite0"
    set_globals(backbone_dir=tmp_path)
    assert backbone_file_candidates("resnet18") == [tmp_path / "resnet18.pth", tmp_path / "resnet18.tv_in1k" / "model.safetensors"]

    reference = create_backbone("resnet18", pretrained=False)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    (tmp_path / "resnet18.tv_in1k").mkdir()
    save_file(state, str(tmp_path / "resnet18.tv_in1k" / "model.safetensors"))
    assert get_backbone_path("resnet18") == tmp_path / "resnet18.tv_in1k" / "model.safetensors"
    loaded = create_backbone("resnet18")
    for key, value in loaded.state_dict().items():  # every tensor mapped
        assert torch.equal(value, state[key]), key

    # online: the hub is asked for the tagged weights
    requested = []

    def fake_create_model(name, pretrained=False, **kwargs):
        if pretrained:
            requested.append(name)
            raise RuntimeError("offline")
        return real_create_model(name, pretrained=False, **kwargs)

    import timm

    real_create_model = timm.create_model
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(timm, "create_model", fake_create_model)
    set_globals(backbone_dir=tmp_path / "empty")
    with pytest.raises(BackboneWeightsNotFound, match="resnet50.tv_in1k"):
        create_backbone("resnet50")
    assert requested == ["resnet50.tv_in1k"]


# The flow models' transformer backbones (FastFlow, U-Flow) and CS-Flow's EfficientNet-B5.
# CaiT/DeiT tags: timm's default (and only) pretrained tag of each name, checked against the
# installed timm below; their spec file is timm's hub layout <timm name>.<tag>/model.safetensors.
FLOW_TRANSFORMER_TAGS = {
    "cait_m48_448": "fb_dist_in1k",
    "cait_s24_224": "fb_dist_in1k",
    "deit_base_distilled_patch16_384": "fb_in1k",
}


def _write_hub_file(backbone_dir, folder, model):
    """``model``'s state dict saved as timm's hub snapshot does: ``<folder>/model.safetensors``."""
    from safetensors.torch import save_file

    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    (backbone_dir / folder).mkdir(parents=True)
    save_file(state, str(backbone_dir / folder / "model.safetensors"))
    return state


def _assert_every_tensor_mapped(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)  # no tensor left random, none left over
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_flow_backbones_use_timms_tags_from_backbone_dir_and_hub(tmp_path, monkeypatch):
    """Files and hub requests name the same tagged weights; a missing file names where to put it."""
    import re

    import timm
    from timm.models import get_pretrained_cfg

    from anomalyzoo.models.components.backbone import backbone_file_candidates, hub_model_name

    set_globals(backbone_dir=tmp_path)
    for name, tag in FLOW_TRANSFORMER_TAGS.items():
        assert get_pretrained_cfg(name).tag == tag  # timm's default tag for the name
        assert BACKBONE_WEIGHT_FILES[name] == f"{name}.{tag}/model.safetensors"
        assert hub_model_name(name) == f"{name}.{tag}"
        assert backbone_file_candidates(name) == [tmp_path / f"{name}.{tag}" / "model.safetensors"]
    # CS-Flow used efficientnet_pytorch's AutoAugment port, not timm's default (Noisy Student, JFT)
    assert BACKBONE_WEIGHT_FILES["efficientnet_b5"] == "efficientnet_b5.pth"
    assert hub_model_name("efficientnet_b5") == "tf_efficientnet_b5.aa_in1k"
    assert "tf_efficientnet_b5.aa_in1k" in timm.list_pretrained("tf_efficientnet_b5*")
    assert backbone_file_candidates("efficientnet_b5") == [
        tmp_path / "efficientnet_b5.pth",
        tmp_path / "tf_efficientnet_b5.aa_in1k" / "model.safetensors",
    ]
    assert hub_model_name("wide_resnet50_2.tv_in1k") == "wide_resnet50_2.tv_in1k"  # not timm's racm_in1k

    # Online with an empty BACKBONE_DIR: the model is built and the hub asked under the tagged name
    # (a stand-in create_model: building CaiT-M48 for an error message would take seconds).
    built, requested = [], []

    def fake_create_model(model_name, pretrained=False, **kwargs):
        if pretrained:
            requested.append(model_name)
            raise RuntimeError("offline")
        built.append(model_name)
        return torch.nn.Linear(1, 1)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(timm, "create_model", fake_create_model)
    expected = {name: f"{name}.{tag}" for name, tag in FLOW_TRANSFORMER_TAGS.items()}
    expected["efficientnet_b5"] = "tf_efficientnet_b5.aa_in1k"
    for name, tagged in expected.items():
        built.clear()
        requested.clear()
        with pytest.raises(BackboneWeightsNotFound) as error:
            create_backbone(name)
        assert built == [tagged] and requested == [tagged]
        for path in backbone_file_candidates(name):  # the file(s) to put where, and the way out
            assert re.search(re.escape(str(path)), str(error.value))
        assert "pretrained=False" in str(error.value)


def test_cait_s24_224_loads_timms_hub_file_from_backbone_dir(tmp_path):
    """The real architecture (47M parameters, a few seconds): the hub file of a randomly initialised
    cait_s24_224 at cait_s24_224.fb_dist_in1k/model.safetensors fills every tensor, also through
    the feature extractor U-Flow's MS-CaiT builds."""
    import timm

    set_globals(backbone_dir=tmp_path)
    torch.manual_seed(0)
    state = _write_hub_file(tmp_path, "cait_s24_224.fb_dist_in1k", timm.create_model("cait_s24_224"))
    assert get_backbone_path("cait_s24_224") == tmp_path / "cait_s24_224.fb_dist_in1k" / "model.safetensors"
    _assert_every_tensor_mapped(create_backbone("cait_s24_224"), state)

    extractor = TimmFeatureExtractor("cait_s24_224", [20], pretrained=True)
    kept = extractor.feature_extractor.state_dict()  # blocks 0..20; later blocks and head pruned
    assert "blocks.20.attn.qkv.weight" in kept and "blocks.21.attn.qkv.weight" not in kept
    for key, value in kept.items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(
    ("name", "small", "timm_kwargs"),
    [
        # FastFlow/U-Flow build CaiT without extra options (it has no dynamic_img_size)
        ("cait_m48_448", "cait_xxs24_224", {}),
        # the extractor builds ViT/DeiT with dynamic_img_size=True: the weights go via the full model
        ("deit_base_distilled_patch16_384", "deit_tiny_distilled_patch16_224", {"dynamic_img_size": True}),
    ],
)
def test_big_flow_transformers_load_their_hub_file_via_a_small_model_of_the_same_family(
    tmp_path, monkeypatch, name, small, timm_kwargs
):
    """Building CaiT-M48 (356M parameters) and writing its 1.4 GB file is too slow for this CPU
    suite, DeiT-B/384 (88M) nearly so. The loader is name-independent past two table look-ups
    (BACKBONE_WEIGHT_FILES for the path, TIMM_ARCHITECTURES for the model), so: check on the meta
    device (no memory, no init) that the small model's state dict has the big one's layout
    (same class, same keys up to the number of blocks), then point TIMM_ARCHITECTURES at the small
    model and load its random weights from the big name's exact hub path."""
    import re

    import timm

    from anomalyzoo.models.components import backbone as backbone_module

    def layout(model):
        return type(model), {re.sub(r"^blocks\.\d+\.", "blocks.N.", key) for key in model.state_dict()}

    with torch.device("meta"):
        big = timm.create_model(name)
    torch.manual_seed(0)
    reference = timm.create_model(small)
    assert layout(reference) == layout(big)

    set_globals(backbone_dir=tmp_path)
    tag = FLOW_TRANSFORMER_TAGS[name]
    state = _write_hub_file(tmp_path, f"{name}.{tag}", reference)
    monkeypatch.setitem(backbone_module.TIMM_ARCHITECTURES, name, small)
    assert get_backbone_path(name) == tmp_path / f"{name}.{tag}" / "model.safetensors"
    _assert_every_tensor_mapped(create_backbone(name, **timm_kwargs), state)
