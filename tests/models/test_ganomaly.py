import math
from pathlib import Path

import pytest
import torch
from torch import nn

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import auroc
from anomalyzoo.models.ganomaly import (
    DcganDecoder,
    DcganEncoder,
    GanomalyModel,
    GanomalyTrainer,
    adversarial_loss,
    contextual_loss,
    discriminator_loss,
    encoder_loss,
    latent_distance_score,
    pyramid_depth,
)
from anomalyzoo.models.components.trainer import read_checkpoint
from anomalyzoo.predict import load_trainer


def small_trainer(**options) -> GanomalyTrainer:
    return GanomalyTrainer(n_features=8, latent_vec_size=16, train_config={"img_size": 32, "batch_size": 4, "normalize": False, "progress": False},
                           device="cpu", **options)


def test_dcgan_networks_are_the_authors_at_32_px_and_grow_by_pyramid_layers_at_256():
    assert [pyramid_depth(size) for size in (16, 32, 64, 256)] == [1, 2, 3, 5]
    for size in (8, 48, 100):
        with pytest.raises(ValueError, match="power-of-two"):
            pyramid_depth(size)
    # lib/networks.py at isize 32, ngf 64: conv 3->64 (16x16), pyramid 64->128 (8x8), 128->256 (4x4), final 4x4 conv
    encoder = DcganEncoder(32, 100, 64)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (3, 64, 4, 2, 1), (64, 128, 4, 2, 1), (128, 256, 4, 2, 1), (256, 100, 4, 1, 0)]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in encoder.modules()) == 2  # none after the first conv
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 100, 1, 1)
    # at 256 px: five pyramid blocks, 2048 channels on the 4x4 grid; the decoder mirrors them
    wide = DcganEncoder(256, 256, 64)
    assert wide.feature_channels == 2048
    assert sum(isinstance(m, nn.Conv2d) for m in wide.modules()) == 1 + 5 + 1
    decoder = DcganDecoder(256, 256, 64)
    transposed = [m for m in decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert transposed[0].in_channels == 256 and transposed[0].out_channels == 2048 and len(transposed) == 1 + 5 + 1
    assert isinstance(list(decoder.layers)[-1], nn.Tanh)
    small = DcganDecoder(32, 16, 8)
    assert small(torch.randn(2, 16, 1, 1)).shape == (2, 3, 32, 32)


def test_discriminator_is_the_encoder_with_a_sigmoid_head_and_weights_follow_dcgan_init():
    torch.manual_seed(0)
    model = GanomalyModel(n_features=64, latent_vec_size=100, input_size=(32, 32))
    probability, features = model.discriminator(torch.rand(3, 3, 32, 32))
    assert probability.shape == (3,) and bool(((probability > 0) & (probability < 1)).all())
    assert features.shape == (3, 256, 4, 4)
    assert model.discriminator.encoder.final.out_channels == 1
    conv_weights = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(float(conv_weights.mean())) < 1e-3 and float(conv_weights.std()) == pytest.approx(0.02, rel=0.02)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    gammas = torch.cat([m.weight.detach() for m in norms])
    assert float(gammas.mean()) == pytest.approx(1.0, abs=0.01) and float(gammas.std()) == pytest.approx(0.02, rel=0.15)
    assert all(bool((m.bias == 0).all()) for m in norms)


def test_generator_loss_terms_on_hand_computed_cases():
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    fake = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    assert float(adversarial_loss(real, fake)) == pytest.approx(2.0)  # (0 + 4 + 0 + 4) / 4
    assert float(contextual_loss(real, fake)) == pytest.approx(1.0)  # (0 + 2 + 0 + 2) / 4
    assert float(encoder_loss(torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([[1.0, 1.0, 1.0]]))) == pytest.approx(5 / 3)
    # the total is w_adv L_adv + w_con L_con + w_enc L_enc with the authors' weights 1, 50, 1
    trainer = small_trainer()
    model = trainer.model.train()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # train mode: BatchNorm uses the batch statistics both times
        losses, reconstructions = trainer.generator_losses(images)
        again, latent, latent_hat = model.generator(images)
        _, real_features = model.discriminator(images)
        _, fake_features = model.discriminator(again)
    expected = (((real_features - fake_features) ** 2).mean() + 50 * (images - again).abs().mean()
                + ((latent - latent_hat) ** 2).mean())
    assert (trainer.w_adv, trainer.w_con, trainer.w_enc) == (1.0, 50.0, 1.0)
    assert float(losses["loss"]) == pytest.approx(float(expected), rel=1e-4)
    assert float(losses["loss"]) == pytest.approx(float(losses["loss_adv"] + 50 * losses["loss_con"] + losses["loss_enc"]), rel=1e-6)
    assert reconstructions.shape == images.shape


def test_discriminator_loss_is_half_the_sum_of_the_two_bce_terms():
    real = torch.tensor([0.8, 0.6])
    fake = torch.tensor([0.1, 0.3])
    expected = 0.5 * ((-math.log(0.8) - math.log(0.6)) / 2 + (-math.log(0.9) - math.log(0.7)) / 2)
    assert float(discriminator_loss(real, fake)) == pytest.approx(expected, rel=1e-6)
    assert float(discriminator_loss(torch.ones(3), torch.zeros(3))) == pytest.approx(0.0, abs=1e-6)


def test_score_is_the_mean_squared_latent_distance_on_the_authors_input_range():
    assert torch.allclose(latent_distance_score(torch.tensor([[0.0, 2.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])),
                          torch.tensor([2.5, 0.0]))
    model = small_trainer().model.eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        output = model(images)
        scaled = model.to_model_range(images)
        _, latent, latent_hat = model.generator(scaled)
    assert set(output) == {"pred_score"}  # image-level only: no anomaly map
    assert float(scaled.min()) >= -1 and float(scaled.max()) <= 1
    torch.testing.assert_close(scaled, images * 2 - 1)
    torch.testing.assert_close(output["pred_score"], ((latent - latent_hat) ** 2).mean(dim=1))


def test_discriminator_is_reinitialised_only_when_its_loss_collapses(monkeypatch):
    trainer = small_trainer()
    discriminator, generator = trainer.model.discriminator, trainer.model.generator
    before_d = {k: v.clone() for k, v in discriminator.state_dict().items()}
    before_g = {k: v.clone() for k, v in generator.state_dict().items()}
    assert trainer.reinitialize_discriminator_if_collapsed(1e-5) is False  # the rule is "< 1e-5"
    assert all(torch.equal(before_d[k], v) for k, v in discriminator.state_dict().items())
    assert trainer.run_notes() == {}
    assert trainer.reinitialize_discriminator_if_collapsed(9e-6) is True
    after_d = discriminator.state_dict()
    assert not torch.equal(before_d["encoder.final.weight"], after_d["encoder.final.weight"])
    assert all(torch.equal(before_g[k], v) for k, v in generator.state_dict().items())
    assert trainer.discriminator_reinitializations == 1 and "1" in trainer.run_notes()["discriminator_reinitializations"]
    # train_step applies the rule to the discriminator loss of the step
    seen: list[float] = []
    monkeypatch.setattr(trainer, "reinitialize_discriminator_if_collapsed", lambda loss: seen.append(loss) or False)
    logs = trainer.train_step({"image": torch.rand(4, 3, 32, 32)})
    assert seen == [pytest.approx(logs["loss_d"])]


def test_train_step_updates_generator_and_discriminator_with_their_own_adam(tmp_path):
    trainer = small_trainer()
    model = trainer.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = trainer.train_step({"image": torch.rand(4, 3, 32, 32)})
    assert set(logs) == {"loss", "loss_adv", "loss_con", "loss_enc", "loss_d"}
    generator_ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    discriminator_ids = {id(p) for group in trainer.discriminator_optimizer.param_groups for p in group["params"]}
    assert generator_ids == {id(p) for p in model.generator.parameters()}
    assert discriminator_ids == {id(p) for p in model.discriminator.parameters()}
    for optimizer in (trainer.optimizer, trainer.discriminator_optimizer):
        assert isinstance(optimizer, torch.optim.Adam)
        assert optimizer.defaults["lr"] == 2e-4 and optimizer.defaults["betas"] == (0.5, 0.999)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("generator.encoder1.") and k.endswith("weight") for k in changed)
    assert any(k.startswith("discriminator.") and k.endswith("weight") for k in changed)
    # both optimisers' states travel in the checkpoint (the discriminator's as extra state)
    trainer.discriminator_reinitializations = 2
    checkpoint = trainer.save_model(tmp_path / "model.pth")
    assert read_checkpoint(checkpoint)["extra_state"]["discriminator_optimizer_state"]["state"]
    restored = load_trainer(checkpoint, device="cpu")
    assert restored.discriminator_reinitializations == 2
    for original, loaded in ((trainer.optimizer, restored.optimizer), (trainer.discriminator_optimizer, restored.discriminator_optimizer)):
        for state, state_loaded in zip(original.state_dict()["state"].values(), loaded.state_dict()["state"].values()):
            assert torch.equal(state["exp_avg"], state_loaded["exp_avg"])
    # validation reports the generator loss on [-1, 1] inputs
    images = torch.rand(4, 3, 32, 32)
    restored.model.eval()
    with torch.no_grad():
        validation = restored.training_loss({"image": images})["loss"]
        expected = restored.generator_losses(images * 2 - 1)[0]["loss"]
    assert float(validation) == pytest.approx(float(expected), rel=1e-6)


def test_ganomaly_end_to_end_on_synthetic_texture(synthetic_dataset_dir, tmp_path):
    """The authors' 32 px networks (half as wide) separate the defective weaves after 20 epochs;
    GANomaly scores images only, so the run reports no pixel metrics."""
    result = train("mvtec", "synthetic_texture", "ganomaly", num_epochs=20, batch_size=4, img_size=32,
                   n_features=32, latent_vec_size=100, dataset_dir=synthetic_dataset_dir, output_dir=tmp_path,
                   max_maps=1, progress=False)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "fit_seconds")})
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] is None and result["pixel_aupro"] is None and result["anomaly_maps"] is False
    report = next(Path(result["output_dir"]).glob("results_*_thresholds.txt")).read_text()
    assert "makes no anomaly map" in report
    trainer = load_trainer(result["checkpoint"], device="cpu")
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=32, batch_size=4, dataset_dir=synthetic_dataset_dir,
                                     normalize=False)
    predictions = trainer.validation_epoch(test_loader)
    assert predictions.anomaly_maps is None
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
