import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import auroc
from anomalyzoo.models.autoencoder import (
    AutoencoderModel,
    AutoencoderTrainer,
    ConvAutoencoder,
    encoder_layers,
    reconstruction_error_map,
    reconstruction_loss,
)
from anomalyzoo.models.components.ssim import ssim
from anomalyzoo.predict import load_trainer

# Table 1 of Bergmann et al. (VISAPP 2019) for a 128 px input and d = 100:
# (in channels, out channels, kernel, stride, padding), Conv1 .. Conv9
TABLE_1 = [(3, 32, 4, 2, 1), (32, 32, 4, 2, 1), (32, 32, 3, 1, 1), (32, 64, 4, 2, 1), (64, 64, 3, 1, 1),
           (64, 128, 4, 2, 1), (128, 64, 3, 1, 1), (64, 32, 3, 1, 1), (32, 100, 8, 1, 0)]


def naive_ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 8 of the AE-SSIM paper pixel by pixel for one channel (H, W): Gaussian-weighted local
    means, variances and covariance over an 11x11 window (sigma 1.5, zeros outside the image),
    C1 = 0.01^2, C2 = 0.03^2 for the [0, 1] range."""
    size, sigma, half = 11, 1.5, 5
    weights = [[math.exp(-((i - half) ** 2 + (j - half) ** 2) / (2 * sigma ** 2)) for j in range(size)] for i in range(size)]
    total = sum(map(sum, weights))
    height, width = x.shape
    out = torch.zeros(height, width, dtype=torch.float64)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    for row in range(height):
        for col in range(width):
            mx = my = mxx = myy = mxy = 0.0
            for i in range(size):
                for j in range(size):
                    r, c = row + i - half, col + j - half
                    if 0 <= r < height and 0 <= c < width:
                        w = weights[i][j] / total
                        a, b = float(x[r, c]), float(y[r, c])
                        mx, my, mxx, myy, mxy = mx + w * a, my + w * b, mxx + w * a * a, myy + w * b * b, mxy + w * a * b
            vx, vy, cov = mxx - mx * mx, myy - my * my, mxy - mx * my
            out[row, col] = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return out


def test_encoder_is_table_1_at_128_px_with_one_more_stride_2_layer_per_doubling():
    assert encoder_layers(128, 100) == TABLE_1
    assert encoder_layers(256, 100) == [(3, 32, 4, 2, 1)] + [(32, 32, 4, 2, 1)] + TABLE_1[1:]
    assert encoder_layers(64, 100) == [(3, 32, 4, 2, 1)] + TABLE_1[2:]
    assert encoder_layers(224, 100)[-1] == (32, 100, 14, 1, 0)  # 224 = 14 * 2^4: a 14x14 bottleneck grid
    for size in (48, 100):
        with pytest.raises(ValueError, match="divisible by 8 and at least 64"):
            encoder_layers(size, 100)


@pytest.mark.parametrize("size", [64, 256])
def test_autoencoder_shapes_activations_and_mirrored_decoder(size):
    network = ConvAutoencoder(size, latent_dim=128)
    images = torch.rand(2, 3, size, size)
    latent = network.encoder(images)
    assert latent.shape == (2, 128, 1, 1)
    assert network(images).shape == images.shape
    for part in (network.encoder, network.decoder):
        layers = list(part)
        assert isinstance(layers[-1], (nn.Conv2d, nn.ConvTranspose2d))  # linear output layers
        assert all(isinstance(layer, nn.LeakyReLU) and layer.negative_slope == 0.2 for layer in layers[1::2])
        assert not any(isinstance(layer, (nn.BatchNorm2d, nn.Dropout)) for layer in layers)
    # the decoder mirrors the encoder: stride-2 and valid layers become transposed convolutions
    encoder_convs = [layer for layer in network.encoder if not isinstance(layer, nn.LeakyReLU)]
    decoder_convs = [layer for layer in network.decoder if not isinstance(layer, nn.LeakyReLU)]
    for encoder_conv, decoder_conv in zip(reversed(encoder_convs), decoder_convs):
        assert (decoder_conv.in_channels, decoder_conv.out_channels) == (encoder_conv.out_channels, encoder_conv.in_channels)
        assert decoder_conv.kernel_size == encoder_conv.kernel_size and decoder_conv.stride == encoder_conv.stride
        shrinks = encoder_conv.stride[0] > 1 or encoder_conv.padding[0] == 0
        assert isinstance(decoder_conv, nn.ConvTranspose2d) == shrinks


def test_anomaly_map_is_squared_error_plus_one_minus_ssim_against_a_naive_transcription():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 13, 12, generator=generator, dtype=torch.float64)
    reconstructions = (images + 0.2 * torch.randn(1, 3, 13, 12, generator=generator, dtype=torch.float64)).clamp(0, 1)
    squared = ((images - reconstructions) ** 2).mean(dim=1)[0]
    ssim_mean = torch.stack([naive_ssim_map(images[0, c], reconstructions[0, c]) for c in range(3)]).mean(dim=0)
    expected = squared + (1 - ssim_mean)
    anomaly_map = reconstruction_error_map(images, reconstructions)
    assert anomaly_map.shape == (1, 13, 12)
    torch.testing.assert_close(anomaly_map[0], expected, rtol=1e-9, atol=1e-9)
    # a perfect reconstruction scores zero everywhere
    assert torch.allclose(reconstruction_error_map(images, images), torch.zeros(1, 13, 12, dtype=torch.float64), atol=1e-12)


def test_loss_is_mse_plus_one_minus_ssim_and_the_mean_of_the_map():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 24, 24, generator=generator, dtype=torch.float64)
    reconstructions = torch.rand(3, 3, 24, 24, generator=generator, dtype=torch.float64)
    losses = reconstruction_loss(images, reconstructions)
    assert float(losses["loss_mse"]) == pytest.approx(float(F.mse_loss(reconstructions, images)), rel=1e-12)
    assert float(losses["loss_ssim"]) == pytest.approx(1 - float(ssim(images, reconstructions, val_range=1.0)), rel=1e-12)
    assert float(losses["loss"]) == pytest.approx(float(losses["loss_mse"] + losses["loss_ssim"]), rel=1e-12)
    assert float(losses["loss"]) == pytest.approx(float(reconstruction_error_map(images, reconstructions).mean()), rel=1e-12)


def test_forward_scores_the_map_maximum_and_undoes_imagenet_normalisation():
    torch.manual_seed(0)
    raw = AutoencoderModel(latent_dim=16, input_size=(64, 64), input_normalized=False).eval()
    normalized = AutoencoderModel(latent_dim=16, input_size=(64, 64), input_normalized=True).eval()
    normalized.load_state_dict(raw.state_dict())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        output = raw(images)
        inputs, reconstructions = raw.reconstruct(images)
        mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        again = normalized((images - mean) / std)
    torch.testing.assert_close(output["anomaly_map"], reconstruction_error_map(inputs, reconstructions))
    torch.testing.assert_close(output["pred_score"], output["anomaly_map"].amax(dim=(-2, -1)))
    torch.testing.assert_close(again["anomaly_map"], output["anomaly_map"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        AutoencoderModel(input_size=(64, 128))


def test_optimiser_is_the_papers_adam():
    trainer = AutoencoderTrainer(latent_dim=16, train_config={"img_size": 64}, device="cpu")
    trainer.setup_optimization()
    optimizer = trainer.optimizer
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 2e-4 and optimizer.defaults["weight_decay"] == 1e-5
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in trainer.model.parameters()}
    assert trainer.scheduler is None


def test_autoencoder_end_to_end_on_synthetic_texture(synthetic_dataset_dir, tmp_path):
    """Twelve epochs at 64 px (132 steps of two images) reconstruct the weave well enough that
    every defect stands out; fewer than ~10 epochs do not (the score is still noise then)."""
    result = train("mvtec", "synthetic_texture", "autoencoder", num_epochs=12, batch_size=2, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, max_maps=1, progress=False)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds")})
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
    trainer = load_trainer(result["checkpoint"], device="cpu")
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=4, dataset_dir=synthetic_dataset_dir,
                                     normalize=False)
    predictions = trainer.validation_epoch(test_loader)
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
    # the map is higher on the defect than around it
    anomalous = predictions.labels == 1
    maps, masks = predictions.anomaly_maps[anomalous], predictions.masks[anomalous].astype(bool)
    assert maps[masks].mean() > 3 * maps[~masks].mean()
    assert Path(result["checkpoint"]).is_file()
