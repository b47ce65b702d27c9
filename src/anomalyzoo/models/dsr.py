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

- VQ-VAE (``discrete_model.py`` ``DiscreteLatentModel``, sec. 3.1): ``EncoderBot`` (two 4x4
  stride-2 convolutions to ``num_hiddens`` 128, a 3x3 one, 2 residual blocks of 64 hidden
  channels), ``EncoderTop`` (one more 4x4 stride-2), 1x1 pre-quantisation convolutions to
  ``embedding_dim`` 128, two EMA vector quantisers of ``num_embeddings`` 4096 codes (decay 0.99,
  commitment 0.25, Laplace-smoothed cluster sizes; zalando pytorch-vq-vae), a 4x4 stride-2
  transposed convolution ``upsample_t`` lifting ``Q_lo`` to the bottom grid, and the general
  decoder ``DecoderBot`` on ``cat(up(Q_lo), Q_hi)``. It is frozen during DSR's training (the
  authors call ``model.eval()``: no codebook update). Module and tensor names are the authors',
  so their ``vq_model_pretrained_128_4096.pckl`` loads key for key. The EMA codebook update is
  done in place under ``no_grad`` (the authors re-wrap new ``nn.Parameter`` objects each step);
  distances are taken in chunks and the code counts with ``bincount``/``index_add`` instead of a
  dense one-hot matrix (32,768 x 4,096 floats per bottom grid of a batch of 8): the same values.
- Input: the authors read images with OpenCV, so every network sees **BGR** images in [0, 1]
  (``/ 255``); the model flips our RGB tensors to BGR so that the authors' VQ weights see what
  they were trained on, and ``pretrain_dsr`` uses the same convention.
- Latent anomaly generation (sec. 3.2, ``train_dsr.py`` ``generate_fake_anomalies_joined``): for
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
- Subspace restriction modules (sec. 3.3, ``SubspaceRestrictionModule``): a 3-level encoder /
  2-level decoder (no skips) of 3x3 conv-InstanceNorm-ReLU blocks, base width 128, whose output
  is re-quantised with the frozen codebook (straight-through). Object-specific decoder
  (``ImageReconstructionNetwork``): conv blocks to 1/16, a 1x1 conv to 64 channels, two 4x4
  transposed convolutions back to the bottom grid and the general decoder's layout to the image.
- Anomaly detection module (sec. 3.4, ``AnomalyDetectionModule``): a U-Net (base 64, three
  poolings, InstanceNorm) on ``cat(object-specific image, general image)`` with 2 output
  channels; upsampling module (sec. 3.5, ``UpsamplingModule``): the same U-Net on those two
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
  (Dhariwal et al., "Jukebox", 2020, sec. 2.2 / 3.1: random restarts). Without restarts the
  N(0, 1)-initialised codebooks collapsed to one code on every small image set we tried
  (perplexity 1): the encoder's outputs start near the origin and only the nearest code moves.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

from anomalyzoo.data.images import cycle, find_images
from anomalyzoo.data.transforms import IMAGE_EXTENSIONS, image_to_tensor, load_rgb_image
from anomalyzoo.models.components.backbone import BackboneWeightsNotFound, get_backbone_path
from anomalyzoo.models.components.focal_loss import focal_loss
from anomalyzoo.models.components.perlin import ROTATION_DEGREES, perlin_mask, uniform
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.components.unit_range import UnitRange
from anomalyzoo.models.components.variants import ModelVariant
from anomalyzoo.settings import get_settings

