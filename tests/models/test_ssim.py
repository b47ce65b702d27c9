"""SSIM (components/ssim.py) against hand-computed values and a per-pixel transcription of
TIP 2004 eq. 13 with the authors' 11 x 11, sigma 1.5 window."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomalyzoo.models.components.ssim import gaussian_window, inferred_dynamic_range, ssim, ssim_loss, ssim_map


def test_window_is_the_normalised_gaussian_of_sigma_1_5():
    window = gaussian_window(11, 1.5, channels=3)
    assert window.shape == (3, 1, 11, 11)
    profile = np.array([math.exp(-(i - 5) ** 2 / (2 * 1.5 ** 2)) for i in range(11)])
    profile /= profile.sum()
    np.testing.assert_allclose(window[0, 0].numpy(), np.outer(profile, profile), rtol=1e-6, atol=1e-8)
    assert float(window[1, 0].sum()) == pytest.approx(1.0, abs=1e-6)


def test_constant_images_give_the_luminance_term_by_hand():
    """Flat patches: sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 1)^2."""
    a, b = 0.2, 0.6
    img1 = torch.full((1, 1, 31, 31), a, dtype=torch.float64)
    img2 = torch.full((1, 1, 31, 31), b, dtype=torch.float64)
    values = ssim_map(img1, img2, val_range=1.0)
    expected = (2 * 0.2 * 0.6 + 1e-4) / (0.04 + 0.36 + 1e-4)  # 0.2401 / 0.4001
    assert float(values[0, 0, 15, 15]) == pytest.approx(expected, abs=1e-9)


def test_one_pixel_against_a_transcription_of_eq_13():
    """An 11 x 11 image: the window centred on pixel (5, 5) covers it exactly (no padding)."""
    generator = torch.Generator().manual_seed(0)
    img1 = torch.rand(1, 1, 11, 11, generator=generator, dtype=torch.float64)
    img2 = (img1 * 0.7 + 0.2 * torch.rand(1, 1, 11, 11, generator=generator, dtype=torch.float64)).clamp(0, 1)
    x, y = img1[0, 0].numpy(), img2[0, 0].numpy()
    g = np.array([math.exp(-(i - 5) ** 2 / 4.5) for i in range(11)])
    w = np.outer(g, g) / np.outer(g, g).sum()
    mu_x, mu_y = (w * x).sum(), (w * y).sum()
    var_x = (w * x * x).sum() - mu_x ** 2
    var_y = (w * y * y).sum() - mu_y ** 2
    cov = (w * x * y).sum() - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    assert float(ssim_map(img1, img2)[0, 0, 5, 5]) == pytest.approx(expected, rel=1e-9)


def test_identical_images_score_one_everywhere_and_the_loss_is_zero():
    images = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ssim_map(images, images), torch.ones_like(images), rtol=0, atol=1e-5)
    assert float(ssim_loss(images, images)) == pytest.approx(0.0, abs=1e-5)


def test_reductions_and_the_inferred_dynamic_range():
    generator = torch.Generator().manual_seed(2)
    img1, img2 = torch.rand(3, 3, 16, 16, generator=generator), torch.rand(3, 3, 16, 16, generator=generator)
    per_image = ssim(img1, img2, size_average=False)
    assert per_image.shape == (3,)
    assert float(ssim(img1, img2)) == pytest.approx(float(per_image.mean()), rel=1e-6)
    assert float(ssim_loss(img1, img2)) == pytest.approx(1 - float(ssim(img1, img2)), rel=1e-6)
    assert inferred_dynamic_range(img1) == 1.0
    assert inferred_dynamic_range(img1 * 255) == 255.0
    assert inferred_dynamic_range(img1 * 2 - 1) == 2.0  # dips below -0.5: L = 1 - (-1)
    torch.testing.assert_close(ssim_map(img1 * 2 - 1, img2), ssim_map(img1 * 2 - 1, img2, val_range=2.0))
