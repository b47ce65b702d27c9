"""EfficientAD teacher pretraining (arXiv 2303.14535, appendix A): distil a pretrained backbone's
patch features into the PDN that EfficientAD uses as its frozen teacher. An offline tool, kept out
of the method file as the reference keeps ``pretraining.py`` beside ``efficientad.py``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from anomalyzoo.data.images import cycle, find_images
from anomalyzoo.data.transforms import IMAGE_EXTENSIONS, image_to_tensor, load_rgb_image
from anomalyzoo.models.components.backbone import get_backbone_path
from anomalyzoo.models.components.feature_extractor import TimmFeatureExtractor
from anomalyzoo.models.efficientad.model import PatchDescriptionNetwork, check_size, teacher_weights_name
from anomalyzoo.settings import get_settings


class DistillationImages(Dataset):
    """One image at two sizes: ``img_size`` for the PDN and ``2 * img_size`` for the backbone,
    so that the backbone's stride-8 grid equals the padded PDN's stride-4 grid (reference
    pretraining: 512 px for the WideResNet, 256 px for the PDN). Grayscale with p = 0.1."""

    def __init__(self, files: list[Path], img_size: int, augment: bool = True) -> None:
        self.files, self.img_size, self.augment = files, img_size, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_rgb_image(self.files[index])
        if self.augment and torch.rand(()) < 0.1:
            image = image.convert("L").convert("RGB")
        return image_to_tensor(image, self.img_size, False), image_to_tensor(image, 2 * self.img_size, False)


class DistillationTarget(nn.Module):
    """Backbone patch features projected to ``out_channels`` by a fixed linear map, as in the
    reference pretraining (PatchCore's aggregation): each layer's features are averaged over
    3x3 neighbourhoods, brought to the first layer's grid bilinearly, pooled over channels to
    1024 each (adaptive average pooling), and the concatenation pooled to ``out_channels``.

    Both poolings are linear along the channels, so they are folded into one
    (sum of channels, out_channels) matrix: one small matmul per position instead of
    materialising 1024-channel vectors for every position."""

    def __init__(self, backbone: str, layers: Sequence[str], out_channels: int = 384, embed_dim: int = 1024) -> None:
        super().__init__()
        self.extractor = TimmFeatureExtractor(backbone, layers, pretrained=True, input_normalized=False)
        self.layers, self.out_channels, self.embed_dim = list(layers), out_channels, embed_dim
        self.register_buffer("projection", channel_pooling_matrix(self.extractor.out_dims, embed_dim, out_channels), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.extractor(images)
        grid = features[self.layers[0]].shape[-2:]
        aggregated = []
        for layer in self.layers:
            feature = F.avg_pool2d(features[layer], kernel_size=3, stride=1, padding=1)
            if feature.shape[-2:] != grid:
                feature = F.interpolate(feature, size=grid, mode="bilinear", align_corners=False)
            aggregated.append(feature)
        return torch.einsum("bchw,co->bohw", torch.cat(aggregated, dim=1), self.projection).contiguous()


def channel_pooling_matrix(channels: Sequence[int], embed_dim: int, out_channels: int) -> torch.Tensor:
    """The linear map of "adaptive-average-pool each layer's channels to ``embed_dim``, concatenate,
    adaptive-average-pool to ``out_channels``", as a (sum(channels), out_channels) matrix."""
    def pooling(size_in: int, size_out: int) -> torch.Tensor:  # row i: what input i contributes to each output
        return F.adaptive_avg_pool1d(torch.eye(size_in, dtype=torch.float64)[:, None, :], size_out)[:, 0, :]

    per_layer = torch.block_diag(*[pooling(c, embed_dim) for c in channels])  # (sum c, L * embed_dim)
    return (per_layer @ pooling(len(channels) * embed_dim, out_channels)).float()


def distill_teacher(
    image_dir: str | Path | Sequence[str | Path],
    model_size: str = "small",
    backbone: str = "wide_resnet50_2",
    layers: Sequence[str] = ("layer2", "layer3"),
    output_path: str | Path | None = None,
    num_steps: int = 10000,
    batch_size: int = 8,
    img_size: int = 256,
    lr: float = 1e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Pretrain an EfficientAD teacher PDN (paper appendix A) and save its state dict where
    :class:`EfficientAdModel` looks for it.

    The PDN (with padding, so its grid is img_size/4) regresses the per-channel normalised,
    384-channel projection of a pretrained backbone's layer2+layer3 features, computed on the
    same image at twice the size (MSE, Adam with weight decay 1e-5). The paper distils
    WideResNet-101 for 60,000 steps of 16 ImageNet images; any folder of natural images works.
    """
    check_size(model_size)
    output_path = Path(output_path) if output_path is not None else get_backbone_path(teacher_weights_name(model_size))
    if output_path.exists() and not overwrite:
        raise FileExistsError(f"{output_path} already exists; pass overwrite=True (--overwrite) to replace it")
    files = find_images(image_dir)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {image_dir}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    random.seed(seed)
    settings = get_settings()
    target_network = DistillationTarget(backbone, layers).to(device).eval()
    pdn = PatchDescriptionNetwork(model_size, 384, padding=True).to(device)

    # per-channel statistics of the targets (over up to 1000 images, no augmentation)
    statistics_files = files if len(files) <= 1000 else random.Random(seed).sample(files, 1000)
    loader = DataLoader(DistillationImages(statistics_files, img_size, augment=False), batch_size=batch_size,
                        num_workers=settings.num_workers)
    count, total, total_sq = 0, 0.0, 0.0
    for _, large in tqdm(loader, desc="teacher target statistics", disable=not progress, leave=False):
        target = target_network(large.to(device)).double()
        total = total + target.sum(dim=(0, 2, 3))
        total_sq = total_sq + (target ** 2).sum(dim=(0, 2, 3))
        count += target.shape[0] * target.shape[2] * target.shape[3]
    mean = (total / count).float().view(1, -1, 1, 1)
    std = (total_sq / count - (total / count) ** 2).clamp_min(0).sqrt().float().view(1, -1, 1, 1).clamp_min(1e-6)

    optimizer = torch.optim.Adam(pdn.parameters(), lr=lr, weight_decay=1e-5)
    loader = DataLoader(DistillationImages(files, img_size), batch_size=batch_size, shuffle=True, drop_last=len(files) > batch_size,
                        generator=torch.Generator().manual_seed(seed), num_workers=settings.num_workers)
    batches = cycle(loader)
    pdn.train()
    bar = tqdm(range(num_steps), desc=f"distill {model_size} teacher", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        small, large = next(batches)
        target = (target_network(large.to(device)) - mean) / std
        prediction = pdn(small.to(device))
        if prediction.shape[-2:] != target.shape[-2:]:
            target = F.interpolate(target, size=prediction.shape[-2:], mode="bilinear", align_corners=False)
        loss = ((prediction - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in pdn.state_dict().items()}
    temporary = output_path.with_suffix(output_path.suffix + ".tmp")
    torch.save(state, temporary)
    temporary.replace(output_path)
    return output_path
