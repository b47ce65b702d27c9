"""DSR's VQ-VAE pretraining (the paper trains it on ImageNet; the authors released no code for it):
:func:`pretrain_dsr`, served by ``anomalyzoo pretrain-dsr --images DIR``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from anomalyzoo.data.images import cycle, find_images
from anomalyzoo.data.transforms import IMAGE_EXTENSIONS, image_to_tensor, load_rgb_image
from anomalyzoo.models.components.backbone import get_backbone_path
from anomalyzoo.models.dsr.model import DOWNSAMPLING
from anomalyzoo.models.dsr.trainer import LEARNING_RATE
from anomalyzoo.models.dsr.vq_vae import (
    EMBEDDING_DIM,
    NUM_EMBEDDINGS,
    NUM_HIDDENS,
    NUM_RESIDUAL_HIDDENS,
    NUM_RESIDUAL_LAYERS,
    VQ_WEIGHTS,
    DiscreteLatentModel,
)
from anomalyzoo.settings import get_settings

DEAD_CODE_THRESHOLD = 1.0  # pretrain_dsr: EMA usage below which a code restarts (Jukebox: random restarts)


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
