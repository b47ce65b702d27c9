"""Tiling (components.tiler): the tile/untile round trip is exact, and a defect too fine to survive
the downscale to the model's size is found when the full-resolution image is scored tile by tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyzoo import ModelRegistry, train
from anomalyzoo.models.components.tiler import Tiler, tiled_scores


@pytest.mark.parametrize("tile_size, stride, height, width", [(32, 32, 96, 64), (32, 16, 80, 80), (32, 12, 70, 53),
                                                              (16, 5, 41, 16)])
def test_untile_of_tile_is_exact(tile_size, stride, height, width):
    tiler = Tiler(tile_size, stride)
    generator = torch.Generator().manual_seed(0)
    # pixel values (integers up to 255): sums of up to 9 overlapping tiles and their mean are exact
    images = torch.randint(0, 256, (2, 3, height, width), generator=generator).float()
    tiles = tiler.tile(images)
    assert tiles.shape == (2 * tiler.num_tiles(height, width), 3, tile_size, tile_size)
    assert torch.equal(tiler.untile(tiles, height, width), images)
    # any float image: exact where overlaps are 1, 2 or 4 deep, within rounding elsewhere
    floats = torch.rand(2, 3, height, width, generator=generator)
    restored = tiler.untile(tiler.tile(floats), height, width)
    if stride in (tile_size, tile_size // 2) and (height - tile_size) % stride == 0 and (width - tile_size) % stride == 0:
        assert torch.equal(restored, floats)
    torch.testing.assert_close(restored, floats, rtol=0, atol=1e-6)


def test_tiles_are_the_crops_row_by_row_and_the_last_is_flush_with_the_border():
    tiler = Tiler(4, 3)
    assert tiler.starts(10) == [0, 3, 6] and tiler.starts(11) == [0, 3, 6, 7] and tiler.starts(4) == [0]
    images = torch.arange(2 * 1 * 11 * 10, dtype=torch.float32).reshape(2, 1, 11, 10)
    tiles = tiler.tile(images).reshape(2, -1, 1, 4, 4)
    windows = tiler.windows(11, 10)
    assert windows[:3] == [(0, 0), (0, 3), (0, 6)] and windows[-1] == (7, 6)
    for index, (top, left) in enumerate(windows):
        assert torch.equal(tiles[1, index], images[1, :, top:top + 4, left:left + 4])


def test_overlaps_are_averaged_and_the_image_score_is_the_worst_tile():
    tiler = Tiler(4, 2)
    images = torch.zeros(1, 1, 6, 6)

    def score(tiles):  # every tile's map is its index + 1
        index = torch.arange(1, tiles.shape[0] + 1, dtype=torch.float32)
        return {"pred_score": index, "anomaly_map": index[:, None, None].expand(-1, 4, 4)}

    output = tiled_scores(score, tiler, images)
    assert output["pred_score"].tolist() == [4.0]  # tiles (0,0), (0,2), (2,0), (2,2) -> scores 1..4
    assert output["anomaly_map"][0, 0, 0] == 1.0 and output["anomaly_map"][0, 5, 5] == 4.0
    assert output["anomaly_map"][0, 2, 2] == 2.5  # under all four tiles: (1 + 2 + 3 + 4) / 4
    assert output["anomaly_map"][0, 0, 2] == 1.5  # under tiles 1 and 2


def test_bad_tiling_options_are_clear_errors():
    with pytest.raises(ValueError, match="stride <= tile_size"):
        Tiler(32, 40)
    with pytest.raises(ValueError, match="img_size >= tile_size"):
        ModelRegistry.get_trainer("padim", {"backbone": "resnet18", "pretrained": False},
                                  {"img_size": 64, "tiling": [128, 64]}, device="cpu")
    with pytest.raises(ValueError, match="does not support tiling"):
        ModelRegistry.get_trainer("ganomaly", {}, {"img_size": 64, "tiling": [32, 32]}, device="cpu")


def fine_defect_dataset(root: Path, size: int = 256, defect: int = 12, seed: int = 0) -> Path:
    """MVTec layout: noisy grey parts of ``size`` px; the defects are ``defect``-px patches of a
    one-pixel checkerboard (+-60 grey levels) on the same noise. Shrunk 4x by the loader's
    antialiased resize, the checkerboard averages to nothing: only the noise is left."""
    rng = np.random.default_rng(seed)
    category = root / "mvtec" / "large_part"

    def background() -> np.ndarray:
        return 128 + rng.normal(0, 8, (size, size, 1)).repeat(3, axis=2)

    def save(path: Path, pixels: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)).save(path)

    for index in range(4):
        save(category / "train" / "good" / f"{index:03d}.png", background())
        save(category / "test" / "good" / f"{index:03d}.png", background())
    rows, columns = np.mgrid[:defect, :defect]
    for index in range(4):
        pixels, mask = background(), np.zeros((size, size), np.uint8)
        top, left = 4 * rng.integers(8, (size - defect) // 4 - 8, 2)
        pixels[top:top + defect, left:left + defect] += (60.0 * (-1.0) ** (rows + columns))[..., None]
        mask[top:top + defect, left:left + defect] = 255
        save(category / "test" / "fine" / f"{index:03d}.png", pixels)
        save(category / "ground_truth" / "fine" / f"{index:03d}_mask.png", mask)
    return root


def test_a_defect_lost_at_the_model_size_is_found_with_tiling(tmp_path):
    dataset_dir = fine_defect_dataset(tmp_path / "data")
    common = {"dataset_dir": dataset_dir, "backbone": "resnet18", "pretrained": False, "progress": False,
              "max_maps": 0, "val_fraction": 0, "output_dir": tmp_path / "out"}
    squashed = train("mvtec", "large_part", "patchcore", img_size=64, **common)  # the 256-px part shrunk 4x
    tiled = train("mvtec", "large_part", "patchcore", img_size=256, tiling=[64, 64], **common)
    assert squashed["image_auroc"] <= 0.75  # chance: the defect is gone
    assert tiled["image_auroc"] == 1.0 and tiled["pixel_auroc"] >= 0.95
    # the checkpoint keeps the tiling: predict on the full-resolution file finds the defect where it is
    from anomalyzoo.predict import predict_images

    image = dataset_dir / "mvtec" / "large_part" / "test" / "fine" / "000.png"
    mask = np.asarray(Image.open(dataset_dir / "mvtec" / "large_part" / "ground_truth" / "fine" / "000_mask.png")) > 0
    rows = predict_images(tiled["checkpoint"], [image], tmp_path / "predictions", progress=False)
    anomaly_map = np.load(Path(rows[0]["map"]).with_suffix(".npy"))
    assert anomaly_map.shape == (256, 256) and rows[0]["verdict"] == "anomalous"
    peak = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
    rows_of_defect, columns_of_defect = np.nonzero(mask)
    assert rows_of_defect.min() - 8 <= peak[0] <= rows_of_defect.max() + 8
    assert columns_of_defect.min() - 8 <= peak[1] <= columns_of_defect.max() + 8


def test_predict_can_tile_a_model_trained_on_whole_images(synthetic_dataset_dir, tmp_path):
    """--tiling IMG_SIZE STRIDE: a 64-px model scores a 128-px load of the file in 64-px tiles."""
    from anomalyzoo.data.transforms import image_to_tensor, load_rgb_image
    from anomalyzoo.predict import load_trainer, predict_images

    result = train("mvtec", "synthetic_object", "padim", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path / "run",
                   backbone="resnet18", pretrained=False, img_size=64, progress=False, max_maps=0)
    image = synthetic_dataset_dir / "mvtec" / "synthetic_object" / "test" / "missing" / "000.png"
    rows = predict_images(result["checkpoint"], [image], tmp_path / "out", tiling=[128, 32], progress=False)
    anomaly_map = np.load(Path(rows[0]["map"]).with_suffix(".npy"))
    trainer = load_trainer(result["checkpoint"], device="cpu")
    expected = tiled_scores(trainer.model.eval(), Tiler(64, 32), image_to_tensor(load_rgb_image(image), 128, True)[None])
    assert anomaly_map.shape == (128, 128)
    np.testing.assert_allclose(anomaly_map, expected["anomaly_map"][0].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert rows[0]["score"] == pytest.approx(float(expected["pred_score"][0]), rel=1e-5)
