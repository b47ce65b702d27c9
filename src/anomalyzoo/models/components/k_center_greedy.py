"""Greedy k-center coreset selection (PatchCore, arXiv 2106.08265, sec. 3.2 and Algorithm 1).

The selection runs on a random linear projection of the features to ``projection_dim``
dimensions (the paper's Johnson-Lindenstrauss argument, sec. 3.2; the reference code projects to
128). Each iteration adds the point farthest from the current coreset and lowers every point's
distance to the coreset. The result here is that exact greedy algorithm's (the same picks, up to
float rounding between near-equal distances), but almost all of its work is skipped with bounds
that can never skip a point whose distance a new center lowers:

1. The projected points are rotated onto their principal axes (an orthogonal map: distances are
   unchanged) and split into balanced blocks of ``block_size`` points, a kd-tree whose cuts
   follow each node's principal direction.
2. Block bound (triangle inequality): a new center ``c`` can only lower a distance in block B if
   ``||m_B - c|| - r_B`` (centroid m_B, radius r_B) is below the block's largest current distance.
   Late in the selection a center touches only the blocks around it.
3. Point bound: inside those blocks, ``||x - c||^2 >= ||x_L - c_L||^2 + (||x_H|| - ||c_H||)^2``
   where ``x_L`` are the first ``low_dims`` principal coordinates and ``x_H`` the rest (the
   reverse triangle inequality on the residual). It costs ``low_dims + 1`` numbers per point
   instead of 128, and keeps only the few percent of points the center may reach; their exact
   distances are then computed.

Every bound carries a small relative margin, so float rounding never drops a needed update.
Each pick reads a few hundred kilobytes instead of the whole N x 128 matrix: on real patch
features (EfficientNet-Lite0 layer2+3 of MVTec bottle, two CPU cores) 872k points -> 87k picks
take minutes where the plain loop takes hours (``benchmarks/bench_coreset.py``). Memory stays
O(N * d); nothing is ever N x N. The coverage radius (the largest distance of any point to its
nearest coreset point, in the projected space) falls out of the last update for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

COVARIANCE_SAMPLE = 200_000  # points used to estimate the principal axes
POWER_ITERATIONS = 4  # per kd-tree cut; the leading direction is all a cut needs
TREE_SAMPLE = 512  # members per node the cut direction is estimated on
TREE_DIMS = 32  # leading principal coordinates the kd-tree cuts in
RELATIVE_MARGIN = 1e-5  # of the squared norms involved, on every bound compared against a distance
# SINGLE_THREAD_NOTE: the picks are tens of thousands of small operations. On one thread they
# never wait for a second one; with two, any other busy process on the machine makes every
# operation wait for the descheduled thread (measured 8x slower on 2 cores beside a niced job),
# while on an idle machine the second thread saves only ~15 %.


@dataclass(frozen=True)
class CoresetSelection:
    """The picked indices (in pick order, starting from a random point) and the coverage radius
    (max over all points of the distance to the nearest picked point, projected space)."""

    indices: torch.Tensor
    coverage_radius: float


def random_projection(features: torch.Tensor, projection_dim: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian random projection to ``projection_dim`` dims (identity when already smaller)."""
    return features @ projection_matrix(features.shape[1], projection_dim, generator).to(features)


def projection_matrix(input_dim: int, projection_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(input_dim, out) Gaussian Johnson-Lindenstrauss matrix; the identity when already small."""
    if input_dim <= projection_dim:
        return torch.eye(input_dim)
    return torch.randn(input_dim, projection_dim, generator=generator) / projection_dim**0.5


def principal_axes(points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(d, d) orthogonal matrix whose columns are the principal axes, largest variance first
    (estimated on a seeded sample of at most ``COVARIANCE_SAMPLE`` points)."""
    if points.shape[0] > COVARIANCE_SAMPLE:
        points = points[torch.randperm(points.shape[0], generator=generator)[:COVARIANCE_SAMPLE]]
    centred = (points - points.mean(dim=0)).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)
    return eigenvectors[:, eigenvalues.argsort(descending=True)].float()


