"""Autoencoder baseline, AE-SSIM style: "Improving Unsupervised Defect Segmentation by Applying
Structural Similarity to Autoencoders" (Bergmann, Löwe, Fauser, Sattlegger & Steger, VISAPP 2019,
arXiv 1807.02011).

A convolutional autoencoder is trained to reconstruct normal images through a small latent
bottleneck. It learns to reproduce what normal images share and cannot reproduce a defect it has
never seen, so where the reconstruction differs from the input is the anomaly map. The paper's
point is *how* to compare: a per-pixel L2 residual fires at every slightly misplaced edge and
misses defects of similar intensity, whereas SSIM compares local luminance, contrast and
structure (sec. 3.1.4, eq. 4-8).

- Architecture (Table 1), for 128 px: Conv1 32 4x4/2, Conv2 32 4x4/2, Conv3 32 3x3/1,
  Conv4 64 4x4/2, Conv5 64 3x3/1, Conv6 128 4x4/2, Conv7 64 3x3/1, Conv8 32 3x3/1 (padding 1, an
  8x8x32 grid), Conv9 ``d`` 8x8/1 valid -> a 1x1x``d`` latent code (our ``latent_dim``); the
  decoder mirrors it with transposed convolutions where the encoder strides. LeakyReLU(0.2)
  after every layer except the encoder's and the decoder's output layers, which are linear.
  No normalisation layers; PyTorch's default initialisation (the paper names none).
- Other sizes: the bottleneck keeps the table's 8x8 grid, so every doubling of the input adds one
  32-channel 4x4 stride-2 convolution in front of Conv1 (and its transposed mirror at the
  decoder's end). At the spec's 256 px that is one extra layer, the same extension as the widely
  used reimplementation's 256 px branch (plutoyuxie/AutoEncoder-SSIM, ``network.py``; the paper
  itself only gives the 128 px table); at 64 px Conv2 is dropped. Sizes that are not
  8 * 2^n keep the halvings that divide the size evenly (at least three) and a correspondingly
  larger last kernel (224 px: a 14x14 grid and a 14x14 Conv9).
- Loss: ``L = MSE(x, x_hat) + (1 - SSIM(x, x_hat))`` (issue 11: "MSE + SSIM"; weight 1, as
  DRAEM's L_rec = L2 + lambda L_SSIM with lambda = 1). The paper trains AE-SSIM on the SSIM
  term alone and AE-L2 on the L2 term alone; the sum keeps the colours (which SSIM on its own
  leaves loosely constrained) and the structure.
- SSIM (``components.ssim``): 11x11 Gaussian window, sigma 1.5, per colour channel (the paper's
  images are grey; ours are RGB), ``C1 = 0.01^2``, ``C2 = 0.03^2`` for the [0, 1] range (eq. 8).
- Anomaly map: the per-pixel form of the same loss,
  ``r(p) = mean_c (x_c(p) - x_hat_c(p))^2 + (1 - mean_c SSIM_c(p))``, so the training loss is
  exactly the map's mean. The paper's residual for AE-SSIM is ``1 - SSIM`` at each pixel (sec.
  3.1.4) and for AE-L2 the squared error; ``r`` is their sum. No extra smoothing: the SSIM term is
  already a Gaussian-windowed local statistic, and the squared error is as the paper uses it.
- Image score: the maximum of the map (the paper segments only; the maximum is the usual image
  score for such maps and the one the other map models of this library use; the map's mean
  ranked the synthetic test defects at chance, AUROC 0.48 against 1.0).
- Optimiser (sec. 4, training procedure): Adam, lr 2e-4, weight decay 1e-5 (an L2 penalty, as
  PyTorch's Adam applies it; the reimplementation passes 1e-5 to Keras' ``decay``, which is a
  learning-rate decay instead).
- Input range: the networks see [0, 1] images (the SSIM constants assume it); with
  ``normalize=True`` the model undoes the loader's ImageNet normalisation first.

Deviations from the paper's training (shown by ``anomalyzoo list``): it trains for 200 epochs,
batch 128, on 10,000 augmented 128x128 patches and slides the model over larger images at test
time; we train on the whole resized image at the spec's 256 px, 50 epochs, batch 16.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anomalyzoo.models.components.ssim import SSIM_WINDOW_SIZE, ssim_map
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.components.unit_range import UnitRange
from anomalyzoo.models.components.variants import ModelVariant

LEARNING_RATE = 2e-4  # sec. 4, training procedure
WEIGHT_DECAY = 1e-5  # sec. 4, training procedure
LEAKY_SLOPE = 0.2  # sec. 4: LeakyReLU slope
SSIM_WEIGHT = 1.0  # L = MSE + SSIM_WEIGHT (1 - SSIM); DRAEM's lambda = 1
BOTTLENECK_GRID = 8  # Table 1: Conv8's output grid, covered by Conv9's 8x8 kernel
MIN_HALVINGS = 3  # Conv4 and Conv6 stride, plus at least one 32-channel stride-2 layer in front
DATA_RANGE = 1.0  # images in [0, 1]: SSIM's L

# Table 1 after the stride-2 front layers: (output channels, kernel, stride, padding)
ENCODER_BODY = (
    (32, 3, 1, 1),  # Conv3
    (64, 4, 2, 1),  # Conv4
    (64, 3, 1, 1),  # Conv5
    (128, 4, 2, 1),  # Conv6
    (64, 3, 1, 1),  # Conv7
    (32, 3, 1, 1),  # Conv8
)
FRONT_CHANNELS = 32  # Conv1, Conv2 (and the layers added for larger inputs)


def bottleneck_layout(image_size: int) -> tuple[int, int]:
    """(number of stride-2 layers, bottleneck grid = Conv9's kernel) for a square input.

    Halve while the size divides evenly and the grid stays >= 8: 256 -> (5, 8), 128 -> (4, 8)
    as in Table 1, 64 -> (3, 8), 224 -> (4, 14)."""
    halvings, grid = 0, image_size
    while grid % 2 == 0 and grid // 2 >= BOTTLENECK_GRID:
        grid //= 2
        halvings += 1
    if halvings < MIN_HALVINGS:
        raise ValueError(f"The autoencoder needs an image size divisible by 8 and at least 64 px "
                         f"(three stride-2 layers down to a grid of >= 8), got {image_size}")
    return halvings, grid


def leaky() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)


def encoder_layers(image_size: int, latent_dim: int, in_channels: int = 3) -> list[tuple[int, int, int, int, int]]:
    """The encoder as (in channels, out channels, kernel, stride, padding) rows: the stride-2
    32-channel front layers (Conv1, Conv2 at 128 px; one more per doubling), Conv3-Conv8 and
    Conv9 (a valid convolution over the whole bottleneck grid to ``latent_dim``)."""
    halvings, grid = bottleneck_layout(image_size)
    rows: list[tuple[int, int, int, int, int]] = []
    channels = in_channels
    for _ in range(halvings - 2):  # Conv4 and Conv6 are the other two stride-2 layers
        rows.append((channels, FRONT_CHANNELS, 4, 2, 1))
        channels = FRONT_CHANNELS
    for out_channels, kernel, stride, padding in ENCODER_BODY:
        rows.append((channels, out_channels, kernel, stride, padding))
        channels = out_channels
    rows.append((channels, latent_dim, grid, 1, 0))  # Conv9
    return rows


class ConvAutoencoder(nn.Module):
    """Table 1's encoder and its mirrored decoder: image (B, C, S, S) -> reconstruction."""

    def __init__(self, image_size: int, latent_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        layers = encoder_layers(image_size, latent_dim, in_channels)
        encoder: list[nn.Module] = []
        for index, (source, target, kernel, stride, padding) in enumerate(layers):
            encoder.append(nn.Conv2d(source, target, kernel, stride, padding))
            if index < len(layers) - 1:
                encoder.append(leaky())  # Conv9, the latent code, is linear
        decoder: list[nn.Module] = []
        for index, (source, target, kernel, stride, padding) in enumerate(reversed(layers)):
            # the mirror maps target -> source; layers that shrink the grid (stride 2, or Conv9's
            # valid kernel) are mirrored by transposed convolutions that grow it back
            shrinks = stride > 1 or padding == 0
            layer_class = nn.ConvTranspose2d if shrinks else nn.Conv2d
            decoder.append(layer_class(target, source, kernel, stride, padding))
            if index < len(layers) - 1:
                decoder.append(leaky())  # the reconstruction is linear
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images))


