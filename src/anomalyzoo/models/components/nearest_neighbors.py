"""Chunked exact k-nearest-neighbour search (Euclidean), bounded in memory."""

from __future__ import annotations

import torch


def nearest_neighbors(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (Q, k) and indices (Q, k) of the ``k`` nearest rows of ``bank`` for each query.

    Distances come from ||q||^2 - 2 q.b + ||b||^2 computed chunk by chunk, so a query set of any
    size needs only ``chunk_size x len(bank)`` floats at a time. When traced for export there is
    one chunk: a traced loop over chunks would fix the number of queries (the batch size).
    """
    bank_norms = (bank * bank).sum(dim=1)
    if torch.jit.is_tracing():
        chunk_size = max(queries.shape[0], 1)
    all_distances, all_indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        chunk = queries[start:start + chunk_size]
        squared = (chunk * chunk).sum(dim=1, keepdim=True) - 2.0 * chunk @ bank.T + bank_norms[None, :]
        distances, indices = torch.topk(squared, k, dim=1, largest=False)
        all_distances.append(distances.clamp_min_(0).sqrt_())
        all_indices.append(indices)
    return torch.cat(all_distances), torch.cat(all_indices)
