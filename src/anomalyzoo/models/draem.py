"""DRAEM: "DRAEM - A discriminatively trained reconstruction embedding for surface anomaly
detection" (Zavrtanik, Kristan & Skocaj, ICCV 2021, arXiv 2108.07610), with the optional SSPCAB
block (Ristea et al., CVPR 2022, arXiv 2111.09099). Reference code: VitjanZ/DRAEM
(``model_unet.py``, ``loss.py``, ``train_DRAEM.py``, ``test_DRAEM.py``, ``data_loader.py``).

Normal images are corrupted with simulated anomalies (Perlin-noise masks filled with augmented
textures: :mod:`anomalyzoo.models.components.perlin`, textures from
:mod:`anomalyzoo.data.textures`). A reconstructive sub-network learns to undo the corruption;
a discriminative sub-network sees the corrupted image beside its reconstruction and learns to
segment the corruption. At test time real anomalies take the place of the simulated ones.

- Reconstructive sub-network (sec. 3.1; ``ReconstructiveSubNetwork``, base width 128): an
  encoder of five double 3x3 conv-BN-ReLU blocks (widths 1, 2, 4, 8, 8 x base, max-pooling
  between them: 16x down) and a decoder of four bilinear up-sampling stages without skip
  connections, ending in a 3x3 convolution to 3 channels (no output activation).
- Discriminative sub-network (sec. 3.2; ``DiscriminativeSubNetwork``, base 64): a U-Net with six
  encoder blocks (five poolings: 32x down) and skip connections, input the channel
  concatenation ``(reconstruction, augmented image)`` (6 channels, the authors' order; anomalib
  concatenates the other way round), output 2 channels (normal, anomalous) of logits. The
  reconstruction is not detached: the focal loss trains the reconstructive network too
  (``train_DRAEM.py``). Module names follow ``model_unet.py``. Input sides must be multiples of 32.
- Initialisation (``train_DRAEM.py`` ``weights_init``): conv weights N(0, 0.02), BatchNorm
  weights N(1, 0.02) and biases 0 (anomalib keeps PyTorch's defaults).
- Loss (sec. 3.1-3.2): ``L = L_2(I, I_r) + L_SSIM(I, I_r) + L_seg(M_a, M)`` with ``L_2`` the
  mean squared error, ``L_SSIM = 1 - SSIM`` (window 11, ``components.ssim``, the authors'
  ``SSIM``) between the normal image ``I`` and the reconstruction ``I_r`` of the corrupted
  image, and ``L_seg`` the focal loss (gamma 2) on the softmaxed output against the simulated
  mask. The paper weights ``L_SSIM`` by a balancing lambda; ``train_DRAEM.py`` uses 1. The
  focal loss is the authors' ``FocalLoss()`` (:func:`focal_loss`): alpha 1 for both classes,
  the one-hot target clamped to [1e-5, 1 - 1e-5] and ``p_t + 1e-5`` inside the log; anomalib
  uses kornia's focal loss (no smoothing) and doubles kornia's SSIM loss (which is
  ``(1 - SSIM) / 2``), the same ``1 - SSIM``.
- SSPCAB (``sspcab=True``; SSPCAB paper and anomalib): the block replaces ``block5``, the last
  encoder block of the reconstructive sub-network (the SSPCAB paper "generally replace[s] the
  penultimate convolutional layer", quoted in ristea/sspcab#3; anomalib's concrete choice,
  followed here, swaps the whole double-conv ``block5``), and ``lambda * MSE(block5 input,
  block5 output)`` with lambda 0.1 (anomalib's ``sspcab_lambda``) joins the loss. The SSPCAB
  authors say (ristea/sspcab#7) they add the block to both DRAEM sub-networks; anomalib, and
  we, only to the reconstructive one.
- Optimiser (``train_DRAEM.py``): Adam, lr 1e-4 on both sub-networks (two parameter groups), lr
  x 0.2 at 80 % and again at 90 % of the epochs (``MultiStepLR([0.8 E, 0.9 E], gamma=0.2)``,
  stepped per epoch; a milestone that is not a whole epoch is taken at the next one). The paper
  (sec. 4) and anomalib train 700 epochs with x 0.1 at epochs 400 and 600; the spec runs 10.
- Scoring (``test_DRAEM.py``): ``anomaly_map`` is the softmax probability of the anomalous class,
  per pixel, at the input resolution, unsmoothed (what the authors evaluate pixel-wise); the
  image score ``pred_score`` is the maximum of that map after a 21 x 21 mean filter (stride 1,
  zero padding 10, ``count_include_pad`` as ``avg_pool2d``'s default; sec. 3.4: mean filter,
  then the maximum). anomalib scores the maximum of the unsmoothed map.
- Synthesis per batch, in the trainer (``components.perlin``): half the images get an anomaly,
  30 % are first rotated (the target rotates with them). Anomaly source: DTD textures from
  ``<DATASET_DIR>/dtd/images`` (or ``texture_dir``); without them, crops of other training
  images of the batch, upscaled 2-4x and augmented like textures, with a notice in the results.
  The authors draw training images with replacement (``__getitem__`` ignores its index); we
  visit each once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomalyzoo.data.images import cycle, find_images
from anomalyzoo.data.textures import TextureImages, dtd_folder, training_image_crops
from anomalyzoo.models.components.focal_loss import focal_loss
from anomalyzoo.models.components.perlin import DraemAnomalySynthesis, SyntheticAnomalies
from anomalyzoo.models.components.ssim import ssim_loss
from anomalyzoo.models.components.sspcab import SSPCAB, sspcab_loss
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig
from anomalyzoo.models.components.unit_range import UnitRange
from anomalyzoo.models.components.variants import ModelVariant
from anomalyzoo.settings import get_settings

RECONSTRUCTIVE_WIDTH = 128  # model_unet.py ReconstructiveSubNetwork(base_width=128)
DISCRIMINATIVE_WIDTH = 64  # model_unet.py DiscriminativeSubNetwork(base_channels=64)
INIT_STD = 0.02  # train_DRAEM.py weights_init
LEARNING_RATE = 1e-4  # README / train_DRAEM.py --lr 0.0001
LR_MILESTONES = (0.8, 0.9)  # train_DRAEM.py MultiStepLR([epochs * 0.8, epochs * 0.9], ...)
LR_GAMMA = 0.2  # train_DRAEM.py MultiStepLR(..., gamma=0.2)
SSPCAB_LAMBDA = 0.1  # anomalib Draem(sspcab_lambda=0.1)
SCORE_POOL_SIZE = 21  # test_DRAEM.py avg_pool2d(out_mask_sm[:, 1:], 21, stride=1, padding=21 // 2)
PAPER_NUM_EPOCHS = 700  # sec. 4; README example --epochs 700
DOWNSAMPLING = 32  # five 2x poolings in the discriminative U-Net


# ----------------------------------------------------------------------------- networks
def conv_block(in_channels: int, out_channels: int, mid_channels: int | None = None) -> nn.Sequential:
    """(3x3 conv, BN, ReLU) twice: every block of ``model_unet.py``."""
    mid_channels = mid_channels or out_channels
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1), nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x bilinear up-sampling (align_corners=True), then 3x3 conv, BN, ReLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


class ReconstructiveEncoder(nn.Module):
    def __init__(self, in_channels: int, width: int, sspcab: bool = False) -> None:
        super().__init__()
        self.block1 = conv_block(in_channels, width)
        self.block2 = conv_block(width, width * 2)
        self.block3 = conv_block(width * 2, width * 4)
        self.block4 = conv_block(width * 4, width * 8)
        self.block5 = SSPCAB(width * 8) if sspcab else conv_block(width * 8, width * 8)
        self.pool = nn.MaxPool2d(2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input of block5, output of block5): the bottleneck and what SSPCAB's loss compares."""
        features = images
        for block in (self.block1, self.block2, self.block3, self.block4):
            features = self.pool(block(features))
        return features, self.block5(features)


