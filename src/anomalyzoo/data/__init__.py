"""Datasets and loaders: ``get_dataloaders(dataset_type, category, ...)`` is the entry point.

Every dataset type lives under ``DATASET_DIR/<dataset_type>/`` (see SPEC section 3) and yields
the same batch dict (:class:`~anomalyzoo.data.base.AnomalyDataset`): ``image`` (B, 3, S, S)
float32, ``label`` (B,) int64, ``mask`` (B, S, S) float32 {0, 1}, ``path`` and ``defect_type``
lists of str.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from anomalyzoo.data.base import AnomalyDataset, DatasetError, Sample
from anomalyzoo.data.btad import btad_samples
from anomalyzoo.data.custom import custom_samples
from anomalyzoo.data.folder import FOLDER_OPTIONS, FolderLayout, folder_samples
from anomalyzoo.data.mvtec import mvtec_samples
from anomalyzoo.data.transforms import ImageReadError
from anomalyzoo.data.visa import visa_samples
from anomalyzoo.settings import get_settings

DATASET_TYPES = ("mvtec", "visa", "btad", "custom", "folder")
_HAS_MASKS = {"mvtec": True, "visa": True, "btad": True, "custom": False, "folder": True}

__all__ = [
    "DATASET_TYPES",
    "FOLDER_OPTIONS",
    "AnomalyDataset",
    "DatasetError",
    "ImageReadError",
    "Sample",
    "get_dataloaders",
    "get_datasets",
    "move_labelled_anomalies",
    "split_custom_category",
    "split_validation",
]


def split_custom_category(category: str, custom_dataset: str | None) -> tuple[str, str]:
    """(dataset, category) of a custom dataset from ``"<dataset>/<category>"`` or from
    ``custom_dataset`` plus a bare ``category``."""
    if "/" in category:
        dataset, _, pattern = category.partition("/")
        if custom_dataset is not None and custom_dataset != dataset:
            raise DatasetError(
                f"category '{category}' names custom dataset '{dataset}' but custom_dataset='{custom_dataset}'; give one."
            )
    else:
        dataset, pattern = custom_dataset or "", category
    if not dataset or not pattern or "/" in pattern:
        raise DatasetError(
            f"For dataset_type 'custom' give category as '<dataset>/<category>' (e.g. 'panel_a/pattern1') "
            f"or pass custom_dataset='<dataset>' with category='<category>'; got category='{category}'."
        )
    return dataset, pattern


def get_datasets(
    dataset_type: str,
    category: str,
    img_size: int = 256,
    normalize: bool = True,
    dataset_dir: str | Path | None = None,
    seed: int | None = None,
    custom_dataset: str | None = None,
    folder_options: dict | None = None,
    crop_pct: float = 1.0,
) -> tuple[AnomalyDataset, AnomalyDataset]:
    """(train, test) datasets of one category, from ``dataset_dir/<dataset_type>/``
    (``dataset_dir`` defaults to the DATASET_DIR setting; ``seed``, which only the custom and
    folder train/test splits use, to the SEED setting). For ``dataset_type="folder"`` the folders
    come from ``folder_options`` (``normal_dir``, ``abnormal_dir``, ``mask_dir``, ``normal_test_dir``,
    ``normal_split_ratio``; see :mod:`anomalyzoo.data.folder`) and ``category`` only names the run.
    ``crop_pct < 1`` resizes to ``img_size / crop_pct`` and centre-crops ``img_size`` (images and masks)."""
    settings = get_settings()
    if dataset_type not in DATASET_TYPES:
        raise DatasetError(f"Unknown dataset type '{dataset_type}'; expected one of {', '.join(DATASET_TYPES)}.")
    base_dir = Path(dataset_dir if dataset_dir is not None else settings.dataset_dir).expanduser()
    seed = settings.seed if seed is None else seed
    if dataset_type == "folder":
        layout = FolderLayout.from_options(**(folder_options or {}))
        train, test = (folder_samples(layout, split, seed) for split in ("train", "test"))
        return _datasets(train, test, img_size, normalize, supports_masks=layout.mask_dir is not None, crop_pct=crop_pct)
    root = base_dir / dataset_type
    if not root.is_dir() and (base_dir / category).is_dir():
        raise DatasetError(
            f"'{root}' does not exist, but '{base_dir / category}' does: dataset_dir must be the folder "
            f"that contains '{dataset_type}/', i.e. '{base_dir.parent}'."
        )
    if dataset_type == "custom":
        dataset, pattern = split_custom_category(category, custom_dataset)
        train, test = (custom_samples(root, dataset, pattern, split, seed=seed) for split in ("train", "test"))
    else:
        find_samples = {"mvtec": mvtec_samples, "visa": visa_samples, "btad": btad_samples}[dataset_type]
        train, test = (find_samples(root, category, split) for split in ("train", "test"))
    return _datasets(train, test, img_size, normalize, supports_masks=_HAS_MASKS[dataset_type], crop_pct=crop_pct)


def _datasets(train: list[Sample], test: list[Sample], img_size: int, normalize: bool,
              supports_masks: bool, crop_pct: float = 1.0) -> tuple[AnomalyDataset, AnomalyDataset]:
    """A category has masks when its layout supports them and its defective images have them (an
    MVTec-layout category without ``ground_truth/`` has image-level labels only)."""
    has_masks = supports_masks and any(s.mask_path is not None for s in test if s.label == 1)
    return (AnomalyDataset(train, img_size, normalize, has_masks, crop_pct),
            AnomalyDataset(test, img_size, normalize, has_masks, crop_pct))


def get_dataloaders(
    dataset_type: str,
    category: str,
    img_size: int = 256,
    batch_size: int = 8,
    normalize: bool = True,
    dataset_dir: str | Path | None = None,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    seed: int | None = None,
    test_batch_size: int | None = None,
    custom_dataset: str | None = None,
    folder_options: dict | None = None,
    crop_pct: float = 1.0,
) -> tuple[DataLoader, DataLoader]:
    """(train_loader, test_loader) for one category. The train loader shuffles with a
    generator seeded from ``seed`` (so a run is repeatable) and keeps the last partial batch:
    with ~200 normal images, dropping up to batch_size-1 of them would be a real loss. Unset
    loader options come from the settings (set_globals)."""
    settings = get_settings()
    seed = settings.seed if seed is None else seed
    num_workers = settings.num_workers if num_workers is None else num_workers
    pin_memory = settings.pin_memory if pin_memory is None else pin_memory
    persistent_workers = settings.persistent_workers if persistent_workers is None else persistent_workers
    train_set, test_set = get_datasets(
        dataset_type, category, img_size=img_size, normalize=normalize, dataset_dir=dataset_dir,
        seed=seed, custom_dataset=custom_dataset, folder_options=folder_options, crop_pct=crop_pct,
    )
    options = {
        "num_workers": num_workers,
        "pin_memory": bool(pin_memory),
        "persistent_workers": bool(persistent_workers) and num_workers > 0,
    }
    train_loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, drop_last=False,
        generator=torch.Generator().manual_seed(int(seed)), **options,
    )
    test_loader = DataLoader(test_set, batch_size=test_batch_size or batch_size, shuffle=False, drop_last=False, **options)
    return train_loader, test_loader


class DatasetSplit(Subset):
    """A seeded part of a dataset that still answers ``has_masks`` like the whole."""

    @property
    def has_masks(self) -> bool:
        return bool(getattr(self.dataset, "has_masks", True))


def validation_count(num_images: int, val_fraction: float) -> int:
    """How many of ``num_images`` training images ``val_fraction`` holds out (at least one, and at
    least one left to train on); 0 for ``val_fraction == 0``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return 0
    if num_images < 2:
        raise DatasetError(f"val_fraction={val_fraction} needs at least 2 training images, got {num_images}; "
                           "add normal images or set val_fraction=0")
    return min(num_images - 1, max(1, round(val_fraction * num_images)))


