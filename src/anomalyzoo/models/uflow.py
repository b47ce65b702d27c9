"""U-Flow: "A U-shaped Normalizing Flow for Anomaly Detection with Unsupervised Threshold"
(Tailanian, Pardo & Musé, arXiv 2211.12353; JMIV 2024).

A frozen ImageNet backbone gives a feature pyramid; one invertible network, shaped like a
U-Net, maps the whole pyramid to independent standard-normal latents at several scales. It is
trained by maximum likelihood on normal images; at test time the latents' likelihood is the
anomaly map, and an a contrario test on the latents gives a segmentation with an automatic
threshold (the number of false alarms, NFA), the paper's point. The authors' code is
mtailanian/uflow (``src/model.py``, ``feature_extraction.py``, ``train.py``, ``nfa.py`` /
``nfa_block.py``); anomalib's ``models/image/uflow/`` ports it.

- Features (paper, phase 1 "multi-scale feature extraction"):
  * ``mcait`` (the paper's MS-CaiT): two independently trained CaiTs at two image scales,
    ``cait_m48_448`` on the 448 px image and ``cait_s24_224`` on the image resized (bicubic,
    corners aligned) to 224 px; the patch tokens after block 40 and block 20 (0-based; the
    authors run ``blocks[:41]``, citing "paper Table 6. Block Index = 40", FastFlow's choice for
    CaiT-M48, and ``blocks[:21]``), each passed through its own model's final LayerNorm
    (pretrained, frozen) and reshaped to a map: 768 channels at stride 16 and 384 channels at
    stride 32 (authors' ``MCaitFeatureExtractor``).
  * CNNs: ``layer1``-``layer3`` (the authors' ``out_indices=[1, 2, 3]``, strides 4, 8, 16), each
    through a ``LayerNorm`` over (C, H, W) with a trainable elementwise affine that is trained
    with the flow (authors' ``ResNetFeatureExtractor``; the optimiser takes every parameter).
    It ties the model to the image size it was built for. Its scale is not part of the
    log-determinant, so shrinking it lowers the loss without bound; the authors and anomalib
    train it all the same, and so do we.
- U-shaped flow (phase 2; authors' ``UFlow.__init__``/``get_flow_stage``): starting at the
  coarsest scale, a stage of ``flow_steps`` FrEIA all-in-one blocks (:class:`AllInOneBlock`,
  affine coupling clamped at 2.0, hard permutations: ``permute_soft=False``), subnet conv ->
  ReLU -> conv with as many hidden channels as inputs (ratio 1.0) and "same" padding, kernels
  3x3 on even steps and 1x1 on odd ones. The stage's output of ``v`` channels is split
  (FrEIA ``Split``, ``section_sizes=(v // 8 * 4, rest)``): the second part is that scale's
  latent, the first is upsampled invertibly (FrEIA ``IRevNetUpsampling``: each group of 4
  consecutive channels becomes one channel's 2x2 patch, i.e. ``pixel_shuffle(., 2)``, log-det
  0) and concatenated *after* the next finer scale's features, which then go through their own
  stage; the finest stage's whole output is the last latent. So every latent dimension is
  independent of the others and the graph is invertible as a whole (ResNet50: latents of
  336 x 64^2, 320 x 32^2 and 512 x 16^2 at 256 px, as many numbers as the features).
- Loss: the negative log-likelihood of the latents under N(0, I) up to a constant,
  ``sum_s 0.5 * ||z_s||^2 - log|det J|`` per image, averaged over the batch (authors'
  ``UFlowTrainer.step``). anomalib's ``UFlowLoss`` sums the first term over the batch too (its
  ``torch.sum`` has no ``dim``) while averaging the log-det, which is not a likelihood; we
  follow the authors.
- Anomaly map (phase 3; authors' ``UFlow.get_probability``): per scale and position
  ``p_s = exp(-0.5 * mean_c z_s^2)`` (a channel *mean*, so every scale weighs the same),
  upsampled bilinearly to the input; the map is ``1 - mean_s p_s`` in [0, 1], the image score
  its maximum (authors' ``validation_step``, anomalib).
- Unsupervised threshold (phase 4, the a contrario block test of the arXiv paper; authors'
  ``src/nfa.py`` of the first release, anomalib ``compute_anomaly_mask``): under the null
  hypothesis (a normal image) every latent value is N(0, 1), so ``z^2 >= tau`` with ``tau``
  the chi-square(1) quantile of level ``q`` happens with probability ``1 - q``. Around each
  position of scale s, in a window of side ``2 * max(floor(w / 2^s / 2), 1) + 1`` (``w`` = 7),
  the candidates are counted and averaged over the channels (``x``); the probability of more
  than ``floor(x)`` successes in ``n`` (the window's size) trials of probability ``1 - q`` is a
  binomial tail. The log-probabilities of the scales
  are upsampled (bicubic, corners aligned) and *added* (independent scales), and
  ``log10 NFA = log10(number of tests) + sum_s log10 P_s`` with one test per position of every
  scale; a pixel is anomalous when ``NFA < 1`` (``log10 NFA < 0``). See :func:`log10_nfa_map`.
- Optimiser (authors' ``configure_optimizers``): Adam with weight decay 1e-5 over every trainable
  parameter (flow and CNN LayerNorms), and a linear decay of the rate to 0.4 of its start over
  the run's optimisation steps (``LinearLR``, stepped per batch; the authors count the steps of
  the run, anomalib fixes 25,000).

Deviations and choices:

- Learning rate 1e-3 by default: anomalib's value and the middle of the authors' per-category
  rates (tuned by a search, listed in anomalib's ``configure_optimizers``: 3.6e-5 for grid to
  6.0e-3 for tile, 1.13e-4 for bottle); the authors' fallback config
  (``configs/mvtec_default.yaml``) says 1e-4. ``learning_rate=`` sets it.
- Schedule: the spec's rows (500 epochs; batch 8 at 256 px with ResNet50, 4 at 448 px with
  MS-CaiT); the authors train MS-CaiT 200 epochs with batch 8 (``mvtec_default.yaml``; per
  category the batch was tuned too), listed under ``paper``. The authors offer ResNet18 and
  WideResNet50-2 for the CNN path; ``uflow-resnet50`` uses the spec's ResNet50 on the same path.
- The authors' latest release (JMIV version) replaces the block test by a region test on a
  tree of level sets (``src/nfa_tree.py``: networkx, scikit-image). We implement the block test
  of the arXiv paper and of anomalib, with the defaults of its function (``w`` = 7, ``q`` =
  0.5; the first release's ``evaluate.py`` passed 5 and 0.9). The binomial tail is computed
  exactly in float64 (the authors call ``scipy.stats.binom.logsf``, which floors the averaged
  count: we do the same); where every value in a window is a candidate that tail is 0 and its
  log ``-inf``, which bicubic upsampling turns into NaN, so we use ``P(X = n)`` there. A window
  larger than a small map is cut to the map (reflect padding needs it).
- anomalib's ``compute_anomaly_mask`` returns ``-log NFA < 0``, i.e. the *normal* pixels; we
  return ``log10 NFA < 0`` as the paper defines a detection.
- CaiT is built for one input size, so the two CaiTs are built for ``img_size`` and
  ``img_size / 2``; with pretrained weights these must be the weights' own sizes (448 and 224).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import get_pretrained_cfg
from torch import nn
from torch.utils.data import DataLoader

from anomalyzoo.models.components.all_in_one_block import AllInOneBlock, SequenceINN, SubnetConstructor
from anomalyzoo.models.components.backbone import timm_architecture
from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor, probe_backbone
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.components.variants import ModelVariant

MCAIT = "mcait"
AFFINE_CLAMP = 2.0  # authors' glow_params
FINAL_LR_FACTOR = 0.4  # authors' LinearLR(start_factor=1.0, end_factor=0.4)
NFA_WINDOW_SIZE = 7  # authors' compute_log_nfa_anomaly_score default, anomalib's compute_anomaly_mask
NFA_CANDIDATE_QUANTILE = 0.5  # idem: tau = chi2(1).ppf(0.5)


# ---------------------------------------------------------------------------- features
class LayerNormPyramid(nn.Module):
    """CNN stages (finest first), each normalised by a LayerNorm over (C, H, W) with a trainable
    affine, as the authors' ``ResNetFeatureExtractor``."""

    def __init__(self, backbone: str, layers: Sequence[str], input_size: tuple[int, int], pretrained: bool,
                 input_normalized: bool) -> None:
        super().__init__()
        self.layers = list(layers)
        self.extractor = TimmFeatureExtractor(backbone, self.layers, pretrained=pretrained,
                                              input_normalized=input_normalized)
        self.channels: list[int] = list(self.extractor.out_dims)
        self.strides: list[int] = list(self.extractor.strides)
        check_pyramid(self.strides, input_size, f"{backbone} {self.layers}")
        self.norms = nn.ModuleList(
            nn.LayerNorm([channels, input_size[0] // stride, input_size[1] // stride], elementwise_affine=True)
            for channels, stride in zip(self.channels, self.strides)
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.extractor(images)
        return [norm(features[layer]) for norm, layer in zip(self.norms, self.layers)]


class MultiScaleCait(nn.Module):
    """MS-CaiT: CaiT ``i`` reads the image at ``1 / 2^i`` of its size (bicubic, corners aligned)
    and gives its tokens after block ``blocks[i]`` through its own final LayerNorm, as a map."""

    def __init__(self, backbones: Sequence[str], blocks: Sequence[int], input_size: tuple[int, int], pretrained: bool,
                 input_normalized: bool) -> None:
        super().__init__()
        if len(backbones) != len(blocks) or len(backbones) < 2:
            raise ValueError(f"mcait needs one block index per CaiT and at least two CaiTs, got {backbones} / {blocks}")
        self.sizes = [(input_size[0] // 2**i, input_size[1] // 2**i) for i in range(len(backbones))]
        self.blocks = list(blocks)
        extractors = []
        for name, block, size in zip(backbones, self.blocks, self.sizes):
            if not probe_backbone(name).token_transformer:
                raise ValueError(f"mcait reads vision transformers (CaiT); '{name}' is a CNN. For a CNN pyramid pass "
                                 f"backbone='{name}' instead of backbone='mcait'")
            if pretrained:
                check_native_size(name, size, input_size[0] // size[0])
            extractors.append(TimmFeatureExtractor(name, [block], pretrained=pretrained, input_normalized=input_normalized,
                                                   img_size=size, final_norm=True))
        self.extractors = nn.ModuleList(extractors)
        self.channels = [int(extractor.out_dims[0]) for extractor in self.extractors]
        self.strides = [int(extractor.strides[0]) * 2**i for i, extractor in enumerate(self.extractors)]
        check_pyramid(self.strides, input_size, f"mcait {list(backbones)}")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for extractor, block, size in zip(self.extractors, self.blocks, self.sizes):
            scaled = images if tuple(images.shape[-2:]) == size else F.interpolate(
                images, size=size, mode="bicubic", align_corners=True)
            features.append(extractor(scaled)[block])
        return features


def check_pyramid(strides: Sequence[int], input_size: tuple[int, int], name: str) -> None:
    """The U-flow doubles the coarse map to meet the next finer one: strides must double from
    scale to scale and divide the input."""
    if any(coarse != 2 * fine for fine, coarse in zip(strides, strides[1:])):
        raise ValueError(f"U-Flow needs scales whose strides double (e.g. layer1-3), {name} has strides {list(strides)}")
    if input_size[0] % strides[-1] or input_size[1] % strides[-1]:
        raise ValueError(f"U-Flow with {name} needs an image size divisible by {strides[-1]}, got {input_size}")


def check_native_size(backbone: str, size: tuple[int, int], downscale: int) -> None:
    """CaiT's position embedding is fixed: pretrained weights only fit their own image size."""
    config = get_pretrained_cfg(timm_architecture(backbone))
    native = tuple(config.input_size[-2:]) if config is not None else None
    if native is not None and native != tuple(size):
        raise ValueError(f"Pretrained {backbone} reads {native[0]} px images, but it would get {size[0]} px here: "
                         f"use img_size={native[0] * downscale} (the paper's MS-CaiT: 448) or pretrained=False")


# ---------------------------------------------------------------------------- U-shaped flow
def coupling_subnet(kernel_size: int, hidden_ratio: float) -> SubnetConstructor:
    """conv(k) -> ReLU -> conv(k), ``int(hidden_ratio * in_channels)`` hidden channels, "same" padding."""

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = int(in_channels * hidden_ratio)
        return nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding="same"), nn.ReLU(),
                             nn.Conv2d(hidden, out_channels, kernel_size, padding="same"))

    return build


def flow_stage(channels: int, flow_steps: int, affine_clamp: float, hidden_ratio: float, permute_soft: bool) -> SequenceINN:
    """``flow_steps`` all-in-one blocks whose subnet kernels alternate 3x3 (even steps) and 1x1."""
    return SequenceINN(
        AllInOneBlock(channels, coupling_subnet(3 if step % 2 == 0 else 1, hidden_ratio),
                      affine_clamping=affine_clamp, permute_soft=permute_soft)
        for step in range(flow_steps)
    )


def upsampled_channels(stage_channels: int) -> int:
    """Channels of a stage's output sent up (FrEIA ``Split`` section 0): ``v // 8 * 4``, a
    multiple of 4, so that the 2x upsampling (4 channels -> one 2x2 patch) is exact."""
    return stage_channels // 8 * 4


class UShapedFlow(nn.Module):
    """The authors' ``GraphINN``: ``encode`` maps a feature pyramid (finest first) to one latent
    per scale (finest first) and the log-determinant of the whole map; ``decode`` inverts it."""

    def __init__(self, feature_channels: Sequence[int], flow_steps: int = 4, affine_clamp: float = AFFINE_CLAMP,
                 hidden_ratio: float = 1.0, permute_soft: bool = False) -> None:
        super().__init__()
        self.feature_channels = list(feature_channels)
        stage_channels = [0] * len(self.feature_channels)
        stage_channels[-1] = self.feature_channels[-1]
        for scale in reversed(range(len(stage_channels) - 1)):
            coming_up = upsampled_channels(stage_channels[scale + 1])
            if coming_up == 0:
                raise ValueError(f"U-Flow's stage at scale {scale + 1} has {stage_channels[scale + 1]} channels; "
                                 "it needs at least 8 to send some up")
            stage_channels[scale] = self.feature_channels[scale] + coming_up // 4
        self.stage_channels = stage_channels
        self.latent_channels = [stage_channels[0]] + [c - upsampled_channels(c) for c in stage_channels[1:]]
        self.stages = nn.ModuleList(flow_stage(channels, flow_steps, affine_clamp, hidden_ratio, permute_soft)
                                    for channels in stage_channels)

    def encode(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(latents finest first, log|det dz/dx| per image (B,))."""
        x = features[-1]
        log_jac_det = x.new_zeros(x.shape[0])
        coarse_latents = []
        for scale in reversed(range(1, len(self.stages))):
            x, stage_log_det = self.stages[scale](x)
            log_jac_det = log_jac_det + stage_log_det
            coming_up = upsampled_channels(x.shape[1])
            up, latent = torch.split(x, [coming_up, x.shape[1] - coming_up], dim=1)
            coarse_latents.append(latent)
            x = torch.cat([features[scale - 1], F.pixel_shuffle(up, 2)], dim=1)
        x, stage_log_det = self.stages[0](x)
        return [x, *reversed(coarse_latents)], log_jac_det + stage_log_det

    def decode(self, latents: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(features finest first, log|det dx/dz| per image): the inverse of :meth:`encode`."""
        x, log_jac_det = self.stages[0](latents[0], reverse=True)
        fine_features = []
        for scale in range(1, len(self.stages)):
            channels = self.feature_channels[scale - 1]
            feature, up = torch.split(x, [channels, x.shape[1] - channels], dim=1)
            fine_features.append(feature)
            x = torch.cat([F.pixel_unshuffle(up, 2), latents[scale]], dim=1)
            x, stage_log_det = self.stages[scale](x, reverse=True)
            log_jac_det = log_jac_det + stage_log_det
        return [*fine_features, x], log_jac_det


# ---------------------------------------------------------------------------- loss and maps
def uflow_negative_log_likelihood(latents: Sequence[torch.Tensor], log_jac_det: torch.Tensor) -> torch.Tensor:
    """``mean_b [ sum_s 0.5 * ||z_s||^2 - log|det J| ]`` (authors' ``UFlowTrainer.step``)."""
    squared_norm = torch.stack([z.flatten(1).pow(2).sum(dim=1) for z in latents]).sum(dim=0)
    return (0.5 * squared_norm - log_jac_det).mean()


def likelihood_map(latents: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """``mean_s upsample(exp(-0.5 * mean_c z_s^2))``: (B, H, W) in (0, 1] (authors' ``get_probability``)."""
    maps = [F.interpolate(torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True)), size=size, mode="bilinear",
                          align_corners=False) for z in latents]
    return torch.stack(maps, dim=-1).mean(dim=-1)[:, 0]


def chi2_one_dof_quantile(level: float) -> float:
    """``tau`` with ``P(z^2 < tau) = level`` for z ~ N(0, 1): ``Phi^-1((1 + level) / 2)^2``."""
    return float(torch.special.ndtri(torch.tensor((1.0 + level) / 2.0, dtype=torch.float64)) ** 2)


def binomial_log10_tail(counts: torch.Tensor, trials: int, probability: float) -> torch.Tensor:
    """``log10 P(X > floor(counts))`` for X ~ Binomial(trials, probability), as
    ``scipy.stats.binom.logsf(counts, trials, probability) / ln 10``; where that tail is empty
    (``counts >= trials``) the last term ``P(X = trials)`` instead of ``-inf``."""
    successes = torch.arange(trials + 1, dtype=torch.float64, device=counts.device)
    log_pmf = (math.lgamma(trials + 1) - torch.lgamma(successes + 1) - torch.lgamma(trials - successes + 1)
               + successes * math.log(probability) + (trials - successes) * math.log1p(-probability))
    first = (torch.floor(counts.double()) + 1).clamp(max=trials)
    in_tail = successes >= first.unsqueeze(-1)
    log_tail = torch.logsumexp(log_pmf.masked_fill(~in_tail, -math.inf), dim=-1)
    return (log_tail / math.log(10.0)).clamp(max=0.0).to(counts.dtype)  # a probability: rounding stays <= 1


def scale_log10_probability(z: torch.Tensor, window: float, candidate_quantile: float) -> torch.Tensor:
    """Per position of one scale (B, 1, h, w): log10 of the probability under N(0, I) of more
    candidates (``z^2 >= tau``) in the window around it than observed (averaged over channels, floored)."""
    half = max(int(window // 2), 1)
    half = min(half, z.shape[-2] - 1, z.shape[-1] - 1)  # reflect padding needs a smaller pad than the map
    side = 2 * half + 1
    candidates = (z.pow(2) >= chi2_one_dof_quantile(candidate_quantile)).double().sum(dim=1, keepdim=True)
    if half > 0:  # integer sums over the window: exact, so the floor of the mean below is too
        ones = torch.ones(1, 1, side, side, dtype=torch.float64, device=z.device)
        candidates = F.conv2d(F.pad(candidates, (half,) * 4, mode="reflect"), ones)
    mean_count = candidates / z.shape[1]
    return binomial_log10_tail(mean_count, side**2, 1.0 - candidate_quantile).to(z.dtype)


def log10_nfa_map(latents: Sequence[torch.Tensor], size: tuple[int, int], window_size: int = NFA_WINDOW_SIZE,
                  candidate_quantile: float = NFA_CANDIDATE_QUANTILE) -> torch.Tensor:
    """``log10 NFA`` per pixel (B, H, W): ``log10(sum_s h_s w_s) + sum_s upsample(log10 P_s)``,
    the window shrinking by 2 per scale (finest first). NFA < 1 is a detection."""
    log_probability = sum(
        F.interpolate(scale_log10_probability(z, window_size / 2**scale, candidate_quantile), size=size,
                      mode="bicubic", align_corners=True)
        for scale, z in enumerate(latents)
    )
    number_of_tests = sum(z.shape[-2] * z.shape[-1] for z in latents)
    return (math.log10(number_of_tests) + log_probability)[:, 0]


# ---------------------------------------------------------------------------- model
class UflowModel(nn.Module):
    """Feature pyramid -> U-shaped flow -> latents; eval ``forward`` returns scores and maps."""

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        cait_backbones: Sequence[str] = ("cait_m48_448", "cait_s24_224"),
        cait_blocks: Sequence[int] = (40, 20),
        flow_steps: int = 4,
        affine_clamp: float = AFFINE_CLAMP,
        hidden_ratio: float = 1.0,
        permute_soft: bool = False,
        pretrained: bool = True,
        input_normalized: bool = True,
        input_size: tuple[int, int] = (256, 256),
    ) -> None:
        """``backbone``: a timm CNN (``layers`` are its stages) or ``"mcait"`` (``cait_backbones``
        read the image at full and half size, ``cait_blocks`` give each one's block)."""
        super().__init__()
        self.input_size = tuple(input_size)
        if backbone == MCAIT:
            self.feature_extractor: nn.Module = MultiScaleCait(cait_backbones, cait_blocks, self.input_size, pretrained,
                                                               input_normalized)
        else:
            self.feature_extractor = LayerNormPyramid(backbone, layers, self.input_size, pretrained, input_normalized)
        self.flow = UShapedFlow(self.feature_extractor.channels, flow_steps, affine_clamp, hidden_ratio, permute_soft)

    def latents(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(latent per scale, finest first; log|det J| per image)."""
        return self.flow.encode(self.feature_extractor(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        latents, _ = self.latents(images)
        anomaly_map = 1.0 - likelihood_map(latents, tuple(images.shape[-2:]))
        return {"pred_score": anomaly_map.amax(dim=(-2, -1)), "anomaly_map": anomaly_map}

    def log10_nfa(self, images: torch.Tensor, window_size: int = NFA_WINDOW_SIZE,
                  candidate_quantile: float = NFA_CANDIDATE_QUANTILE) -> torch.Tensor:
        """``log10 NFA`` per pixel (B, H, W) of the a contrario block test."""
        latents, _ = self.latents(images)
        return log10_nfa_map(latents, tuple(images.shape[-2:]), window_size, candidate_quantile)

    def a_contrario_mask(self, images: torch.Tensor, window_size: int = NFA_WINDOW_SIZE,
                         candidate_quantile: float = NFA_CANDIDATE_QUANTILE) -> torch.Tensor:
        """The paper's unsupervised segmentation (B, H, W) bool: ``NFA < 1``, i.e. ``log10 NFA < 0``."""
        return self.log10_nfa(images, window_size, candidate_quantile) < 0


# ---------------------------------------------------------------------------- trainer
class UflowTrainer(BaseTrainer):
    """Maximum likelihood of the latents on normal images; Adam with a linear decay per step."""

    model_class = UflowModel
    scheduler_interval = "step"

    def __init__(self, *, learning_rate: float = 1e-3, weight_decay: float = 1e-5,
                 train_config: TrainConfig | dict[str, Any] | None = None, device: str | torch.device | None = None,
                 **model_options: Any) -> None:
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        super().__init__(train_config, device, **model_options)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam(lr, weight decay 1e-5) over the flow and the CNN LayerNorms; the rate falls
        linearly to 0.4 of its start over the run's steps (authors' ``configure_optimizers``)."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=FINAL_LR_FACTOR,
                                                      total_iters=max(self.total_steps, 1))
        return optimizer, scheduler

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        latents, log_jac_det = self.model.latents(batch["image"])
        return {"loss": uflow_negative_log_likelihood(latents, log_jac_det)}

    def model_test_results(self, test_loader: DataLoader) -> dict[str, Any]:
        """The paper's unsupervised threshold (NFA < 1) on the test set: its rule and its
        image/pixel confusion counts, for the results file beside the library's thresholds."""
        counts = self.a_contrario_results(test_loader)
        rule = (f"log10 NFA < 0 (NFA < 1), block test, window {NFA_WINDOW_SIZE}, "
                f"candidates z^2 >= chi2(1) quantile {NFA_CANDIDATE_QUANTILE}")
        return {"a_contrario_threshold": rule, **{f"a_contrario_{key}": value for key, value in counts.items()}}

    @torch.no_grad()
    def a_contrario_results(self, loader: DataLoader, window_size: int = NFA_WINDOW_SIZE,
                            candidate_quantile: float = NFA_CANDIDATE_QUANTILE) -> dict[str, int]:
        """What the NFA < 1 segmentation does on a labelled set: image confusion counts (an image
        is flagged when any of its pixels is) and, where the dataset has masks, pixel counts."""
        self.model.eval()
        with_pixels = bool(getattr(getattr(loader, "dataset", None), "has_masks", True))
        counts: dict[str, int] = {}
        for batch in loader:
            batch = self.to_device(batch)
            detected = self.model.a_contrario_mask(batch["image"], window_size, candidate_quantile)
            tallies = [("image", detected.flatten(1).any(dim=1), batch["label"].bool())]
            if with_pixels:
                tallies.append(("pixel", detected, batch["mask"].reshape(detected.shape).bool()))
            for level, predicted, truth in tallies:
                for name, hits in (("tp", predicted & truth), ("fp", predicted & ~truth),
                                   ("fn", ~predicted & truth), ("tn", ~predicted & ~truth)):
                    counts[f"{level}_{name}"] = counts.get(f"{level}_{name}", 0) + int(hits.sum())
        return counts


VARIANTS = {
    "uflow-resnet50": ModelVariant(
        trainer=UflowTrainer, family="flow",
        train={"num_epochs": 500, "batch_size": 8, "img_size": 256, "normalize": True},  # SPEC sec. 7
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64, "num_steps": 2, "batch_size": 4},
        paper={"num_epochs": 200},  # authors' configs (their CNN path: resnet18 / wide_resnet50_2)
    ),
    "uflow-mcait": ModelVariant(
        trainer=UflowTrainer, family="flow",
        options={"backbone": MCAIT},
        train={"num_epochs": 500, "batch_size": 4, "img_size": 448, "normalize": True},  # SPEC sec. 7
        # two small CaiTs of the same family stand in for CaiT-M48 and CaiT-S24 (the same
        # MS-CaiT code path at 64 and 32 px, random weights)
        tiny={"cait_backbones": ["cait_xxs24_224", "cait_xxs24_224"], "cait_blocks": [3, 3], "pretrained": False,
              "img_size": 64, "num_steps": 2, "batch_size": 4},
        paper={"num_epochs": 200, "batch_size": 8},  # authors' configs/mvtec_default.yaml
        note=("backbone=mcait is two CaiTs (cait_m48_448 + cait_s24_224); any CNN backbone, e.g. "
              "efficientnet_lite0, takes the CNN path of uflow-resnet50 instead"),
    ),
}
