"""GANomaly: "Semi-Supervised Anomaly Detection via Adversarial Training"
(Akcay, Atapour-Abarghouei & Breckon, ACCV 2018, arXiv 1805.06725; authors' code
samet-akcay/ganomaly: ``lib/networks.py``, ``lib/model.py``, ``options.py``).

A generator learns, on normal images only, to map an image x to a latent vector z = G_E(x),
to decode it back to an image x_hat = G_D(z), and to encode that reconstruction again,
z_hat = E(x_hat). A normal image is reconstructed well, so z_hat stays close to z; an anomaly
cannot be reproduced by a decoder that never saw one, the reconstruction misses it, and the
second encoding moves away from the first. The distance between z and z_hat is the score.

- Networks (sec. 3, Fig. 2; ``lib/networks.py``): DCGAN networks. The encoder is a 4x4
  stride-2 convolution to ``n_features`` channels with LeakyReLU(0.2), then "pyramid" blocks
  (4x4 stride-2 convolution doubling the channels, BatchNorm, LeakyReLU(0.2)) while the grid is
  larger than 4x4, and a final 4x4 valid convolution to the ``latent_vec_size`` vector (no bias
  anywhere). The decoder mirrors it with transposed convolutions, BatchNorm and ReLU, and ends
  in a Tanh. The generator is encoder - decoder - encoder (two encoders of the same
  architecture, separate weights). The discriminator is the encoder with a 1-channel final
  convolution and a sigmoid; its features (everything before that convolution) serve the
  adversarial loss. ``extra_layers`` adds the authors' optional 3x3 stride-1 blocks (default 0).
- Size: the authors run 32 px (MNIST, CIFAR-10) and 64 px (UBA); the DCGAN encoder halves the
  grid until it is 4x4, so at the spec's 256 px the same code has five pyramid blocks
  (64 -> 128 -> ... -> 2048 channels) where 32 px has two and 64 px three: the networks are
  the authors', extended by three (resp. two) layers. The image size must be a power of two
  >= 16 (the authors' ``assert isize % 16 == 0``; their decoder loops forever otherwise).
- Input range: the authors normalise images to [-1, 1] (``lib/data.py``: Normalize(0.5, 0.5)),
  the range of the Tanh output; the model maps the loader's images to it (undoing ImageNet
  normalisation first when the run uses ``normalize=True``).
- Weights (``weights_init``): convolutions N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0.
- Generator loss (eq. 1-4; ``lib/model.py backward_g``):
  ``L_G = w_adv L_adv + w_con L_con + w_enc L_enc`` with w_adv 1, w_con 50, w_enc 1
  (``options.py``). ``L_adv = mean (f(x) - f(G(x)))^2`` is feature matching on the
  discriminator's features f (eq. 1; the code's ``l2_loss`` is the mean squared difference);
  ``L_con = mean |x - G(x)|`` (eq. 2, L1); ``L_enc = mean (z - z_hat)^2`` (eq. 3).
- Discriminator loss (``backward_d``): ``0.5 (BCE(D(x), 1) + BCE(D(G(x)), 0))`` on the detached
  reconstruction. Each batch updates the generator, then the discriminator, each with its own
  Adam (lr 2e-4, betas (0.5, 0.999), ``options.py``). When the discriminator's loss falls below
  1e-5 its weights are re-drawn from the initialisation (``reinit_d``; its Adam state is kept,
  as the authors do); the results file says how often that happened.
- Score (eq. 5; ``lib/model.py test``): ``A(x) = mean_k (z_k - z_hat_k)^2``, one number per
  image, no anomaly map (pixel metrics are n/a and the results file says so). The paper writes
  eq. 5 with an L1 norm; the authors' code (and anomalib) use this mean square, which we follow.
  Their per-test-set min-max scaling (eq. 6) is monotone and uses the whole test set at once; the
  library's label-free normalisation from the validation split takes its place.
- Validation: ``val_loss`` is the generator loss L_G on held-out normal images (eval mode).

anomalib (``models/image/ganomaly``) differs: its adversarial term is the MSE between the
discriminator's *predictions* for x and G(x) rather than feature matching, its encoder loss is
SmoothL1, its first convolution pads by 4 and inputs are zero-padded to the next power of two,
and it never re-initialises the discriminator. We follow the authors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.components.unit_range import UnitRange
from anomalyzoo.models.components.variants import ModelVariant

W_ADV = 1.0  # options.py --w_adv: adversarial (feature matching) weight
W_CON = 50.0  # options.py --w_con: contextual (L1 reconstruction) weight
W_ENC = 1.0  # options.py --w_enc: encoder (latent L2) weight
LEARNING_RATE = 2e-4  # options.py --lr, both networks
ADAM_BETAS = (0.5, 0.999)  # options.py --beta1; beta2 as in lib/model.py
DISCRIMINATOR_REINIT_BELOW = 1e-5  # lib/model.py optimize_params: re-initialise D when its loss < 1e-5
INIT_STD = 0.02  # lib/networks.py weights_init
LEAKY_SLOPE = 0.2  # DCGAN encoder activations
FINAL_GRID = 4  # the encoder halves the grid until it is 4x4, then a 4x4 valid conv


def dcgan_init(module: nn.Module) -> None:
    """``weights_init``: conv (and transposed conv) weights N(0, 0.02); BatchNorm weight
    N(1, 0.02), bias 0. Apply with ``network.apply(dcgan_init)``."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)