class ReconstructiveDecoder(nn.Module):
    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.up1, self.db1 = up_block(width * 8, width * 8), conv_block(width * 8, width * 4, width * 8)
        self.up2, self.db2 = up_block(width * 4, width * 4), conv_block(width * 4, width * 2, width * 4)
        self.up3, self.db3 = up_block(width * 2, width * 2), conv_block(width * 2, width, width * 2)
        self.up4, self.db4 = up_block(width, width), conv_block(width, width)
        self.fin_out = nn.Sequential(nn.Conv2d(width, out_channels, kernel_size=3, padding=1))

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        features = bottleneck
        for up, block in ((self.up1, self.db1), (self.up2, self.db2), (self.up3, self.db3), (self.up4, self.db4)):
            features = block(up(features))
        return self.fin_out(features)


class ReconstructiveSubNetwork(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = RECONSTRUCTIVE_WIDTH,
                 sspcab: bool = False) -> None:
        super().__init__()
        self.encoder = ReconstructiveEncoder(in_channels, width, sspcab)
        self.decoder = ReconstructiveDecoder(width, out_channels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, block5 input, block5 output)."""
        bottleneck_input, bottleneck = self.encoder(images)
        return self.decoder(bottleneck), bottleneck_input, bottleneck


class DiscriminativeEncoder(nn.Module):
    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.block1 = conv_block(in_channels, width)
        self.block2 = conv_block(width, width * 2)
        self.block3 = conv_block(width * 2, width * 4)
        self.block4 = conv_block(width * 4, width * 8)
        self.block5 = conv_block(width * 8, width * 8)
        self.block6 = conv_block(width * 8, width * 8)
        self.pool = nn.MaxPool2d(2)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The six blocks' outputs b1..b6 (full resolution down to 1/32)."""
        skips = [self.block1(images)]
        for block in (self.block2, self.block3, self.block4, self.block5, self.block6):
            skips.append(block(self.pool(skips[-1])))
        return skips


