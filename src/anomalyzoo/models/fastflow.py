"""FastFlow: "Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows"
(Yu, Zheng, Wang, Li, Wu, Zhao & Wu, arXiv 2111.07677).

A frozen ImageNet backbone turns an image into feature maps; a normalizing flow, built from
fully convolutional coupling blocks so that it keeps the 2-D layout of the map (sec. 3.2-3.3,
Fig. 2), maps each feature map to latents ``z`` of the same shape that follow a standard normal
distribution on normal images. It is trained by maximum likelihood on normal images only; at
test time a position whose features the flow finds unlikely is anomalous.

The authors' code was never published. Where the paper is silent we follow the reproduction
it points everyone to, gathierry/FastFlow (``fastflow.py``, ``constants.py``, ``configs/``),
which anomalib's ``models/image/fastflow/`` (``torch_model.py``, ``loss.py``,
``anomaly_map.py``) ports line by line.

- Features, CNN path (sec. 4, implementation details: "the features of the last layer in the
  first three blocks", each into its own FastFlow): ``layer1``-``layer3`` (strides 4, 8, 16).
  Each map goes through a ``LayerNorm`` over (C, H, W) with a trainable elementwise affine
  before its flow. The paper does not mention it; gathierry found it critical (README,
  "Unmentioned but critical LayerNorm", his issue #3) and anomalib keeps it. It ties the model
  to the image size it was built for.
- Features, vision-transformer path (paper Table 6: CaiT-M48 at 448 px, DeiT-B distilled at
  384 px, one feature map each): the patch tokens after one block, with the backbone's own final
  LayerNorm (pretrained, frozen: no extra norm), reshaped to (C, H/16, W/16); class and
  distillation tokens are dropped. The block is the paper's "block index": 40 for CaiT-M48 and 7
  for DeiT (0-based; gathierry and anomalib run ``blocks[:41]`` and ``blocks[:8]``, then
  ``norm``). Which path a backbone takes follows the type of the model timm builds
  (:class:`TimmFeatureExtractor`), so ``layers`` are stage names for CNNs and block indices
  for transformers, and there is one flow per entry either way.
- Flow (sec. 3.3, Fig. 2): ``flow_steps`` = 8 FrEIA all-in-one blocks
  (:class:`AllInOneBlock`: affine coupling clamped at 2.0, softplus global affine, a fixed hard
  channel permutation). The coupling subnet is conv -> ReLU -> conv with
  ``int(hidden_ratio * in_channels)`` hidden channels (``hidden_ratio`` 1.0) and "same"
  padding; its kernel alternates 3x3 (even steps) and 1x1 (odd steps), the paper's
  accuracy/size trade-off for the large backbones (``conv3x3_only`` gives 3x3 everywhere,
  gathierry's ResNet18 setting, ``configs/resnet18.yaml``). With WideResNet50's channels
  (256/512/1024, the same as ResNet50's) the three flows hold 41.3M parameters, the paper's
  count of additional parameters for that backbone (gathierry issue #2; his 45.0M include the
  LayerNorms).
- Loss: the negative log-likelihood under a standard normal, up to a constant,
  ``0.5 * ||z||^2 - log|det dz/dx|`` per image (sums over channels and positions), averaged
  over the batch and summed over the feature maps (gathierry ``FastFlow.forward``, anomalib
  ``FastflowLoss``).
- Anomaly map: per feature map and position, ``p = exp(-0.5 * mean_c z^2)`` (a per-channel
  average, not the sum of the exact log-density: gathierry's choice, kept by anomalib), upsampled
  bilinearly to the input size; the map is *minus* the mean of ``p`` over the feature maps, so
  it lies in [-1, 0] and higher means more anomalous (gathierry ``FastFlow.forward``, anomalib
  ``AnomalyMapGenerator``). The image score is the map's maximum (anomalib ``FastflowModel``;
  gathierry evaluates pixels only).
- Optimiser (sec. 4, implementation details; gathierry ``constants.py``): Adam, lr 1e-3,
  weight decay 1e-5, over the flows and the CNN path's LayerNorms; the backbone is frozen.

Deviations and choices:

- Schedule: the spec's rows (500 epochs; batch 8 for ResNet50, 2 for CaiT/DeiT) rather than the
  paper's batch 32 (gathierry ``constants.py``); ``paper`` in each row says how to get it back.
- ``fastflow-resnet50`` uses ResNet50 (the spec); the paper reports ResNet18 and WideResNet50-2,
  which take the same CNN path here (``backbone=``).
- CaiT/DeiT flows use the spec's 8 steps and hidden ratio 1.0 (anomalib's defaults for every
  backbone); gathierry's transformer configs (``configs/cait.yaml``, ``deit.yaml``) use 20
  steps with hidden ratio 0.16, listed under ``paper``.
- CaiT is built for one input size, so it is built for the run's ``img_size``; with pretrained
  weights that must be the weights' own size (448). DeiT takes any multiple of 16 (timm
  resamples its position embedding per input), though the paper uses 384.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo.models.components.all_in_one_block import AllInOneBlock, SequenceINN, SubnetConstructor
from anomalyzoo.models.components.feature_extractor import (
    LayerSpec,
    TimmFeatureExtractor,
    dryrun_find_featuremap_dims,
    probe_backbone,
)
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.components.variants import ModelVariant

AFFINE_CLAMPING = 2.0  # gathierry nf_fast_flow(clamp=2.0), anomalib create_fast_flow_block
LEARNING_RATE = 1e-3  # sec. 4 implementation details; gathierry constants.LR
WEIGHT_DECAY = 1e-5  # sec. 4 implementation details; gathierry constants.WEIGHT_DECAY


def fastflow_loss(latents: Sequence[torch.Tensor], log_jac_dets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood (up to a constant): per feature map the batch mean of
    ``0.5 * sum_{c,h,w} z^2 - log|det J|``, summed over the feature maps.

    ``latents``: one ``(B, C, h, w)`` tensor per feature map; ``log_jac_dets``: one ``(B,)`` each.
    """
    loss = torch.zeros((), device=latents[0].device)
    for latent, log_jac_det in zip(latents, log_jac_dets, strict=True):
        loss = loss + (0.5 * latent.pow(2).sum(dim=(1, 2, 3)) - log_jac_det).mean()
    return loss


