import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalyzoo import ModelRegistry, train
from anomalyzoo.data import DatasetError, get_dataloaders, move_labelled_anomalies
from anomalyzoo.metrics import auroc
from anomalyzoo.models.supersimplenet import (
    SupersimplenetTrainer,
    add_feature_anomalies,
    perlin_feature_mask,
    sigmoid_focal_loss,
    supersimplenet_losses,
    truncated_l1_loss,
)
from anomalyzoo.models.components.trainer import read_checkpoint
from anomalyzoo.predict import load_trainer


# ----------------------------------------------------------------------------- losses
def authors_focal_loss(probabilities: torch.Tensor, targets: torch.Tensor, gamma: float = 4.0) -> float:
    """common/loss.py, transcribed: BCE on probabilities times (1 - p_t)^gamma, mean."""
    ce = F.binary_cross_entropy(probabilities.double(), targets.double(), reduction="none")
    p_t = probabilities.double() * targets + (1 - probabilities.double()) * (1 - targets)
    return float((ce * (1 - p_t) ** gamma).mean())


def test_focal_loss_against_hand_computed_values():
    # logit 0 with target 1: p = 1/2, CE = ln 2, (1 - p_t)^4 = 1/16
    assert float(sigmoid_focal_loss(torch.tensor([0.0]), torch.tensor([1.0]))) == pytest.approx(math.log(2) / 16, rel=1e-6)
    # logit 2 with target 0: p = sigmoid(2), CE = -ln(1 - p), p_t = 1 - p, weight p^4
    p = 1 / (1 + math.exp(-2))
    assert float(sigmoid_focal_loss(torch.tensor([2.0]), torch.tensor([0.0]))) == pytest.approx(-math.log(1 - p) * p ** 4, rel=1e-6)
    logits = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    targets = (torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    assert float(sigmoid_focal_loss(logits, targets)) == pytest.approx(authors_focal_loss(torch.sigmoid(logits), targets), rel=1e-5)


def test_truncated_l1_against_hand_computed_values():
    # normal positions: relu(m + 0.5) -> 0.5 + 1.5 + 0 = 2, mean 2/3; anomalous: relu(0.5 - m) -> 0.5 + 0 -> mean 0.25
    logits = torch.tensor([0.0, 1.0, -2.0, 0.0, 3.0])
    masks = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    assert float(truncated_l1_loss(logits, masks)) == pytest.approx(2 / 3 + 0.25)
    # no anomalous position: that term is 0, not NaN
    assert float(truncated_l1_loss(torch.tensor([-1.0, 0.5]), torch.zeros(2))) == pytest.approx(0.5)
    losses = supersimplenet_losses(logits.view(1, 1, 1, 5), torch.tensor([0.0]), masks.view(1, 1, 1, 5), torch.tensor([1.0]))
    assert float(losses["loss"]) == pytest.approx(float(losses["loss_trunc_l1"] + losses["loss_focal_map"] + losses["loss_focal_score"]))


# ----------------------------------------------------------------------------- synthesis
def test_perlin_masks_are_binary_and_half_of_them_empty():
    torch.manual_seed(0)
    masks = torch.stack([perlin_feature_mask(16, 24, threshold=0.2) for _ in range(200)])
    assert masks.shape == (200, 1, 16, 24)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    empty = (masks.flatten(1).sum(1) == 0).float().mean()
    assert 0.4 < float(empty) < 0.65  # 1/2 emptied by the coin, a few more where no noise exceeds 0.2


def test_noise_is_added_only_inside_the_masks_and_the_targets_follow():
    torch.manual_seed(1)
    features = torch.randn(3, 8, 16, 16)
    real_masks = torch.zeros(3, 1, 16, 16)
    real_masks[1, :, 2:6, 2:6] = 1.0  # image 1 has a real defect
    labels = torch.tensor([0, 1, 0])
    for overlap in (True, False):
        synthetic = add_feature_anomalies(features, real_masks, labels, perlin_threshold=0.2, noise_std=0.015, overlap=overlap)
        assert synthetic.features.shape == (6, 8, 16, 16) and synthetic.masks.shape == (6, 1, 16, 16)
        changed = (synthetic.features != torch.cat((features, features))).any(dim=1, keepdim=True)
        assert not (changed & (synthetic.masks == 0)).any()  # noise never outside the target mask
        assert (synthetic.masks >= torch.cat((real_masks, real_masks))).all()  # real defects stay in the target
        assert torch.equal(synthetic.labels, (synthetic.masks.flatten(1).amax(1) > 0).float())
        assert synthetic.labels[1] == 1 and synthetic.labels[4] == 1
        if not overlap:  # run_sup: no noise on a real defect
            assert not changed[torch.cat((real_masks, real_masks)).bool()].any()
        noise = (synthetic.features - torch.cat((features, features)))[changed.expand_as(synthetic.features)]
        assert noise.std() == pytest.approx(0.015, rel=0.1)


# ----------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def trainer() -> SupersimplenetTrainer:
    torch.manual_seed(0)
    return SupersimplenetTrainer(backbone="resnet18", pretrained=False, train_config={"img_size": 64, "num_epochs": 50}, device="cpu")


def test_features_are_upscaled_to_twice_layer2_and_averaged(trainer):
    model = trainer.model.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        raw = model.feature_extractor(images)
        expected = torch.cat([F.interpolate(raw[layer], size=(16, 16), mode="bilinear", align_corners=True)
                              for layer in ("layer2", "layer3")], dim=1)
        expected = F.avg_pool2d(expected, 3, 1, 1)
        features = model.upscaled_features(images)
        output = model(images)
        map_logits, score_logits = model.segdec(model.adaptor(expected))
    assert features.shape == (2, 128 + 256, 16, 16)  # resnet18 layer2 (stride 8) doubled: stride 4
    torch.testing.assert_close(features, expected)
    assert output["anomaly_map"].shape == (2, 64, 64)
    torch.testing.assert_close(output["pred_score"], torch.sigmoid(score_logits))  # the classification head's score
    upsampled = F.interpolate(map_logits, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(output["anomaly_map"], model.blur(upsampled)[:, 0], atol=1e-6)


def test_optimiser_groups_and_schedule_follow_the_authors(trainer):
    trainer.train_loader = None
    optimizer, scheduler = trainer.configure_optimizers()
    groups = [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups]
    assert groups == [(1e-4, 0.01), (2e-4, 1e-5), (2e-4, 1e-5)]
    assert sorted(scheduler.milestones.elements()) == [40, 45] and scheduler.gamma == 0.4
    heads = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert heads == {id(p) for name, p in trainer.model.named_parameters() if not name.startswith("feature_extractor")}


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_grad_cuts_the_classification_loss_from_the_segmentation_head(stop_grad):
    torch.manual_seed(3)
    model = SupersimplenetTrainer(backbone="resnet18", pretrained=False, stop_grad=stop_grad,
                                  train_config={"img_size": 64}, device="cpu").model.train()
    images = torch.randn(2, 3, 64, 64)
    map_logits, score_logits, synthetic = model.training_outputs(images, torch.zeros(2, 64, 64), torch.zeros(2))
    sigmoid_focal_loss(score_logits, synthetic.labels).backward()
    seg_gradient = sum(float(p.grad.abs().sum()) for p in model.segdec.seg_head.parameters() if p.grad is not None)
    assert (seg_gradient == 0.0) == stop_grad


def test_supervised_row_is_the_authors_supervised_configuration():
    config = ModelRegistry.get_model_config("supersimplenet-supervised")
    assert config["stop_grad"] is False and config["overlap"] is False
    assert config["labelled_anomaly_fraction"] == 0.5 and config["max_grad_norm"] == 1.0
    unsupervised = ModelRegistry.get_model_config("supersimplenet")
    assert unsupervised["stop_grad"] is True and unsupervised["labelled_anomaly_fraction"] == 0.0
    trainer = ModelRegistry.get_trainer("supersimplenet-supervised", {"backbone": "resnet18", "pretrained": False},
                                        {"img_size": 64}, device="cpu")
    assert trainer.train_config.gradient_clip_norm == 1.0


# ----------------------------------------------------------------------------- supervised protocol
def test_labelled_anomalies_move_per_defect_type_seeded(synthetic_dataset_dir):
    train_loader, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=32, batch_size=4,
                                                dataset_dir=synthetic_dataset_dir, seed=0)
    samples = test_loader.dataset.samples
    new_train, new_test, note = move_labelled_anomalies(train_loader, test_loader, 0.5, seed=7)
    kept = {samples[i].image_path for i in new_test.dataset.indices}
    moved = [new_train.dataset.datasets[1][i] for i in range(len(new_train.dataset.datasets[1]))]
    moved_paths = {item["path"] for item in moved}
    assert not kept & {str(p) for p in moved_paths} and not {str(p) for p in kept} & moved_paths
    assert len(kept) + len(moved_paths) == len(samples)
    assert all(item["label"] == 1 and item["mask"].sum() > 0 for item in moved)  # with their masks
    assert all(s.image_path in kept for s in samples if s.label == 0)  # every normal test image stays
    for defect_type in {s.defect_type for s in samples if s.label == 1}:
        total = sum(1 for s in samples if s.defect_type == defect_type)
        assert sum(1 for item in moved if item["defect_type"] == defect_type) == int(0.5 * total)
    assert len(new_train.dataset) == len(train_loader.dataset) + len(moved)
    assert "metrics are on the remaining" in note
    again = move_labelled_anomalies(train_loader, test_loader, 0.5, seed=7)[1].dataset.indices
    other = move_labelled_anomalies(train_loader, test_loader, 0.5, seed=8)[1].dataset.indices
    assert again == new_test.dataset.indices and other != new_test.dataset.indices


def test_supervision_needs_masks(synthetic_dataset_dir):
    train_loader, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=32, batch_size=4,
                                                dataset_dir=synthetic_dataset_dir, seed=0)
    test_loader.dataset.has_masks = False
    with pytest.raises(DatasetError, match="needs pixel masks"):
        move_labelled_anomalies(train_loader, test_loader, 0.5, seed=0)