VQ_WEIGHTS = "dsr_vq_model"  # BACKBONE_WEIGHT_FILES: dsr/vq_model_pretrained_128_4096.pckl
NUM_HIDDENS = 128  # test_dsr.py / train_dsr.py
NUM_RESIDUAL_HIDDENS = 64
NUM_RESIDUAL_LAYERS = 2
EMBEDDING_DIM = 128
NUM_EMBEDDINGS = 4096
COMMITMENT_COST = 0.25
EMA_DECAY = 0.99
EMA_EPSILON = 1e-5  # VectorQuantizerEMA(epsilon=1e-5)
DETECTION_WIDTH = 64  # UnetModel(base_width=64) of both U-Nets
INIT_STD = 0.02  # train_dsr.py weights_init
LATENT_ANOMALY_STRENGTH = 0.2  # train_dsr.py anom_par
CLOSEST_SKIPPED = 0.05  # topk_indices[:, int(K * 0.05):]
IMAGE_LOSS_WEIGHT = 10.0  # total_recon_loss = ... + loss_l2_recon_img * 10
LEARNING_RATE = 2e-4  # README: --lr 0.0002
STAGE_ONE_LR_MILESTONE = 0.8  # MultiStepLR([int(epochs * 0.80)], gamma=0.1)
STAGE_ONE_LR_GAMMA = 0.1
UPSAMPLING_SHARE = 1 / 3  # E epochs of stage one, then E // 2 of the upsampling module
STAGE_ONE_ROTATION_PROBABILITY = 0.4  # TrainWholeImageDataset: torch.rand(1) > 0.6
STAGE_TWO_ROTATION_PROBABILITY = 0.3  # MVTecImageAnomTrainDataset: torch.rand(1) > 0.7
NO_ANOMALY_PROBABILITY = 0.5  # both data sets: no_anomaly > 0.5
COLOUR_BETA_MAX = 0.8  # beta = torch.rand(1) * 0.8
SCORE_POOL_SIZE = 21  # test_dsr.py avg_pool2d(out_mask_sm[:, 1:], 21, stride=1, padding=21 // 2)
PAPER_NUM_STEPS = 150_000  # (100 + 50) epochs x 8,000 draws / batch 8
DOWNSAMPLING = 32  # the restriction module of Q_lo pools the 1/8 grid twice
DISTANCE_CHUNK = 4096  # rows of the distance matrix at a time
DEAD_CODE_THRESHOLD = 1.0  # pretrain_dsr: EMA usage below which a code restarts (Jukebox, sec. 3.1)


# ----------------------------------------------------------------------------- VQ-VAE (discrete_model.py)
class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, C, H, W), straight-through: forward = codes, backward = identity
    loss: torch.Tensor  # commitment_cost * MSE(codes, inputs)
    perplexity: torch.Tensor
    indices: torch.Tensor  # (B, H, W) code per position


