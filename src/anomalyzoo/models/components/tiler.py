"""Tiling: inspect a large image at full resolution, one overlapping tile at a time.

A 1024-px part squashed to the model's 256 px shrinks a 20-px defect to 5 px, or, for fine
texture defects, averages it away. With ``tiling=[tile_size, stride]`` (a training option) the
images are loaded at ``img_size`` (e.g. 1024), cut into ``tile_size`` tiles every ``stride``
pixels, and the model trains and scores on the tiles; the tiles' maps are stitched back to the
image by averaging where tiles overlap, and the image score is the largest tile score (an image is
as anomalous as its worst tile). This is anomalib's ``Tiler`` (``tile_size``, ``stride``, mean over
overlaps) with one difference: where the stride does not reach the border exactly, the last tile
is placed flush with the border instead of padding the image, so every tile is real image.

The stitching is plain slicing and addition, so it traces into exported graphs too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tiler:
    tile_size: int
    stride: int

    def __post_init__(self) -> None:
        if self.tile_size < 1 or not 1 <= self.stride <= self.tile_size:
            raise ValueError(f"tiling needs 1 <= stride <= tile_size, got tile_size={self.tile_size}, stride={self.stride} "
                             f"(a larger stride would skip pixels)")

    @classmethod
    def from_option(cls, tiling: int | Sequence[int]) -> "Tiler":
        """``tiling`` as given to ``train``: ``[tile_size, stride]``, or one number (no overlap)."""
        values = [int(tiling)] if isinstance(tiling, (int, float)) else [int(v) for v in tiling]
        if len(values) not in (1, 2):
            raise ValueError(f"tiling is [tile_size, stride] (or one tile size), got {tiling!r}")
        return cls(values[0], values[-1])

    def starts(self, length: int) -> list[int]:
        """Top (or left) edges of the tiles along an axis of ``length`` pixels; the last is flush."""
        if length < self.tile_size:
            raise ValueError(f"an image of {length} px cannot be cut into {self.tile_size}-px tiles: "
                             f"use img_size >= tile_size")
        positions = list(range(0, length - self.tile_size + 1, self.stride))
        if positions[-1] != length - self.tile_size:
            positions.append(length - self.tile_size)
        return positions

    def windows(self, height: int, width: int) -> list[tuple[int, int]]:
        return [(top, left) for top in self.starts(height) for left in self.starts(width)]

    def num_tiles(self, height: int, width: int) -> int:
        return len(self.starts(height)) * len(self.starts(width))

    def tile(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * T, C, tile, tile), the T tiles of each image together, row by row."""
        size = self.tile_size
        tiles = [images[:, :, top:top + size, left:left + size] for top, left in self.windows(*images.shape[-2:])]
        stacked = torch.stack(tiles, dim=1)  # (B, T, C, tile, tile)
        return stacked.reshape(-1, *stacked.shape[2:])

    def untile(self, tiles: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B * T, C, tile, tile) -> (B, C, H, W): every pixel the mean of the tiles that cover it."""
        size = self.tile_size
        windows = self.windows(height, width)
        tiles = tiles.reshape(-1, len(windows), *tiles.shape[1:])
        total = tiles.new_zeros(tiles.shape[0], tiles.shape[2], height, width)
        count = torch.zeros(height, width, dtype=tiles.dtype, device=tiles.device)
        for index, (top, left) in enumerate(windows):
            total[:, :, top:top + size, left:left + size] += tiles[:, index]
            count[top:top + size, left:left + size] += 1
        return total / count


def tiled_scores(score: Callable[[torch.Tensor], dict[str, torch.Tensor]], tiler: Tiler,
                 images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Score ``images`` (B, C, H, W) tile by tile with ``score`` (a model's eval forward): the
    stitched map (B, H, W) and the largest tile score (B,)."""
    height, width = images.shape[-2:]
    output = score(tiler.tile(images))
    tile_scores = output["pred_score"].reshape(images.shape[0], -1)
    result = {"pred_score": tile_scores.amax(dim=1)}
    tile_maps = output.get("anomaly_map")
    if tile_maps is not None:
        result["anomaly_map"] = tiler.untile(tile_maps.reshape(-1, 1, *tile_maps.shape[-2:]), height, width)[:, 0]
    return result
