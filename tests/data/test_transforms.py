"""Reading images and masks: every odd file format becomes 8-bit RGB / a {0, 1} mask, and every
unreadable file is an error that names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from anomalyzoo.data import ImageReadError
from anomalyzoo.data.base import AnomalyDataset, DatasetError, Sample
from anomalyzoo.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    image_to_tensor,
    load_mask,
    load_rgb_image,
    read_binary_mask,
    resize_mask,
)


def _save(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_rgb_image_is_returned_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    img = load_rgb_image(_save(tmp_path / "rgb.png", Image.fromarray(pixels)))
    assert img.mode == "RGB" and img.size == (5, 6)
    assert np.array_equal(np.asarray(img), pixels)


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    img = load_rgb_image(_save(tmp_path / "gray.png", Image.fromarray(gray, mode="L")))
    pixels = np.asarray(img)
    assert img.mode == "RGB" and pixels.shape == (4, 5, 3)
    for channel in range(3):
        assert np.array_equal(pixels[:, :, channel], gray)


def test_sixteen_bit_grayscale_is_scaled_by_a_fixed_factor(tmp_path):
    # 0 -> 0, 65535 -> 255, 257 * k -> k: a fixed scale, not the image's own min/max stretched.
    values = np.array([[0, 257 * 10, 257 * 100], [257 * 200, 65535, 257 * 128]], dtype=np.uint16)
    path = _save(tmp_path / "deep.png", Image.fromarray(values))
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # really stored as 16-bit
    pixels = np.asarray(load_rgb_image(path))
    expected = np.array([[0, 10, 100], [200, 255, 128]], dtype=np.uint8)
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 3, 3)
    for channel in range(3):
        assert np.array_equal(pixels[:, :, channel], expected)


def test_dim_sixteen_bit_image_is_not_stretched(tmp_path):
    values = np.full((3, 3), 257 * 20, dtype=np.uint16)
    values[1, 1] = 257 * 40
    pixels = np.asarray(load_rgb_image(_save(tmp_path / "dim.png", Image.fromarray(values))))
    assert pixels.max() == 40 and pixels.min() == 20


def test_rgba_is_composited_onto_black(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque: kept
    rgba[0, 1] = (200, 100, 50, 0)  # transparent: black whatever colour it stores
    rgba[1, 0] = (200, 100, 50, 128)  # half: scaled by alpha
    rgba[1, 1] = (10, 250, 90, 0)
    img = load_rgb_image(_save(tmp_path / "alpha.png", Image.fromarray(rgba, mode="RGBA")))
    pixels = np.asarray(img).astype(int)
    assert img.mode == "RGB"
    assert pixels[0, 0].tolist() == [200, 100, 50]
    assert pixels[0, 1].tolist() == [0, 0, 0] and pixels[1, 1].tolist() == [0, 0, 0]
    assert np.abs(pixels[1, 0] - np.array([200, 100, 50]) * 128 / 255).max() <= 1


def test_grayscale_with_alpha_and_palette_become_rgb(tmp_path):
    la = Image.fromarray(np.stack([np.full((3, 3), 90, np.uint8), np.full((3, 3), 255, np.uint8)], axis=2), mode="LA")
    assert np.all(np.asarray(load_rgb_image(_save(tmp_path / "la.png", la))) == 90)
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pixels = np.asarray(load_rgb_image(_save(tmp_path / "p.png", palette)))
    assert pixels.shape == (3, 3, 3) and pixels[0, 0].tolist() == [10, 20, 30]


def test_truncated_image_is_an_error_naming_the_file(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = _save(tmp_path / "full.png", Image.fromarray(pixels))
    cut = tmp_path / "cut short.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="cut short.png"):
        load_rgb_image(cut)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_an_error_even_when_pillow_is_told_to_allow_it(tmp_path, monkeypatch, suffix):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = _save(tmp_path / f"full{suffix}", Image.fromarray(pixels))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageReadError, match=f"cut{suffix}"):
        load_rgb_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the user's setting is restored
    assert load_rgb_image(good).size == (64, 64)


def test_file_that_is_not_an_image_is_an_error_naming_the_file(tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not a png")
    with pytest.raises(ImageReadError, match="notes.png"):
        load_rgb_image(bogus)
    with pytest.raises(ImageReadError, match="notes.png"):
        read_binary_mask(bogus)
    with pytest.raises(ImageReadError, match="absent.png"):
        load_rgb_image(tmp_path / "absent.png")


def test_mask_binarised_at_half_range_or_any_nonzero(tmp_path):
    values = np.array([[0, 1, 127], [128, 200, 255]], dtype=np.uint8)
    path = _save(tmp_path / "mask.png", Image.fromarray(values, mode="L"))
    assert read_binary_mask(path).tolist() == [[False, False, False], [True, True, True]]
    assert read_binary_mask(path, nonzero=True).tolist() == [[False, True, True], [True, True, True]]
    # a red-on-black colour mask counts where any channel does
    colour = np.zeros((2, 2, 3), dtype=np.uint8)
    colour[0, 1] = (255, 0, 0)
    assert read_binary_mask(_save(tmp_path / "red.png", Image.fromarray(colour))).tolist() == [[False, True], [False, False]]
    # a 0/1 label mask (largest value 1) keeps its defect without nonzero=True
    label_mask = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    assert read_binary_mask(_save(tmp_path / "label.png", Image.fromarray(label_mask))).tolist() == [[False, True], [True, False]]
    assert not read_binary_mask(_save(tmp_path / "empty.png", Image.fromarray(np.zeros((2, 2), np.uint8)))).any()
    # 16-bit masks use the 16-bit half range
    deep = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    assert read_binary_mask(_save(tmp_path / "deep.png", Image.fromarray(deep))).tolist() == [[False, False], [True, True]]


def test_mask_resize_is_nearest_and_binary(tmp_path):
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    up = resize_mask(mask, (8, 8))
    assert up.dtype == np.uint8 and set(np.unique(up).tolist()) == {0, 1}
    expected = np.kron(mask.astype(np.uint8), np.ones((2, 2), dtype=np.uint8))  # nearest x2 = each pixel a 2x2 block
    assert np.array_equal(up, expected)
    # shrinking an anti-aliased mask still gives only {0, 1}
    soft = np.clip(np.random.default_rng(1).normal(128, 80, (37, 53)), 0, 255).astype(np.uint8)
    path = _save(tmp_path / "soft.png", Image.fromarray(soft, mode="L"))
    small = load_mask(path, (16, 16))
    assert small.shape == (16, 16) and set(np.unique(small).tolist()) <= {0, 1}
    # (width, height) order: a non-square target has height rows
    assert resize_mask(mask, (6, 3)).shape == (3, 6)


def test_image_to_tensor_range_and_normalisation():
    pixels = np.random.default_rng(2).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    raw = image_to_tensor(img, 10, normalize=False)
    assert raw.dtype == torch.float32 and raw.shape == (3, 10, 10)
    assert torch.allclose(raw, torch.from_numpy(pixels.transpose(2, 0, 1) / 255.0).float())
    normed = image_to_tensor(img, 10, normalize=True)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(normed, (raw - mean) / std, atol=1e-6)
    assert np.array_equal(denormalize(normed, normalize=True), pixels)
    assert image_to_tensor(img, 7, normalize=False).shape == (3, 7, 7)


def _dataset_with_mask(tmp_path: Path, image_size: tuple[int, int], mask_size: tuple[int, int]) -> AnomalyDataset:
    image = _save(tmp_path / "img.png", Image.new("RGB", image_size, (120, 40, 10)))
    mask_pixels = np.zeros(mask_size[::-1], dtype=np.uint8)
    mask_pixels[: mask_size[1] // 2] = 255
    mask = _save(tmp_path / "img_mask.png", Image.fromarray(mask_pixels))
    return AnomalyDataset([Sample(image, 1, mask, "crack")], img_size=16, normalize=False, has_masks=True)


def test_dataset_item_shapes_and_binary_resized_mask(tmp_path):
    item = _dataset_with_mask(tmp_path, (40, 24), (40, 24))[0]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (16, 16)
    assert item["mask"].dtype == torch.float32 and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["mask"][:8].eq(1).all() and item["mask"][8:].eq(0).all()  # top half defective
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1
    assert item["defect_type"] == "crack" and item["path"].endswith("img.png")


def test_mask_with_a_different_size_than_its_image_is_an_error_naming_it(tmp_path):
    dataset = _dataset_with_mask(tmp_path, (40, 24), (20, 12))
    with pytest.raises(DatasetError, match=r"img_mask\.png.*20x12.*40x24"):
        dataset[0]


def test_crop_pct_resizes_then_centre_crops_image_and_mask_alike():
    """Dinomaly's R448-C392 in small: 16 px with crop_pct 0.5 -> resize to 32, keep the middle 16."""
    from anomalyzoo.data.transforms import center_crop_box, resize_and_crop_mask, resize_size_for_crop

    assert resize_size_for_crop(392, 392 / 448) == 448 and center_crop_box(448, 392) == (28, 28, 420, 420)
    assert resize_size_for_crop(224) == 224
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = 255  # a white square that is exactly the central crop
    tensor = image_to_tensor(Image.fromarray(pixels), 16, normalize=False, crop_pct=0.5)
    assert tensor.shape == (3, 16, 16) and torch.all(tensor == 1.0)
    full = image_to_tensor(Image.fromarray(pixels), 16, normalize=False)  # no crop: the border stays
    assert full[:, 0, 0].max() == 0.0 and full[:, 8, 8].min() == 1.0
    mask = np.zeros((32, 32), dtype=bool)
    mask[0:8, 0:8] = True  # outside the crop
    mask[15, 15] = True  # inside: (15, 15) of 32 -> (7, 7) of the crop
    cropped = resize_and_crop_mask(mask, 16, crop_pct=0.5)
    assert cropped.shape == (16, 16) and cropped.sum() == 1 and cropped[7, 7] == 1
    with pytest.raises(ValueError, match="crop_pct"):
        resize_size_for_crop(16, 1.5)