def position_likelihood(latent: torch.Tensor) -> torch.Tensor:
    """``exp(-0.5 * mean_c z^2)`` at every position: (B, C, h, w) -> (B, 1, h, w), in (0, 1]."""
    return torch.exp(-0.5 * latent.pow(2).mean(dim=1, keepdim=True))


def conv_subnet(kernel_size: int, hidden_ratio: float) -> SubnetConstructor:
    """The coupling subnet of sec. 3.3: conv(k) -> ReLU -> conv(k), "same" padding (odd k)."""

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden_channels = int(in_channels * hidden_ratio)
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=kernel_size // 2),
        )

    return build


def fastflow_flow(channels: int, flow_steps: int, hidden_ratio: float, conv3x3_only: bool) -> SequenceINN:
    """One 2-D flow: ``flow_steps`` all-in-one blocks, subnet kernels 3x3 on even steps and 1x1
    on odd ones unless ``conv3x3_only`` (gathierry ``nf_fast_flow``)."""
    blocks = []
    for step in range(flow_steps):
        kernel_size = 1 if step % 2 == 1 and not conv3x3_only else 3
        blocks.append(AllInOneBlock(channels, conv_subnet(kernel_size, hidden_ratio),
                                    affine_clamping=AFFINE_CLAMPING, permute_soft=False))
    return SequenceINN(blocks)