class VectorQuantizerEMA(nn.Module):
    """Nearest-code quantiser whose codebook follows an exponential moving average of the inputs
    assigned to each code (van den Oord et al. 2017, appendix; zalando pytorch-vq-vae). The
    codebook gets no gradient: ``_embedding.weight`` and ``_ema_w`` are updated in training mode
    only, in place."""

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = COMMITMENT_COST,
                 decay: float = EMA_DECAY, epsilon: float = EMA_EPSILON) -> None:
        super().__init__()
        self._num_embeddings, self._embedding_dim = num_embeddings, embedding_dim
        self._commitment_cost, self._decay, self._epsilon = commitment_cost, decay, epsilon
        self._embedding = nn.Embedding(num_embeddings, embedding_dim)
        self._embedding.weight.data.normal_()
        self._embedding.weight.requires_grad_(False)
        self.register_buffer("_ema_cluster_size", torch.zeros(num_embeddings))
        self._ema_w = nn.Parameter(torch.randn(num_embeddings, embedding_dim), requires_grad=False)
        # pretraining only (pretrain_dsr): restart codes used less than this per step (not the authors')
        self.dead_code_threshold: float | None = None

    @property
    def codebook(self) -> torch.Tensor:
        return self._embedding.weight

    def nearest_codes(self, flat_inputs: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each row of (N, C), in chunks of rows."""
        codebook = self.codebook.detach()
        squared_norms = (codebook ** 2).sum(dim=1)
        indices = []
        for chunk in flat_inputs.detach().split(DISTANCE_CHUNK):
            distances = (chunk ** 2).sum(dim=1, keepdim=True) + squared_norms - 2 * chunk @ codebook.t()
            indices.append(distances.argmin(dim=1))
        return torch.cat(indices) if indices else flat_inputs.new_zeros(0, dtype=torch.long)

    @torch.no_grad()
    def restart_dead_codes(self, flat_inputs: torch.Tensor) -> int:
        """Codes whose EMA usage fell below ``dead_code_threshold`` move onto random inputs of the
        batch (Jukebox's random restarts); returns how many moved. Off (None) by default."""
        if self.dead_code_threshold is None or len(flat_inputs) == 0:
            return 0
        dead = self._ema_cluster_size < self.dead_code_threshold
        count = int(dead.sum())
        if count:
            picks = flat_inputs.detach()[torch.randint(len(flat_inputs), (count,), device=flat_inputs.device)]
            self._embedding.weight[dead] = picks
            self._ema_w[dead] = picks
            self._ema_cluster_size[dead] = 1.0
        return count

    @torch.no_grad()
    def update_codebook(self, flat_inputs: torch.Tensor, indices: torch.Tensor) -> None:
        """EMA of the code counts (Laplace-smoothed) and of the summed inputs per code."""
        counts = torch.bincount(indices, minlength=self._num_embeddings).to(flat_inputs.dtype)
        self._ema_cluster_size.mul_(self._decay).add_(counts, alpha=1 - self._decay)
        total = self._ema_cluster_size.sum()
        self._ema_cluster_size.copy_((self._ema_cluster_size + self._epsilon)
                                     / (total + self._num_embeddings * self._epsilon) * total)
        summed = torch.zeros_like(self._ema_w).index_add_(0, indices, flat_inputs.detach())
        self._ema_w.mul_(self._decay).add_(summed, alpha=1 - self._decay)
        self._embedding.weight.copy_(self._ema_w / self._ema_cluster_size[:, None])

    def forward(self, inputs: torch.Tensor) -> QuantizerOutput:
        batch, channels, height, width = inputs.shape
        flat = inputs.permute(0, 2, 3, 1).reshape(-1, channels)
        indices = self.nearest_codes(flat)
        codes = self.codebook.detach()[indices]
        if self.training:
            self.update_codebook(flat, indices)
            self.restart_dead_codes(flat)
        loss = self._commitment_cost * F.mse_loss(codes, flat)
        quantized = flat + (codes - flat).detach()
        probabilities = torch.bincount(indices, minlength=self._num_embeddings).to(flat.dtype) / max(len(indices), 1)
        perplexity = torch.exp(-(probabilities * torch.log(probabilities + 1e-10)).sum())
        quantized = quantized.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()
        return QuantizerOutput(quantized, loss, perplexity, indices.reshape(batch, height, width))


class Residual(nn.Module):
    """ReLU, 3x3 conv (no bias), ReLU, 1x1 conv (no bias), added to the *rectified* input.

    The authors write ``x + self._block(x)`` with an in-place ``ReLU(True)`` first in the block,
    which rectifies ``x`` itself before the sum is taken: what their weights were trained with is
    ``relu(x) + block(relu(x))``. We compute that explicitly (an in-place ReLU would also break
    autograd where ``x`` is the output of a ReLU, as in ``EncoderTop``)."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self._block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(in_channels, num_residual_hiddens, kernel_size=3, padding=1, bias=False),
            nn.ReLU(), nn.Conv2d(num_residual_hiddens, num_hiddens, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rectified = F.relu(x)
        return rectified + self._block(rectified)


class ResidualStack(nn.Module):
    def __init__(self, in_channels: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self._layers = nn.ModuleList([Residual(in_channels, num_hiddens, num_residual_hiddens)
                                      for _ in range(num_residual_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._layers:
            x = layer(x)
        return F.relu(x)


class EncoderBot(nn.Module):
    """Image -> 1/4 grid (``F_hi`` before fusion)."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, num_hiddens // 2, kernel_size=4, stride=2, padding=1)
        self._conv_2 = nn.Conv2d(num_hiddens // 2, num_hiddens, kernel_size=4, stride=2, padding=1)
        self._conv_3 = nn.Conv2d(num_hiddens, num_hiddens, kernel_size=3, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, num_hiddens, num_residual_layers, num_residual_hiddens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self._conv_2(F.relu(self._conv_1(x))))
        return self._residual_stack(self._conv_3(x))


class EncoderTop(nn.Module):
    """1/4 grid -> 1/8 grid (``F_lo``)."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, num_hiddens, kernel_size=4, stride=2, padding=1)
        self._conv_2 = nn.Conv2d(num_hiddens, num_hiddens, kernel_size=3, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, num_hiddens, num_residual_layers, num_residual_hiddens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual_stack(F.relu(self._conv_2(F.relu(self._conv_1(x)))))


class DecoderBot(nn.Module):
    """The general appearance decoder: ``cat(up(Q_lo), Q_hi)`` -> image (no output activation)."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, num_hiddens, kernel_size=3, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, num_hiddens, num_residual_layers, num_residual_hiddens)
        self._conv_trans_1 = nn.ConvTranspose2d(num_hiddens, num_hiddens // 2, kernel_size=4, stride=2, padding=1)
        self._conv_trans_2 = nn.ConvTranspose2d(num_hiddens // 2, 3, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual_stack(self._conv_1(x))
        return self._conv_trans_2(F.relu(self._conv_trans_1(x)))


class LatentCodes(NamedTuple):
    top: torch.Tensor  # Q_lo (B, D, H/8, W/8)
    bottom: torch.Tensor  # Q_hi (B, D, H/4, W/4)


class VQVAEOutput(NamedTuple):
    reconstruction: torch.Tensor
    commitment_loss: torch.Tensor  # of both quantisers
    codes: LatentCodes
    perplexity_top: torch.Tensor
    perplexity_bottom: torch.Tensor


class DiscreteLatentModel(nn.Module):
    """The authors' two-level VQ-VAE (attribute names as in ``discrete_model.py``)."""

    def __init__(self, num_hiddens: int = NUM_HIDDENS, num_residual_layers: int = NUM_RESIDUAL_LAYERS,
                 num_residual_hiddens: int = NUM_RESIDUAL_HIDDENS, num_embeddings: int = NUM_EMBEDDINGS,
                 embedding_dim: int = EMBEDDING_DIM, commitment_cost: float = COMMITMENT_COST,
                 decay: float = EMA_DECAY) -> None:
        super().__init__()
        self._encoder_t = EncoderTop(num_hiddens, num_hiddens, num_residual_layers, num_residual_hiddens)
        self._encoder_b = EncoderBot(3, num_hiddens, num_residual_layers, num_residual_hiddens)
        self._pre_vq_conv_bot = nn.Conv2d(num_hiddens + embedding_dim, embedding_dim, kernel_size=1)
        self._pre_vq_conv_top = nn.Conv2d(num_hiddens, embedding_dim, kernel_size=1)
        self._vq_vae_top = VectorQuantizerEMA(num_embeddings, embedding_dim, commitment_cost, decay)
        self._vq_vae_bot = VectorQuantizerEMA(num_embeddings, embedding_dim, commitment_cost, decay)
        self._decoder_b = DecoderBot(embedding_dim * 2, num_hiddens, num_residual_layers, num_residual_hiddens)
        self.upsample_t = nn.ConvTranspose2d(embedding_dim, embedding_dim, 4, stride=2, padding=1)

    def bottom_features(self, encoded_bottom: torch.Tensor, top_codes: torch.Tensor) -> torch.Tensor:
        """``F_hi`` before quantisation: the bottom encoding fused with the up-sampled ``Q_lo``."""
        return self._pre_vq_conv_bot(torch.cat((encoded_bottom, self.upsample_t(top_codes)), dim=1))

    def decode(self, codes: LatentCodes) -> torch.Tensor:
        """The general appearance decoder on (``Q_lo``, ``Q_hi``)."""
        return self._decoder_b(torch.cat((self.upsample_t(codes.top), codes.bottom), dim=1))

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        encoded_bottom = self._encoder_b(images)
        top = self._vq_vae_top(self._pre_vq_conv_top(self._encoder_t(encoded_bottom)))
        bottom = self._vq_vae_bot(self.bottom_features(encoded_bottom, top.quantized))
        codes = LatentCodes(top.quantized, bottom.quantized)
        return VQVAEOutput(self.decode(codes), top.loss + bottom.loss, codes, top.perplexity, bottom.perplexity)


def read_vq_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The VQ-VAE file as a state dict, read with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "unsupported global" in str(error).lower():  # torch refused a class outside its allow-list
            raise ValueError(
                f"Refusing to load {path}: it is not a plain state dict and reading it would run arbitrary "
                "pickled code (torch.load(weights_only=True) failed). Re-save it from a trusted session with "
                "torch.save(model.state_dict(), path), or make a new one with `anomalyzoo pretrain-dsr --images DIR`."
            ) from error
        raise ValueError(f"Could not read the DSR VQ model {path}: {error}. The file is truncated or not a "
                         "PyTorch state dict; replace it (`anomalyzoo pretrain-dsr --images DIR --overwrite`).") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (found {type(state).__name__})")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_vq_weights(model: DiscreteLatentModel) -> Path:
    """Load ``BACKBONE_DIR/dsr/vq_model_pretrained_128_4096.pckl`` into ``model``, or say how to get it."""
    path = get_backbone_path(VQ_WEIGHTS)
    if not path.is_file():
        raise BackboneWeightsNotFound(
            f"DSR needs its pretrained VQ-VAE at {path}, which does not exist. Either put the authors' "
            "vq_model_pretrained_128_4096.pckl there (VitjanZ/DSR_anomaly_detection README, or anomalib's "
            "dsr_vq_model_pretrained.zip), or train one on any folder of images with "
            "`anomalyzoo pretrain-dsr --images DIR` (API: anomalyzoo.models.dsr.pretrain_dsr(image_dir)). "
            "Set the folder with set_globals(backbone_dir=...) or ANOMALYZOO_BACKBONE_DIR.")
    state = read_vq_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{key}: file {tuple(state[key].shape)}, model {tuple(value.shape)}"
                  for key, value in expected.items() if key in state and state[key].shape != value.shape]
    if missing or unexpected or mismatched:
        codebook = state.get("_vq_vae_top._embedding.weight")
        size = f" (its codebook: {tuple(codebook.shape)} = num_embeddings x embedding_dim)" if codebook is not None else ""
        raise ValueError(f"{path} is not a DSR VQ-VAE of this configuration{size}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, mismatched {mismatched[:5]}")
    model.load_state_dict(state)
    return path


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
    """Codes -> restored features, re-quantised with a frozen codebook (sec. 3.3)."""

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
    """(object-specific image, general image) -> 2-channel logits (sec. 3.4)."""

    def __init__(self, width: int = DETECTION_WIDTH) -> None:
        super().__init__()
        self.unet = UnetModel(6, 2, width)

    def forward(self, object_specific: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat((object_specific, general), dim=1))


class UpsamplingModule(nn.Module):
    """(object-specific image, general image, detection softmax) -> 2-channel logits (sec. 3.5)."""

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
    of its pre-quantisation ``features`` (sec. 3.2)."""
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


# ----------------------------------------------------------------------------- training data
def rotate_some(images: torch.Tensor, probability: float) -> torch.Tensor:
    """Each image rotated by U(-90, 90) degrees with ``probability`` (bilinear, zeros outside:
    ``iaa.Affine(rotate=(-90, 90))``)."""
    rotated = []
    for image in images:
        if float(torch.rand(())) < probability:
            image = TF.rotate(image, uniform(*ROTATION_DEGREES), interpolation=InterpolationMode.BILINEAR, fill=0.0)
        rotated.append(image)
    return torch.stack(rotated)


def perlin_masks(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(B, 1, H, W) Perlin masks, each left empty with p = 0.5."""
    masks = []
    for _ in range(batch):
        mask = perlin_mask(height, width)
        if float(torch.rand(())) < NO_ANOMALY_PROBABILITY:
            mask = torch.zeros_like(mask)
        masks.append(mask)
    return torch.stack(masks)[:, None].to(device)


def stage_one_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TrainWholeImageDataset(perlin_augment=True)``: (images, 40 % rotated; Perlin masks)."""
    images = rotate_some(images, STAGE_ONE_ROTATION_PROBABILITY)
    return images, perlin_masks(images.shape[0], *images.shape[-2:], images.device)


def stage_two_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``MVTecImageAnomTrainDataset``: (images with uniform-colour Perlin anomalies, masks)."""
    images = rotate_some(images, STAGE_TWO_ROTATION_PROBABILITY)
    masks = perlin_masks(images.shape[0], *images.shape[-2:], images.device)
    colours = torch.rand(images.shape[0], 3, 1, 1).to(images)
    beta = (torch.rand(images.shape[0], 1, 1, 1) * COLOUR_BETA_MAX).to(images)
    augmented = images * (1 - masks) + (1 - beta) * colours * masks + beta * images * masks
    return augmented, masks


# ----------------------------------------------------------------------------- trainer
class DsrTrainer(BaseTrainer):
    """Stage one (restriction modules, object-specific decoder, detection module on latent
    anomalies) for the first two thirds of the steps, then the upsampling module."""

    model_class = DsrModel
    scheduler_interval = "step"

    def __init__(self, *, train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        super().__init__(train_config, device, **model_options)
        self.announced_stage_two = False

    def stage_one_modules(self) -> list[nn.Module]:
        model = self.model
        return [model.subspace_restriction_lo, model.subspace_restriction_hi, model.image_reconstruction,
                model.anomaly_detection]

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam 2e-4: four stage-one groups (x 0.1 from 80 % of stage one) and the upsampling module."""
        groups = [{"params": module.parameters(), "lr": LEARNING_RATE} for module in self.stage_one_modules()]
        groups.append({"params": self.model.upsampling.parameters(), "lr": LEARNING_RATE})
        optimizer = torch.optim.Adam(groups)
        factors = [self.stage_one_lr_factor] * 4 + [lambda step: 1.0]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)

    def planned_total_steps(self) -> int:
        """Steps of the current fit, else of the configured schedule (a loss outside fit())."""
        if self.total_steps:
            return self.total_steps
        return self.train_config.num_steps or self.train_config.num_epochs

    def stage_one_steps(self) -> int:
        total = self.planned_total_steps()
        return total - int(total * UPSAMPLING_SHARE)

    def stage_one_lr_factor(self, step: int) -> float:
        return STAGE_ONE_LR_GAMMA if step >= int(STAGE_ONE_LR_MILESTONE * self.stage_one_steps()) else 1.0

    def in_stage_two(self) -> bool:
        return self.global_step >= self.stage_one_steps()

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = self.model.to_network_input(batch["image"])
        if self.in_stage_two():
            if self.model.training and not self.announced_stage_two:
                tqdm.write(f"DSR stage two from step {self.global_step + 1}: training the upsampling module")
                self.announced_stage_two = True
            augmented, masks = stage_two_batch(images)
            upsampled = self.model.detect(augmented).upsampled_logits
            loss = focal_loss(torch.softmax(upsampled, dim=1), masks)
            return {"loss": loss, "loss_upsampling_focal": loss}
        images, masks = stage_one_batch(images)
        outputs = self.model.stage_one(images, masks)
        terms = {
            "loss_focal": focal_loss(torch.softmax(outputs.detection_logits, dim=1), outputs.target_masks),
            "loss_feature_top": F.mse_loss(outputs.restored_top, outputs.normal_top),
            "loss_feature_bottom": F.mse_loss(outputs.restored_bottom, outputs.normal_bottom),
            "loss_image": F.mse_loss(images, outputs.object_specific),
        }
        total = (terms["loss_focal"] + terms["loss_feature_top"] + terms["loss_feature_bottom"]
                 + IMAGE_LOSS_WEIGHT * terms["loss_image"])
        return {"loss": total, **terms}

    def run_notes(self) -> dict[str, str]:
        total = self.planned_total_steps()
        return {"stages": f"steps 1-{self.stage_one_steps()}: stage one; {self.stage_one_steps() + 1}-{total}: "
                          "upsampling module (the authors' 100 + 50 epochs, scaled)"}


# ----------------------------------------------------------------------------- VQ-VAE pretraining
class PretrainingImages(Dataset):
    """Images resized to ``img_size``, [0, 1] BGR, mirrored left-right with p = 0.5."""

    def __init__(self, files: list[Path], img_size: int) -> None:
        self.files, self.img_size = files, img_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = image_to_tensor(load_rgb_image(self.files[index]), self.img_size, False).flip(0)
        return image.flip(-1) if torch.rand(()) < 0.5 else image


def pretrain_dsr(
    image_dir: str | Path | Sequence[str | Path],
    output_path: str | Path | None = None,
    num_steps: int = 10000,
    batch_size: int = 8,
    img_size: int = 256,
    lr: float = LEARNING_RATE,
    embedding_dim: int = EMBEDDING_DIM,
    num_embeddings: int = NUM_EMBEDDINGS,
    num_hiddens: int = NUM_HIDDENS,
    num_residual_hiddens: int = NUM_RESIDUAL_HIDDENS,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Train DSR's VQ-VAE on any folder of images and save its state dict (the authors' layout)
    where :class:`DsrModel` looks for it (``BACKBONE_DIR/dsr/vq_model_pretrained_128_4096.pckl``).

    The paper trains it on ImageNet; natural images of any kind are the closest substitute, the
    product's own normal images the fallback. Loss: ``MSE(x, x_hat) + commitment`` (0.25 per
    quantiser), codebooks by EMA (decay 0.99), Adam ``lr``.
    """
    output_path = Path(output_path) if output_path is not None else get_backbone_path(VQ_WEIGHTS)
    if output_path.exists() and not overwrite:
        raise FileExistsError(f"{output_path} already exists; pass overwrite=True (--overwrite) to replace it")
    if img_size % DOWNSAMPLING or img_size < 2 * DOWNSAMPLING:
        raise ValueError(f"img_size must be a multiple of {DOWNSAMPLING} and at least {2 * DOWNSAMPLING}, got {img_size}")
    files = find_images(image_dir)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {image_dir}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    random.seed(seed)
    model = DiscreteLatentModel(num_hiddens, NUM_RESIDUAL_LAYERS, num_residual_hiddens, num_embeddings, embedding_dim)
    model = model.to(device).train()
    for quantizer in (model._vq_vae_top, model._vq_vae_bot):
        quantizer.dead_code_threshold = DEAD_CODE_THRESHOLD
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loader = DataLoader(PretrainingImages(files, img_size), batch_size=batch_size, shuffle=True,
                        drop_last=len(files) > batch_size, generator=torch.Generator().manual_seed(seed),
                        num_workers=get_settings().num_workers)
    batches = cycle(loader)
    bar = tqdm(range(num_steps), desc="pretrain DSR VQ-VAE", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        images = next(batches).to(device)
        output = model(images)
        reconstruction_loss = F.mse_loss(output.reconstruction, images)
        loss = reconstruction_loss + output.commitment_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(mse=f"{reconstruction_loss.item():.4f}", perplexity=f"{output.perplexity_bottom.item():.0f}")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    temporary = output_path.with_suffix(output_path.suffix + ".tmp")
    torch.save(state, temporary)
    temporary.replace(output_path)
    return output_path


VARIANTS = {
    "dsr": ModelVariant(
        trainer=DsrTrainer, family="reconstruction",
        train={"num_epochs": 50, "batch_size": 8, "img_size": 256, "normalize": False},  # SPEC sec. 7
        tiny={"pretrained": False, "embedding_dim": 8, "num_embeddings": 32, "num_hiddens": 8,
              "num_residual_hiddens": 4, "detection_width": 4, "img_size": 64, "num_steps": 3, "batch_size": 4},
        paper={"num_steps": PAPER_NUM_STEPS},  # 100 + 50 authors' epochs of 8,000 draws, batch 8
        note="Needs the VQ-VAE at BACKBONE_DIR/dsr/vq_model_pretrained_128_4096.pckl (the authors' file, or "
             "`anomalyzoo pretrain-dsr --images DIR`). The first 2/3 of the steps train stage one, the last "
             "1/3 the upsampling module.",
    ),
}
