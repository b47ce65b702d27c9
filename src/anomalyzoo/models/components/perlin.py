"""Perlin-noise anomaly masks and DRAEM's anomaly synthesis (Zavrtanik, Kristan & Skocaj,
ICCV 2021, arXiv 2108.07610, sec. 3.3), as a data transform on batches of [0, 1]
images. Reproduces the authors' ``perlin.py`` and ``MVTecDRAEMTrainDataset.augment_image`` /
``transform_image`` (VitjanZ/DRAEM ``data_loader.py``):

1. Mask ``M_a`` (sec. 3.3): 2-D Perlin noise (:func:`rand_perlin_2d_np`, the authors' function)
   with a lattice of ``2^a x 2^b`` cells, ``a, b`` drawn independently from {0, ..., 5}
   (``2 ** torch.randint(0, 6)`` per axis), rotated by an angle uniform in [-90, 90] degrees
   (``iaa.Affine(rotate=(-90, 90))``: bilinear, zeros outside) and thresholded at 0.5.
2. Anomaly source ``A`` (sec. 3.3): a texture image (DTD in the paper; see
   ``anomalyzoo.data.textures`` for the source and the fallback) transformed by 3 augmentations
   drawn without repetition, in random order, from the authors' list of 10 imgaug augmenters,
   reproduced here with torch / torchvision ops (:data:`TEXTURE_AUGMENTATIONS`):

   ======================================================  ==============================================
   authors (imgaug)                                        here
   ======================================================  ==============================================
   ``GammaContrast((0.5, 2.0), per_channel=True)``         ``x ** gamma``, gamma ~ U(0.5, 2) per channel
   ``MultiplyAndAddToBrightness((0.8, 1.2), (-30, 30))``   luma Y of YCrCb: ``Y * m`` and ``+ a/255`` in
                                                           random order, clipped; chroma kept (``x + Y' - Y``)
   ``pillike.EnhanceSharpness()`` (factor 0..2)            ``TF.adjust_sharpness`` (PIL's filter), factor ~ U(0, 2)
   ``AddToHueAndSaturation((-50, 50), per_channel=True)``  HSV: hue += k/255 turn, saturation += k'/255,
                                                           k, k' integers in [-50, 50] drawn separately
   ``Solarize(0.5, threshold=(32, 128))``                  with p = 0.5: ``TF.solarize`` at U(32, 128)/255
   ``Posterize()`` (1..8 bits)                             ``TF.posterize`` (PIL's bit mask), bits in 1..8
   ``Invert()``                                            ``1 - x``
   ``pillike.Autocontrast()`` (cutoff 0..20 %)             per channel: stretch the [c, 1 - c] quantiles
                                                           to [0, 1], c in 0..20 %
   ``pillike.Equalize()``                                  ``TF.equalize`` on the uint8 image
   ``Affine(rotate=(-45, 45))``                            ``TF.rotate``, bilinear, zeros outside
   ======================================================  ==============================================
3. Blend (sec. 3.3): ``I_a = (1 - M_a) * I + (1 - beta) (M_a * I) + beta (M_a * A)`` with the
   opacity ``beta`` uniform in [0.2, 1.0): the authors' code, which produced the published
   numbers, draws ``beta_code = 0.8 u`` and weights the texture by ``1 - beta_code``, an opacity
   uniform in (0.2, 1.0]; the paper's text says [0.1, 1.0] and anomalib follows the text.
4. Half of the images stay normal (authors: ``no_anomaly > 0.5``): ``I_a = I``, ``M_a = 0``.
   Before all this, 30 % of the normal images are rotated by U(-90, 90) degrees (authors'
   ``transform_image``: ``rand > 0.7``); the rotated image is also the reconstruction target.

Seeding: every draw comes from one ``torch.Generator`` (the global one by default, so a
checkpoint's RNG state resumes it); the Perlin gradients use a NumPy generator seeded from it.
One deviation: the authors' ``rand_perlin_2d_np`` needs sizes divisible by the lattice; here the
noise is drawn on the next multiple and cropped (identical for divisible sizes, e.g. 256).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

PERLIN_SCALE_EXPONENTS = (0, 6)  # 2 ** torch.randint(0, 6): lattices of 1..32 cells per axis
PERLIN_THRESHOLD = 0.5  # data_loader.py: perlin_noise > 0.5
ROTATION_DEGREES = (-90.0, 90.0)  # data_loader.py: self.rot = iaa.Affine(rotate=(-90, 90)), noise and images
BETA_RANGE = (0.2, 1.0)  # data_loader.py: texture weight 1 - 0.8 u (the paper's text: [0.1, 1.0])
NO_ANOMALY_PROBABILITY = 0.5  # data_loader.py: no_anomaly > 0.5 keeps the image normal
NORMAL_ROTATION_PROBABILITY = 0.3  # data_loader.py transform_image: torch.rand(1) > 0.7
NUM_TEXTURE_AUGMENTATIONS = 3  # data_loader.py randAugmenter: 3 of the list, no repetition


def fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic interpolant ``6t^5 - 15t^4 + 10t^3``."""
    return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3


