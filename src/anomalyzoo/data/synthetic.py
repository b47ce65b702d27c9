"""A small MVTec-layout category drawn from a seed, for tests and smoke runs without downloads.

Normal images are all the same thing with small nuisance variation (position/phase jitter,
brightness, mild sensor noise), so a detector's memory of the training images covers every
normal test image. Defects are local, clearly visible and painted through the same shape that
becomes the ground-truth mask, so the mask covers exactly what changed:

- ``texture``: a basket weave (threads alternating horizontal/vertical in a fixed-period grid);
- ``object``: a bottle cap seen from above (red rim, cream face, dark centre) on a grey table.

Defect types: ``scratch`` (a thin bright/dark line), ``spot`` (a blob of a foreign colour),
``missing`` (a chunk gone: a hole in the fabric, a bite out of the cap's edge).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image, ImageDraw

from anomalyzoo.data.base import DatasetError

DEFECT_TYPES = ("scratch", "spot", "missing")
_MARKER = ".anomalyzoo_synthetic"  # marks a folder this module wrote (and may therefore replace)
_NOISE_SIGMA = 2.5  # in 0..255 grey levels

_THREAD = np.array([176.0, 142.0, 98.0])
_TABLE = np.array([196.0, 198.0, 204.0])
_RIM = np.array([158.0, 42.0, 40.0])
_FACE = np.array([228.0, 216.0, 178.0])
_CENTRE = np.array([62.0, 60.0, 66.0])


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    return yy.astype(np.float64) + 0.5, xx.astype(np.float64) + 0.5


def _texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """A basket weave; each grid cell holds one thread, horizontal and vertical in turn. The
    thread profile (bright middle, dark gaps) is a half sine across the thread."""
    period = max(6, round(size / 10))
    yy, xx = _grid(size)
    y = yy + rng.uniform(-1.5, 1.5)
    x = xx + rng.uniform(-1.5, 1.5)
    horizontal = (np.floor(x / period) + np.floor(y / period)) % 2 == 0
    across = np.where(horizontal, np.sin(np.pi * (y % period) / period), np.sin(np.pi * (x % period) / period))
    along = np.where(horizontal, x, y)
    # faint fibre ripple along the thread, same in every image (part of the texture, not noise)
    shade = 0.55 + 0.40 * across + 0.05 * np.sin(2 * np.pi * along / (period / 2))
    image = shade[:, :, None] * _THREAD * rng.uniform(0.97, 1.03)
    return image, {"period": period}


def _coverage(distance: np.ndarray, radius: float) -> np.ndarray:
    """Antialiased disc coverage: 1 inside, 0 outside, a one-pixel ramp at the edge."""
    return np.clip(radius - distance + 0.5, 0.0, 1.0)[:, :, None]


def _object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    centre_y, centre_x = size / 2 + rng.uniform(-size / 64, size / 64, 2)
    radius = 0.32 * size * rng.uniform(0.99, 1.01)
    yy, xx = _grid(size)
    distance = np.hypot(yy - centre_y, xx - centre_x)
    image = np.broadcast_to(_TABLE, (size, size, 3)).copy()
    for colour, fraction in ((_RIM, 1.0), (_FACE, 0.72), (_CENTRE, 0.18)):
        alpha = _coverage(distance, radius * fraction)
        image = image * (1 - alpha) + colour * alpha
    image *= rng.uniform(0.97, 1.03)
    return image, {"centre": (centre_x, centre_y), "radius": radius, "distance": distance}


def _shape_mask(size: int, draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _point_in_disc(rng: np.random.Generator, centre: tuple[float, float], max_radius: float) -> tuple[float, float]:
    angle, reach = rng.uniform(0, 2 * np.pi), max_radius * np.sqrt(rng.uniform(0, 1))
    return centre[0] + reach * np.cos(angle), centre[1] + reach * np.sin(angle)


def _blob(rng: np.random.Generator, centre: tuple[float, float], radius: float) -> Callable[[ImageDraw.ImageDraw], None]:
    """Three overlapping ellipses: an irregular stain rather than a perfect circle."""
    parts = []
    for _ in range(3):
        cx, cy = centre[0] + rng.uniform(-0.5, 0.5) * radius, centre[1] + rng.uniform(-0.5, 0.5) * radius
        rx, ry = radius * rng.uniform(0.6, 1.0), radius * rng.uniform(0.6, 1.0)
        parts.append((cx - rx, cy - ry, cx + rx, cy + ry))
    return lambda draw: [draw.ellipse(box, fill=255) for box in parts]


def _paint_defect(rng: np.random.Generator, image: np.ndarray, kind: str, defect: str, geometry: dict) -> np.ndarray:
    """Paint one defect into ``image`` (in place) and return its boolean mask."""
    size = image.shape[0]
    if kind == "texture":
        centre = tuple(rng.uniform(0.25 * size, 0.75 * size, 2))
        reach = 0.5 * size
    else:
        centre, reach = geometry["centre"], geometry["radius"]

    if defect == "scratch":
        half = rng.uniform(0.3, 0.4) * reach
        angle = rng.uniform(0, np.pi)
        middle = _point_in_disc(rng, centre, 0.25 * reach)
        start = (middle[0] - half * np.cos(angle), middle[1] - half * np.sin(angle))
        end = (middle[0] + half * np.cos(angle), middle[1] + half * np.sin(angle))
        width = max(2, round(size / 40))
        mask = _shape_mask(size, lambda draw: draw.line([start, end], fill=255, width=width))
        colour = np.array([248.0, 248.0, 244.0]) if kind == "texture" else np.array([22.0, 22.0, 26.0])
    elif defect == "spot":
        radius = rng.uniform(0.06, 0.09) * size
        where = _point_in_disc(rng, centre, 0.3 * reach)
        mask = _shape_mask(size, _blob(rng, where, radius))
        colour = np.array([64.0, 72.0, 150.0]) if kind == "texture" else np.array([70.0, 150.0, 64.0])
    elif defect == "missing":
        if kind == "texture":
            # a hole in the fabric: an irregular polygon through which the dark backing shows
            radius = rng.uniform(0.09, 0.12) * size
            angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
            spans = radius * rng.uniform(0.75, 1.0, 7)
            polygon = [(centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)) for a, r in zip(angles, spans)]
            mask = _shape_mask(size, lambda draw: draw.polygon(polygon, fill=255))
            colour = np.array([24.0, 22.0, 20.0])
        else:
            # a bite out of the cap's edge: the table shows where the cap was
            angle = rng.uniform(0, 2 * np.pi)
            bite_centre = (centre[0] + reach * np.cos(angle), centre[1] + reach * np.sin(angle))
            bite = rng.uniform(0.3, 0.4) * reach
            box = (bite_centre[0] - bite, bite_centre[1] - bite, bite_centre[0] + bite, bite_centre[1] + bite)
            mask = _shape_mask(size, lambda draw: draw.ellipse(box, fill=255))
            mask &= geometry["distance"] <= reach + 1.0  # only the part of the bite that removed cap
            colour = _TABLE
    else:
        raise ValueError(f"Unknown defect type '{defect}'; expected one of {DEFECT_TYPES}")
    image[mask] = colour
    return mask


def _to_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def make_synthetic_dataset(
    root: Path,
    category: str = "synthetic",
    kind: Literal["texture", "object"] = "texture",
    n_train: int = 24,
    n_test_good: int = 8,
    n_test_defect: int = 12,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write ``root/<category>`` in the MVTec layout and return that folder.

    Defective images cycle through :data:`DEFECT_TYPES` (so 12 gives 4 of each); masks are
    0/255 PNGs at ``ground_truth/<defect>/<stem>_mask.png``. The same arguments give the same
    bytes. A folder this function wrote before is replaced; any other existing folder is an error.
    """
    if kind not in ("texture", "object"):
        raise ValueError(f"kind must be 'texture' or 'object', got '{kind}'")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError("n_train must be >= 1 and the test counts >= 0")
    folder = Path(root) / category
    if folder.exists():
        if not (folder / _MARKER).is_file():
            raise DatasetError(f"'{folder}' exists and was not written by make_synthetic_dataset; not replacing it.")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    rng = np.random.default_rng(seed)
    render = _texture if kind == "texture" else _object

    def normal_image() -> tuple[np.ndarray, dict]:
        return render(rng, image_size)

    def finish(image: np.ndarray) -> np.ndarray:
        noisy = image + rng.normal(0.0, _NOISE_SIGMA, image.shape)
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)

    for index in range(n_train):
        _to_png(folder / "train" / "good" / f"{index:03d}.png", finish(normal_image()[0]))
    for index in range(n_test_good):
        _to_png(folder / "test" / "good" / f"{index:03d}.png", finish(normal_image()[0]))
    counters = dict.fromkeys(DEFECT_TYPES, 0)
    for index in range(n_test_defect):
        defect = DEFECT_TYPES[index % len(DEFECT_TYPES)]
        stem = f"{counters[defect]:03d}"
        counters[defect] += 1
        image, geometry = normal_image()
        mask = _paint_defect(rng, image, kind, defect, geometry)
        _to_png(folder / "test" / defect / f"{stem}.png", finish(image))
        _to_png(folder / "ground_truth" / defect / f"{stem}_mask.png", mask.astype(np.uint8) * 255)

    settings = {"kind": kind, "n_train": n_train, "n_test_good": n_test_good,
                "n_test_defect": n_test_defect, "image_size": image_size, "seed": seed}
    (folder / _MARKER).write_text(json.dumps(settings, sort_keys=True) + "\n")
    return folder