def test_supervision_helps_where_the_unsupervised_model_is_weak(synthetic_dataset_dir, lite0_weights):
    """A short schedule on the synthetic texture: the classification head trained only on
    feature noise has not learnt the real defects (its image AUROC is near chance or inverted),
    while the same network, steps and seed with half of each defect type labelled separates the
    remaining test images. Both are scored on exactly the same remaining images."""
    train_loader, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=4,
                                                dataset_dir=synthetic_dataset_dir, seed=0)
    supervised_train, remaining_test, _ = move_labelled_anomalies(train_loader, test_loader, 0.5, seed=0)
    results = {}
    for name, loader in (("supersimplenet", train_loader), ("supersimplenet-supervised", supervised_train)):
        torch.manual_seed(0)
        trainer = ModelRegistry.get_trainer(name, {"backbone": "efficientnet_lite0"},
                                            {"img_size": 64, "batch_size": 4, "num_epochs": 4, "progress": False}, device="cpu")
        trainer.fit(loader)
        predictions = trainer.validation_epoch(remaining_test)
        results[name] = (auroc(predictions.labels, predictions.scores),
                         auroc(predictions.masks.reshape(-1), predictions.anomaly_maps.reshape(-1)))
    print(results)
    unsupervised, supervised = results["supersimplenet"], results["supersimplenet-supervised"]
    assert unsupervised[0] < 0.7  # the premise: unsupervised, this schedule is weak
    assert supervised[0] >= 0.9 and supervised[0] >= unsupervised[0] + 0.3


