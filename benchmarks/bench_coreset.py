"""Greedy k-center coreset selection (PatchCore's memory bank) on real patch features at scale.

    python benchmarks/bench_coreset.py --dataset-dir ../shared/data            # 200k, 500k, 1M points
    python benchmarks/bench_coreset.py --sizes 872000 --reference-points 100000

Extracts PatchCore's patch features (EfficientNet-Lite0 layer2+3, 256 px: 1,024 patches x 152
dims per image) of MVTec bottle's 209 training images in five views (as is, rotated by 90, 180
and 270 degrees, mirrored: 1,070,080 patches), draws seeded random subsets of the sizes asked
for, and selects a 10 % coreset of each with ``greedy_coreset``, printing the time and the
coverage radius (the largest distance of any patch to its nearest coreset point, in the
projected space the selection works in). The plain greedy loop (one full distance update per
pick, the paper's Algorithm 1 as anomalib runs it) runs on a smaller subset against our
selection of the same points: our selection is exact, so the picks and the radius must agree
there, and the plain loop's time is extrapolated to the large sizes (it is linear in N x k).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from anomalyzoo.data import get_dataloaders
from anomalyzoo.models.components.k_center_greedy import greedy_coreset, projection_matrix
from anomalyzoo.models.patchcore import PatchcoreModel

VIEWS = ((0, False), (1, False), (2, False), (3, False), (0, True))  # (quarter turns, mirrored)


def bottle_patch_features(dataset_dir: str, img_size: int) -> torch.Tensor:
    train_loader, _ = get_dataloaders("mvtec", "bottle", img_size=img_size, batch_size=8, normalize=True,
                                      dataset_dir=dataset_dir, seed=0)
    model = PatchcoreModel("efficientnet_lite0", ["layer2", "layer3"]).eval()
    features = []
    with torch.no_grad():
        for turns, mirrored in VIEWS:
            for batch in tqdm(train_loader, desc=f"features (view {turns * 90} deg{', mirrored' if mirrored else ''})"):
                images = torch.rot90(batch["image"], turns, dims=(2, 3))
                features.append(model.flatten(model.embed(images.flip(-1) if mirrored else images)))
    return torch.cat(features)


def plain_k_center_greedy(projected: torch.Tensor, coreset_size: int, start: int) -> tuple[torch.Tensor, float]:
    """The reference loop: after each pick, update every point's distance to the coreset."""
    selected = torch.empty(coreset_size, dtype=torch.long)
    min_distances = torch.full((projected.shape[0],), float("inf"))
    index = start
    for step in tqdm(range(coreset_size), desc="plain greedy", leave=False, mininterval=1.0):
        selected[step] = index
        torch.minimum(min_distances, torch.linalg.vector_norm(projected - projected[index], dim=1), out=min_distances)
        index = int(min_distances.argmax())
    return selected, float(min_distances.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", default="../shared/data")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 500_000, 1_000_000])
    parser.add_argument("--reference-points", type=int, default=50_000, help="points for the plain loop")
    parser.add_argument("--cache", type=Path, default=None, help="features file to reuse between runs")
    options = parser.parse_args()

    if options.cache is not None and options.cache.exists():
        features = torch.load(options.cache)
    else:
        features = bottle_patch_features(options.dataset_dir, options.img_size)
        if options.cache is not None:
            torch.save(features, options.cache)
    print(f"{features.shape[0]} patch features x {features.shape[1]} dims, {torch.get_num_threads()} threads")

    rows = []
    generator = torch.Generator().manual_seed(0)
    subset = features[torch.randperm(features.shape[0], generator=generator)[:options.reference_points]]
    size = int(round(options.ratio * subset.shape[0]))
    start = time.perf_counter()
    ours = greedy_coreset(subset, size, seed=0)
    ours_seconds = time.perf_counter() - start
    projected = subset.float() @ projection_matrix(subset.shape[1], 128, torch.Generator().manual_seed(0))
    start = time.perf_counter()
    plain, plain_radius = plain_k_center_greedy(projected, size, int(ours.indices[0]))
    plain_seconds = time.perf_counter() - start
    same = len(set(plain.tolist()) & set(ours.indices.tolist())) / size
    rows.append((subset.shape[0], size, ours_seconds, ours.coverage_radius, plain_seconds, plain_radius, f"{same:.2%}"))
    plain_rate = plain_seconds / (subset.shape[0] * size)

    for num_points in options.sizes:
        points = features if num_points >= features.shape[0] else \
            features[torch.randperm(features.shape[0], generator=generator)[:num_points]]
        size = int(round(options.ratio * points.shape[0]))
        start = time.perf_counter()
        ours = greedy_coreset(points, size, seed=0)
        seconds = time.perf_counter() - start
        rows.append((points.shape[0], size, seconds, ours.coverage_radius, plain_rate * points.shape[0] * size, None, ""))

    print(f"\nMVTec bottle x 5 views, EfficientNet-Lite0 layer2+3 at {options.img_size} px, coreset {options.ratio:.0%}\n")
    print("| patches | coreset | ours (s) | ours radius | plain greedy (s) | plain radius | same picks |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for points, size, seconds, radius, plain_time, plain_r, same in rows:
        plain_text = f"{plain_time:.1f}" if plain_r is not None else f"~{plain_time:.0f} (extrapolated)"
        radius_text = f"{plain_r:.4f}" if plain_r is not None else ""
        print(f"| {points} | {size} | {seconds:.1f} | {radius:.4f} | {plain_text} | {radius_text} | {same} |")


if __name__ == "__main__":
    main()
