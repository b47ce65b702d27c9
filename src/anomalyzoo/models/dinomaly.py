"""Dinomaly: "The Less Is More Philosophy in Multi-Class Unsupervised Anomaly Detection"
(Guo, Lu, Zhang, Chen, Li & Liao, CVPR 2025, arXiv 2405.14325; authors' code guojiajeremy/Dinomaly,
``dinomaly_mvtec_uni.py``, ``models/uad.py`` ``ViTill``, ``utils.py``).

A frozen foundation ViT encodes the image; a small transformer decoder learns, on normal images,
to reconstruct the encoder's middle-level features from a noisy bottleneck of them. Where the
input is anomalous the decoder's reconstruction drifts from the encoder; the cosine distance
between the two is the anomaly map. Designed for (and by default in the paper trained as) one
model on the union of many categories: ``train(dataset, [cat1, cat2, ...], "dinomaly-...")``.

- Encoder (sec. 3, "Foundation Transformers"): DINOv2 ViT-S/B/L with patch 14, frozen (``components_dinomaly.loader``:
  the official checkpoints). The token sequences (class token included) after the *target
  blocks*, the middle eight: blocks 2-9 of ViT-S/B's 12, blocks 4, 6, ..., 18 of ViT-L's 24
  (``dinomaly_mvtec_uni.py``). The authors' default is DINOv2 *with registers*
  (``dinov2reg_vit_base_14``); the spec names the plain DINOv2 checkpoints
  (``dinov2_vit{s,b,l}14_pretrain.pth``), which the authors' loader also supports (their
  ``vit_encoder.load('dinov2_vit_base_14')``) and their README compares with other foundation models.
- Noisy bottleneck (sec. 3, "Noisy Bottleneck"): the mean of the eight target-block outputs goes through one MLP
  (D -> 4D -> D) with dropout 0.2 on its input and after each layer (``layers.DinomalyMLP``).
- Decoder (sec. 3, "Linear Attention"): ``decoder_depth`` 8 pre-norm ViT blocks with linear attention
  (``vision_transformer.DecoderBlock``). Its block outputs, last first, are paired with the
  encoder's target blocks in order.
- Loose reconstruction (sec. 3, "Loose Reconstruction"): the eight layers are fused into two groups, the mean of
  encoder blocks {0-3} and {4-7} of the target list against the mean of the same decoder groups;
  class tokens are dropped after fusing and the tokens laid out on the (h, w) patch grid.
  Loss: the global hard-mining cosine loss (``loss.global_cosine_hard_mining_loss``, p rising
  to 0.9, factor 0.1).
- Anomaly map (authors' ``cal_anomaly_maps`` and ``evaluation_batch(max_ratio=0.01,
  resize_mask=256)``): per group ``1 - cos`` along the channels, upsampled bilinearly
  (align_corners=True) to the input size and averaged over the groups; resized to 256 x 256
  (where the authors evaluate) and smoothed with their 5 x 5 Gaussian of sigma 4 (zero padding);
  the image score is the mean of the top 1 % of that map. The map returned is the smoothed one,
  resized back to the input size (the contract of every model here).
- Optimisation (appendix B, implementation details; ``dinomaly_mvtec_uni.py``): StableAdamW over bottleneck and decoder
  (lr 2e-3, betas (0.9, 0.999), weight decay 1e-4, AMSGrad, eps 1e-10), gradient-norm clipping
  at 0.1, warm-up cosine schedule 2e-3 -> 2e-4 per step. The authors train by iterations
  (10,000 for the 15 MVTec categories together, batch 16, warm-up 100, hard-mining ramp 1000);
  the registry trains by epochs (spec: 15), so the warm-up and the ramp are the same *fractions*
  (1 % and 10 %) of the planned steps: with ``num_steps=10000`` they are exactly the authors'.
  ``anomalyzoo list`` shows that paper schedule.
- Initialisation: the scripts' truncated normal (std 0.01, +-0.03) for every linear layer of
  bottleneck and decoder.

Resolutions (registry entries ``-224``, ``-392``, ``-448``), as the authors' scripts feed them
(``dataset.get_data_transforms(image_size, crop_size)``: resize, then centre crop):

- ``-392``: resize to 448, centre-crop 392 ("R448-C392", the scripts' ``image_size = 448;
  crop_size = 392`` and the paper's default), i.e. ``crop_pct = 392 / 448 = 0.875``; masks go
  through the same crop, so pixel metrics cover the crop as theirs do;
- ``-448``: resize to 448, no crop (the scripts' alternative ``image_size = 448; crop_size = 448``);
- ``-224``: resize to 224, no crop.

The positional embedding, trained at 518 px (37 x 37 patches), is interpolated to the entry's
grid (16, 28 or 32 patches per side) when the checkpoint is loaded, exactly as DINOv2
interpolates it on the fly (``loader.interpolate_pos_embed``).

Deviations: batches keep the last partial batch (the authors drop it); the encoder is plain
DINOv2, not DINOv2-with-registers (see above); the epoch-based default schedule (see above).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.blur import gaussian_kernel1d
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.components.variants import ModelVariant
from anomalyzoo.models.components_dinomaly.layers import DinomalyMLP
from anomalyzoo.models.components_dinomaly.loss import (
    EASY_GRADIENT_FACTOR,
    P_FINAL,
    global_cosine_hard_mining_loss,
    hard_mining_share,
)
from anomalyzoo.models.components_dinomaly.optimizer import StableAdamW, WarmCosineSchedule
from anomalyzoo.models.components_dinomaly.vision_transformer import DecoderBlock, DinoV2Encoder, init_dinomaly_weights

# the middle eight blocks of each encoder (dinomaly_mvtec_uni.py: target_layers)
TARGET_LAYERS: dict[str, tuple[int, ...]] = {
    "dinov2_vit_small_14": (2, 3, 4, 5, 6, 7, 8, 9),
    "dinov2_vit_base_14": (2, 3, 4, 5, 6, 7, 8, 9),
    "dinov2_vit_large_14": (4, 6, 8, 10, 12, 14, 16, 18),
}
FUSE_GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))  # fuse_layer_encoder = fuse_layer_decoder
BOTTLENECK_EXPANSION = 4  # bMlp(embed_dim, embed_dim * 4, embed_dim)
EVALUATION_SIZE = 256  # evaluation_batch(resize_mask=256)
SMOOTHING_KERNEL, SMOOTHING_SIGMA = 5, 4.0  # get_gaussian_kernel(kernel_size=5, sigma=4)
TOP_RATIO = 0.01  # evaluation_batch(max_ratio=0.01): mean of the top 1 % of the map

LEARNING_RATE, FINAL_LEARNING_RATE = 2e-3, 2e-4
WEIGHT_DECAY = 1e-4
ADAM_EPS = 1e-10  # the multi-class scripts (1e-8 in the class-separated ones)
MAX_GRAD_NORM = 0.1  # nn.utils.clip_grad_norm(trainable.parameters(), max_norm=0.1)
WARMUP_FRACTION = 100 / 10000  # warmup_iters=100 of total_iters=10000
PAPER_NUM_STEPS = 10000  # dinomaly_mvtec_uni.py total_iters (15 categories, one model)


def fuse(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of same-shaped token tensors (``ViTill.fuse_feature``)."""
    return torch.stack(list(features), dim=1).mean(dim=1)


