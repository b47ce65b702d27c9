"""DSR: "DSR - A dual subspace re-projection network for surface anomaly detection" (Zavrtanik,
Kristan & Skocaj, ECCV 2022, arXiv 2208.01521). Reference code: VitjanZ/DSR_anomaly_detection
(``discrete_model.py``, ``dsr_model.py``, ``train_dsr.py``, ``test_dsr.py``, ``data_loader.py``),
which produced the published numbers; where anomalib's port differs we follow the authors.

A VQ-VAE pretrained on natural images (ImageNet in the paper) encodes an image into two grids of
codebook vectors: ``Q_lo`` (top, 1/8 of the image side, codebook ``K_lo``) and ``Q_hi`` (bottom,
1/4, codebook ``K_hi``). Anomalies are simulated *in that quantised latent space*, so no external
texture data set is needed. Two subspace restriction modules learn to project the (possibly
anomalous) codes back onto the codes of normal images, an object-specific decoder turns the
restored codes into an image, and the anomaly detection module compares it with the general
decoder's reconstruction of the unrestored codes. An upsampling module, trained last on
image-space anomalies, sharpens the detection module's map.

- VQ-VAE (``discrete_model.py`` ``DiscreteLatentModel``): ``EncoderBot`` (two 4x4
  stride-2 convolutions to ``num_hiddens`` 128, a 3x3 one, 2 residual blocks of 64 hidden
  channels), ``EncoderTop`` (one more 4x4 stride-2), 1x1 pre-quantisation convolutions to
  ``embedding_dim`` 128, two EMA vector quantisers of ``num_embeddings`` 4096 codes (decay 0.99,
  commitment 0.25, Laplace-smoothed cluster sizes; zalando pytorch-vq-vae), a 4x4 stride-2
  transposed convolution ``upsample_t`` lifting ``Q_lo`` to the bottom grid, and the general
  decoder ``DecoderBot`` on ``cat(up(Q_lo), Q_hi)``. It is frozen during DSR's training (the
  authors call ``model.eval()``: no codebook update). Its residual blocks compute
  ``relu(x) + f(relu(x))``: the authors' ``x + self._block(x)`` opens the block with an in-place
  ``ReLU(True)`` that rectifies ``x`` before the sum, so that is what their weights were trained
  with (anomalib copies it). Module and tensor names are the authors',
  so their ``vq_model_pretrained_128_4096.pckl`` loads key for key. The EMA codebook update is
  done in place under ``no_grad`` (the authors re-wrap new ``nn.Parameter`` objects each step);
  distances are taken in chunks and the code counts with ``bincount``/``index_add`` instead of a
  dense one-hot matrix (32,768 x 4,096 floats per bottom grid of a batch of 8): the same values.
- Input: the authors read images with OpenCV, so every network sees **BGR** images in [0, 1]
  (``/ 255``); the model flips our RGB tensors to BGR so that the authors' VQ weights see what
  they were trained on, and ``pretrain_dsr`` uses the same convention.
- Latent anomaly generation (``train_dsr.py`` ``generate_fake_anomalies_joined``): for
  each image a strength ``s ~ U(latent_anomaly_strength, 1)`` (0.2); at each position of the
  Perlin mask (max-pooled to the grid) the pre-quantisation feature's codebook neighbours are
  ranked by distance, the nearest ``int(0.05 K)`` skipped, and a code is drawn uniformly among
  the next ranks up to ``max(1, min(int(s K) + 1, K - 1))``. Per image one of three cases
  (``use_both``, else ``use_lo`` / ``use_hi`` with p = 1/2 each): anomalies in both grids (the
  bottom grid re-encoded from the anomalous top and then altered too), only in ``Q_lo``, or only
  in ``Q_hi``; the target mask is the Perlin mask max-pooled to the altered grid (the coarse one
  when both) and brought back to the image by nearest up-sampling. Only positions under the
  mask are ranked (the others are never replaced): the same distribution as the authors'
  ranking of every position, at a fraction of the cost.
- Subspace restriction modules (``SubspaceRestrictionModule``): a 3-level encoder /
  2-level decoder (no skips) of 3x3 conv-InstanceNorm-ReLU blocks, base width 128, whose output
  is re-quantised with the frozen codebook (straight-through). Object-specific decoder
  (``ImageReconstructionNetwork``): conv blocks to 1/16, a 1x1 conv to 64 channels, two 4x4
  transposed convolutions back to the bottom grid and the general decoder's layout to the image.
- Anomaly detection module (``AnomalyDetectionModule``): a U-Net (base 64, three
  poolings, InstanceNorm) on ``cat(object-specific image, general image)`` with 2 output
  channels; upsampling module (``UpsamplingModule``): the same U-Net on those two
  images and the detection module's softmax (8 channels).
- Stage-one loss (``train_dsr.py``): ``focal(softmax(detection), target mask) + MSE(restored
  Q_hi features, normal Q_hi) + MSE(restored Q_lo features, normal Q_lo) + 10 MSE(image,
  object-specific reconstruction)``; the focal loss is the authors' (``components.focal_loss``).
  The detection module sees both images detached. Stage two: the focal loss of the upsampling
  module's softmax against an image-space Perlin mask, the other modules fixed.
- Stage-two anomalies (``data_loader.py`` ``MVTecImageAnomTrainDataset``): 30 % of the images
  rotated by U(-90, 90) degrees, a Perlin mask (``components.perlin``), filled with one uniform
  random colour: ``I (1 - M) + (1 - beta) c M + beta I M``, beta ~ U(0, 0.8); half the images stay
  normal. Stage one (``TrainWholeImageDataset(perlin_augment=True)``): 40 % of the images rotated
  (``rand > 0.6``), a Perlin mask, half of them empty.
- Schedule (``train_dsr.py`` and README command): Adam lr 2e-4 for every trained module, batch 8.
  The authors train stage one for ``E`` = 100 "epochs" of 8,000 random draws (x 0.1 after 80 %),
  then the upsampling module for ``E // 2`` = 50 at a constant rate (their ``MultiStepLR`` there
  counts milestones of the first stage, 80 and 90, which 50 epochs never reach): 150,000 steps of 8
  images, the paper's ``num_steps`` shown by ``anomalyzoo list``. Here ``num_epochs`` (or
  ``num_steps``) covers both stages in the authors' proportion: the first two thirds of the steps
  train stage one (lr x 0.1 from 80 % of them on), the last third the upsampling module. One Adam
  holds both stages' parameters in separate groups: a module without gradients is not stepped,
  so it equals the authors' two optimisers and resumes from one checkpoint.
- Initialisation: the detection module and the object-specific decoder get the authors'
  ``weights_init`` (conv and transposed-conv weights N(0, 0.02)); the restriction and upsampling
  modules keep PyTorch's defaults, as in ``train_dsr.py``.
- Scoring (``test_dsr.py``): the anomaly map is the upsampling module's softmax (anomalous
  channel); the image score the maximum of the *detection* module's softmax after a 21 x 21 mean
  filter. The authors evaluate pixels on a centre crop of 224 of the 256 px map; we evaluate the
  whole map, as every model here.
- VQ weights: ``BACKBONE_DIR/dsr/vq_model_pretrained_128_4096.pckl``, a state dict read with
  ``weights_only=True`` (anything that needs arbitrary unpickling is refused). Without it,
  :func:`pretrain_dsr` (``anomalyzoo pretrain-dsr --images DIR``) trains the VQ-VAE on any folder
  of images. The authors released no pretraining code; ours minimises the VQ-VAE objective
  ``MSE(x, x_hat) + 0.25 (commitment of both quantisers)`` with EMA codebooks, Adam 2e-4, and
  restarts every code whose EMA usage falls below 1 on a random encoder output of the batch
  (the random restarts of Dhariwal et al., "Jukebox", 2020). Without restarts the
  N(0, 1)-initialised codebooks collapsed to one code on every small image set we tried
  (perplexity 1): the encoder's outputs start near the origin and only the nearest code moves.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.unit_range import UnitRange
from anomalyzoo.models.dsr.vq_vae import (
    EMBEDDING_DIM,
    NUM_EMBEDDINGS,
    NUM_HIDDENS,
    NUM_RESIDUAL_HIDDENS,
    NUM_RESIDUAL_LAYERS,
    DiscreteLatentModel,
    LatentCodes,
    ResidualStack,
    VectorQuantizerEMA,
    load_vq_weights,
)

DETECTION_WIDTH = 64  # UnetModel(base_width=64) of both U-Nets
INIT_STD = 0.02  # train_dsr.py weights_init
LATENT_ANOMALY_STRENGTH = 0.2  # train_dsr.py anom_par
CLOSEST_SKIPPED = 0.05  # topk_indices[:, int(K * 0.05):]
SCORE_POOL_SIZE = 21  # test_dsr.py avg_pool2d(out_mask_sm[:, 1:], 21, stride=1, padding=21 // 2)
DOWNSAMPLING = 32  # the restriction module of Q_lo pools the 1/8 grid twice


# ----------------------------------------------------------------------------- DSR modules (dsr_model.py)
def conv_norm_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.InstanceNorm2d(out_channels),
            nn.ReLU(inplace=True)]


def double_conv(in_channels: int, out_channels: int, mid_channels: int | None = None) -> nn.Sequential:
    """(3x3 conv, InstanceNorm, ReLU) twice: the blocks of ``dsr_model.py``."""
    mid_channels = mid_channels or out_channels
    return nn.Sequential(*conv_norm_relu(in_channels, mid_channels), *conv_norm_relu(mid_channels, out_channels))


def up_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x bilinear up-sampling (align_corners=True), then 3x3 conv, InstanceNorm, ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         *conv_norm_relu(in_channels, out_channels))


class FeatureEncoder(nn.Module):
    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.block1 = double_conv(in_channels, width)
        self.mp1 = nn.Sequential(nn.MaxPool2d(2))
        self.block2 = double_conv(width, width * 2)
        self.mp2 = nn.Sequential(nn.MaxPool2d(2))
        self.block3 = double_conv(width * 2, width * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block3(self.mp2(self.block2(self.mp1(self.block1(x)))))


class FeatureDecoder(nn.Module):
    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.up2, self.db2 = up_conv(width * 4, width * 2), double_conv(width * 2, width * 2)
        self.up3, self.db3 = up_conv(width * 2, width), double_conv(width, width)
        self.fin_out = nn.Sequential(nn.Conv2d(width, out_channels, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fin_out(self.db3(self.up3(self.db2(self.up2(x)))))


class SubspaceRestrictionNetwork(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, width: int) -> None:
        super().__init__()
        self.encoder = FeatureEncoder(in_channels, width)
        self.decoder = FeatureDecoder(width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class SubspaceRestrictionModule(nn.Module):
    """Codes -> restored features, re-quantised with a frozen codebook."""

    def __init__(self, embedding_dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.unet = SubspaceRestrictionNetwork(embedding_dim, embedding_dim, embedding_dim)

    def forward(self, codes: torch.Tensor, quantizer: VectorQuantizerEMA) -> tuple[torch.Tensor, torch.Tensor]:
        """(restored features, their quantisation with straight-through gradients)."""
        features = self.unet(codes)
        return features, quantizer(features).quantized


class ImageReconstructionNetwork(nn.Module):
    """The object-specific decoder: restored ``cat(up(Q_lo), Q_hi)`` -> image."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self.block1 = double_conv(in_channels, in_channels * 2, mid_channels=in_channels)
        self.mp1 = nn.Sequential(nn.MaxPool2d(2))
        self.block2 = double_conv(in_channels * 2, in_channels * 4, mid_channels=in_channels * 2)
        self.mp2 = nn.Sequential(nn.MaxPool2d(2))
        self.pre_vq_conv = nn.Conv2d(in_channels * 4, 64, kernel_size=1)
        self.upblock1 = nn.ConvTranspose2d(64, 64, kernel_size=4, stride=2, padding=1)
        self.upblock2 = nn.ConvTranspose2d(64, 64, kernel_size=4, stride=2, padding=1)
        self._conv_1 = nn.Conv2d(64, num_hiddens, kernel_size=3, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, num_hiddens, num_residual_layers, num_residual_hiddens)
        self._conv_trans_1 = nn.ConvTranspose2d(num_hiddens, num_hiddens // 2, kernel_size=4, stride=2, padding=1)
        self._conv_trans_2 = nn.ConvTranspose2d(num_hiddens // 2, 3, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_vq_conv(self.mp2(self.block2(self.mp1(self.block1(x)))))
        x = F.relu(self.upblock2(F.relu(self.upblock1(x))))
        x = self._residual_stack(self._conv_1(x))
        return self._conv_trans_2(F.relu(self._conv_trans_1(x)))


class UnetEncoder(nn.Module):
    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.block1 = double_conv(in_channels, width)
        self.mp1 = nn.Sequential(nn.MaxPool2d(2))
        self.block2 = double_conv(width, width * 2)
        self.mp2 = nn.Sequential(nn.MaxPool2d(2))
        self.block3 = double_conv(width * 2, width * 4)
        self.mp3 = nn.Sequential(nn.MaxPool2d(2))
        self.block4 = double_conv(width * 4, width * 4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b1 = self.block1(x)
        b2 = self.block2(self.mp1(b1))
        b3 = self.block3(self.mp2(b2))
        return [b1, b2, b3, self.block4(self.mp3(b3))]


class UnetDecoder(nn.Module):
    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.up1, self.db1 = up_conv(width * 4, width * 4), double_conv(width * 8, width * 4)
        self.up2, self.db2 = up_conv(width * 4, width * 2), double_conv(width * 4, width * 2)
        self.up3, self.db3 = up_conv(width * 2, width), double_conv(width * 2, width)
        self.fin_out = nn.Sequential(nn.Conv2d(width, out_channels, kernel_size=3, padding=1))

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        b1, b2, b3, b4 = skips
        x = self.db1(torch.cat((self.up1(b4), b3), dim=1))
        x = self.db2(torch.cat((self.up2(x), b2), dim=1))
        x = self.db3(torch.cat((self.up3(x), b1), dim=1))
        return self.fin_out(x)


class UnetModel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, width: int) -> None:
        super().__init__()
        self.encoder = UnetEncoder(in_channels, width)
        self.decoder = UnetDecoder(width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class AnomalyDetectionModule(nn.Module):
    """(object-specific image, general image) -> 2-channel logits."""

    def __init__(self, width: int = DETECTION_WIDTH) -> None:
        super().__init__()
        self.unet = UnetModel(6, 2, width)

    def forward(self, object_specific: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat((object_specific, general), dim=1))


class UpsamplingModule(nn.Module):
    """(object-specific image, general image, detection softmax) -> 2-channel logits."""

    def __init__(self, width: int = DETECTION_WIDTH) -> None:
        super().__init__()
        self.unet = UnetModel(8, 2, width)

    def forward(self, object_specific: torch.Tensor, general: torch.Tensor, detection: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat((object_specific, general, detection), dim=1))


def init_weights(module: nn.Module) -> None:
    """``train_dsr.py`` ``weights_init``: every class named ``*Conv*`` (transposed ones too) N(0, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, INIT_STD)


# ----------------------------------------------------------------------------- latent anomalies
def distant_codes(features: torch.Tensor, codebook: torch.Tensor, strength: float) -> torch.Tensor:
    """One code per row of ``features`` (N, D): uniform among its nearest codes from rank
    ``int(0.05 K)`` up to ``max(1, min(int(strength K) + 1, K - 1))`` (``generate_fake_anomalies_joined``)."""
    num_codes = codebook.shape[0]
    count = max(1, min(int(strength * num_codes) + 1, num_codes - 1))
    skipped = min(int(num_codes * CLOSEST_SKIPPED), count - 1)
    distances = (features ** 2).sum(dim=1, keepdim=True) + (codebook ** 2).sum(dim=1) - 2 * features @ codebook.t()
    ranked = distances.topk(count, dim=1, largest=False).indices[:, skipped:]
    choice = torch.randint(ranked.shape[1], (ranked.shape[0],), device=features.device)
    return codebook[ranked[torch.arange(ranked.shape[0], device=features.device), choice]]


def grid_mask(masks: torch.Tensor, grid: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The image mask (B, 1, H, W) max-pooled to a latent grid (B, 1, h, w)."""
    ratio_y, ratio_x = masks.shape[-2] // grid[-2], masks.shape[-1] // grid[-1]
    return F.max_pool2d(masks, (ratio_y, ratio_x))


def insert_latent_anomalies(features: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor,
                            masks: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
    """``codes`` (B, D, h, w) with every position under the pooled mask replaced by a distant code
    of its pre-quantisation ``features``."""
    latent_mask = grid_mask(masks, codes.shape)[:, 0] > 0
    altered = codes.permute(0, 2, 3, 1).clone()
    flat_features = features.permute(0, 2, 3, 1)
    for index in range(codes.shape[0]):
        where = latent_mask[index]
        if where.any():
            altered[index][where] = distant_codes(flat_features[index][where], codebook, float(strengths[index]))
    return altered.permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- model
class StageOneOutputs(NamedTuple):
    detection_logits: torch.Tensor  # (B, 2, H, W)
    target_masks: torch.Tensor  # (B, 1, H, W): the mask at the resolution of the altered grid
    object_specific: torch.Tensor  # reconstruction from the restored codes
    restored_top: torch.Tensor  # features of the restriction modules (before re-quantisation)
    restored_bottom: torch.Tensor
    normal_top: torch.Tensor  # Q_lo, Q_hi of the unaltered image: what the restriction must recover
    normal_bottom: torch.Tensor


class DsrOutputs(NamedTuple):
    detection_logits: torch.Tensor  # (B, 2, H, W) anomaly detection module
    upsampled_logits: torch.Tensor  # (B, 2, H, W) upsampling module
    object_specific: torch.Tensor
    general: torch.Tensor


class DsrModel(nn.Module):
    """Frozen VQ-VAE, two subspace restriction modules, the object-specific decoder, the anomaly
    detection and upsampling modules; eval ``forward`` returns scores and maps."""

    def __init__(
        self,
        latent_anomaly_strength: float = LATENT_ANOMALY_STRENGTH,
        embedding_dim: int = EMBEDDING_DIM,
        num_embeddings: int = NUM_EMBEDDINGS,
        num_hiddens: int = NUM_HIDDENS,
        num_residual_hiddens: int = NUM_RESIDUAL_HIDDENS,
        detection_width: int = DETECTION_WIDTH,
        pretrained: bool = True,
        input_normalized: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= latent_anomaly_strength < 1.0:
            raise ValueError(f"latent_anomaly_strength must be in [0, 1), got {latent_anomaly_strength}")
        self.latent_anomaly_strength = latent_anomaly_strength
        self.vq_model = DiscreteLatentModel(num_hiddens, NUM_RESIDUAL_LAYERS, num_residual_hiddens, num_embeddings, embedding_dim)
        if pretrained:
            load_vq_weights(self.vq_model)
        self.vq_model.requires_grad_(False)
        self.vq_model.eval()
        self.subspace_restriction_hi = SubspaceRestrictionModule(embedding_dim)
        self.subspace_restriction_lo = SubspaceRestrictionModule(embedding_dim)
        self.image_reconstruction = ImageReconstructionNetwork(embedding_dim * 2, num_hiddens, NUM_RESIDUAL_LAYERS,
                                                               num_residual_hiddens)
        self.anomaly_detection = AnomalyDetectionModule(detection_width)
        self.upsampling = UpsamplingModule(detection_width)
        self.image_reconstruction.apply(init_weights)
        self.anomaly_detection.apply(init_weights)
        self.unit_range = UnitRange(input_normalized)

    def train(self, mode: bool = True) -> "DsrModel":
        super().train(mode)
        self.vq_model.eval()  # frozen: its codebooks never move during DSR's training
        return self

    def to_network_input(self, images: torch.Tensor) -> torch.Tensor:
        """Loader images -> [0, 1] BGR (the authors' OpenCV images), sides checked."""
        height, width = images.shape[-2:]
        if height % DOWNSAMPLING or width % DOWNSAMPLING or min(height, width) < 2 * DOWNSAMPLING:
            raise ValueError(f"DSR's networks need image sides that are multiples of {DOWNSAMPLING} and at least "
                             f"{2 * DOWNSAMPLING}, got {height} x {width} (use img_size 256, as the authors)")
        return self.unit_range(images).flip(1)

    # ------------------------------------------------------------- shared pieces
    def encode(self, images: torch.Tensor) -> LatentCodes:
        """``Q_lo``, ``Q_hi`` of [0, 1] BGR images."""
        vq = self.vq_model
        encoded_bottom = vq._encoder_b(images)
        top = vq._vq_vae_top(vq._pre_vq_conv_top(vq._encoder_t(encoded_bottom))).quantized
        return LatentCodes(top, vq._vq_vae_bot(vq.bottom_features(encoded_bottom, top)).quantized)

    def restore(self, codes: LatentCodes) -> tuple[LatentCodes, LatentCodes]:
        """(restored features, their re-quantised codes) of both subspace restriction modules."""
        features_top, codes_top = self.subspace_restriction_lo(codes.top, self.vq_model._vq_vae_top)
        features_bottom, codes_bottom = self.subspace_restriction_hi(codes.bottom, self.vq_model._vq_vae_bot)
        return LatentCodes(features_top, features_bottom), LatentCodes(codes_top, codes_bottom)

    def reconstruct_object(self, codes: LatentCodes) -> torch.Tensor:
        return self.image_reconstruction(torch.cat((self.vq_model.upsample_t(codes.top), codes.bottom), dim=1))

    # ------------------------------------------------------------- stage one
    def stage_one(self, images: torch.Tensor, masks: torch.Tensor) -> StageOneOutputs:
        """``train_dsr.py`` ``train_on_device`` on [0, 1] BGR images and Perlin masks (B, 1, H, W)."""
        vq, batch = self.vq_model, images.shape[0]
        with torch.no_grad():
            strength_range = 1.0 - self.latent_anomaly_strength
            strengths_top = torch.rand(batch) * strength_range + self.latent_anomaly_strength
            strengths_bottom = torch.rand(batch) * strength_range + self.latent_anomaly_strength
            encoded_bottom = vq._encoder_b(images)
            features_top = vq._pre_vq_conv_top(vq._encoder_t(encoded_bottom))
            normal_top = vq._vq_vae_top(features_top).quantized
            anomalous_top = insert_latent_anomalies(features_top, normal_top, vq._vq_vae_top.codebook, masks, strengths_top)
            features_bottom = vq.bottom_features(encoded_bottom, anomalous_top)  # from the altered Q_lo
            features_bottom_normal = vq.bottom_features(encoded_bottom, normal_top)
            codes_bottom = vq._vq_vae_bot(features_bottom).quantized
            normal_bottom = vq._vq_vae_bot(features_bottom_normal).quantized
            both_bottom = insert_latent_anomalies(features_bottom, codes_bottom, vq._vq_vae_bot.codebook, masks, strengths_bottom)
            use_both = torch.randint(0, 2, (batch, 1, 1, 1), device=images.device).float()
            use_top = torch.randint(0, 2, (batch, 1, 1, 1), device=images.device).float()
            use_bottom = 1.0 - use_top
            only_bottom = insert_latent_anomalies(features_bottom_normal, normal_bottom, vq._vq_vae_bot.codebook,
                                                  masks, strengths_bottom)
            bottom = use_both * both_bottom + (1 - use_both) * (use_bottom * only_bottom + use_top * normal_bottom)
            top = use_both * anomalous_top + (1 - use_both) * (use_bottom * normal_top + use_top * anomalous_top)
            altered = LatentCodes(top, bottom)
            general = vq.decode(altered)
            size = masks.shape[-2:]
            mask_top = F.interpolate(grid_mask(masks, top.shape), size=size, mode="nearest")
            mask_bottom = F.interpolate(grid_mask(masks, bottom.shape), size=size, mode="nearest")
            targets = use_both * mask_top + (1 - use_both) * (use_top * mask_top + use_bottom * mask_bottom)
        restored_features, restored_codes = self.restore(altered)
        object_specific = self.reconstruct_object(restored_codes)
        detection = self.anomaly_detection(object_specific.detach(), general)
        return StageOneOutputs(detection, targets, object_specific, restored_features.top, restored_features.bottom,
                               normal_top, normal_bottom)

    # ------------------------------------------------------------- stage two and inference
    def detect(self, images: torch.Tensor) -> DsrOutputs:
        """Every module on [0, 1] BGR images (``test_dsr.py`` ``evaluate_model``). Only the
        upsampling module is differentiated (stage two trains it alone)."""
        with torch.no_grad():
            codes = self.encode(images)
            _, restored = self.restore(codes)
            object_specific = self.reconstruct_object(restored)
            general = self.vq_model.decode(codes)
            detection = self.anomaly_detection(object_specific, general)
        upsampled = self.upsampling(object_specific, general, torch.softmax(detection, dim=1))
        return DsrOutputs(detection, upsampled, object_specific, general)

    @staticmethod
    def image_score(detection_logits: torch.Tensor) -> torch.Tensor:
        """Max of the 21 x 21 mean of the detection module's anomalous softmax (``test_dsr.py``), (B,)."""
        probability = torch.softmax(detection_logits, dim=1)[:, 1:]
        smoothed = F.avg_pool2d(probability, SCORE_POOL_SIZE, stride=1, padding=SCORE_POOL_SIZE // 2)
        return smoothed.amax(dim=(-3, -2, -1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.detect(self.to_network_input(images))
        return {"pred_score": self.image_score(outputs.detection_logits),
                "anomaly_map": torch.softmax(outputs.upsampled_logits, dim=1)[:, 1]}
