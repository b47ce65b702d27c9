"""DRAEM (models/draem.py): the losses against naive transcriptions of the authors' loss.py,
the architecture's wiring, the scoring of test_DRAEM.py, the optimiser schedule, the anomaly
sources, and one synthetic end-to-end run without DTD (the fallback and its notice)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.models.components.perlin import SyntheticAnomalies
from anomalyzoo.models.components.ssim import ssim
from anomalyzoo.models.components.sspcab import SSPCAB
from anomalyzoo.models.draem import DraemModel, DraemTrainer, draem_losses, focal_loss
from anomalyzoo.predict import load_trainer

TINY = {"reconstructive_width": 8, "discriminative_width": 8}


def authors_focal_loss(probabilities: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> float:
    """loss.py FocalLoss() (apply_nonlin None, alpha None, balance_index 0, size_average True),
    one flattened pixel at a time."""
    num_classes = probabilities.shape[1]
    rows = probabilities.permute(0, 2, 3, 1).reshape(-1, num_classes).tolist()
    targets = masks.reshape(-1).long().tolist()
    total = 0.0
    for row, target in zip(rows, targets):
        one_hot = [1.0 if c == target else 0.0 for c in range(num_classes)]
        one_hot = [min(max(v, smooth / (num_classes - 1)), 1.0 - smooth) for v in one_hot]
        pt = sum(k * p for k, p in zip(one_hot, row)) + smooth
        alpha = 1.0  # alpha=None -> torch.ones(num_class, 1)
        total += -alpha * (1 - pt) ** gamma * math.log(pt)
    return total / len(rows)


def test_focal_loss_matches_the_authors_focal_loss():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(torch.randn(2, 2, 5, 6, generator=generator) * 3, dim=1)
    masks = (torch.rand(2, 1, 5, 6, generator=generator) > 0.7).float()
    assert float(focal_loss(probabilities, masks)) == pytest.approx(authors_focal_loss(probabilities, masks), rel=1e-5)


def test_focal_loss_by_hand():
    """p = 0.5 for both classes: p_t = (1e-5 * 0.5 + (1 - 1e-5) * 0.5) + 1e-5 = 0.5 + 1e-5."""
    probabilities = torch.full((1, 2, 2, 2), 0.5, dtype=torch.float64)
    masks = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]], dtype=torch.float64)
    p_t = 0.5 + 1e-5
    assert float(focal_loss(probabilities, masks)) == pytest.approx(-(1 - p_t) ** 2 * math.log(p_t), rel=1e-12)


def test_total_loss_is_l2_plus_ssim_plus_focal():
    generator = torch.Generator().manual_seed(1)
    targets, reconstruction = torch.rand(2, 3, 32, 32, generator=generator), torch.rand(2, 3, 32, 32, generator=generator)
    logits = torch.randn(2, 2, 32, 32, generator=generator)
    masks = (torch.rand(2, 1, 32, 32, generator=generator) > 0.8).float()
    losses = draem_losses(targets, reconstruction, masks, logits)
    l2 = ((reconstruction - targets) ** 2).mean()
    ssim_term = 1 - ssim(reconstruction, targets)  # the reconstruction is img1, as in train_DRAEM.py
    focal = authors_focal_loss(torch.softmax(logits, dim=1), masks)
    assert float(losses["loss_l2"]) == pytest.approx(float(l2), rel=1e-6)
    assert float(losses["loss_ssim"]) == pytest.approx(float(ssim_term), rel=1e-6)
    assert float(losses["loss_focal"]) == pytest.approx(focal, rel=1e-5)
    assert float(losses["loss"]) == pytest.approx(float(l2 + ssim_term) + focal, rel=1e-5)


def fixed_synthesis(trainer: DraemTrainer, size: int = 32) -> SyntheticAnomalies:
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, size, size, generator=generator)
    masks = torch.zeros(2, 1, size, size)
    masks[0, :, 8:16, 4:20] = 1
    synthetic = SyntheticAnomalies(images, images * (1 - masks) + masks * 0.9, masks)
    trainer.synthesize = lambda batch: synthetic  # type: ignore[method-assign]
    return synthetic


def test_sspcab_adds_lambda_times_the_mse_of_block5():
    torch.manual_seed(0)
    trainer = DraemTrainer(sspcab=True, **TINY, train_config={"img_size": 32}, device="cpu")
    synthetic = fixed_synthesis(trainer)
    losses = trainer.training_loss({"image": synthetic.images})
    outputs = trainer.model.segment(synthetic.augmented)  # train mode: same batch statistics, same outputs
    expected_sspcab = F.mse_loss(outputs.bottleneck_output, outputs.bottleneck_input)
    base = draem_losses(synthetic.images, outputs.reconstruction, synthetic.masks, outputs.logits)["loss"]
    losses = {key: value.detach() for key, value in losses.items()}
    assert float(losses["loss_sspcab"]) == pytest.approx(float(expected_sspcab.detach()), rel=1e-5)
    assert float(losses["loss"]) == pytest.approx(float((base + 0.1 * expected_sspcab).detach()), rel=1e-5)
    plain = DraemTrainer(sspcab=False, **TINY, train_config={"img_size": 32}, device="cpu")
    fixed_synthesis(plain)
    assert "loss_sspcab" not in plain.training_loss({"image": synthetic.images})


def test_architecture_wiring():
    model = DraemModel(sspcab=True, reconstructive_width=8, discriminative_width=4)
    assert isinstance(model.reconstructive.encoder.block5, SSPCAB)  # anomalib's choice: block5 of the encoder
    assert not isinstance(DraemModel(**TINY).reconstructive.encoder.block5, SSPCAB)
    assert model.reconstructive.encoder.block1[0].out_channels == 8
    assert model.discriminative.encoder_segment.block1[0].in_channels == 6
    assert model.discriminative.decoder_segment.fin_out[0].out_channels == 2
    seen = {}
    model.discriminative.register_forward_hook(lambda module, inputs, output: seen.update(input=inputs[0]))
    images = torch.rand(2, 3, 64, 32)
    outputs = model.segment(images)
    assert outputs.reconstruction.shape == (2, 3, 64, 32) and outputs.logits.shape == (2, 2, 64, 32)
    assert outputs.bottleneck_input.shape == outputs.bottleneck_output.shape == (2, 64, 4, 2)
    torch.testing.assert_close(seen["input"], torch.cat((outputs.reconstruction, images), dim=1))  # authors' order
    assert model.discriminative.encoder_segment.block6[0].out_channels == 4 * 8
    defaults = inspect.signature(DraemModel.__init__).parameters  # the authors' widths
    assert defaults["reconstructive_width"].default == 128 and defaults["discriminative_width"].default == 64


def test_initialisation_follows_weights_init():
    torch.manual_seed(0)
    model = DraemModel(reconstructive_width=16, discriminative_width=16)
    weights = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    assert float(weights.mean()) == pytest.approx(0.0, abs=1e-3) and float(weights.std()) == pytest.approx(0.02, rel=0.02)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert float(torch.cat([m.weight.detach() for m in norms]).std()) == pytest.approx(0.02, rel=0.1)
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in norms)


def test_scoring_is_the_softmax_map_and_the_max_of_its_21x21_mean():
    torch.manual_seed(0)
    model = DraemModel(**TINY).eval()
    images = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        logits = model.segment(images).logits
        output = model(images)
    expected_map = logits.exp()[:, 1] / logits.exp().sum(dim=1)
    torch.testing.assert_close(output["anomaly_map"], expected_map, rtol=1e-5, atol=1e-6)
    maps = expected_map.numpy().astype(np.float64)
    padded = np.pad(maps, ((0, 0), (10, 10), (10, 10)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (21, 21), axis=(1, 2))
    expected_score = (windows.sum(axis=(-2, -1)) / 441).max(axis=(1, 2))  # zeros outside count (avg_pool2d)
    np.testing.assert_allclose(output["pred_score"].numpy(), expected_score, rtol=1e-5)
    # the image score is not the raw maximum (anomalib's choice)
    assert not torch.allclose(output["pred_score"], output["anomaly_map"].amax(dim=(-2, -1)))


def test_normalized_inputs_are_brought_back_to_unit_range():
    torch.manual_seed(0)
    unit = DraemModel(**TINY).eval()
    normalized = DraemModel(**TINY, input_normalized=True).eval()
    normalized.load_state_dict(unit.state_dict())
    images = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normalized((images - mean) / std)["anomaly_map"], unit(images)["anomaly_map"],
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 32"):
        unit(torch.rand(1, 3, 48, 40))


@pytest.mark.parametrize("epochs, expected", [
    (10, {0: 1.0, 7: 1.0, 8: 0.2, 9: 0.04}),  # train_DRAEM.py: MultiStepLR([8.0, 9.0], gamma=0.2)
    (700, {559: 1.0, 560: 0.2, 629: 0.2, 630: 0.04}),
    (5, {3: 1.0, 4: 0.2, 5: 0.04}),  # 4.0 and 4.5 -> 5: like the authors' float 4.5, it never fires within 5 epochs
])
def test_learning_rate_drops_at_80_and_90_percent_of_the_epochs(epochs, expected):
    trainer = DraemTrainer(**TINY, train_config={"num_epochs": epochs, "img_size": 32}, device="cpu")
    assert {epoch: pytest.approx(trainer.lr_factor(epoch)) for epoch in expected} == expected


def test_schedule_follows_the_length_of_the_fit():
    trainer = DraemTrainer(**TINY, train_config={"num_epochs": 100, "img_size": 32}, device="cpu")
    trainer.train_loader, trainer.total_steps = [None] * 3, 30  # this fit: 10 epochs of 3 steps (e.g. num_steps=30)
    assert [trainer.lr_factor(epoch) for epoch in (7, 8, 9)] == pytest.approx([1.0, 0.2, 0.04])


def test_adam_over_both_sub_networks_at_1e_4():
    trainer = DraemTrainer(**TINY, train_config={"img_size": 32}, device="cpu")
    optimizer, scheduler = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and all(group["lr"] == 1e-4 for group in optimizer.param_groups)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.model.parameters()}


def test_dtd_textures_are_used_when_the_folder_exists(tmp_path):
    for texture in ("banded", "dotted"):
        folder = tmp_path / "dtd" / "images" / texture
        folder.mkdir(parents=True)
        Image.fromarray(np.full((48, 40, 3), 255, dtype=np.uint8)).save(folder / f"{texture}_0001.jpg")
    trainer = DraemTrainer(**TINY, train_config={"img_size": 32, "batch_size": 4}, device="cpu")
    trainer.dataset_dir = tmp_path
    trainer.start_texture_source()
    assert trainer.run_notes()["anomaly_source"].startswith("dtd: 2 texture images")
    textures = trainer.anomaly_sources(torch.zeros(4, 3, 32, 32))  # more images than textures: batches are chained
    assert textures.shape == (4, 3, 32, 32) and float(textures.min()) > 0.99
    # the folder can also be named directly, and the checkpoint (plain types only) keeps it
    by_option = DraemTrainer(texture_dir=tmp_path / "dtd" / "images", **TINY, train_config={"img_size": 32}, device="cpu")
    restored = load_trainer(by_option.save_model(tmp_path / "model.pth"), device="cpu")
    assert restored.texture_folder() == by_option.texture_folder() == tmp_path / "dtd" / "images"


def test_end_to_end_without_dtd_uses_the_fallback_finds_the_defects_and_scores_consistently(synthetic_dataset_dir, tmp_path):
    """200 steps at 32 px: over six seeds image AUROC 0.98-1.0 and pixel AUROC 0.92-0.96."""
    result = train("mvtec", "synthetic_texture", "draem", num_steps=200, batch_size=8, img_size=32,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, max_maps=1, progress=False, **TINY)
    notice = result["notes"]["anomaly_source"]
    assert notice.startswith("fallback: no texture images under") and "crops of other training images" in notice
    results_text = next((tmp_path / "mvtec" / "synthetic_texture" / "draem").rglob("results_*_thresholds.txt")).read_text()
    assert "fallback: no texture images under" in results_text
    assert result["image_auroc"] >= 0.9 and result["pixel_auroc"] >= 0.85, (result["image_auroc"], result["pixel_auroc"])
    assert result["num_steps"] == 200
    # the checkpoint scores the test set again exactly, and every score is the pooled maximum of its map
    trainer = load_trainer(result["checkpoint"], device="cpu")
    assert trainer.model_config["sspcab"] is True  # the registry row
    losses = [record["loss"] for record in trainer.history]
    assert losses[-1] < losses[0], losses  # the objective falls from the first epoch on
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=32, batch_size=8, normalize=False,
                                     dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    maps = torch.from_numpy(predictions.anomaly_maps)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    np.testing.assert_allclose(predictions.scores, DraemModel.image_score(maps).numpy(), rtol=1e-5, atol=1e-7)
    from anomalyzoo.metrics.roc import auroc
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
