import pytest

from anomalyzoo import ModelRegistry
from anomalyzoo.registry import UnknownModelError


def test_registered_models_and_defaults_match_the_spec():
    assert {"padim", "patchcore"} <= set(ModelRegistry.list_models())
    config = ModelRegistry.get_model_config("patchcore")
    assert config["backbone"] == "wide_resnet50_2" and config["layers"] == ["layer2", "layer3"]
    # the rest comes from the one home of defaults, the signatures
    assert config["coreset_ratio"] == 0.1 and config["num_neighbors"] == 9
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
        with pytest.raises(TypeError, match="does not accept") as error:
            ModelRegistry.get_trainer("padim-tiny", {"pretrained": False, "no_such_option": 1})
        assert "no_such_option" in str(error.value) and "n_features" in str(error.value)  # lists the valid ones
    finally:
        ModelRegistry._entries.pop("padim-tiny")


SPEC_DEFAULTS = {  # SPEC.md sec. 7: name -> (model config, epochs, batch, img_size, normalize)
    "padim": ({"backbone": "wide_resnet50_2", "layers": ["layer1", "layer2", "layer3"]}, 1, 4, 256, True),
    "patchcore": ({"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"]}, 1, 8, 256, True),
    "dfkde": ({"backbone": "resnet50", "layers": ["layer4"]}, 1, 8, 256, True),
    "cflow-resnet18": ({"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"]}, 250, 8, 256, True),
    "cflow-resnet50": ({"backbone": "resnet50", "layers": ["layer1", "layer2", "layer3"]}, 250, 8, 256, True),
    "fastflow-resnet50": ({"backbone": "resnet50", "flow_steps": 8}, 500, 8, 256, True),
    "fastflow-cait": ({"backbone": "cait_m48_448", "flow_steps": 8}, 500, 2, 448, True),
    "fastflow-deit": ({"backbone": "deit_base_distilled_patch16_384", "flow_steps": 8}, 500, 2, 384, True),
    "csflow": ({"backbone": "efficientnet_b5", "n_coupling_blocks": 4}, 500, 2, 256, True),
    "uflow-resnet50": ({"backbone": "resnet50", "flow_steps": 4}, 500, 8, 256, True),
    "uflow-mcait": ({"backbone": "mcait", "flow_steps": 4, "cait_backbones": ["cait_m48_448", "cait_s24_224"]}, 500, 4, 448, True),
    "dfm": ({"backbone": "resnet50", "layer": "layer3", "score_type": "fre"}, 1, 16, 256, True),
    "stfpm": ({"backbone": "resnet50", "layers": ["layer1", "layer2", "layer3"]}, 50, 16, 256, True),
    "fre": ({"backbone": "resnet50", "layer": "layer3"}, 50, 16, 256, True),
    "reverse-distillation": ({"backbone": "wide_resnet50_2", "layers": ["layer1", "layer2", "layer3"]}, 50, 8, 256, True),
    "efficientad-small": ({"model_size": "small"}, 20, 1, 256, False),
    "efficientad-medium": ({"model_size": "medium"}, 20, 1, 256, False),
    "draem": ({"sspcab": True}, 10, 8, 256, False),
    "dsr": ({"latent_anomaly_strength": 0.2, "embedding_dim": 128, "num_embeddings": 4096}, 50, 8, 256, False),
    "autoencoder": ({"latent_dim": 128}, 50, 16, 256, False),
    "ganomaly": ({"n_features": 64, "latent_vec_size": 256}, 20, 8, 256, False),
    "uninet": ({"backbone": "wide_resnet50_2", "temperature": 0.4}, 20, 4, 256, True),
    **{f"dinomaly-{size}-{img}": ({"encoder_name": f"dinov2_vit_{size}_14", "bottleneck_dropout": 0.2, "decoder_depth": 8},
                                  15, batch, img, True)
       for size, batch in (("small", 32), ("base", 16), ("large", 8)) for img in (224, 392, 448)},
    "cfa": ({"backbone": "wide_resnet50_2"}, 20, 16, 256, True),
    "supersimplenet": ({"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"]}, 50, 16, 256, True),
    "supersimplenet-supervised": ({"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"]}, 50, 16, 256, True),
}
# training keys beyond the spec's four: how the image reaches img_size (Dinomaly's R448-C392)
EXTRA_TRAIN_KEYS = {f"dinomaly-{size}-392": {"crop_pct": 392 / 448} for size in ("small", "base", "large")}


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS))
def test_every_registered_model_has_the_spec_defaults_and_a_trainer(name):
    model_config, epochs, batch, img_size, normalize = SPEC_DEFAULTS[name]
    config = ModelRegistry.get_model_config(name)
    assert {key: config[key] for key in model_config} == model_config
    assert ModelRegistry.get_train_config(name) == {"num_epochs": epochs, "batch_size": batch, "img_size": img_size,
                                                    "normalize": normalize, **EXTRA_TRAIN_KEYS.get(name, {})}
    trainer_class = ModelRegistry.get_trainer_class(name)
    assert trainer_class.__name__.endswith("Trainer")
    assert (trainer_class.__module__ and __import__(trainer_class.__module__, fromlist=["_"]).__doc__), "the module must cite its paper"


def test_only_implemented_models_are_registered():
    assert set(ModelRegistry.list_models()) == set(SPEC_DEFAULTS)


def test_an_error_inside_a_constructor_is_not_called_a_bad_option():
    with pytest.raises(ValueError, match="coreset_ratio must be in"):  # a valid name with a bad value
        ModelRegistry.get_trainer("patchcore", {"backbone": "resnet18", "pretrained": False, "coreset_ratio": 2.0})


def test_defaults_live_in_the_signatures():
    """The registry row holds only what differs from the signatures (EfficientAD's size)."""
    from anomalyzoo.models.efficientad import EfficientAdModel, EfficientAdTrainer
    from anomalyzoo.models.patchcore import PatchcoreModel

    assert ModelRegistry.get("patchcore").model_config == {}
    assert ModelRegistry.get("efficientad-medium").model_config == {"model_size": "medium"}
    import inspect

    signature = inspect.signature(PatchcoreModel.__init__).parameters
    assert ModelRegistry.get_model_config("patchcore")["coreset_ratio"] == signature["coreset_ratio"].default
    assert "imagenet_dir" in EfficientAdTrainer.option_defaults()  # a trainer's own option
    assert "input_normalized" not in EfficientAdTrainer.option_defaults()  # filled from the training config
    assert "model_size" in inspect.signature(EfficientAdModel.__init__).parameters


def test_a_directly_built_trainer_records_its_configuration(tmp_path):
    """Not built through the registry, with a non-default backbone: the checkpoint still rebuilds it."""
    from anomalyzoo.models.reverse_distillation import ReverseDistillationTrainer
    from anomalyzoo.predict import load_trainer

    trainer = ReverseDistillationTrainer(backbone="resnet18", pretrained=False, learning_rate=0.01,
                                         train_config={"img_size": 64}, device="cpu")
    assert trainer.model_config["backbone"] == "resnet18" and trainer.model_config["learning_rate"] == 0.01
    assert trainer.optimizer is None  # built when fitting starts
    checkpoint = trainer.save_model(tmp_path / "model.pth")
    restored = load_trainer(checkpoint, device="cpu")  # no registry name: the recorded class rebuilds it
    assert type(restored) is ReverseDistillationTrainer
    assert restored.model_config == {**trainer.model_config, "pretrained": False}
    assert restored.learning_rate == 0.01 and restored.model.encoder.backbone_name == "resnet18"
