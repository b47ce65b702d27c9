"""VisA layout (Zou et al., ECCV 2022); the split comes from the dataset's own ``1cls.csv``::

    <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png
    <root>/<category>/split_csv/1cls.csv     columns: object,split,label,image,mask

Paths in the CSV are relative to ``<root>`` (``candle/Data/Images/Normal/0000.JPG``), as in the
original release; a per-category CSV may also give them relative to ``<root>/<category>``
(``Data/Images/Normal/0000.JPG``). The original release keeps one ``split_csv/1cls.csv`` for
all objects at ``<root>``; that location is read when the category has none of its own. The
train split must hold normal images only: training on a defective image would silently teach
the model that the defect is normal. VisA masks store small values (1, 2, ...) for
defect pixels rather than 255, so they are binarised with "any non-zero".
"""

from __future__ import annotations

import csv
from pathlib import Path

from anomalyzoo.data.base import NORMAL_DEFECT_TYPE, DatasetError, Sample, category_dir, check_split

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def find_split_csv(root: Path, category: str) -> Path:
    candidates = [Path(root) / category / SPLIT_CSV, Path(root) / SPLIT_CSV]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"VisA split file not found; looked for {' and '.join(repr(str(c)) for c in candidates)}. "
        f"It must have the columns {','.join(COLUMNS)} (as in VisA's split_csv/1cls.csv)."
    )


def _resolve(root: Path, category: str, relative: str) -> Path:
    """A CSV path relative to ``root`` (VisA's own convention) or, failing that, to ``root/<category>``."""
    from_root = root / relative
    if from_root.is_file():
        return from_root
    from_category = root / category / relative
    return from_category if from_category.is_file() else from_root


def visa_samples(root: Path, category: str, split: str) -> list[Sample]:
    """The rows of ``1cls.csv`` for this object and split, in file order."""
    check_split(split)
    root = Path(root)
    category_dir(root, category)
    csv_path = find_split_csv(root, category)
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in COLUMNS if name not in header]
        if missing:
            raise DatasetError(f"'{csv_path}' lacks column(s) {missing}; found {header}, expected {list(COLUMNS)}.")
        rows = [{key.strip(): (value or "").strip() for key, value in row.items() if key} for row in reader]

    samples: list[Sample] = []
    for line, row in enumerate(rows, start=2):
        if row["object"] != category or row["split"].lower() != split:
            continue
        label = LABELS.get(row["label"].lower())
        if label is None:
            raise DatasetError(f"'{csv_path}' line {line}: label '{row['label']}' is not one of {sorted(LABELS)}.")
        if label == 1 and split == "train":
            raise DatasetError(
                f"'{csv_path}' line {line}: anomalous image '{row['image']}' is in the train split; "
                f"the models train on normal images only. Move it to the test split."
            )
        if label == 1 and not row["mask"]:
            raise DatasetError(f"'{csv_path}' line {line}: anomalous image '{row['image']}' has an empty mask column.")
        mask_path = _resolve(root, category, row["mask"]) if label == 1 else None
        defect_type = "anomaly" if label else NORMAL_DEFECT_TYPE
        samples.append(Sample(_resolve(root, category, row["image"]), label, mask_path, defect_type, mask_nonzero=True))

    if not samples:
        objects = sorted({row["object"] for row in rows})
        raise DatasetError(
            f"'{csv_path}' has no '{split}' rows for object '{category}'. Objects in the file: {', '.join(objects) or 'none'}."
        )
    missing_files = [path for s in samples for path in (s.image_path, s.mask_path) if path is not None and not path.is_file()]
    if missing_files:
        shown = "\n  ".join(str(path) for path in missing_files[:10])
        raise DatasetError(
            f"{len(missing_files)} file(s) listed in '{csv_path}' do not exist "
            f"(paths are relative to '{root}' or '{root / category}'):\n  {shown}"
        )
    return samples
