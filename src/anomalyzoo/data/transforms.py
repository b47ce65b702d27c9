"""Reading images and masks from disk, and turning them into the tensors every model eats.

Everything a dataset file can throw at us (grayscale, palette, alpha, 16-bit, a file cut short
by an interrupted copy) is settled here, once, so that every loader hands the models the same
thing: an RGB image and a binary mask on the same pixel grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Extensions (lower case) that the loaders treat as images; everything else in a folder is ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageReadError(ValueError):
    """An image or mask file that cannot be decoded (corrupt, truncated, not an image)."""


def _read_error(path: Path, what: str, reason: object) -> ImageReadError:
    return ImageReadError(
        f"Cannot read {what} '{path}': {reason}. The file is corrupt, truncated or not an image; "
        f"re-export it from the original source or remove it from the dataset folder."
    )


def _open_fully(path: str | Path, what: str) -> Image.Image:
    """Open and decode the whole file. ``Image.open`` alone only reads the header, so a file cut
    short would pass it and fail (or, with LOAD_TRUNCATED_IMAGES, silently come back grey) much
    later inside a DataLoader worker; ``load()`` makes the failure happen here, with the name.
    Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` (often switched on in notebooks) is
    held off while we decode: a half-grey image would be a false anomaly in the test set and
    a corrupted memory in the training set."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{what.capitalize()} file '{path}' does not exist (or is not a file).")
    load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
            # Detach from the file handle so it is closed when we leave the ``with``.
            return img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _read_error(path, what, error) from error
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = load_truncated


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Scale single-channel pixels of a high-bit-depth mode to 0..255.

    16-bit data is scaled by a fixed factor (65535 -> 255), never by each image's own min/max:
    per-image stretching would make brightness differences between images, which may be
    exactly the anomaly, disappear. 'I' (32-bit int, how older Pillow returns 16-bit PNGs) is
    read as 16-bit; 'F' is read as [0, 1] when it fits there, else as 0..255.
    """
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        scaled = np.clip(pixels.astype(np.float64), 0, 65535) / 257.0
    elif mode == "F":
        values = pixels.astype(np.float64)
        scaled = values * 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else values
        scaled = np.nan_to_num(np.clip(scaled, 0, 255))
    else:
        return pixels.astype(np.uint8)
    return np.round(scaled).astype(np.uint8)


def load_rgb_image(path: str | Path) -> Image.Image:
    """Load any image file as an 8-bit RGB ``PIL.Image``.

    - grayscale ('1', 'L', 'I;16', 'I', 'F') is replicated to three channels; 16-bit is scaled
      to 8-bit by a fixed factor (see :func:`_to_uint8`);
    - palette ('P') is expanded through its palette;
    - alpha ('RGBA', 'LA', 'PA', palette transparency) is **composited onto black**, so fully
      transparent pixels always look the same whatever colour values they happen to store;
    - EXIF orientation is deliberately not applied: masks are drawn on the stored pixel grid.

    Raises :class:`ImageReadError` (naming the file) for a missing, corrupt or truncated file.
    """
    img = _open_fully(path, "image")
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        gray = _to_uint8(np.asarray(img), img.mode)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def read_binary_mask(path: str | Path, nonzero: bool = False) -> np.ndarray:
    """A mask file as a boolean (H, W) array at its stored size.

    By default a pixel is a defect when it is in the upper half of its type's range (> 127 for
    8-bit, > 32767 for 16-bit, set for 1-bit), which is right for the usual 0/255 masks and
    ignores the grey fringe some tools anti-alias in. ``nonzero=True`` counts every non-zero
    pixel instead, for datasets (VisA) whose masks store small label values such as 1.
    A mask whose largest value is 1 is such a 0/1 label mask whatever ``nonzero`` says (no
    0/255 mask, anti-aliased or not, tops out at 1), so its defect is not silently lost.
    Colour masks count a pixel when any channel does, so a red-on-black mask works too.
    """
    img = _open_fully(path, "mask")
    if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX", "RGBa"):
        img = img.convert("RGB")
    pixels = np.asarray(img)
    if pixels.ndim == 3:
        pixels = pixels[:, :, 0] if img.mode in ("LA", "La") else pixels.max(axis=2)
    if img.mode == "1" or pixels.dtype == bool:
        return pixels.astype(bool)
    if nonzero or (pixels.dtype.kind in "ui" and pixels.max(initial=0) == 1):
        return pixels > 0
    if img.mode in _SIXTEEN_BIT_MODES:
        return pixels > 32767
    if img.mode in ("I", "F"):
        # 32-bit int / float masks carry no fixed range; read small ranges as 8-bit (or [0, 1]).
        peak = float(np.nanmax(pixels, initial=0))
        threshold = 0.5 if peak <= 1 else (127 if peak <= 255 else 32767)
        return pixels > threshold
    return pixels > 127


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a binary mask to ``size`` = (width, height), as uint8 {0, 1}.
    Nearest keeps it binary; interpolating would invent fractional 'half defect' pixels."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    width, height = size
    if binary.shape != (height, width):
        resized = Image.fromarray(binary * 255).resize((width, height), Image.Resampling.NEAREST)
        binary = (np.asarray(resized) > 0).astype(np.uint8)
    return binary


def load_mask(path: str | Path, size: tuple[int, int], nonzero: bool = False) -> np.ndarray:
    """Load a mask file, binarise it (see :func:`read_binary_mask`) and resize it with nearest
    neighbour to ``size`` = (width, height). Returns uint8 (height, width) with values {0, 1}."""
    return resize_mask(read_binary_mask(path, nonzero=nonzero), size)


def resize_size_for_crop(img_size: int, crop_pct: float = 1.0) -> int:
    """The side images are resized to before a centre crop of ``img_size`` keeps ``crop_pct`` of
    it (timm's ``crop_pct``): ``round(img_size / crop_pct)``; ``img_size`` itself for 1.0 (no crop).
    Dinomaly's R448-C392 is ``img_size=392, crop_pct=0.875``."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return int(round(img_size / crop_pct))


def center_crop_box(resized: int, img_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred ``img_size`` square in a ``resized`` square
    (torchvision's CenterCrop offsets: ``round((resized - img_size) / 2)``)."""
    offset = int(round((resized - img_size) / 2.0))
    return offset, offset, offset + img_size, offset + img_size


def resize_and_crop_mask(mask: np.ndarray, img_size: int, crop_pct: float = 1.0) -> np.ndarray:
    """A mask through the same geometry as :func:`image_to_tensor`: nearest resize, centre crop."""
    resized = resize_size_for_crop(img_size, crop_pct)
    binary = resize_mask(mask, (resized, resized))
    left, top, right, bottom = center_crop_box(resized, img_size)
    return np.ascontiguousarray(binary[top:bottom, left:right])


def image_to_tensor(img: Image.Image, img_size: int, normalize: bool, crop_pct: float = 1.0) -> torch.Tensor:
    """RGB image -> float32 tensor (3, img_size, img_size) in [0, 1], ImageNet-normalised when
    ``normalize``. Pillow's bilinear resize filters over the whole source footprint when it
    shrinks (i.e. it antialiases), so large images are not aliased on the way down. With
    ``crop_pct < 1`` the image is resized to ``round(img_size / crop_pct)`` and centre-cropped to
    ``img_size`` (the resize-then-crop evaluation transform of timm and of Dinomaly)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    resized = resize_size_for_crop(img_size, crop_pct)
    if img.size != (resized, resized):
        img = img.resize((resized, resized), Image.Resampling.BILINEAR)
    if resized != img_size:
        img = img.crop(center_crop_box(resized, img_size))
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        tensor = (tensor - mean) / std
    return tensor


def denormalize(tensor: torch.Tensor | np.ndarray, normalize: bool) -> np.ndarray:
    """Undo :func:`image_to_tensor` for display: (3, H, W) (or (1, 3, H, W)) -> uint8 (H, W, 3)."""
    values = torch.as_tensor(tensor).detach().to("cpu", torch.float32)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 3 or values.shape[0] != 3:
        raise ValueError(f"denormalize expects a (3, H, W) image tensor, got shape {tuple(values.shape)}")
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        values = values * std + mean
    pixels = (values.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().numpy()


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma with ITU-R 601 weights (PIL's and torchvision's grayscale)."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)
