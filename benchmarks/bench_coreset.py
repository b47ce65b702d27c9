"""Greedy k-center coreset selection (PatchCore's memory bank) on real patch features.

    python benchmarks/bench_coreset.py --dataset-dir ../shared/data
    python benchmarks/bench_coreset.py --reference-points 214016   # also time the plain loop on everything

Extracts the PatchCore patch features of MVTec bottle's training images (EfficientNet-Lite0,
256 px: 214,016 patches x 152 dims), then times our pruned selection against the plain greedy
loop (one full distance update per selected center, as in the paper's Algorithm 1 and in
anomalib). Both pick the same points up to ties, so the coverage radius (the largest distance of
any patch to its nearest coreset point, in the projected space) is printed as the accuracy check.
By default the plain loop runs on a random subset and its time on everything is extrapolated
(it is linear in points x centers).
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from anomalyzoo.data import get_dataloaders
from anomalyzoo.models.components.k_center_greedy import k_center_greedy, random_projection
from anomalyzoo.models.patchcore import PatchcoreModel


def plain_k_center_greedy(projected: torch.Tensor, coreset_size: int, start: int) -> torch.Tensor:
    """The reference loop: after each pick, update every point's distance to the coreset."""
    selected = torch.empty(coreset_size, dtype=torch.long)
    min_distances = torch.full((projected.shape[0],), float("inf"))
    index = start
    for step in tqdm(range(coreset_size), desc="plain greedy", leave=False, mininterval=1.0):
        selected[step] = index
        distances = torch.linalg.vector_norm(projected - projected[index], dim=1)
        torch.minimum(min_distances, distances, out=min_distances)
        index = int(min_distances.argmax())
    return selected


def coverage_radius(projected: torch.Tensor, selected: torch.Tensor, chunk: int = 8192) -> float:
    centers = projected[selected]
    radius = 0.0
    for begin in range(0, projected.shape[0], chunk):
        radius = max(radius, float(torch.cdist(projected[begin:begin + chunk], centers).amin(dim=1).max()))
    return radius


def bottle_patch_features(dataset_dir: str, img_size: int) -> torch.Tensor:
    train_loader, _ = get_dataloaders("mvtec", "bottle", img_size=img_size, batch_size=8, normalize=True,
                                      dataset_dir=dataset_dir, seed=0)
    model = PatchcoreModel("efficientnet_lite0", ["layer2", "layer3"]).eval()
    with torch.no_grad():
        return torch.cat([model.flatten(model.embed(batch["image"])) for batch in tqdm(train_loader, desc="features")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", default="../shared/data")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--reference-points", type=int, default=40000, help="points for the plain loop")
    options = parser.parse_args()
    torch.manual_seed(0)

    features = bottle_patch_features(options.dataset_dir, options.img_size)
    rows = []
    for name, points in (("all", features), ("subset", features[torch.randperm(features.shape[0])[:options.reference_points]])):
        if name == "all" and options.reference_points >= features.shape[0]:
            points = features
        size = int(round(options.ratio * points.shape[0]))
        start = time.perf_counter()
        pruned = k_center_greedy(points, size, seed=0)
        pruned_seconds = time.perf_counter() - start
        projected = random_projection(points.float(), 128, torch.Generator().manual_seed(0))
        rows.append((f"pruned (ours), {name}", points.shape[0], size, pruned_seconds, coverage_radius(projected, pruned)))
        if name == "subset" or options.reference_points >= features.shape[0]:
            start = time.perf_counter()
            plain = plain_k_center_greedy(projected, size, int(pruned[0]))
            plain_seconds = time.perf_counter() - start
            rows.append((f"plain greedy, {name}", points.shape[0], size, plain_seconds, coverage_radius(projected, plain)))
            same = len(set(plain.tolist()) & set(pruned.tolist())) / size
            print(f"{name}: {same:.1%} of the coreset points are the same in both selections")
            if name == "subset" and options.reference_points < features.shape[0]:
                full_size = int(round(options.ratio * features.shape[0]))
                estimate = plain_seconds * (features.shape[0] * full_size) / (points.shape[0] * size)
                rows.append(("plain greedy, all (extrapolated)", features.shape[0], full_size, estimate, float("nan")))
        if options.reference_points >= features.shape[0]:
            break

    print(f"\nMVTec bottle, EfficientNet-Lite0 layer2+3 at {options.img_size} px, {torch.get_num_threads()} threads\n")
    print("| selection | points | coreset | seconds | coverage radius |")
    print("| --- | --- | --- | --- | --- |")
    for name, points, size, seconds, radius in rows:
        print(f"| {name} | {points} | {size} | {seconds:.1f} | {radius:.4f} |")


if __name__ == "__main__":
    main()