# ----------------------------------------------------------------------------- end to end
def test_supersimplenet_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    """A short unsupervised run learns what it is trained on and finds the real defects.

    The paper's noise (sigma 0.015) is sized for WideResNet-50 features; EfficientNet-Lite0's
    upscaled features here have a standard deviation near 5, and the heads need hundreds of
    steps to find a 0.3 % perturbation (test_supervision_helps... relies on that weakness). So that
    20 steps suffice, this run uses noise of the features' own scale (``noise_std=5``): the
    segmentation map must then find fresh feature-space anomalies on held-out normal images, the
    classification score the noised images, and the score the real defective images. The
    checkpoint reproduces the scores."""
    result = train("mvtec", "synthetic_object", "supersimplenet", num_epochs=4, batch_size=4, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, backbone="efficientnet_lite0",
                   max_maps=1, progress=False, noise_std=5.0)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds")})
    assert result["image_auroc"] >= 0.8
    trainer = load_trainer(result["checkpoint"], device="cpu")
    _, test_loader = get_dataloaders("mvtec", "synthetic_object", img_size=64, batch_size=4, dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
    assert np.all((predictions.scores > 0) & (predictions.scores < 1))

    normal_images = torch.stack([item["image"] for item in test_loader.dataset if item["label"] == 0])
    model = trainer.model.eval()
    torch.manual_seed(123)
    with torch.no_grad():
        adapted = model.adapted_features(normal_images)
        synthetic = add_feature_anomalies(adapted, torch.zeros(len(adapted), 1, *adapted.shape[-2:]),
                                          torch.zeros(len(adapted)), model.perlin_threshold, model.noise_std)
        map_logits, score_logits = model.segdec(synthetic.features)
    assert 0 < synthetic.labels.mean() < 1
    assert auroc(synthetic.masks.flatten().numpy(), map_logits.flatten().numpy()) >= 0.85
    assert auroc(synthetic.labels.numpy(), score_logits.numpy()) >= 0.9


def test_supervised_run_reports_its_protocol(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_texture", "supersimplenet-supervised", num_epochs=4, batch_size=4, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, backbone="efficientnet_lite0",
                   max_maps=1, progress=False)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds")})
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=4, dataset_dir=synthetic_dataset_dir)
    num_defective = int(test_loader.dataset.labels.sum())
    assert result["num_test_images"] < len(test_loader.dataset)
    assert len(test_loader.dataset) - result["num_test_images"] == sum(
        int(0.5 * n) for n in np.unique([s.defect_type for s in test_loader.dataset.samples if s.label == 1], return_counts=True)[1])
    assert num_defective > 0 and "labelled_anomalies" in result["notes"]
    results_text = next(tmp_path.rglob("results_*_thresholds.txt")).read_text()
    assert "supervised protocol" in results_text
    assert result["image_auroc"] >= 0.9