def lerp(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (y - x) * w + x


def rand_perlin_2d_np(shape: tuple[int, int], res: tuple[int, int],
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Gradient noise on a ``res[0] x res[1]`` lattice sampled at ``shape`` pixels: the authors'
    ``rand_perlin_2d_np`` (random unit gradients at the lattice corners, dot products with the
    offsets, quintic interpolation, times sqrt(2)). Sizes that are not multiples of ``res`` are
    drawn on the next multiple and cropped."""
    rng = rng if rng is not None else np.random.default_rng()
    padded = (math.ceil(shape[0] / res[0]) * res[0], math.ceil(shape[1] / res[1]) * res[1])
    delta = (res[0] / padded[0], res[1] / padded[1])
    cell = (padded[0] // res[0], padded[1] // res[1])  # pixels per lattice cell
    rows = (np.arange(padded[0]) * delta[0]) % 1
    cols = (np.arange(padded[1]) * delta[1]) % 1
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)  # position inside its cell
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile_gradients(row_slice: slice, col_slice: slice) -> np.ndarray:
        return np.repeat(np.repeat(gradients[row_slice, col_slice], cell[0], axis=0), cell[1], axis=1)

    def dot(gradient: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
        offsets = np.stack((grid[..., 0] + shift[0], grid[..., 1] + shift[1]), axis=-1)
        return (offsets * gradient).sum(axis=-1)

    n00 = dot(tile_gradients(slice(0, -1), slice(0, -1)), (0, 0))
    n10 = dot(tile_gradients(slice(1, None), slice(0, -1)), (-1, 0))
    n01 = dot(tile_gradients(slice(0, -1), slice(1, None)), (0, -1))
    n11 = dot(tile_gradients(slice(1, None), slice(1, None)), (-1, -1))
    t = fade(grid)
    noise = math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])
    return noise[:shape[0], :shape[1]]


# ----------------------------------------------------------------------------- random draws
def uniform(low: float, high: float, generator: torch.Generator | None = None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def integer(low: int, high: int, generator: torch.Generator | None = None) -> int:
    """An integer uniform in [low, high] (both included, as imgaug's integer ranges)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def numpy_rng(generator: torch.Generator | None = None) -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2 ** 62, (), generator=generator)))


# ----------------------------------------------------------------------------- the mask
def perlin_mask(height: int, width: int, generator: torch.Generator | None = None,
                threshold: float = PERLIN_THRESHOLD) -> torch.Tensor:
    """Binary anomaly mask (H, W), float {0, 1}: step 1 of the module docstring."""
    low, high = PERLIN_SCALE_EXPONENTS
    res = (2 ** int(torch.randint(low, high, (), generator=generator)),
           2 ** int(torch.randint(low, high, (), generator=generator)))
    noise = torch.from_numpy(rand_perlin_2d_np((height, width), res, numpy_rng(generator))).float()
    angle = uniform(*ROTATION_DEGREES, generator=generator)
    noise = TF.rotate(noise[None], angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)[0]
    return (noise > threshold).float()


# ----------------------------------------------------------------------------- texture augmentations
def to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def luma(image: torch.Tensor) -> torch.Tensor:
    """Y of (3, H, W) RGB, ITU-R BT.601 (OpenCV's YCrCb)."""
    red, green, blue = image
    return 0.299 * red + 0.587 * green + 0.114 * blue


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> HSV, hue in [0, 1) turns."""
    red, green, blue = image
    value, _ = image.max(dim=0)
    chroma = value - image.min(dim=0).values
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == red, ((green - blue) / safe_chroma) % 6,
                      torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    return torch.stack((hue, saturation, value))


def hsv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = image
    sector = torch.floor(hue * 6)
    fraction = hue * 6 - sector
    sector = sector.long() % 6
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    choices = {  # per sector: (r, g, b)
        "r": torch.stack((value, q, p, p, t, value)),
        "g": torch.stack((t, value, value, q, p, p)),
        "b": torch.stack((p, p, t, value, value, q)),
    }
    index = sector[None]
    return torch.cat([choices[c].gather(0, index) for c in ("r", "g", "b")])


def gamma_contrast(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    gamma = torch.tensor([uniform(0.5, 2.0, generator) for _ in range(image.shape[0])], device=image.device)
    return image.clamp(0, 1) ** gamma.view(-1, 1, 1).to(image.dtype)


def multiply_and_add_to_brightness(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    factor, offset = uniform(0.8, 1.2, generator), uniform(-30, 30, generator) / 255
    brightness = luma(image)
    if float(torch.rand((), generator=generator)) < 0.5:  # imgaug's random_order=True
        changed = brightness * factor + offset
    else:
        changed = (brightness + offset) * factor
    return (image + (changed.clamp(0, 1) - brightness)[None]).clamp(0, 1)


def enhance_sharpness(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return TF.adjust_sharpness(image, uniform(0.0, 2.0, generator)).clamp(0, 1)


def add_to_hue_and_saturation(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    hue_shift, saturation_shift = integer(-50, 50, generator) / 255, integer(-50, 50, generator) / 255
    hue, saturation, value = rgb_to_hsv(image.clamp(0, 1))
    hsv = torch.stack(((hue + hue_shift) % 1.0, (saturation + saturation_shift).clamp(0, 1), value))
    return hsv_to_rgb(hsv)


def solarize(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    threshold = uniform(32, 128, generator) / 255
    if float(torch.rand((), generator=generator)) < 0.5:  # iaa.Solarize(0.5, ...): p = 0.5
        return TF.solarize(image.clamp(0, 1), threshold)
    return image


def posterize(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return TF.posterize(to_uint8(image), integer(1, 8, generator)).to(image.dtype) / 255


def invert(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return 1.0 - image.clamp(0, 1)


def autocontrast(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    cutoff = integer(0, 20, generator) / 100
    flat = image.clamp(0, 1).flatten(1)
    bounds = torch.quantile(flat, torch.tensor([cutoff, 1 - cutoff], device=image.device, dtype=image.dtype), dim=1)
    low, high = bounds[0].view(-1, 1, 1), bounds[1].view(-1, 1, 1)
    stretched = (image - low) / torch.where(high > low, high - low, torch.ones_like(high))
    return torch.where(high > low, stretched, image).clamp(0, 1)


def equalize(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return TF.equalize(to_uint8(image)).to(image.dtype) / 255


def rotate(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return TF.rotate(image, uniform(-45, 45, generator), interpolation=InterpolationMode.BILINEAR, fill=0.0)


TextureAugmentation = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
# the authors' list, in their order (data_loader.py MVTecDRAEMTrainDataset.augmenters)
TEXTURE_AUGMENTATIONS: tuple[TextureAugmentation, ...] = (
    gamma_contrast, multiply_and_add_to_brightness, enhance_sharpness, add_to_hue_and_saturation, solarize,
    posterize, invert, autocontrast, equalize, rotate,
)


def augment_texture(texture: torch.Tensor, generator: torch.Generator | None = None,
                    augmentations: Sequence[TextureAugmentation] = TEXTURE_AUGMENTATIONS) -> torch.Tensor:
    """(3, H, W) [0, 1] -> the same with 3 distinct augmentations applied in a random order."""
    chosen = torch.randperm(len(augmentations), generator=generator)[:NUM_TEXTURE_AUGMENTATIONS]
    for index in chosen.tolist():
        texture = augmentations[index](texture, generator)
    return texture.clamp(0, 1)


# ----------------------------------------------------------------------------- the synthesis
@dataclass
class SyntheticAnomalies:
    images: torch.Tensor  # (B, 3, H, W) the normal images (30 % rotated): reconstruction targets
    augmented: torch.Tensor  # (B, 3, H, W) the same with the anomalies pasted in: the networks' input
    masks: torch.Tensor  # (B, 1, H, W) float {0, 1}: where anomalies were pasted


class DraemAnomalySynthesis:
    """Steps 1-4 of the module docstring on a batch: ``(images, textures) -> SyntheticAnomalies``,
    with [0, 1] images and one anomaly-source texture per image."""

    def __init__(self, no_anomaly_probability: float = NO_ANOMALY_PROBABILITY,
                 beta_range: tuple[float, float] = BETA_RANGE,
                 normal_rotation_probability: float = NORMAL_ROTATION_PROBABILITY) -> None:
        self.no_anomaly_probability = no_anomaly_probability
        self.beta_range = beta_range
        self.normal_rotation_probability = normal_rotation_probability

    def __call__(self, images: torch.Tensor, textures: torch.Tensor,
                 generator: torch.Generator | None = None) -> SyntheticAnomalies:
        if textures.shape != images.shape:
            raise ValueError(f"one texture per image is needed: images {tuple(images.shape)}, textures {tuple(textures.shape)}")
        targets, augmented, masks = zip(*(self.synthesize(image, texture, generator) for image, texture in zip(images, textures)))
        return SyntheticAnomalies(torch.stack(targets), torch.stack(augmented), torch.stack(masks))

    def synthesize(self, image: torch.Tensor, texture: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image: (target, augmented, mask (1, H, W))."""
        if float(torch.rand((), generator=generator)) < self.normal_rotation_probability:
            angle = uniform(*ROTATION_DEGREES, generator=generator)
            image = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        height, width = image.shape[-2:]
        if float(torch.rand((), generator=generator)) < self.no_anomaly_probability:
            return image, image, torch.zeros(1, height, width, dtype=image.dtype, device=image.device)
        mask = perlin_mask(height, width, generator).to(image.device, image.dtype)[None]
        source = augment_texture(texture, generator)
        beta = uniform(*self.beta_range, generator=generator)
        augmented = (1 - mask) * image + (1 - beta) * (mask * image) + beta * (mask * source)
        return image, augmented, mask