class FastflowModel(nn.Module):
    """Frozen backbone, per-map LayerNorm (CNNs) and one 2-D flow per feature map; eval
    ``forward`` returns scores and maps."""

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[LayerSpec] = ("layer1", "layer2", "layer3"),
        pretrained: bool = True,
        flow_steps: int = 8,
        hidden_ratio: float = 1.0,
        conv3x3_only: bool = False,
        input_normalized: bool = True,
        input_size: tuple[int, int] = (256, 256),
    ) -> None:
        super().__init__()
        self.layers = list(layers)
        self.input_size = tuple(input_size)
        self.feature_extractor = build_feature_extractor(backbone, self.layers, pretrained, input_normalized,
                                                         self.input_size)
        # CNN features are normalised by a trainable LayerNorm over (C, H, W); transformer tokens
        # already went through the backbone's own final norm
        self.norms = nn.ModuleList()
        if not self.feature_extractor.is_transformer:
            dims = dryrun_find_featuremap_dims(self.feature_extractor, self.input_size, self.layers)
            self.norms.extend(nn.LayerNorm([dims[layer]["num_features"], *dims[layer]["resolution"]],
                                           elementwise_affine=True) for layer in self.layers)
        self.flows = nn.ModuleList(fastflow_flow(channels, flow_steps, hidden_ratio, conv3x3_only)
                                   for channels in self.feature_extractor.out_dims)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the flows and the LayerNorms (the backbone is frozen)."""
        return [*self.flows.parameters(), *self.norms.parameters()]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The normalised feature maps the flows model, one ``(B, C, h, w)`` per layer."""
        maps = self.feature_extractor(images)
        features = [maps[layer] for layer in self.layers]
        if len(self.norms):
            features = [norm(feature) for norm, feature in zip(self.norms, features, strict=True)]
        return features

    def latents(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(latents ``z`` per feature map (B, C, h, w), ``log|det dz/dx|`` per feature map (B,))."""
        latents, log_jac_dets = [], []
        for flow, feature in zip(self.flows, self.features(images), strict=True):
            latent, log_jac_det = flow(feature)
            latents.append(latent)
            log_jac_dets.append(log_jac_det)
        return latents, log_jac_dets

    def anomaly_map(self, latents: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Minus the mean over feature maps of the upsampled per-position likelihood: (B, H, W)."""
        upsampled = [F.interpolate(position_likelihood(latent), size=size, mode="bilinear", align_corners=False)
                     for latent in latents]
        return -torch.stack(upsampled, dim=-1).mean(dim=-1)[:, 0]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        latents, _log_jac_dets = self.latents(images)
        anomaly_map = self.anomaly_map(latents, tuple(images.shape[-2:]))
        return {"pred_score": anomaly_map.amax(dim=(-2, -1)), "anomaly_map": anomaly_map}


def build_feature_extractor(backbone: str, layers: list[LayerSpec], pretrained: bool, input_normalized: bool,
                            input_size: tuple[int, int]) -> TimmFeatureExtractor:
    """The frozen backbone: CNN stages as they are, or transformer blocks with the final norm.
    A transformer built for one input size (CaiT) is built for ``input_size``."""
    probe = probe_backbone(backbone)
    transformer_options: dict[str, Any] = {}
    if probe.token_transformer:
        transformer_options["final_norm"] = True
        if not probe.dynamic_img_size:
            transformer_options["img_size"] = input_size
    try:
        return TimmFeatureExtractor(backbone, layers, pretrained=pretrained, requires_grad=False,
                                    input_normalized=input_normalized, **transformer_options)
    except ValueError as error:
        raise ValueError(
            f"FastFlow cannot read layers {layers} from backbone '{backbone}': {error}. CNN backbones "
            "take stage names (the ResNet path: layers=['layer1', 'layer2', 'layer3']); vision "
            "transformers (CaiT, DeiT) take block indices (fastflow-cait: [40], fastflow-deit: [7]). The "
            "transformer rows cannot run on a CNN such as efficientnet_lite0: use fastflow-resnet50 with "
            f"backbone='{backbone}'."
        ) from error
    except RuntimeError as error:
        if "img_size" not in transformer_options or "pos_embed" not in str(error):
            raise
        raise ValueError(
            f"'{backbone}' is built for one input size and its pretrained position embedding does not "
            f"fit img_size={input_size[0]}: train at the weights' own size (448 for cait_m48_448) "
            "or pass pretrained=False."
        ) from error


class FastflowTrainer(BaseTrainer):
    """Fits the flows (and LayerNorms) by maximum likelihood on normal images."""

    model_class = FastflowModel

    def __init__(self, *, learning_rate: float = LEARNING_RATE, weight_decay: float = WEIGHT_DECAY,
                 train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        super().__init__(train_config, device, **model_options)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        """Adam(lr 1e-3, weight decay 1e-5) over the flows and LayerNorms, no schedule."""
        parameters = self.model.trainable_parameters()
        return torch.optim.Adam(parameters, lr=self.learning_rate, weight_decay=self.weight_decay), None

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        latents, log_jac_dets = self.model.latents(batch["image"])
        return {"loss": fastflow_loss(latents, log_jac_dets)}


SPEC_TRAINING = {"num_epochs": 500, "img_size": 256, "normalize": True}  # SPEC sec. 7

VARIANTS = {
    "fastflow-resnet50": ModelVariant(
        trainer=FastflowTrainer, family="flow",
        train={**SPEC_TRAINING, "batch_size": 8},
        tiny={"backbone": "resnet18", "pretrained": False, "img_size": 64, "num_steps": 2, "batch_size": 4},
        paper={"batch_size": 32},  # gathierry constants.BATCH_SIZE (500 epochs as in the spec)
    ),
    "fastflow-cait": ModelVariant(
        trainer=FastflowTrainer, family="flow",
        options={"backbone": "cait_m48_448", "layers": [40]},  # Table 6 block index
        train={**SPEC_TRAINING, "batch_size": 2, "img_size": 448},
        # CaiT-M48 (356M parameters) does not fit the contract test's CPU budget: the smallest
        # CaiT, block 20 of 24 (40 of 48 in CaiT-M48), the same path from tokens to map
        tiny={"backbone": "cait_xxs24_224", "layers": [20], "pretrained": False, "img_size": 64, "num_steps": 2},
        # batch: gathierry constants.BATCH_SIZE; steps and hidden ratio: gathierry configs/cait.yaml
        paper={"batch_size": 32, "flow_steps": 20, "hidden_ratio": 0.16},
    note=("vision-transformer path only (tokens of one block): a CNN backbone such as efficientnet_lite0 is "
          "refused here; use fastflow-resnet50 with backbone=efficientnet_lite0"),
    ),
    "fastflow-deit": ModelVariant(
        trainer=FastflowTrainer, family="flow",
        options={"backbone": "deit_base_distilled_patch16_384", "layers": [7]},  # Table 6 block index
        train={**SPEC_TRAINING, "batch_size": 2, "img_size": 384},
        # DeiT-B at 384 px is too slow for the contract test on a CPU: the tiny distilled DeiT
        # (also 12 blocks), same block 7, same path from tokens to map
        tiny={"backbone": "deit_tiny_distilled_patch16_224", "pretrained": False, "img_size": 64, "num_steps": 2},
        # batch: gathierry constants.BATCH_SIZE; steps and hidden ratio: gathierry configs/deit.yaml
        paper={"batch_size": 32, "flow_steps": 20, "hidden_ratio": 0.16},
    note=("vision-transformer path only (tokens of one block): a CNN backbone such as efficientnet_lite0 is "
          "refused here; use fastflow-resnet50 with backbone=efficientnet_lite0"),
    ),
}
