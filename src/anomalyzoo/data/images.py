"""Finding image files in folders, and cycling a loader: shared by the offline tools
(teacher distillation) and auxiliary data sources (EfficientAD's penalty images)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from anomalyzoo.data.transforms import IMAGE_EXTENSIONS


def find_images(folders: str | Path | Sequence[str | Path]) -> list[Path]:
    """Every image file under the folder(s), recursively, sorted."""
    if isinstance(folders, (str, Path)):
        folders = [folders]
    files: list[Path] = []
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"Image folder {folder} does not exist")
        files.extend(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                     and not p.name.startswith("."))
    return sorted(files)



def cycle(loader: DataLoader) -> Iterator[Any]:
    """Batches of ``loader`` forever, epoch after epoch (step-based consumers)."""
    while True:
        yield from loader
