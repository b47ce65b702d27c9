"""Greedy k-center coreset selection (PatchCore, arXiv 2106.08265, sec. 3.2 and Algorithm 1).

The selection runs on a random linear projection of the features to ``projection_dim``
dimensions (the paper's Johnson-Lindenstrauss argument, sec. 3.2; the reference code projects to
128). Each iteration adds the point farthest from the current coreset and lowers every point's
distance to the coreset.

The result is the plain greedy algorithm's, but most of its work is skipped: the points are
first split into balanced blocks (a median split along each block's principal direction), and a
new center can only lower the distances in a block whose bounding ball comes closer to it than
the block's current largest distance (triangle inequality). Late in the selection, when the
coreset already covers the data densely, a new center touches only the few blocks around it.
On the 214k patch features of MVTec bottle this takes about a minute on two CPU cores, against
about 6 minutes for the unpruned loop and 40 for anomalib 2.7. Memory stays O(N * d); nothing is
ever N x N.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def random_projection(features: torch.Tensor, projection_dim: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian random projection to ``projection_dim`` dims (identity when already smaller)."""
    if features.shape[1] <= projection_dim:
        return features
    matrix = torch.randn(features.shape[1], projection_dim, generator=generator)
    return features @ (matrix / projection_dim**0.5).to(features)


def balanced_blocks(points: torch.Tensor, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """(num_blocks, size) indices into ``points``: recursive median splits along each block's
    principal direction (a balanced kd-tree). The tail is padded with repeats of real points so
    every block has the same size; a repeat can never be selected twice (its distance drops to
    zero together with the original's)."""
    num_points, dims = points.shape
    levels = max(0, math.ceil(math.log2(max(num_points / block_size, 1.0))))
    size = math.ceil(num_points / 2**levels)
    index = (torch.arange(size * 2**levels) % num_points).view(1, -1)
    for _ in range(levels):
        members = points[index]
        centred = members - members.mean(dim=1, keepdim=True)
        covariance = centred.transpose(1, 2) @ centred
        direction = torch.randn(index.shape[0], dims, 1, generator=generator).to(points)
        for _ in range(8):  # power iteration: the leading principal direction is enough
            direction = covariance @ direction
            direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        order = (centred @ direction)[..., 0].argsort(dim=1)
        index = torch.gather(index, 1, order).reshape(index.shape[0] * 2, -1)
    return index


def k_center_greedy(
    features: torch.Tensor,
    coreset_size: int,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = True,
    block_size: int = 256,
) -> torch.Tensor:
    """Indices (``coreset_size``,) of a greedy k-center coreset of ``features`` (N, D), in the
    order the greedy algorithm picks them, starting from a random point."""
    num_points = features.shape[0]
    if coreset_size >= num_points:
        return torch.arange(num_points)
    generator = torch.Generator().manual_seed(seed)
    projected = random_projection(features.detach().float().cpu(), projection_dim, generator).contiguous()
    start = int(torch.randint(num_points, (1,), generator=generator))

    block_index = balanced_blocks(projected, block_size, generator)  # (G, S)
    blocks = projected[block_index]  # (G, S, d)
    squared_norms = (blocks * blocks).sum(dim=-1)
    centroids = blocks.mean(dim=1)
    radii = (blocks - centroids[:, None]).norm(dim=-1).amax(dim=1)
    min_distances = torch.full(block_index.shape, float("inf"))  # squared, per point
    num_blocks = block_index.shape[0]
    block_max = torch.full((num_blocks,), float("inf"))  # largest min distance per block

    selected = torch.empty(coreset_size, dtype=torch.long)
    block, slot = (int(i) for i in (block_index == start).nonzero()[0])
    for step in tqdm(range(coreset_size), desc="coreset (k-center greedy)", leave=False, disable=not progress,
                     mininterval=0.5, dynamic_ncols=True):
        selected[step] = block_index[block, slot]
        center = blocks[block, slot]
        # ||x - c|| >= ||m_B - c|| - r_B: skip blocks whose every point is already closer to the
        # coreset than that bound (with a small margin so rounding never skips a needed block)
        lower_bound = ((centroids - center).norm(dim=1) - radii) * (1 - 1e-5) - 1e-6
        active = (lower_bound < block_max.sqrt()).nonzero()[:, 0]
        if 2 * active.numel() > num_blocks:  # early on most blocks are touched: skip the gather
            squared = squared_norms - 2.0 * (blocks @ center) + squared_norms[block, slot]
            torch.minimum(min_distances, squared, out=min_distances)
            block_max = min_distances.amax(dim=1)
        else:
            squared = squared_norms[active] - 2.0 * (blocks[active] @ center) + squared_norms[block, slot]
            updated = torch.minimum(min_distances[active], squared)
            min_distances[active] = updated
            block_max[active] = updated.amax(dim=1)
        block = int(block_max.argmax())
        slot = int(min_distances[block].argmax())
    return selected.to(features.device)