def balanced_blocks(points: torch.Tensor, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """(num_blocks, size) slot ids: recursive median splits along each node's principal direction
    (a balanced kd-tree). Slot ids run over ``num_blocks * size >= N``; id ``i`` stands for point
    ``i % N``, so ids ``>= N`` are padding that repeats real points.

    Each node's direction comes from a few power iterations on at most ``TREE_SAMPLE`` of its
    members (spread along the previous cut), started from its widest coordinate; the points are
    physically reordered node by node, so every level reads them once."""
    num_points, dims = points.shape
    levels = max(0, math.ceil(math.log2(max(num_points / block_size, 1.0))))
    size = math.ceil(num_points / 2**levels)
    slots = torch.arange(size * 2**levels)
    ordered = points.index_select(0, slots % num_points)
    for level in range(levels):
        nodes = 2**level
        members = ordered.view(nodes, -1, dims)
        stride = max(1, members.shape[1] // TREE_SAMPLE)
        sample = members[:, ::stride]
        sample = sample - sample.mean(dim=1, keepdim=True)
        direction = torch.zeros(nodes, dims, 1)
        direction.scatter_(1, sample.pow(2).sum(dim=1).argmax(dim=1).view(-1, 1, 1), 1.0)
        direction = direction + 0.01 * torch.randn(direction.shape, generator=generator)
        for _ in range(POWER_ITERATIONS):
            direction = sample.transpose(1, 2) @ (sample @ direction)
            direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        order = (members @ direction)[..., 0].argsort(dim=1)
        order = (order + torch.arange(nodes).view(-1, 1) * members.shape[1]).view(-1)
        ordered = ordered.index_select(0, order)
        slots = slots.index_select(0, order)
    return slots.view(2**levels, size)


def k_center_greedy(
    features: torch.Tensor,
    coreset_size: int,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Indices (``coreset_size``,) of a greedy k-center coreset of ``features`` (N, D), in the
    order the greedy algorithm picks them, starting from a random point."""
    return greedy_coreset(features, coreset_size, projection_dim, seed, progress).indices.to(features.device)


def greedy_coreset(
    features: torch.Tensor,
    coreset_size: int,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = True,
    block_size: int = 256,
    low_dims: int = 16,
) -> CoresetSelection:
    """Exact greedy k-center on the seeded random projection, with the bounds of the module
    docstring; see :class:`CoresetSelection`."""
    num_points = features.shape[0]
    if coreset_size >= num_points:
        return CoresetSelection(torch.arange(num_points), 0.0)
    generator = torch.Generator().manual_seed(seed)
    features = features.detach().float().cpu()
    projection = projection_matrix(features.shape[1], projection_dim, generator)
    start = int(torch.randint(num_points, (1,), generator=generator))
    projected = features @ projection
    points = projected @ principal_axes(projected, generator)  # rotation: same distances
    del projected
    low_dims = min(low_dims, points.shape[1])

    slots = balanced_blocks(points[:, :TREE_DIMS].contiguous(), block_size, generator)
    num_blocks, size = slots.shape
    point_of_slot = (slots % num_points).view(-1)
    ordered = points[point_of_slot]  # (G * S, d), block after block
    del points
    squared_norms = ordered.pow(2).sum(dim=1)
    # [x_L, ||x_H||]: x~ . c~ = x_L . c_L + ||x_H|| ||c_H||, so ||x||^2 + ||c||^2 - 2 x~ . c~ is the point bound
    low = torch.cat([ordered[:, :low_dims], ordered[:, low_dims:].norm(dim=1, keepdim=True)], dim=1)
    low = low.view(num_blocks, size, low_dims + 1)
    blocks = ordered.view(num_blocks, size, -1)
    centroids = blocks.mean(dim=1)
    centroid_norms = centroids.pow(2).sum(dim=1)
    radii = (blocks - centroids[:, None]).norm(dim=-1).amax(dim=1) * (1 + RELATIVE_MARGIN)
    margin = RELATIVE_MARGIN * 2 * float(squared_norms.max())
    slot_ids = torch.arange(num_blocks * size).view(num_blocks, size)

    # squared distance to the coreset per slot; padding slots (repeats) never count
    min_distances = torch.full((num_blocks, size), float("inf"))
    min_distances.view(-1)[slots.view(-1) >= num_points] = -float("inf")
    block_max = min_distances.amax(dim=1)
    # a block is visited when ||m_B - c||^2 < (sqrt(block_max) + r_B)^2 (the block bound, squared)
    reach = torch.full((num_blocks,), float("inf"))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see SINGLE_THREAD_NOTE
    try:
        selected = torch.empty(coreset_size, dtype=torch.long)
        position = int((slots.view(-1) == start).nonzero()[0])
        for step in tqdm(range(coreset_size), desc="coreset (k-center greedy)", leave=False, disable=not progress,
                         mininterval=0.5, dynamic_ncols=True):
            selected[step] = point_of_slot[position]
            min_distances.view(-1)[position] = 0.0  # exactly, not the rounding residue of x.x - 2x.x + x.x
            center, center_norm = ordered[position], squared_norms[position]
            center_low = low.view(-1, low_dims + 1)[position]
            centroid_distances = torch.addmv(centroid_norms, centroids, center, alpha=-2.0)
            active = (centroid_distances < reach - center_norm).nonzero().view(-1)

            # point bound on the visited blocks, then exact distances for the points it keeps
            visited_distances = min_distances.index_select(0, active)
            visited_norms = squared_norms.view(num_blocks, size).index_select(0, active)
            bound = visited_norms - 2.0 * (low.index_select(0, active) @ center_low)
            keep = (bound - margin < visited_distances - center_norm).view(-1).nonzero().view(-1)
            rows = slot_ids.index_select(0, active).view(-1).index_select(0, keep)
            exact = torch.addmv(visited_norms.view(-1).index_select(0, keep) + center_norm,
                                ordered.index_select(0, rows), center, alpha=-2.0)
            lowered = torch.minimum(visited_distances.view(-1).index_select(0, keep), exact)
            visited_distances.view(-1).index_copy_(0, keep, lowered)
            min_distances.view(-1).index_copy_(0, rows, lowered)
            visited_max = visited_distances.amax(dim=1)
            block_max.index_copy_(0, active, visited_max)
            reach.index_copy_(0, active, (visited_max.clamp_min(0).sqrt() + radii.index_select(0, active)).pow(2) + margin)

            block = int(block_max.argmax())
            position = block * size + int(min_distances[block].argmax())
    finally:
        torch.set_num_threads(threads)
    return CoresetSelection(selected, float(block_max.max().clamp_min(0).sqrt()))