def pyramid_depth(image_size: int) -> int:
    """Stride-2 pyramid blocks after the first convolution: ``log2(image_size / 8)``
    (2 at the authors' 32 px, 5 at 256 px)."""
    if image_size < 16 or image_size & (image_size - 1):
        raise ValueError(f"GANomaly's DCGAN networks need a square power-of-two image size >= 16 "
                         f"(the grid is halved down to 4x4), got {image_size}")
    return int(math.log2(image_size // (2 * FINAL_GRID)))


def conv_block(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int,
               transposed: bool = False, leaky: bool = True) -> list[nn.Module]:
    """Convolution (no bias), BatchNorm and LeakyReLU(0.2) (encoder) or ReLU (decoder)."""
    conv_class = nn.ConvTranspose2d if transposed else nn.Conv2d
    activation = nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if leaky else nn.ReLU(inplace=True)
    return [conv_class(in_channels, out_channels, kernel, stride, padding, bias=False), nn.BatchNorm2d(out_channels), activation]


class DcganEncoder(nn.Module):
    """``lib/networks.py Encoder``: image (B, C, S, S) -> (B, out_channels, 1, 1).

    ``features`` is everything before the final 4x4 convolution (the discriminator's f)."""

    def __init__(self, image_size: int, out_channels: int, n_features: int, extra_layers: int = 0, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, n_features, 4, 2, 1, bias=False),
                                   nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]  # no BatchNorm on the first layer
        for _ in range(extra_layers):
            layers += conv_block(n_features, n_features, 3, 1, 1)
        channels = n_features
        for _ in range(pyramid_depth(image_size)):
            layers += conv_block(channels, channels * 2, 4, 2, 1)
            channels *= 2
        self.features = nn.Sequential(*layers)
        self.feature_channels = channels
        self.final = nn.Conv2d(channels, out_channels, FINAL_GRID, 1, 0, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.final(self.features(images))


class DcganDecoder(nn.Module):
    """``lib/networks.py Decoder``: latent (B, latent, 1, 1) -> image (B, C, S, S) in [-1, 1]."""

    def __init__(self, image_size: int, latent_vec_size: int, n_features: int, extra_layers: int = 0, out_channels: int = 3) -> None:
        super().__init__()
        depth = pyramid_depth(image_size)
        channels = n_features * 2 ** depth  # the encoder's widest layer, mirrored
        layers = conv_block(latent_vec_size, channels, FINAL_GRID, 1, 0, transposed=True, leaky=False)
        for _ in range(depth):
            layers += conv_block(channels, channels // 2, 4, 2, 1, transposed=True, leaky=False)
            channels //= 2
        for _ in range(extra_layers):
            layers += conv_block(channels, channels, 3, 1, 1, leaky=False)
        layers += [nn.ConvTranspose2d(channels, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.layers(latent)


class Generator(nn.Module):
    """``NetG``: encoder G_E, decoder G_D, encoder E (Fig. 2)."""

    def __init__(self, image_size: int, latent_vec_size: int, n_features: int, extra_layers: int = 0) -> None:
        super().__init__()
        self.encoder1 = DcganEncoder(image_size, latent_vec_size, n_features, extra_layers)
        self.decoder = DcganDecoder(image_size, latent_vec_size, n_features, extra_layers)
        self.encoder2 = DcganEncoder(image_size, latent_vec_size, n_features, extra_layers)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction G(x), z = G_E(x), z_hat = E(G(x))); latents (B, latent_vec_size)."""
        latent = self.encoder1(images)
        reconstruction = self.decoder(latent)
        latent_of_reconstruction = self.encoder2(reconstruction)
        return reconstruction, latent.flatten(1), latent_of_reconstruction.flatten(1)


class Discriminator(nn.Module):
    """``NetD``: the encoder with a 1-channel final convolution and a sigmoid."""

    def __init__(self, image_size: int, n_features: int, extra_layers: int = 0) -> None:
        super().__init__()
        self.encoder = DcganEncoder(image_size, 1, n_features, extra_layers)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probability that each image is real (B,), features f (B, C, 4, 4))."""
        features = self.encoder.features(images)
        probability = torch.sigmoid(self.encoder.final(features)).flatten()
        return probability, features


# ----------------------------------------------------------------- losses (eq. 1-4)
def adversarial_loss(real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
    """Eq. 1, feature matching: mean squared difference of the discriminator's features."""
    return (real_features - fake_features).pow(2).mean()


def contextual_loss(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean absolute difference between x and G(x)."""
    return (images - reconstructions).abs().mean()


def encoder_loss(latent: torch.Tensor, latent_of_reconstruction: torch.Tensor) -> torch.Tensor:
    """Eq. 3: mean squared difference between z and z_hat."""
    return (latent - latent_of_reconstruction).pow(2).mean()


def discriminator_loss(real_probability: torch.Tensor, fake_probability: torch.Tensor) -> torch.Tensor:
    """``backward_d``: 0.5 (BCE(D(x), 1) + BCE(D(G(x)), 0))."""
    real = F.binary_cross_entropy(real_probability, torch.ones_like(real_probability))
    fake = F.binary_cross_entropy(fake_probability, torch.zeros_like(fake_probability))
    return 0.5 * (real + fake)


def latent_distance_score(latent: torch.Tensor, latent_of_reconstruction: torch.Tensor) -> torch.Tensor:
    """Eq. 5 as in the authors' ``test``: ``mean_k (z_k - z_hat_k)^2`` per image, (B,)."""
    return (latent - latent_of_reconstruction).pow(2).mean(dim=1)


class GanomalyModel(nn.Module):
    """Generator and discriminator; eval ``forward`` returns ``pred_score`` only (no map)."""

    def __init__(
        self,
        n_features: int = 64,
        latent_vec_size: int = 256,
        extra_layers: int = 0,
        input_size: tuple[int, int] = (256, 256),
        input_normalized: bool = False,
    ) -> None:
        super().__init__()
        height, width = input_size
        if height != width:
            raise ValueError(f"GANomaly's DCGAN networks need square images, got {height}x{width}")
        self.input_normalized = input_normalized
        self.generator = Generator(height, latent_vec_size, n_features, extra_layers)
        self.discriminator = Discriminator(height, n_features, extra_layers)
        self.generator.apply(dcgan_init)
        self.discriminator.apply(dcgan_init)
        self.unit_range = UnitRange(input_normalized)

    def to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        """Loader images -> [-1, 1], the authors' input range (and the Tanh's)."""
        return self.unit_range(images) * 2.0 - 1.0

    def reinitialize_discriminator(self) -> None:
        """``reinit_d``: re-draw the discriminator's weights from the DCGAN initialisation."""
        self.discriminator.apply(dcgan_init)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _, latent, latent_of_reconstruction = self.generator(self.to_model_range(images))
        return {"pred_score": latent_distance_score(latent, latent_of_reconstruction)}


class GanomalyTrainer(BaseTrainer):
    """Per batch: one generator step on L_G, then one discriminator step on its BCE (two Adam
    optimisers); the discriminator is re-initialised when its loss collapses."""

    model_class = GanomalyModel

    def __init__(self, *, w_adv: float = W_ADV, w_con: float = W_CON, w_enc: float = W_ENC,
                 learning_rate: float = LEARNING_RATE, train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        self.w_adv, self.w_con, self.w_enc = w_adv, w_con, w_enc
        self.learning_rate = learning_rate
        super().__init__(train_config, device, **model_options)
        self.discriminator_optimizer: torch.optim.Optimizer | None = None
        self.discriminator_reinitializations = 0

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """Adam(lr 2e-4, betas (0.5, 0.999)) for each network. The generator's is the trainer's
        ``optimizer`` (checkpointed by the base class); the discriminator's is kept beside it
        and travels in the checkpoint's extra state."""
        self.discriminator_optimizer = torch.optim.Adam(self.model.discriminator.parameters(), lr=self.learning_rate, betas=ADAM_BETAS)
        return torch.optim.Adam(self.model.generator.parameters(), lr=self.learning_rate, betas=ADAM_BETAS), None

    def generator_losses(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """L_G and its terms for images already in [-1, 1], and the reconstructions G(x)."""
        reconstructions, latent, latent_of_reconstruction = self.model.generator(images)
        _, real_features = self.model.discriminator(images)
        _, fake_features = self.model.discriminator(reconstructions)
        loss_adv = adversarial_loss(real_features, fake_features)
        loss_con = contextual_loss(images, reconstructions)
        loss_enc = encoder_loss(latent, latent_of_reconstruction)
        total = self.w_adv * loss_adv + self.w_con * loss_con + self.w_enc * loss_enc
        return {"loss": total, "loss_adv": loss_adv, "loss_con": loss_con, "loss_enc": loss_enc}, reconstructions

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The generator loss L_G (validation reports it as ``val_loss``)."""
        return self.generator_losses(self.model.to_model_range(batch["image"]))[0]

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """``optimize_params``: generator step, then discriminator step on the detached G(x)."""
        self.setup_optimization()
        images = self.model.to_model_range(batch["image"])
        losses, reconstructions = self.generator_losses(images)
        self.optimize(losses["loss"], self.optimizer)
        real_probability, _ = self.model.discriminator(images)
        fake_probability, _ = self.model.discriminator(reconstructions.detach())
        loss_d = discriminator_loss(real_probability, fake_probability)
        self.optimize(loss_d, self.discriminator_optimizer)
        self.reinitialize_discriminator_if_collapsed(float(loss_d.detach()))
        return {**{key: float(value.detach()) for key, value in losses.items()}, "loss_d": float(loss_d.detach())}

    def reinitialize_discriminator_if_collapsed(self, loss_d: float) -> bool:
        """``if err_d < 1e-5: reinit_d()``: a discriminator that separates real from reconstructed
        perfectly gives the generator no useful features; start it again."""
        if loss_d >= DISCRIMINATOR_REINIT_BELOW:
            return False
        self.model.reinitialize_discriminator()
        self.discriminator_reinitializations += 1
        return True

    def run_notes(self) -> dict[str, str]:
        notes: dict[str, str] = {}
        if self.discriminator_reinitializations:
            notes["discriminator_reinitializations"] = (
                f"{self.discriminator_reinitializations} (its loss fell below {DISCRIMINATOR_REINIT_BELOW:g}, as in the authors' reinit_d)")
        return notes

    def extra_state(self) -> dict[str, Any]:
        optimizer = self.discriminator_optimizer
        return {"discriminator_optimizer_state": optimizer.state_dict() if optimizer is not None else None,
                "discriminator_reinitializations": self.discriminator_reinitializations}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.discriminator_reinitializations = int(state.get("discriminator_reinitializations", 0))
        if state.get("discriminator_optimizer_state"):
            self.setup_optimization()
            assert self.discriminator_optimizer is not None
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer_state"])


VARIANTS = {
    "ganomaly": ModelVariant(
        trainer=GanomalyTrainer, family="reconstruction",
        train={"num_epochs": 20, "batch_size": 8, "img_size": 256, "normalize": False},  # SPEC sec. 7
        tiny={"n_features": 8, "latent_vec_size": 16, "img_size": 32, "num_epochs": 1, "batch_size": 4},
        paper={"num_epochs": 15, "batch_size": 64, "img_size": 32, "latent_vec_size": 100},  # options.py defaults (CIFAR-10/MNIST)
        note=("image-level only (no anomaly map); at 256 px the DCGAN networks are wide (2048 channels at 4x4, "
              "204M parameters): a checkpoint with both Adam states is about 2.4 GB"),
    ),
}
