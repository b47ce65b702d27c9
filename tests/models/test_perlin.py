"""DRAEM's anomaly synthesis (components/perlin.py) and its texture sources (data/textures.py):
the Perlin noise against a per-pixel transcription, mask statistics and seeding, the texture
augmentations, the blend and the share of normal images."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyzoo.data.textures import TextureImages, training_image_crops
from anomalyzoo.models.components import perlin
from anomalyzoo.models.components.perlin import (
    TEXTURE_AUGMENTATIONS,
    DraemAnomalySynthesis,
    augment_texture,
    hsv_to_rgb,
    perlin_mask,
    rand_perlin_2d_np,
    rgb_to_hsv,
)


def naive_perlin(shape: tuple[int, int], res: tuple[int, int], seed: int) -> np.ndarray:
    """Gradient noise pixel by pixel: unit gradients at the lattice corners, dot products with the
    offsets to the corners, quintic interpolation along rows then columns, times sqrt(2)."""
    angles = 2 * math.pi * np.random.default_rng(seed).random((res[0] + 1, res[1] + 1))
    noise = np.zeros(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            u, v = i * res[0] / shape[0], j * res[1] / shape[1]
            ci, cj = int(u), int(v)
            fu, fv = u - ci, v - cj

            def corner(di: int, dj: int) -> float:
                angle = angles[ci + di, cj + dj]
                return math.cos(angle) * (fu - di) + math.sin(angle) * (fv - dj)

            tu, tv = (6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3 for t in (fu, fv))
            along_rows_0 = corner(0, 0) + tu * (corner(1, 0) - corner(0, 0))
            along_rows_1 = corner(0, 1) + tu * (corner(1, 1) - corner(0, 1))
            noise[i, j] = math.sqrt(2) * (along_rows_0 + tv * (along_rows_1 - along_rows_0))
    return noise


@pytest.mark.parametrize("shape, res", [((16, 16), (2, 4)), ((12, 20), (3, 5)), ((8, 8), (1, 1))])
def test_noise_matches_the_per_pixel_transcription(shape, res):
    np.testing.assert_allclose(rand_perlin_2d_np(shape, res, np.random.default_rng(7)), naive_perlin(shape, res, 7),
                               rtol=1e-10, atol=1e-12)


def test_noise_is_zero_on_the_lattice_bounded_and_any_size_works():
    noise = rand_perlin_2d_np((64, 64), (4, 8), np.random.default_rng(0))
    assert np.allclose(noise[::16, ::8], 0.0)  # every lattice point: all offsets are zero there
    assert np.abs(noise).max() <= 1.0 + 1e-9
    odd = rand_perlin_2d_np((100, 70), (32, 8), np.random.default_rng(0))  # not multiples: drawn larger, cropped
    assert odd.shape == (100, 70) and np.isfinite(odd).all()


def test_same_seed_same_mask_and_masks_are_binary():
    first = perlin_mask(64, 64, torch.Generator().manual_seed(3))
    again = perlin_mask(64, 64, torch.Generator().manual_seed(3))
    other = [perlin_mask(64, 64, torch.Generator().manual_seed(seed)) for seed in range(4, 8)]
    assert torch.equal(first, again)
    assert not all(torch.equal(first, mask) for mask in other)
    assert all(set(mask.unique().tolist()) <= {0.0, 1.0} for mask in [first, *other])


def test_mask_coverage_is_in_a_sane_range():
    generator = torch.Generator().manual_seed(0)
    coverage = np.array([float(perlin_mask(64, 64, generator).mean()) for _ in range(150)])
    assert 0.02 < coverage.mean() < 0.10  # a few per cent of the image, as the authors' masks
    assert (coverage == 0).mean() < 0.15  # empty only for the coarsest lattices
    assert coverage.max() < 0.5


def test_lattice_scales_are_powers_of_two_from_1_to_32_per_axis(monkeypatch):
    seen: list[tuple[int, int]] = []
    original = perlin.rand_perlin_2d_np

    def recording(shape, res, rng=None):
        seen.append(res)
        return original(shape, res, rng)

    monkeypatch.setattr(perlin, "rand_perlin_2d_np", recording)
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):
        perlin_mask(32, 32, generator)
    assert {r for r, _ in seen} == {r for _, r in seen} == {1, 2, 4, 8, 16, 32}


def test_three_distinct_augmentations_per_texture():
    calls: list[int] = []

    def make(index):
        def augmentation(image, generator):
            calls.append(index)
            return image
        return augmentation

    augmentations = [make(i) for i in range(10)]
    generator = torch.Generator().manual_seed(0)
    orders = set()
    for _ in range(20):
        calls.clear()
        augment_texture(torch.rand(3, 8, 8), generator, augmentations)
        assert len(calls) == 3 == len(set(calls))
        orders.add(tuple(calls))
    assert len(orders) > 10


def test_each_augmentation_keeps_shape_and_range():
    generator = torch.Generator().manual_seed(0)
    texture = torch.rand(3, 32, 32, generator=generator)
    for augmentation in TEXTURE_AUGMENTATIONS:
        out = augmentation(texture, generator)
        assert out.shape == texture.shape and out.dtype == texture.dtype, augmentation.__name__
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0, augmentation.__name__


def test_augmentations_by_hand():
    generator = torch.Generator().manual_seed(5)
    texture = torch.rand(3, 16, 16, generator=generator) * 0.8 + 0.1
    torch.testing.assert_close(perlin.invert(texture, generator), 1 - texture)
    gamma = torch.log(perlin.gamma_contrast(texture, generator)) / torch.log(texture)  # one exponent per channel
    assert torch.allclose(gamma, gamma.mean(dim=(1, 2), keepdim=True).expand_as(gamma), atol=1e-4)
    assert ((gamma >= 0.5 - 1e-4) & (gamma <= 2.0 + 1e-4)).all()
    brighter = perlin.multiply_and_add_to_brightness(torch.full((3, 4, 4), 0.5), generator)
    assert torch.allclose(brighter, brighter[:1].expand_as(brighter))  # grey stays grey: only luma moves
    stretched = perlin.autocontrast(texture * 0.5 + 0.2, torch.Generator().manual_seed(0))
    assert float(stretched.amin()) == pytest.approx(0.0, abs=1e-6) and float(stretched.amax()) == pytest.approx(1.0, abs=1e-6)
    levels = perlin.posterize(texture, generator).mul(255).round()
    assert len(levels.unique()) <= 256
    hsv = rgb_to_hsv(texture)
    for i, j in [(0, 0), (3, 7), (15, 15)]:
        expected = colorsys.rgb_to_hsv(*texture[:, i, j].tolist())
        assert hsv[:, i, j].tolist() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(hsv_to_rgb(hsv), texture, rtol=0, atol=1e-6)


def test_synthesis_blends_inside_the_mask_and_leaves_the_rest(monkeypatch):
    """With the texture augmentation switched off: outside the mask I_a = I; inside
    I_a = (1 - beta) I + beta A with one beta per image in [0.2, 1.0) (the authors' code)."""
    monkeypatch.setattr(perlin, "augment_texture", lambda texture, generator=None: texture)
    synthesis = DraemAnomalySynthesis(normal_rotation_probability=0.0)
    images, textures = torch.full((64, 3, 32, 32), 0.2), torch.ones(64, 3, 32, 32)
    result = synthesis(images, textures, torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.images, images)
    masks = result.masks.expand_as(images).bool()
    assert torch.equal(result.augmented[~masks], images[~masks])
    betas = []
    for augmented, mask in zip(result.augmented, masks):
        if mask.any():
            inside = augmented[mask]
            assert torch.allclose(inside, inside[0])  # one opacity per image
            betas.append((float(inside[0]) - 0.2) / 0.8)
    assert betas and all(0.2 - 1e-6 <= beta < 1.0 for beta in betas)
    assert min(betas) < 0.3  # the whole interval is used


def test_half_the_images_stay_normal_and_a_third_rotate():
    synthesis = DraemAnomalySynthesis()
    generator = torch.Generator().manual_seed(1)
    images = torch.ones(96, 3, 32, 32)
    result = synthesis(images, torch.zeros_like(images), generator)
    empty = result.masks.flatten(1).amax(dim=1) == 0
    assert 0.35 < float(empty.float().mean()) < 0.7  # 1/2 kept normal, plus the few empty masks
    assert torch.equal(result.augmented[empty], result.images[empty])
    rotated = result.images[:, 0, 0, 0] < 1  # a rotated image has black corners
    assert 0.15 < float(rotated.float().mean()) < 0.45  # authors: 30 %


def test_same_generator_seed_same_synthesis():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    textures = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first = DraemAnomalySynthesis()(images, textures, torch.Generator().manual_seed(9))
    again = DraemAnomalySynthesis()(images, textures, torch.Generator().manual_seed(9))
    assert all(torch.equal(a, b) for a, b in zip((first.images, first.augmented, first.masks),
                                                  (again.images, again.augmented, again.masks)))
    with pytest.raises(ValueError, match="one texture per image"):
        DraemAnomalySynthesis()(images, textures[:2])


def test_fallback_source_crops_another_image_of_the_batch():
    images = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    crops = training_image_crops(images, torch.Generator().manual_seed(0))
    assert crops.shape == images.shape
    assert torch.equal(crops[0], torch.ones(3, 32, 32)) and torch.equal(crops[1], torch.zeros(3, 32, 32))
    single = torch.arange(3 * 16 * 16, dtype=torch.float32).view(1, 3, 16, 16) / 768
    zoomed = training_image_crops(single, torch.Generator().manual_seed(0))  # a batch of one crops itself
    assert zoomed.shape == single.shape and not torch.equal(zoomed, single)


def test_texture_images_load_as_unit_range_tensors(tmp_path):
    folder = tmp_path / "dtd" / "images" / "banded"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((40, 50, 3), 255, dtype=np.uint8)).save(folder / "banded_0001.jpg")
    dataset = TextureImages([folder / "banded_0001.jpg"], img_size=32)
    texture = dataset[0]
    assert texture.shape == (3, 32, 32) and float(texture.min()) >= 0.99
