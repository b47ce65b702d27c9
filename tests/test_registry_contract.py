"""One contract for every registry entry, run on its tiny configuration (random weights, 64 px,
one epoch or two steps): the forward contract, one training step, save -> load_trainer, predict.
A new model gets these checks by being registered; its own test file keeps only its equations and
its accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from anomalyzoo import ModelRegistry
from anomalyzoo.data import get_dataloaders, split_validation
from anomalyzoo.models.components.trainer import TRAIN_KEYS, BaseTrainer
from anomalyzoo.predict import load_trainer, predict_images

CATEGORY = "synthetic_object"


def tiny_trainer(name: str) -> tuple[BaseTrainer, dict[str, Any]]:
    tiny = ModelRegistry.get_tiny_config(name)
    train_values = {**ModelRegistry.get_train_config(name), "progress": False,
                    **{k: v for k, v in tiny.items() if k in TRAIN_KEYS}}
    options = {k: v for k, v in tiny.items() if k not in TRAIN_KEYS}
    return ModelRegistry.get_trainer(name, options, train_values, device="cpu"), train_values


def loaders(dataset_dir: Path, train_values: dict[str, Any]):
    train_loader, test_loader = get_dataloaders("mvtec", CATEGORY, img_size=train_values["img_size"],
                                                batch_size=train_values["batch_size"], normalize=train_values["normalize"],
                                                dataset_dir=dataset_dir, seed=0, crop_pct=train_values.get("crop_pct", 1.0))
    train_loader, val_loader = split_validation(train_loader, 0.1, seed=0)
    return train_loader, val_loader, test_loader


def test_every_entry_has_a_tiny_configuration():
    for name in ModelRegistry.list_models():
        tiny = ModelRegistry.get_tiny_config(name)
        assert tiny.get("img_size", 256) <= 64, name
        has_pretrained_weights = "pretrained" in ModelRegistry.get_trainer_class(name).option_defaults()
        assert not has_pretrained_weights or tiny.get("pretrained") is False or tiny.get("backbone") == "efficientnet_lite0", name
        assert tiny.get("num_steps") or ModelRegistry.get_train_config(name)["num_epochs"] == 1 or tiny.get("num_epochs") == 1, name


@pytest.mark.parametrize("name", ModelRegistry.list_models())
def test_one_training_step_changes_only_trainable_parameters(name, synthetic_dataset_dir):
    trainer, train_values = tiny_trainer(name)
    train_loader, val_loader, _ = loaders(synthetic_dataset_dir, train_values)
    trainer.train_loader, trainer.valid_loader = train_loader, val_loader
    trainer.total_steps = trainer.planned_steps(train_loader)
    trainer.setup_optimization()
    model = trainer.model.train()
    before = {key: value.detach().clone() for key, value in model.state_dict().items()}
    frozen = {key for key, parameter in model.named_parameters() if not parameter.requires_grad}
    frozen_modules = [prefix for prefix, module in model.named_modules()
                      if any(True for _ in module.parameters()) and not any(p.requires_grad for p in module.parameters())]
    trainer.on_train_start()
    trainer.train_step(trainer.to_device(next(iter(train_loader))))
    after = model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    # frozen parameters, and everything (BatchNorm statistics included) inside fully frozen modules, stay
    assert not changed & frozen, sorted(changed & frozen)[:5]
    inside_frozen = {key for key in changed for prefix in frozen_modules if prefix and key.startswith(prefix + ".")}
    assert not inside_frozen, sorted(inside_frozen)[:5]
    if trainer.uses_optimizer:
        trainable = {key for key, parameter in model.named_parameters() if parameter.requires_grad}
        assert trainable and changed & trainable, "a gradient step must move some trainable parameter"
        optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert all(p.requires_grad for p in model.parameters() if id(p) in optimised)
    else:
        assert not changed, "a memory-bank model's training step only collects features"


@pytest.mark.parametrize("name", ModelRegistry.list_models())
def test_forward_save_load_and_predict(name, synthetic_dataset_dir, tmp_path):
    trainer, train_values = tiny_trainer(name)
    train_loader, val_loader, test_loader = loaders(synthetic_dataset_dir, train_values)
    trainer.fit(train_loader, val_loader)
    trainer.calibrate(val_loader)
    batch = next(iter(test_loader))
    images = batch["image"][:2]
    size = train_values["img_size"]

    output = trainer.predict(images)
    assert output["pred_score"].shape == (len(images),)
    assert torch.isfinite(output["pred_score"]).all()
    anomaly_map = output.get("anomaly_map")
    if anomaly_map is not None:
        assert anomaly_map.shape == (len(images), size, size)  # at input resolution
        assert torch.isfinite(anomaly_map).all()

    trainer.model_type = name
    checkpoint = trainer.save_model(tmp_path / "model.pth")
    restored = load_trainer(checkpoint, device="cpu")
    assert type(restored) is type(trainer) and restored.model_config == trainer.model_config
    again = restored.predict(images)
    torch.testing.assert_close(again["pred_score"], output["pred_score"], rtol=1e-5, atol=1e-6)
    if anomaly_map is not None:
        torch.testing.assert_close(again["anomaly_map"], anomaly_map, rtol=1e-5, atol=1e-6)
    assert restored.normal_statistics == trainer.normal_statistics

    paths = [Path(p) for p in batch["path"][:2]]
    rows = predict_images(checkpoint, paths, tmp_path / "predictions", device="cpu")
    assert [row["path"] for row in rows] == [str(p) for p in paths]
    assert all(np.isfinite(row["score"]) and row["verdict"] in ("normal", "anomalous") for row in rows)
    assert all(row["threshold_name"] == trainer.normal_statistics.threshold_name for row in rows)
    # the files, read and transformed by predict, score as the loader's tensors did
    np.testing.assert_allclose([row["score"] for row in rows], output["pred_score"].numpy(), rtol=1e-4, atol=1e-6)
