"""Experiment script: set the globals, train one model, then several.

    python main.py                      # the bottle category, if DATASET_DIR has it
    python main.py --synthetic          # a generated dataset, no download needed

The data layout under DATASET_DIR and the outputs under OUTPUT_DIR are described in README.md.
"""

import argparse
from pathlib import Path

from anomalyzoo import print_globals, set_globals, train, train_models
from anomalyzoo.data.synthetic import make_synthetic_dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--synthetic", action="store_true", help="generate and use a synthetic category")
    parser.add_argument("--dataset-dir", default="../shared/data")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()

    dataset_dir, category = Path(args.dataset_dir), "bottle"
    if args.synthetic:
        dataset_dir, category = Path("outputs/synthetic_data"), "synthetic_texture"
        make_synthetic_dataset(dataset_dir / "mvtec", category=category, kind="texture")

    set_globals(dataset_dir=dataset_dir, backbone_dir="backbones", output_dir="outputs", seed=42, num_workers=0)
    print_globals()

    # One model on one category: every train() argument overrides the registry default.
    result = train("mvtec", category, "patchcore", num_epochs=1, backbone=args.backbone)
    print(f"PatchCore image AUROC {result['image_auroc']:.4f}, pixel AUROC {result['pixel_auroc']:.4f}")

    # Several models (and categories): one failure does not stop the others; a summary table ends it.
    train_models("mvtec", [category], ["padim", "patchcore"], backbone=args.backbone)


if __name__ == "__main__":
    main()