def cosine_distance_map(encoder_groups: Sequence[torch.Tensor], decoder_groups: Sequence[torch.Tensor],
                        image_size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W): per group 1 - cos along channels, upsampled (bilinear, align_corners=True), averaged."""
    maps = []
    for encoder, decoder in zip(encoder_groups, decoder_groups, strict=True):
        distance = 1.0 - F.cosine_similarity(encoder, decoder, dim=1)[:, None]
        maps.append(F.interpolate(distance, size=image_size, mode="bilinear", align_corners=True))
    return torch.cat(maps, dim=1).mean(dim=1, keepdim=True)


def top_ratio_score(maps: torch.Tensor, ratio: float = TOP_RATIO) -> torch.Tensor:
    """(B, 1, H, W) -> (B,): the mean of the largest ``int(H * W * ratio)`` values (the maximum at 0)."""
    flat = maps.flatten(1)
    count = int(flat.shape[1] * ratio)
    if count < 1:
        return flat.amax(dim=1)
    return flat.topk(count, dim=1).values.mean(dim=1)


class DinomalyModel(nn.Module):
    def __init__(
        self,
        encoder_name: str = "dinov2_vit_base_14",
        bottleneck_dropout: float = 0.2,
        decoder_depth: int = 8,
        target_layers: Sequence[int] | None = None,
        fuse_groups: Sequence[Sequence[int]] = FUSE_GROUPS,
        pretrained: bool = True,
        input_normalized: bool = True,
        input_size: tuple[int, int] = (224, 224),
    ) -> None:
        super().__init__()
        self.target_layers = list(target_layers if target_layers is not None else TARGET_LAYERS[encoder_name])
        self.fuse_groups = [list(group) for group in fuse_groups]
        if self.target_layers != sorted(set(self.target_layers)):
            raise ValueError(f"target_layers must be distinct and ascending, got {self.target_layers}")
        if decoder_depth != len(self.target_layers):
            raise ValueError(f"decoder_depth ({decoder_depth}) must equal the number of target layers "
                             f"({len(self.target_layers)}): each decoder block reconstructs one of them")
        if any(not 0 <= i < decoder_depth for group in self.fuse_groups for i in group):
            raise ValueError(f"fuse_groups {self.fuse_groups} index layers outside 0..{decoder_depth - 1}")
        self.input_size = tuple(input_size)
        self.encoder = DinoV2Encoder(encoder_name, self.input_size, self.target_layers, pretrained=pretrained,
                                     input_normalized=input_normalized)
        dim = self.encoder.embed_dim
        self.bottleneck = DinomalyMLP(dim, BOTTLENECK_EXPANSION * dim, dim, dropout=bottleneck_dropout)
        self.decoder = nn.ModuleList(DecoderBlock(dim, self.encoder.num_heads) for _ in range(decoder_depth))
        init_dinomaly_weights(self.bottleneck)
        init_dinomaly_weights(self.decoder)
        kernel = gaussian_kernel1d(SMOOTHING_SIGMA, SMOOTHING_KERNEL)
        self.register_buffer("smoothing_kernel", torch.outer(kernel, kernel)[None, None], persistent=False)

    def trainable_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.bottleneck, self.decoder])

    def reconstruct(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(encoder groups, decoder groups), each (B, D, h, w) on the patch grid (``ViTill.forward``)."""
        if tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(f"This Dinomaly model was built for {self.input_size} inputs, got {tuple(images.shape[-2:])}")
        encoder_layers = self.encoder(images)
        tokens = self.bottleneck(fuse(encoder_layers))
        decoder_layers = []
        for block in self.decoder:
            tokens = block(tokens)
            decoder_layers.append(tokens)
        decoder_layers = decoder_layers[::-1]  # the last decoder block reconstructs the first target block
        prefix = self.encoder.num_prefix_tokens
        height, width = self.encoder.grid

        def grouped(layers: list[torch.Tensor]) -> list[torch.Tensor]:
            fused = [fuse([layers[i] for i in group])[:, prefix:] for group in self.fuse_groups]
            return [f.transpose(1, 2).reshape(f.shape[0], -1, height, width) for f in fused]

        return grouped(encoder_layers), grouped(decoder_layers)

    def smoothed_map(self, encoder_groups: list[torch.Tensor], decoder_groups: list[torch.Tensor]) -> torch.Tensor:
        """(B, 1, 256, 256): the averaged distance map at the authors' evaluation size, smoothed."""
        distance = cosine_distance_map(encoder_groups, decoder_groups, self.input_size)
        distance = F.interpolate(distance, size=(EVALUATION_SIZE, EVALUATION_SIZE), mode="bilinear", align_corners=False)
        return F.conv2d(distance, self.smoothing_kernel, padding=SMOOTHING_KERNEL // 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        smoothed = self.smoothed_map(*self.reconstruct(images))
        score = top_ratio_score(smoothed)
        anomaly_map = F.interpolate(smoothed, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        return {"pred_score": score, "anomaly_map": anomaly_map[:, 0]}


class DinomalyTrainer(BaseTrainer):
    """Trains bottleneck + decoder with the hard-mining global cosine loss, one scheduler step per batch."""

    model_class = DinomalyModel
    scheduler_interval = "step"

    def __init__(self, *, learning_rate: float = LEARNING_RATE, final_learning_rate: float = FINAL_LEARNING_RATE,
                 weight_decay: float = WEIGHT_DECAY, max_grad_norm: float = MAX_GRAD_NORM,
                 hard_mining_p: float = P_FINAL, hard_mining_factor: float = EASY_GRADIENT_FACTOR,
                 train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        self.learning_rate = learning_rate
        self.final_learning_rate = final_learning_rate
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        self.hard_mining_p = hard_mining_p
        self.hard_mining_factor = hard_mining_factor
        super().__init__(train_config, device, **model_options)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, WarmCosineSchedule]:
        optimizer = StableAdamW(self.model.trainable_modules().parameters(), lr=self.learning_rate, betas=(0.9, 0.999),
                                eps=ADAM_EPS, weight_decay=self.weight_decay, amsgrad=True)
        total = max(self.total_steps, 1)
        scheduler = WarmCosineSchedule(optimizer, self.learning_rate, self.final_learning_rate, total_steps=total,
                                       warmup_steps=round(WARMUP_FRACTION * total))
        return optimizer, scheduler

    def current_hard_mining_p(self) -> float:
        """p at this step: 0 -> ``hard_mining_p`` over the first 10 % of the planned steps."""
        return hard_mining_share(self.global_step, max(self.total_steps, 1), self.hard_mining_p)

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        encoder_groups, decoder_groups = self.model.reconstruct(batch["image"])
        p = self.current_hard_mining_p()
        loss = global_cosine_hard_mining_loss(encoder_groups, decoder_groups, p, self.hard_mining_factor)
        return {"loss": loss}

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        self.setup_optimization()
        loss = self.training_loss(batch)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.trainable_modules().parameters(), self.max_grad_norm)
        self.optimizer.step()
        return {"loss": float(loss.detach()), "hard_mining_p": self.current_hard_mining_p()}


# size -> (encoder, spec batch size); the registry rows are every size at every resolution
DINOMALY_SIZES: dict[str, tuple[str, int]] = {
    "small": ("dinov2_vit_small_14", 32),
    "base": ("dinov2_vit_base_14", 16),
    "large": ("dinov2_vit_large_14", 8),
}
# resolution -> crop_pct: the share of the resized image the centre crop keeps (see the module doc)
DINOMALY_RESOLUTIONS: dict[int, float] = {224: 1.0, 392: 392 / 448, 448: 1.0}

# ViT-B and ViT-L checkpoints (with optimiser state) weigh 1.3 and 2.7 GB, which makes the contract
# test take minutes per entry on 2 cores: their contract-test configuration is the ViT-S encoder (the
# same path from tokens to maps); tests/models/test_dinomaly.py runs ViT-B and ViT-L end to end
_TINY_ENCODER = {"small": "dinov2_vit_small_14", "base": "dinov2_vit_small_14", "large": "dinov2_vit_small_14"}


def _variant(size: str, resolution: int) -> ModelVariant:
    encoder, batch_size = DINOMALY_SIZES[size]
    return ModelVariant(
        trainer=DinomalyTrainer, family="foundation",
        options={"encoder_name": encoder, "bottleneck_dropout": 0.2, "decoder_depth": 8},  # SPEC sec. 7
        train={"num_epochs": 15, "batch_size": batch_size, "img_size": resolution, "normalize": True,  # SPEC sec. 7
               **({"crop_pct": DINOMALY_RESOLUTIONS[resolution]} if DINOMALY_RESOLUTIONS[resolution] != 1.0 else {})},
        tiny={"encoder_name": _TINY_ENCODER[size], "pretrained": False, "img_size": 56, "num_steps": 2, "batch_size": 4},
        # dinomaly_mvtec_uni.py: 10,000 iterations of batch 16 on all 15 categories at R448-C392
        paper={"num_steps": PAPER_NUM_STEPS, "batch_size": 16},
        note=("trained on one category by default; train(dataset, [cat1, cat2, ...], model) trains one model on "
              "several (the paper's multi-class protocol). Needs the official DINOv2 checkpoint under "
              "BACKBONE_DIR/" + encoder + "/"),
    )


VARIANTS = {f"dinomaly-{size}-{resolution}": _variant(size, resolution)
            for size in DINOMALY_SIZES for resolution in DINOMALY_RESOLUTIONS}
