import pytest

from anomalyzoo import ModelRegistry
from anomalyzoo.registry import UnknownModelError


def test_registered_models_and_defaults_match_the_spec():
    assert {"padim", "patchcore"} <= set(ModelRegistry.list_models())
    assert ModelRegistry.get_model_config("patchcore") == {"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"]}
    assert ModelRegistry.get_train_config("padim") == {"num_epochs": 1, "batch_size": 4, "img_size": 256, "normalize": True}
    assert "patchcore" in ModelRegistry.list_by_category()["memory"]


def test_configs_are_copies_not_shared_state():
    config = ModelRegistry.get_model_config("patchcore")
    config["layers"].append("layer4")
    assert ModelRegistry.get_model_config("patchcore")["layers"] == ["layer2", "layer3"]


def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownModelError, match="patchcore"):
        ModelRegistry.get("patchcor")
    assert not ModelRegistry.is_registered("patchcor")


def test_register_and_get_trainer_with_overrides():
    ModelRegistry.register("padim-tiny", "anomalyzoo.models.padim.PadimTrainer",
                           {"backbone": "resnet18", "layers": ["layer1", "layer2"]}, {"num_epochs": 1, "batch_size": 2}, "memory")
    try:
        trainer = ModelRegistry.get_trainer("padim-tiny", {"pretrained": False, "n_features": 20}, {"num_epochs": 1}, "cpu")
        assert trainer.model_type == "padim-tiny"
        assert trainer.model.channel_index.numel() == 20
        with pytest.raises(TypeError, match="does not accept"):
            ModelRegistry.get_trainer("padim-tiny", {"pretrained": False, "no_such_option": 1})
    finally:
        ModelRegistry._entries.pop("padim-tiny")