class StopAfterTwoEpochs(Exception):
    pass


def test_a_resumed_supervised_run_ends_like_an_uninterrupted_one(synthetic_dataset_dir, tmp_path, monkeypatch):
    """The labelled defects, the Perlin masks and the noise are all seeded: a supervised run
    stopped after epoch 1's checkpoint and resumed trains on the same images and ends identically."""
    tiny = dict(backbone="resnet18", pretrained=False, img_size=64, batch_size=8, num_epochs=2, progress=False, max_maps=0)
    whole = train("mvtec", "synthetic_texture", "supersimplenet-supervised", dataset_dir=synthetic_dataset_dir,
                  output_dir=tmp_path / "whole", **tiny)
    original_hook = SupersimplenetTrainer.on_epoch_end

    def stop_after_two(self, epoch, record):
        original_hook(self, epoch, record)
        if self.epoch == 2:
            raise StopAfterTwoEpochs

    monkeypatch.setattr(SupersimplenetTrainer, "on_epoch_end", stop_after_two)
    with pytest.raises(StopAfterTwoEpochs):
        train("mvtec", "synthetic_texture", "supersimplenet-supervised", dataset_dir=synthetic_dataset_dir,
              output_dir=tmp_path / "split", **tiny)
    monkeypatch.setattr(SupersimplenetTrainer, "on_epoch_end", original_hook)
    resumed = train("mvtec", "synthetic_texture", "supersimplenet-supervised", dataset_dir=synthetic_dataset_dir,
                    output_dir=tmp_path / "split", resume=True, **tiny)
    assert resumed["num_test_images"] == whole["num_test_images"]
    assert resumed["image_auroc"] == whole["image_auroc"] and resumed["pixel_auroc"] == whole["pixel_auroc"]
    whole_state = read_checkpoint(whole["checkpoint"])["model_state"]
    resumed_state = read_checkpoint(resumed["checkpoint"])["model_state"]
    assert all(torch.equal(value, resumed_state[key]) for key, value in whole_state.items())
