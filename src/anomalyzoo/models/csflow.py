"""CS-Flow: "Fully Convolutional Cross-Scale-Flows for Image-based Defect Detection"
(Rudolph, Wehrbein, Rosenhahn & Wandt, WACV 2022, arXiv 2110.02855; authors' code
marco-rudolph/cs-flow: ``config.py``, ``model.py``, ``freia_funcs.py``, ``train.py``,
``utils.py``, ``evaluate.py``).

A frozen ImageNet CNN describes the image at three scales; one normalizing flow maps the three
feature maps *jointly* to three latent maps of the same shapes that should be standard normal
for defect-free images. The flow is fully convolutional and exchanges information between
neighbouring scales in every coupling block, so a latent position sees both its local
neighbourhood and the coarser context. The likelihood of the latents scores the image, and
since the latents keep the spatial layout, ``||z_ij||^2`` localises the defect.

- Features (``model.py`` ``FeatureExtractor``): the image at full size and resized to 1/2 and
  1/4 of its side (``F.interpolate``'s default *nearest* mode, as the authors), each through the
  same frozen EfficientNet-B5; the map kept is the output of block 36 of its 39 MBConv blocks
  (``eff_ext(use_layer=35)``), i.e. the end of the 6th of its 7 stages: 304 channels at stride
  32. timm's ``feature_info`` lists only the stages where the stride changes (5 and 7), so we
  read stage 6 through timm's ``forward_intermediates(..., extra_blocks=True)`` (index 0 is the
  stem, index k the k-th stage) and prune the stages after it: ``feature_stage=6``. The authors
  feed 768 px (maps 24/12/6, ``config.py``); the spec's 256 px gives maps 8 x 8, 4 x 4 and
  2 x 2, the size anomalib runs by default (anomalib also takes stage 6's 304 channels, from
  torchvision's PyTorch-trained B5 ``features.6.8``; we use timm's TF port
  ``tf_efficientnet_b5``, with TF "same" padding like the authors' ``efficientnet_pytorch``). The
  scales are joined by exact 2x up/down-sampling, so the maps must halve exactly: the image
  side must be a multiple of 4 x the stage's stride (128 for stage 6, the authors'
  ``assert img_size % 128 == 0``); a size that breaks this is refused when the model is built.
- Flow (``model.py`` ``get_cs_flow_model``): ``n_coupling_blocks`` = 4 blocks, each a fixed
  channel permutation of every scale followed by a parallel affine coupling of all scales.
  The permutations are the authors' exactly: block k seeds numpy's legacy generator with k and
  draws one permutation per scale in turn (``ParallelPermute(seed=k)``); they are buffers.
- Coupling (``freia_funcs.py`` ``parallel_glow_coupling_layer``, the paper's coupling block
  equations): every scale's channels are split in halves ``x1`` (first ``C // 2``) and ``x2``.
  A cross-scale subnetwork reads the ``x2`` of all scales and gives per scale ``(s, t)`` for
  ``y1 = x1 * exp(a(s)) + t``; a second one reads the ``y1`` of all scales and gives ``(s, t)``
  for ``y2 = x2 * exp(a(s)) + t``. ``a(s) = clamp * 0.636 * atan(s / clamp)`` is the soft clamp
  (0.636 is the authors' rounding of 2/pi, so ``|a| < 0.999 clamp``), ``clamp`` = 3
  (``config.clamp``). ``log|det J|`` is the sum of ``a(s)`` over both halves, channels,
  positions and scales. Latents are clipped to +-1e6 as in the authors' forward. (The
  authors' *reverse* pass has an indexing slip, ``t02 = r01[...]``; it is never used there. We
  write the exact inverse and test it.)
- Cross-convolutions (``freia_funcs.py`` ``CrossConvolutions``, the paper's subnetwork figure):
  per scale a conv (``hidden_channels`` = 1024, ``config.fc_internal``) and leaky ReLU (slope
  0.1), then per scale a conv to the ``2 * len(half)`` outputs, plus, from each neighbour, a
  conv of its hidden map: bilinearly upsampled x2 (``align_corners=False``) from the coarser
  scale, stride-2 from the finer one. All convs have bias and zero padding ``k // 2``; the
  kernel is 3 in every block but the last, which uses 5 (``config.kernel_sizes = [3] * (n - 1)
  + [5]``). Each scale's output is multiplied by a learnable scalar gamma initialised to 0
  (``config.use_gamma = True``), so every coupling starts as the identity; there is no other
  fixed output scaling.
- Loss (``utils.py`` ``get_loss``): per image ``0.5 * ||z||^2 - log|det J|`` with ``z`` all
  three latent maps concatenated, averaged over the batch and divided by the number of latent
  dimensions D (the negative log-likelihood per dimension up to a constant). anomalib's port
  sums the log-determinant over the batch as well (``torch.stack(...).sum()`` in
  ``ParallelGlowCouplingLayer``), which weights it B times in its loss; we keep the authors'.
- Scores (``train.py``, ``evaluate.py``): the image score is the mean of ``z^2 / 2`` over all D
  latent entries of the image (so the finest scale, with most positions, weighs most); the map
  is ``mean_c(z^2)`` of the *first* (finest) scale, upsampled bilinearly to the input
  (``evaluate.py`` keeps ``likelihood_grouped[0]``; anomalib's README says the same of the
  paper). ``anomaly_map_mode="product"`` gives anomalib's default instead: the product over
  the three scales of their upsampled ``mean_c(z^2)``.
- Training (``train.py``, ``config.py``): Adam over the flow only, lr 2e-4, eps 1e-4, weight
  decay 1e-5, with torch's default betas (0.9, 0.999): the authors pass none. anomalib passes
  (0.5, 0.9); ``adam_betas=(0.5, 0.9)`` reproduces it (``learning_rate`` and ``weight_decay``
  are options too). The gradient norm is clipped to 1 (``max_grad_norm``), our
  ``gradient_clip_norm``. The authors train 240 epochs (4 x 60) at batch 16 on 768 px; the
  spec's defaults are 500 epochs, batch 2, 256 px (``anomalyzoo list`` shows the paper's row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.efficientnet import EfficientNet
from torch import nn

from anomalyzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from anomalyzoo.models.components.backbone import create_backbone
from anomalyzoo.models.components.feature_extractor import input_statistics
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.components.variants import ModelVariant

N_SCALES = 3  # config.n_scales: full, 1/2 and 1/4 of the image side
SOFT_CLAMP_FACTOR = 0.636  # freia_funcs.log_e: the authors' rounding of 2 / pi
LEAKY_SLOPE = 0.1  # CrossConvolutions(leaky_slope=0.1)
LATENT_LIMIT = 1e6  # parallel_glow_coupling_layer clips its outputs to +-1e6
LEARNING_RATE = 2e-4  # config.lr_init
ADAM_EPS = 1e-4  # train.py
WEIGHT_DECAY = 1e-5  # train.py
ADAM_BETAS = (0.9, 0.999)  # train.py leaves torch's default (anomalib: (0.5, 0.9))
MAX_GRAD_NORM = 1.0  # config.max_grad_norm
ANOMALY_MAP_MODES = ("largest_scale", "product")


def soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """``clamp * 0.636 * atan(s / clamp)``: the log-scale of the affine coupling, smoothly bounded
    by about ``clamp`` (``freia_funcs.log_e``)."""
    return clamp * SOFT_CLAMP_FACTOR * torch.atan(s / clamp)


def cs_flow_loss(latents: Sequence[torch.Tensor], log_jac_det: torch.Tensor) -> torch.Tensor:
    """``mean_b(0.5 * ||z_b||^2 - log|det J_b|) / D`` over the concatenated latents of all scales
    (``utils.get_loss``). ``log_jac_det`` is per image, (B,)."""
    flat = torch.cat([z.flatten(1) for z in latents], dim=1)
    return torch.mean(0.5 * flat.pow(2).sum(dim=1) - log_jac_det) / flat.shape[1]


def image_scores(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of ``z^2 / 2`` over every latent entry of all scales (``train.py``/``evaluate.py``): (B,)."""
    flat = torch.cat([z.flatten(1) for z in latents], dim=1)
    return flat.pow(2).mean(dim=1) / 2


