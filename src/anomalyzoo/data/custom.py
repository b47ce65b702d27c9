"""User datasets: one folder of normal images and one folder per defect type, no masks::

    <root>/<dataset>/data_rgb/normal/pattern1 60 100.png
    <root>/<dataset>/data_rgb/<defect_type>/design_A 80 150_v2.png
    <root>/<dataset>/data_rgb/data_info.csv          (written by the loader)

File names carry the metadata: ``{category} {freq} {dimming}[_{extra}].png``, fields separated
by single spaces. ``category`` is the pattern shown on the screen under test; the rows of one
category form one anomaly-detection problem. There is no fixed test split, so the normal images
are split into train and test here, reproducibly from the seed; every defective image is test.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from anomalyzoo.data.base import (
    NORMAL_DEFECT_TYPE,
    DatasetError,
    Sample,
    category_dir,
    check_split,
    list_images,
)

NORMAL_FOLDER = "normal"
DATA_INFO_NAME = "data_info.csv"
DATA_INFO_COLUMNS = ("path", "category", "freq", "dimming", "extra", "defect_type", "label")
NAMING_RULE = (
    "custom image names must be '{category} {freq} {dimming}[_{extra}].png' with single spaces "
    "and integer freq and dimming, e.g. 'pattern1 60 100.png' or 'design_A 80 150_v2.png'"
)
_NAME_PATTERN = re.compile(r"(?P<category>[^ ]+) (?P<freq>[0-9]+) (?P<dimming>[0-9]+)(?:_(?P<extra>[^ ]+))?")


def parse_custom_filename(name: str | Path) -> dict[str, Any]:
    """``'design_A 80 150_v2.png'`` -> ``{'category': 'design_A', 'freq': 80, 'dimming': 150,
    'extra': 'v2'}`` (``extra`` is None when absent). Any image extension is accepted."""
    path = Path(name)
    match = _NAME_PATTERN.fullmatch(path.stem)
    if match is None:
        raise DatasetError(f"'{path}' breaks the naming rule: {NAMING_RULE}. Rename or remove the file.")
    return {
        "category": match["category"],
        "freq": int(match["freq"]),
        "dimming": int(match["dimming"]),
        "extra": match["extra"],
    }


def _scan(data_rgb_dir: Path) -> list[dict[str, Any]]:
    """One row per image under ``data_rgb/<folder>/``; every bad name is reported at once."""
    if not (data_rgb_dir / NORMAL_FOLDER).is_dir():
        raise DatasetError(
            f"'{data_rgb_dir}' has no '{NORMAL_FOLDER}/' folder; a custom dataset needs "
            f"data_rgb/{NORMAL_FOLDER}/ (normal images) and one data_rgb/<defect_type>/ per defect type."
        )
    folders = sorted(p for p in data_rgb_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for folder in folders:
        is_normal = folder.name == NORMAL_FOLDER
        for image in list_images(folder):
            try:
                fields = parse_custom_filename(image.name)
            except DatasetError:
                errors.append(str(image))
                continue
            rows.append({
                "path": image.relative_to(data_rgb_dir).as_posix(),
                **fields,
                "extra": fields["extra"] or "",
                "defect_type": NORMAL_DEFECT_TYPE if is_normal else folder.name,
                "label": 0 if is_normal else 1,
            })
    if errors:
        shown = "\n  ".join(errors[:10])
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DatasetError(f"{len(errors)} file(s) break the naming rule ({NAMING_RULE}):\n  {shown}{more}")
    return rows


def _read_data_info(csv_path: Path) -> list[dict[str, Any]] | None:
    """The rows of an existing data_info.csv, or None when it is missing or not in our format."""
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != DATA_INFO_COLUMNS:
                return None
            return [
                {**row, "freq": int(row["freq"]), "dimming": int(row["dimming"]), "label": int(row["label"])}
                for row in reader
            ]
    except (OSError, ValueError, KeyError, csv.Error):
        return None


def create_data_info(data_rgb_dir: str | Path) -> Path:
    """Write ``data_rgb/data_info.csv`` unless an up-to-date one exists; return its path.

    "Up to date" means it lists exactly the image files on disk now: adding, removing or
    renaming an image (or moving it to another defect folder) rewrites it.
    """
    data_rgb_dir = Path(data_rgb_dir)
    rows = _scan(data_rgb_dir)
    csv_path = data_rgb_dir / DATA_INFO_NAME
    current = _read_data_info(csv_path) if csv_path.is_file() else None
    on_disk = {(row["path"], row["defect_type"]) for row in rows}
    if current is not None and {(row["path"], row["defect_type"]) for row in current} == on_disk and len(current) == len(rows):
        return csv_path

    # Write beside and rename, so a reader (another process, a DataLoader worker) never sees half a file.
    partial = csv_path.with_name(f".{DATA_INFO_NAME}.{os.getpid()}.tmp")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=DATA_INFO_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, csv_path)
    return csv_path


def split_normals(n_normal: int, seed: int, test_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of ``n_normal`` normal images from a seeded permutation. With two or
    more images each side gets at least one; a single image goes to train."""
    if not 0.0 < test_ratio < 1.0:
        raise ValueError(f"test_ratio must be between 0 and 1 (exclusive), got {test_ratio}")
    order = np.random.default_rng(seed).permutation(n_normal)
    n_test = 0 if n_normal < 2 else min(max(int(round(n_normal * test_ratio)), 1), n_normal - 1)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def custom_samples(
    root: Path, dataset: str, category: str, split: str, seed: int, test_ratio: float = 0.2
) -> list[Sample]:
    """The samples of one category of one custom dataset (writing data_info.csv if needed)."""
    check_split(split)
    data_rgb_dir = category_dir(Path(root), dataset, what="custom dataset") / "data_rgb"
    if not data_rgb_dir.is_dir():
        raise DatasetError(f"Custom dataset folder '{data_rgb_dir.parent}' has no 'data_rgb/' folder.")
    rows = _read_data_info(create_data_info(data_rgb_dir)) or []
    selected = sorted((row for row in rows if row["category"] == category), key=lambda row: row["path"])
    if not selected:
        available = sorted({row["category"] for row in rows})
        raise DatasetError(
            f"No images of category '{category}' in '{data_rgb_dir}'. Categories found: {', '.join(available) or 'none'}."
        )
    normals = [row for row in selected if row["label"] == 0]
    if not normals:
        raise DatasetError(
            f"Category '{category}' has no normal images in '{data_rgb_dir / NORMAL_FOLDER}'; "
            f"at least one is needed to train."
        )
    train_idx, test_idx = split_normals(len(normals), seed, test_ratio)

    def to_sample(row: dict[str, Any]) -> Sample:
        return Sample(data_rgb_dir / row["path"], int(row["label"]), None, row["defect_type"])

    if split == "train":
        return [to_sample(normals[i]) for i in train_idx]
    defects = [row for row in selected if row["label"] == 1]
    samples = [to_sample(normals[i]) for i in test_idx] + [to_sample(row) for row in defects]
    if not samples:
        raise DatasetError(
            f"Category '{category}' in '{data_rgb_dir}' has a single normal image and no defective "
            f"ones, so there is nothing to test on; add normal images or a defect folder."
        )
    return samples