def split_validation(train_loader: DataLoader, val_fraction: float, seed: int) -> tuple[DataLoader, DataLoader | None]:
    """(train, validation) loaders: a seeded ``val_fraction`` of the normal training images is held
    out (validation loader ``None`` for 0). The test split is not involved: validation, early
    stopping and the label-free threshold see only these held-out normals."""
    dataset: Dataset = train_loader.dataset
    held_out = validation_count(len(dataset), val_fraction)
    if held_out == 0:
        return train_loader, None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(seed))).tolist()
    options = {"num_workers": train_loader.num_workers, "pin_memory": train_loader.pin_memory,
               "persistent_workers": train_loader.persistent_workers}
    train_part = DatasetSplit(dataset, sorted(order[held_out:]))
    validation_part = DatasetSplit(dataset, sorted(order[:held_out]))
    new_train_loader = DataLoader(train_part, batch_size=train_loader.batch_size, shuffle=True, drop_last=False,
                                  generator=torch.Generator().manual_seed(int(seed)), **options)
    validation_loader = DataLoader(validation_part, batch_size=train_loader.batch_size, shuffle=False, **options)
    return new_train_loader, validation_loader


def move_labelled_anomalies(train_loader: DataLoader, test_loader: DataLoader, fraction: float,
                            seed: int) -> tuple[DataLoader, DataLoader, str]:
    """The supervised protocol on datasets that keep every defect in the test split: a seeded
    ``fraction`` of each defect type's test images (``floor(fraction * n)`` of its ``n``), with
    their masks, joins the training images and leaves the test set; normal test images all stay.
    Returns (train loader, test loader of what remains, a note saying what moved) so that every
    metric is computed on images the model has not seen."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the labelled anomaly fraction must be in (0, 1), got {fraction}")
    test_set = test_loader.dataset
    if not isinstance(test_set, AnomalyDataset):
        raise TypeError(f"move_labelled_anomalies needs the test loader of get_dataloaders, got a {type(test_set).__name__}")
    if not test_set.has_masks:
        raise DatasetError("Supervised training needs pixel masks of the defective test images, and this dataset "
                           "has none; train the unsupervised model instead (e.g. 'supersimplenet').")
    by_type: dict[str, list[int]] = {}
    for index, sample in enumerate(test_set.samples):
        if sample.label == 1:
            by_type.setdefault(sample.defect_type, []).append(index)
    generator = torch.Generator().manual_seed(int(seed))
    moved: list[int] = []
    counts = []
    for defect_type in sorted(by_type):
        indices = by_type[defect_type]
        count = int(fraction * len(indices))
        order = torch.randperm(len(indices), generator=generator).tolist()
        moved.extend(indices[j] for j in order[:count])
        counts.append(f"{defect_type} {count}/{len(indices)}")
    if not moved:
        raise DatasetError(f"No defect type of the test split has enough images to move {fraction:.0%} of them to "
                           f"training ({', '.join(counts) or 'no defective images'}).")
    moved_set = set(moved)
    kept = [index for index in range(len(test_set)) if index not in moved_set]
    options = {"num_workers": train_loader.num_workers, "pin_memory": train_loader.pin_memory,
               "persistent_workers": train_loader.persistent_workers}
    train_set = ConcatDataset([train_loader.dataset, DatasetSplit(test_set, sorted(moved))])
    new_train_loader = DataLoader(train_set, batch_size=train_loader.batch_size, shuffle=True, drop_last=False,
                                  generator=torch.Generator().manual_seed(int(seed)), **options)
    new_test_loader = DataLoader(DatasetSplit(test_set, kept), batch_size=test_loader.batch_size, shuffle=False, **options)
    note = (f"supervised protocol: {len(moved)} defective test images ({', '.join(counts)}; seeded {fraction:.0%} "
            f"of each defect type, seed {seed}) moved with their masks to training; metrics are on the remaining "
            f"{len(kept)} test images")
    return new_train_loader, new_test_loader, note