def scale_maps(latents: Sequence[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """Per scale ``mean_c(z^2)`` upsampled bilinearly to ``size``: each (B, 1, H, W)."""
    return [F.interpolate(z.pow(2).mean(dim=1, keepdim=True), size=size, mode="bilinear", align_corners=False)
            for z in latents]


class MultiScaleEfficientNet(nn.Module):
    """A frozen timm EfficientNet applied to the image at full, 1/2 and 1/4 size, returning the
    output of stage ``feature_stage`` at each scale (``model.py`` ``FeatureExtractor``)."""

    def __init__(self, backbone: str, feature_stage: int, pretrained: bool, input_normalized: bool) -> None:
        super().__init__()
        model = create_backbone(backbone, pretrained=pretrained)
        if not isinstance(model, EfficientNet):
            raise ValueError(
                f"CS-Flow reads one stage of an EfficientNet (the authors' block 36 of EfficientNet-B5); backbone "
                f"'{backbone}' is a {type(model).__name__}. Use 'efficientnet_b5', 'efficientnet_lite0' or another "
                "timm EfficientNet.")
        num_stages = len(model.blocks)
        if not 1 <= feature_stage <= num_stages:
            raise ValueError(f"feature_stage must be in 1..{num_stages} for '{backbone}' (stage k is the output of "
                             f"timm's blocks[k - 1]; 6 is the authors' choice), got {feature_stage}")
        model.prune_intermediate_layers([feature_stage], prune_norm=True, prune_head=True, extra_blocks=True)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.backbone = model
        self.feature_stage = feature_stage
        # images arrive ImageNet-normalised (normalize=True) or in [0, 1]; the backbone wants its own statistics
        backbone_mean, backbone_std = (torch.tensor(v).view(1, 3, 1, 1) for v in input_statistics(model))
        source_mean = torch.tensor(IMAGENET_MEAN if input_normalized else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        source_std = torch.tensor(IMAGENET_STD if input_normalized else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        self.register_buffer("input_scale", source_std / backbone_std, persistent=False)
        self.register_buffer("input_shift", (source_mean - backbone_mean) / backbone_std, persistent=False)

    def train(self, mode: bool = True) -> "MultiScaleEfficientNet":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics fixed, no drop-path
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> ``N_SCALES`` maps (B, C, h / 2^s, w / 2^s)."""
        images = images * self.input_scale + self.input_shift
        height, width = images.shape[-2:]
        features = []
        for scale in range(N_SCALES):
            size = (height // 2**scale, width // 2**scale)
            resized = images if scale == 0 else F.interpolate(images, size=size, mode="nearest")
            features.append(self.backbone.forward_intermediates(
                resized, indices=[self.feature_stage], intermediates_only=True, extra_blocks=True)[0])
        return features


class CrossConvolutions(nn.Module):
    """The subnetwork of a parallel coupling (``freia_funcs.CrossConvolutions``): per scale
    conv -> leaky ReLU -> conv, plus a conv of each neighbouring scale's hidden map (upsampled x2
    from the coarser, stride 2 from the finer), times a zero-initialised learnable gamma per scale.
    Scale 0 is the finest."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()

        def conv(channels_in: int, channels_out: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(channels_in, channels_out, kernel_size, stride=stride, padding=kernel_size // 2)

        self.hidden_convs = nn.ModuleList([conv(in_channels, hidden_channels) for _ in range(N_SCALES)])
        self.output_convs = nn.ModuleList([conv(hidden_channels, out_channels) for _ in range(N_SCALES)])
        # up_convs[s]: from scale s + 1 (upsampled) to scale s; down_convs[s]: from scale s (stride 2) to s + 1
        self.up_convs = nn.ModuleList([conv(hidden_channels, out_channels) for _ in range(N_SCALES - 1)])
        self.down_convs = nn.ModuleList([conv(hidden_channels, out_channels, stride=2) for _ in range(N_SCALES - 1)])
        self.gammas = nn.Parameter(torch.zeros(N_SCALES))

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [F.leaky_relu(conv(x), LEAKY_SLOPE) for conv, x in zip(self.hidden_convs, inputs)]
        outputs = []
        for scale, own in enumerate(hidden):
            out = self.output_convs[scale](own)
            if scale > 0:
                out = out + self.down_convs[scale - 1](hidden[scale - 1])
            if scale + 1 < N_SCALES:
                coarser = F.interpolate(hidden[scale + 1], scale_factor=2, mode="bilinear", align_corners=False)
                out = out + self.up_convs[scale](coarser)
            outputs.append(self.gammas[scale] * out)
        return outputs


class ParallelPermute(nn.Module):
    """A fixed random channel permutation per scale, the authors' exactly: numpy's legacy
    generator seeded with ``seed`` draws one permutation per scale in turn
    (``freia_funcs.ParallelPermute``)."""

    def __init__(self, channels: int, seed: int) -> None:
        super().__init__()
        generator = np.random.RandomState(seed)
        permutations = torch.from_numpy(np.stack([generator.permutation(channels) for _ in range(N_SCALES)]))
        self.register_buffer("permutations", permutations.long())
        self.register_buffer("inverse_permutations", torch.argsort(permutations, dim=1))

    def forward(self, inputs: Sequence[torch.Tensor], reverse: bool = False) -> list[torch.Tensor]:
        """Volume-preserving: log|det J| = 0."""
        orders = self.inverse_permutations if reverse else self.permutations
        return [x[:, order] for x, order in zip(inputs, orders)]


class ParallelCouplingBlock(nn.Module):
    """Affine coupling of all scales at once (``freia_funcs.parallel_glow_coupling_layer``):
    ``y1 = x1 * exp(a(s)) + t`` with ``(s, t)`` from the ``x2`` of every scale, then
    ``y2 = x2 * exp(a(s)) + t`` with ``(s, t)`` from the ``y1`` of every scale."""

    def __init__(self, channels: int, hidden_channels: int, kernel_size: int, clamp: float) -> None:
        super().__init__()
        self.first_channels = channels // 2
        self.second_channels = channels - channels // 2
        self.clamp = clamp
        # the authors' s2: reads x2, gives (s, t) for x1; their s1: reads y1, gives (s, t) for x2
        self.first_half_subnet = CrossConvolutions(self.second_channels, 2 * self.first_channels,
                                                   hidden_channels, kernel_size)
        self.second_half_subnet = CrossConvolutions(self.first_channels, 2 * self.second_channels,
                                                    hidden_channels, kernel_size)

    def affine_parameters(self, subnet: CrossConvolutions, conditions: Sequence[torch.Tensor],
                          channels: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per scale (soft-clamped log-scale, shift), each (B, channels, h, w)."""
        return [(soft_clamp(out[:, :channels], self.clamp), out[:, channels:]) for out in subnet(conditions)]

    def forward(self, inputs: Sequence[torch.Tensor], reverse: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(outputs, log|det J|)`` with the log-determinant per image, (B,), summed over scales
        (negated in the reverse direction)."""
        firsts = [x[:, : self.first_channels] for x in inputs]
        seconds = [x[:, self.first_channels :] for x in inputs]
        log_jac_det = inputs[0].new_zeros(inputs[0].shape[0])
        if not reverse:
            first_params = self.affine_parameters(self.first_half_subnet, seconds, self.first_channels)
            firsts = [x * torch.exp(log_scale) + shift for x, (log_scale, shift) in zip(firsts, first_params)]
            second_params = self.affine_parameters(self.second_half_subnet, firsts, self.second_channels)
            seconds = [x * torch.exp(log_scale) + shift for x, (log_scale, shift) in zip(seconds, second_params)]
        else:
            second_params = self.affine_parameters(self.second_half_subnet, firsts, self.second_channels)
            seconds = [(y - shift) * torch.exp(-log_scale) for y, (log_scale, shift) in zip(seconds, second_params)]
            first_params = self.affine_parameters(self.first_half_subnet, seconds, self.first_channels)
            firsts = [(y - shift) * torch.exp(-log_scale) for y, (log_scale, shift) in zip(firsts, first_params)]
        for log_scale, _shift in (*first_params, *second_params):
            log_jac_det = log_jac_det + log_scale.sum(dim=(1, 2, 3))
        outputs = [torch.cat((first, second), dim=1) for first, second in zip(firsts, seconds)]
        if reverse:
            return outputs, -log_jac_det
        return [z.clamp(-LATENT_LIMIT, LATENT_LIMIT) for z in outputs], log_jac_det


class CrossScaleFlow(nn.Module):
    """``n_coupling_blocks`` x (ParallelPermute(seed=k) -> ParallelCouplingBlock) over the three
    scales (``model.py`` ``get_cs_flow_model``); kernel 3, the last block 5 (``config.kernel_sizes``)."""

    def __init__(self, channels: int, n_coupling_blocks: int, hidden_channels: int, kernel_size: int,
                 last_kernel_size: int, clamp: float) -> None:
        super().__init__()
        if n_coupling_blocks < 1:
            raise ValueError(f"n_coupling_blocks must be at least 1, got {n_coupling_blocks}")
        kernel_sizes = [kernel_size] * (n_coupling_blocks - 1) + [last_kernel_size]
        self.permutations = nn.ModuleList([ParallelPermute(channels, seed=k) for k in range(n_coupling_blocks)])
        self.couplings = nn.ModuleList([ParallelCouplingBlock(channels, hidden_channels, size, clamp)
                                        for size in kernel_sizes])

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Feature maps of the three scales -> (latent maps, log|det J| per image (B,))."""
        latents = list(features)
        log_jac_det = features[0].new_zeros(features[0].shape[0])
        for permute, coupling in zip(self.permutations, self.couplings):
            latents, block_log_det = coupling(permute(latents))
            log_jac_det = log_jac_det + block_log_det
        return latents, log_jac_det

    def inverse(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Latent maps -> the feature maps that give them."""
        features = list(latents)
        for permute, coupling in zip(reversed(self.permutations), reversed(self.couplings)):
            features, _ = coupling(features, reverse=True)
            features = permute(features, reverse=True)
        return features


class CsFlowModel(nn.Module):
    """Frozen multi-scale EfficientNet features -> cross-scale flow; eval ``forward`` returns
    scores and maps."""

    def __init__(
        self,
        backbone: str = "efficientnet_b5",
        pretrained: bool = True,
        feature_stage: int = 6,
        n_coupling_blocks: int = 4,
        hidden_channels: int = 1024,
        kernel_size: int = 3,
        last_kernel_size: int = 5,
        clamp: float = 3.0,
        anomaly_map_mode: str = "largest_scale",
        input_normalized: bool = True,
        input_size: tuple[int, int] = (256, 256),
    ) -> None:
        super().__init__()
        if anomaly_map_mode not in ANOMALY_MAP_MODES:
            raise ValueError(f"anomaly_map_mode must be one of {ANOMALY_MAP_MODES}, got {anomaly_map_mode!r}")
        self.anomaly_map_mode = anomaly_map_mode
        self.feature_extractor = MultiScaleEfficientNet(backbone, feature_stage, pretrained, input_normalized)
        channels = self.check_scale_sizes(tuple(input_size))
        self.flow = CrossScaleFlow(channels, n_coupling_blocks, hidden_channels, kernel_size, last_kernel_size, clamp)

    def check_scale_sizes(self, input_size: tuple[int, int]) -> int:
        """Dry run at ``input_size``: the feature channels, after checking that each scale's map is
        exactly half the previous one (the cross-convolutions' 2x up/down-sampling needs it)."""
        features = self.feature_extractor(torch.zeros(1, 3, *input_size))
        sizes = [tuple(f.shape[-2:]) for f in features]
        halving = all(fine == (2 * coarse[0], 2 * coarse[1]) for fine, coarse in zip(sizes, sizes[1:]))
        if not halving or min(sizes[-1]) < 1:
            stride = max(1, round(input_size[0] / max(sizes[0][0], 1)))
            raise ValueError(
                f"CS-Flow joins neighbouring scales by exact 2x up/down-sampling, but an input of {input_size[0]}x"
                f"{input_size[1]} gives feature maps {sizes} at the 3 scales (feature_stage "
                f"{self.feature_extractor.feature_stage}, stride {stride}). Use an image size that is a multiple "
                f"of {4 * stride} (the authors require multiples of 128 for stage 6).")
        return int(features[0].shape[1])

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen feature maps of the three scales."""
        return self.feature_extractor(images)

    def latents(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(latent maps of the three scales, log|det J| per image)."""
        return self.flow(self.features(images))

    def anomaly_map(self, latents: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``mean_c(z^2)`` of the finest scale, or the product over scales, at ``size``: (B, H, W)."""
        maps = scale_maps(latents[:1] if self.anomaly_map_mode == "largest_scale" else latents, size)
        anomaly_map = maps[0]
        for scale_map in maps[1:]:
            anomaly_map = anomaly_map * scale_map
        return anomaly_map[:, 0]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        latents, _log_jac_det = self.latents(images)
        return {"pred_score": image_scores(latents), "anomaly_map": self.anomaly_map(latents, tuple(images.shape[-2:]))}


class CsFlowTrainer(BaseTrainer):
    """Fits the cross-scale flow to the frozen features of normal images by maximum likelihood."""

    model_class = CsFlowModel
    train_defaults = {"gradient_clip_norm": MAX_GRAD_NORM}  # the authors clip every step (config.max_grad_norm)

    def __init__(self, *, learning_rate: float = LEARNING_RATE, weight_decay: float = WEIGHT_DECAY,
                 adam_betas: tuple[float, float] = ADAM_BETAS, train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.adam_betas = tuple(adam_betas)
        super().__init__(train_config, device, **model_options)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """``train.py``: Adam(lr 2e-4, eps 1e-4, weight decay 1e-5, default betas) over the flow, no schedule."""
        optimizer = torch.optim.Adam(self.model.flow.parameters(), lr=self.learning_rate, betas=self.adam_betas,
                                     eps=ADAM_EPS, weight_decay=self.weight_decay)
        return optimizer, None

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        latents, log_jac_det = self.model.latents(batch["image"])
        return {"loss": cs_flow_loss(latents, log_jac_det)}


VARIANTS = {
    "csflow": ModelVariant(
        trainer=CsFlowTrainer, family="flow",
        train={"num_epochs": 500, "batch_size": 2, "img_size": 256, "normalize": True},  # SPEC sec. 7
        # random weights and the smallest EfficientNet; stage 3 (stride 8, 40 channels) gives 8/4/2 maps
        # at 64 px, where stage 6 (stride 32) would leave the coarser scales below 1x1
        tiny={"backbone": "efficientnet_lite0", "pretrained": False, "feature_stage": 3, "hidden_channels": 16,
              "img_size": 64, "num_steps": 2},
        paper={"num_epochs": 240, "batch_size": 16, "img_size": 768},  # config.py: 4 x 60 epochs, 768 px
    ),
}
