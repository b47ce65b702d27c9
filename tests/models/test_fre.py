import pytest
import torch

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import auroc
from anomalyzoo.models.components.trainer import read_checkpoint
from anomalyzoo.models.fre import FreModel, FreTrainer, TiedAutoencoder
from anomalyzoo.predict import load_trainer


def test_tied_autoencoder_is_w_transpose_of_w_x():
    autoencoder = TiedAutoencoder(input_dim=6, latent_dim=2)
    with torch.no_grad():
        autoencoder.encoder_bias.copy_(torch.tensor([0.5, -1.0]))
        autoencoder.decoder_bias.copy_(torch.arange(6.0))
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    weight = autoencoder.weight.detach()
    expected = (x @ weight.T + autoencoder.encoder_bias.detach()) @ weight + autoencoder.decoder_bias.detach()
    assert torch.allclose(autoencoder(x), expected, atol=1e-6)
    assert sum(p.numel() for p in autoencoder.parameters()) == 6 * 2 + 2 + 6  # one tied matrix


def test_latent_dim_must_be_below_the_feature_dimension():
    with pytest.raises(ValueError, match="latent_dim"):
        TiedAutoencoder(input_dim=10, latent_dim=10)
    # EfficientNet-Lite0 layer3 at 64 px: 112 channels x (4x4 pooled by 2 -> 2x2) = 448 dimensions
    with pytest.raises(ValueError, match="latent_dim must be in 1..447"):
        FreModel("efficientnet_lite0", "layer3", (64, 64), pooling_kernel_size=2, latent_dim=448, pretrained=False)


@pytest.fixture(scope="module")
def small_model() -> FreModel:
    return FreModel("efficientnet_lite0", "layer3", (64, 64), pooling_kernel_size=2, latent_dim=20, pretrained=False).eval()


def test_scores_are_the_feature_reconstruction_error_of_a_projection(small_model):
    """With orthonormal rows Q and zero biases the autoencoder is the projection Q^T Q, so the
    FRE of x is ||x||^2 - ||Q x||^2, zero for features inside the subspace."""
    model = small_model
    assert model.feature_shape == (112, 2, 2) and model.autoencoder.input_dim == 448
    q, _ = torch.linalg.qr(torch.randn(448, 20, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        model.autoencoder.weight.copy_(q.T)
        model.autoencoder.encoder_bias.zero_()
        model.autoencoder.decoder_bias.zero_()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        output = model(images)
        x = model.pooled_features(images).flatten(1)
    expected_score = x.pow(2).sum(1) - (x @ q).pow(2).sum(1)
    assert torch.allclose(output["pred_score"], expected_score, rtol=1e-4)
    residual = (x - (x @ q) @ q.T).reshape(3, 112, 2, 2)
    pooled_map = residual.pow(2).sum(1)
    assert torch.allclose(output["pred_score"], pooled_map.sum((-2, -1)), rtol=1e-4)  # score = sum of the map
    assert output["anomaly_map"].shape == (3, 64, 64)
    # 64 px / 2x2 map: each pooled cell's value is reached at the centre of its 32x32 block
    assert torch.allclose(output["anomaly_map"][:, 16, 16], pooled_map[:, 0, 0], rtol=1e-2)
    # a feature vector inside the subspace reconstructs exactly: zero error
    inside = (x @ q) @ q.T
    assert torch.allclose(model.autoencoder(inside), inside, atol=1e-4)


def test_train_step_fits_the_autoencoder_and_never_the_backbone():
    trainer = FreTrainer(backbone="efficientnet_lite0", layer="layer3", latent_dim=20, pretrained=False,
                         train_config={"img_size": 64, "batch_size": 2}, device="cpu")
    backbone_before = {k: v.clone() for k, v in trainer.model.feature_extractor.state_dict().items()}
    weight_before = trainer.model.autoencoder.weight.detach().clone()
    trainer.model.train()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features, reconstruction = trainer.model.reconstruct(images)
    direct_loss = float(((features - reconstruction) ** 2).mean())
    logs = trainer.train_step({"image": images})
    assert logs["loss"] == pytest.approx(direct_loss, rel=1e-5)  # MSE over every feature of the batch
    backbone_after = trainer.model.feature_extractor.state_dict()
    assert all(torch.equal(backbone_before[k], backbone_after[k]) for k in backbone_before)
    assert not torch.equal(weight_before, trainer.model.autoencoder.weight)


def test_fre_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_texture", "fre", num_epochs=3, batch_size=8, img_size=128,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, backbone="efficientnet_lite0",
                   max_maps=1, progress=False)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds")})
    assert result["image_auroc"] >= 0.9
    checkpoint = read_checkpoint(result["checkpoint"])
    losses = [record["loss"] for record in checkpoint["history"]]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]  # the subspace is being learnt
    trainer = load_trainer(result["checkpoint"], device="cpu")
    assert trainer.model.autoencoder.input_dim == 112 * 4 * 4  # lite0 layer3 at 128 px, pooled by 2
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=128, batch_size=8, dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
    assert predictions.anomaly_maps.shape == (20, 128, 128)