def reconstruction_error_map(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """``r(p) = mean_c (x - x_hat)^2 + SSIM_WEIGHT (1 - mean_c SSIM_c(p))``: (B, H, W).

    Both tensors are [0, 1] images (B, C, H, W); the input is SSIM's first image."""
    squared_error = (images - reconstructions).pow(2).mean(dim=1)
    structural = 1.0 - ssim_map(images, reconstructions, SSIM_WINDOW_SIZE, val_range=DATA_RANGE).mean(dim=1)
    return squared_error + SSIM_WEIGHT * structural


def reconstruction_loss(images: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
    """``L = MSE + SSIM_WEIGHT (1 - SSIM)`` over the batch, i.e. the mean of the anomaly map."""
    mse = (images - reconstructions).pow(2).mean()
    ssim_term = 1.0 - ssim_map(images, reconstructions, SSIM_WINDOW_SIZE, val_range=DATA_RANGE).mean()
    return {"loss": mse + SSIM_WEIGHT * ssim_term, "loss_mse": mse, "loss_ssim": ssim_term}


class AutoencoderModel(nn.Module):
    """The autoencoder; eval ``forward`` returns the reconstruction-error map and its maximum."""

    def __init__(
        self,
        latent_dim: int = 128,
        input_size: tuple[int, int] = (256, 256),
        input_normalized: bool = False,
    ) -> None:
        super().__init__()
        height, width = input_size
        if height != width:
            raise ValueError(f"The autoencoder's bottleneck kernel covers a square grid: give square images, got {height}x{width}")
        self.input_normalized = input_normalized
        self.autoencoder = ConvAutoencoder(height, latent_dim)
        self.unit_range = UnitRange(input_normalized)

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """Loader images -> [0, 1] (undo ImageNet normalisation when the run used it)."""
        return self.unit_range(images)

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([0, 1] inputs, their reconstructions), both (B, C, H, W)."""
        images = self.to_unit_range(images)
        return images, self.autoencoder(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        anomaly_map = reconstruction_error_map(*self.reconstruct(images))
        return {"pred_score": anomaly_map.amax(dim=(-2, -1)), "anomaly_map": anomaly_map}


class AutoencoderTrainer(BaseTrainer):
    """Minimises MSE + (1 - SSIM) between normal images and their reconstructions."""

    model_class = AutoencoderModel

    def __init__(self, *, learning_rate: float = LEARNING_RATE, weight_decay: float = WEIGHT_DECAY,
                 train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        super().__init__(train_config, device, **model_options)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """Sec. 4: Adam(lr 2e-4, weight decay 1e-5), no schedule."""
        return torch.optim.Adam(self.model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay), None

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return reconstruction_loss(*self.model.reconstruct(batch["image"]))


VARIANTS = {
    "autoencoder": ModelVariant(
        trainer=AutoencoderTrainer, family="reconstruction",
        train={"num_epochs": 50, "batch_size": 16, "img_size": 256, "normalize": False},  # SPEC sec. 7
        tiny={"latent_dim": 16, "img_size": 64, "num_epochs": 1, "batch_size": 4},
        paper={"num_epochs": 200, "batch_size": 128, "img_size": 128},  # sec. 4: 128 px patches
    ),
}
