"""DSR's VQ-VAE (``discrete_model.py`` of VitjanZ/DSR_anomaly_detection): two EMA codebooks over a
two-level encoder and the general appearance decoder; see :mod:`anomalyzoo.models.dsr.model` for
the method and every deviation. Names follow the authors' so that their
``vq_model_pretrained_128_4096.pckl`` loads key for key."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.backbone import BackboneWeightsNotFound, get_backbone_path

VQ_WEIGHTS = "dsr_vq_model"  # BACKBONE_WEIGHT_FILES: dsr/vq_model_pretrained_128_4096.pckl
NUM_HIDDENS = 128  # test_dsr.py / train_dsr.py
NUM_RESIDUAL_HIDDENS = 64
NUM_RESIDUAL_LAYERS = 2
EMBEDDING_DIM = 128
NUM_EMBEDDINGS = 4096
COMMITMENT_COST = 0.25
EMA_DECAY = 0.99
EMA_EPSILON = 1e-5  # VectorQuantizerEMA(epsilon=1e-5)
DISTANCE_CHUNK = 4096  # rows of the distance matrix at a time


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
        # one chunk when traced for export: a traced split would fix the row count (the batch size)
        chunks = [flat_inputs.detach()] if torch.jit.is_tracing() else flat_inputs.detach().split(DISTANCE_CHUNK)
        for chunk in chunks:
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