class DiscriminativeDecoder(nn.Module):
    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.up_b, self.db_b = up_block(width * 8, width * 8), conv_block(width * (8 + 8), width * 8)
        self.up1, self.db1 = up_block(width * 8, width * 4), conv_block(width * (4 + 8), width * 4)
        self.up2, self.db2 = up_block(width * 4, width * 2), conv_block(width * (2 + 4), width * 2)
        self.up3, self.db3 = up_block(width * 2, width), conv_block(width * (2 + 1), width)
        self.up4, self.db4 = up_block(width, width), conv_block(width * 2, width)
        self.fin_out = nn.Sequential(nn.Conv2d(width, out_channels, kernel_size=3, padding=1))

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        b1, b2, b3, b4, b5, b6 = skips
        features = b6
        stages = ((self.up_b, self.db_b, b5), (self.up1, self.db1, b4), (self.up2, self.db2, b3),
                  (self.up3, self.db3, b2), (self.up4, self.db4, b1))
        for up, block, skip in stages:
            features = block(torch.cat((up(features), skip), dim=1))
        return self.fin_out(features)


class DiscriminativeSubNetwork(nn.Module):
    def __init__(self, in_channels: int = 6, out_channels: int = 2, width: int = DISCRIMINATIVE_WIDTH) -> None:
        super().__init__()
        self.encoder_segment = DiscriminativeEncoder(in_channels, width)
        self.decoder_segment = DiscriminativeDecoder(width, out_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder_segment(self.encoder_segment(images))


def init_weights(module: nn.Module) -> None:
    """``train_DRAEM.py`` ``weights_init``: conv weights N(0, 0.02); BatchNorm N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- losses
def draem_losses(targets: torch.Tensor, reconstruction: torch.Tensor, masks: torch.Tensor,
                 logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sec. 3.1-3.2: ``loss_l2 + loss_ssim + loss_focal`` (``train_DRAEM.py``), each term named."""
    terms = {
        "loss_l2": F.mse_loss(reconstruction, targets),
        "loss_ssim": ssim_loss(reconstruction, targets),
        "loss_focal": focal_loss(torch.softmax(logits, dim=1), masks),
    }
    return {"loss": terms["loss_l2"] + terms["loss_ssim"] + terms["loss_focal"], **terms}


# ----------------------------------------------------------------------------- model
class DraemOutputs(NamedTuple):
    reconstruction: torch.Tensor  # (B, 3, H, W)
    logits: torch.Tensor  # (B, 2, H, W) discriminative output before the softmax
    bottleneck_input: torch.Tensor  # input of the reconstructive encoder's block5
    bottleneck_output: torch.Tensor  # its output (SSPCAB's loss compares the two)


class DraemModel(nn.Module):
    """Reconstructive + discriminative sub-networks; eval ``forward`` returns scores and maps."""

    def __init__(
        self,
        sspcab: bool = False,
        reconstructive_width: int = RECONSTRUCTIVE_WIDTH,
        discriminative_width: int = DISCRIMINATIVE_WIDTH,
        input_normalized: bool = False,
    ) -> None:
        super().__init__()
        self.input_normalized = input_normalized
        self.reconstructive = ReconstructiveSubNetwork(3, 3, reconstructive_width, sspcab)
        self.discriminative = DiscriminativeSubNetwork(6, 2, discriminative_width)
        self.apply(init_weights)
        self.unit_range = UnitRange(input_normalized)

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """The networks and the synthesis work on [0, 1] images (the authors' ``/ 255``); undo
        the loader's ImageNet normalisation when the run was configured with normalize=True."""
        return self.unit_range(images)

    def segment(self, unit_images: torch.Tensor) -> DraemOutputs:
        """Both sub-networks on [0, 1] images (B, 3, H, W) with H, W multiples of 32."""
        height, width = unit_images.shape[-2:]
        if height % DOWNSAMPLING or width % DOWNSAMPLING:
            raise ValueError(f"DRAEM's U-Net pools five times: image sides must be multiples of {DOWNSAMPLING}, "
                             f"got {height} x {width} (use img_size 256, as the authors)")
        reconstruction, bottleneck_input, bottleneck_output = self.reconstructive(unit_images)
        logits = self.discriminative(torch.cat((reconstruction, unit_images), dim=1))
        return DraemOutputs(reconstruction, logits, bottleneck_input, bottleneck_output)

    @staticmethod
    def anomaly_map(logits: torch.Tensor) -> torch.Tensor:
        """Softmax probability of the anomalous class, (B, H, W)."""
        return torch.softmax(logits, dim=1)[:, 1]

    @staticmethod
    def image_score(anomaly_map: torch.Tensor) -> torch.Tensor:
        """Max of the 21 x 21 mean-filtered map (``test_DRAEM.py``), (B,)."""
        smoothed = F.avg_pool2d(anomaly_map[:, None], SCORE_POOL_SIZE, stride=1, padding=SCORE_POOL_SIZE // 2)
        return smoothed.amax(dim=(-3, -2, -1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        anomaly_map = self.anomaly_map(self.segment(self.to_unit_range(images)).logits)
        return {"pred_score": self.image_score(anomaly_map), "anomaly_map": anomaly_map}


# ----------------------------------------------------------------------------- trainer
class DraemTrainer(BaseTrainer):
    """Synthesises anomalies on each batch and trains both sub-networks on them."""

    model_class = DraemModel

    def __init__(self, *, texture_dir: str | Path | None = None, sspcab_lambda: float = SSPCAB_LAMBDA,
                 train_config: TrainConfig | dict[str, Any] | None = None, device: str | torch.device | None = None,
                 **model_options: Any) -> None:
        self.texture_dir = str(texture_dir) if texture_dir is not None else None  # checkpoints store plain types
        self.sspcab_lambda = sspcab_lambda
        super().__init__(train_config, device, **model_options)
        self.synthesis = DraemAnomalySynthesis()
        self.texture_iterator: Iterator[torch.Tensor] | None = None
        self.texture_note = ""

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam(lr 1e-4) over both sub-networks; lr x 0.2 at 80 % and 90 % of the epochs."""
        optimizer = torch.optim.Adam([{"params": self.model.reconstructive.parameters(), "lr": LEARNING_RATE},
                                      {"params": self.model.discriminative.parameters(), "lr": LEARNING_RATE}])
        # the milestones are read at every step: a resumed run builds the optimiser before fit() knows its epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: self.lr_factor(epoch))
        return optimizer, scheduler

    def lr_factor(self, epoch: int) -> float:
        """``MultiStepLR([0.8 E, 0.9 E], gamma=0.2)`` as a factor after ``epoch`` completed epochs,
        E the epochs of the current fit (``num_steps`` included), else the configured epochs."""
        if self.train_loader is not None and self.total_steps:
            epochs = math.ceil(self.total_steps / max(len(self.train_loader), 1))
        else:
            epochs = self.train_config.num_epochs
        milestones = [math.ceil(round(fraction * epochs, 6)) for fraction in LR_MILESTONES]
        return LR_GAMMA ** sum(epoch >= milestone for milestone in milestones)

    # ------------------------------------------------------------- anomaly sources
    def texture_folder(self) -> Path:
        """``texture_dir``, else ``<the run's DATASET_DIR>/dtd/images``."""
        if self.texture_dir is not None:
            return Path(self.texture_dir).expanduser()
        return dtd_folder(self.dataset_dir or get_settings().dataset_dir)

    def start_texture_source(self) -> None:
        folder = self.texture_folder()
        files = find_images(folder) if folder.is_dir() else []
        if not files:
            self.texture_note = (f"fallback: no texture images under {folder}; anomalies are filled with augmented, "
                                 "upscaled crops of other training images instead of DTD textures (the paper's "
                                 "source). Put DTD (dtd/images/<texture>/) in DATASET_DIR to use it")
            self.texture_iterator = None
            return
        self.texture_note = f"dtd: {len(files)} texture images from {folder}"
        loader = DataLoader(TextureImages(files, self.train_config.img_size), batch_size=self.train_config.batch_size,
                            shuffle=True, generator=torch.Generator().manual_seed(self.train_config.seed),
                            num_workers=get_settings().num_workers)
        self.texture_iterator = cycle(loader)

    def on_fit_start(self) -> None:
        self.start_texture_source()
        tqdm.write(f"DRAEM anomaly source {self.texture_note}")

    def anomaly_sources(self, images: torch.Tensor) -> torch.Tensor:
        """One anomaly-source image per training image (B, 3, H, W): DTD textures, else crops
        (the synthesis augments them)."""
        if not self.texture_note:  # a train_step outside fit()
            self.start_texture_source()
        if self.texture_iterator is None:
            return training_image_crops(images)
        parts, count = [], 0
        while count < len(images):  # the texture loader's last batch may be short
            parts.append(next(self.texture_iterator))
            count += len(parts[-1])
        return torch.cat(parts)[:len(images)].to(images.device)

    def synthesize(self, batch: dict[str, Any]) -> SyntheticAnomalies:
        images = self.model.to_unit_range(batch["image"])
        return self.synthesis(images, self.anomaly_sources(images))

    # ------------------------------------------------------------- loss
    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The DRAEM loss on a freshly synthesised batch, plus lambda * L_SSPCAB with ``sspcab``."""
        synthetic = self.synthesize(batch)
        outputs = self.model.segment(synthetic.augmented)
        losses = draem_losses(synthetic.images, outputs.reconstruction, synthetic.masks, outputs.logits)
        if self.model_options["sspcab"]:
            losses["loss_sspcab"] = sspcab_loss(outputs.bottleneck_input, outputs.bottleneck_output)
            losses["loss"] = losses["loss"] + self.sspcab_lambda * losses["loss_sspcab"]
        return losses

    def run_notes(self) -> dict[str, str]:
        return {"anomaly_source": self.texture_note} if self.texture_note else {}


VARIANTS = {
    "draem": ModelVariant(
        trainer=DraemTrainer, family="reconstruction", options={"sspcab": True},
        train={"num_epochs": 10, "batch_size": 8, "img_size": 256, "normalize": False},  # SPEC sec. 7
        tiny={"reconstructive_width": 8, "discriminative_width": 8, "img_size": 32, "num_epochs": 1, "batch_size": 4},
        paper={"num_epochs": PAPER_NUM_EPOCHS},  # sec. 4 (lr x 0.1 at 400 and 600 there; see the docstring)
        note="Synthetic anomalies use DTD textures from DATASET_DIR/dtd/images (the paper's source); without them "
             "augmented crops of the training images stand in, and the results say so.",
    ),
}
