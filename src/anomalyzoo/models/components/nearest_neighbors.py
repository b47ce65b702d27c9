"""Exact k-nearest-neighbour search (Euclidean): chunked torch, or faiss's exact flat index.

Both find the neighbours on ``||b||^2 - 2 q.b`` (one fused matrix product, ``addmm``; the row's
constant ``||q||^2`` changes no ranking; faiss's ``IndexFlatL2`` ranks the same way in its BLAS path) and then recompute the returned distances directly
as ``||q - b||``: the expansion loses digits to cancellation when the distance is small beside the
norms (float32 patch features), and the direct distance makes the scores independent of how a
backend orders its sums (torch, faiss, ONNX Runtime, OpenVINO agree to ~1e-6).
"""

from __future__ import annotations

from typing import Any

import torch

KNN_BACKENDS = ("torch", "faiss")


def nearest_neighbors(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_size: int = 4096,
                      index: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (Q, k) and indices (Q, k) of the ``k`` nearest rows of ``bank`` for each query.

    The torch search goes chunk by chunk, so a query set of any size needs only
    ``chunk_size x len(bank)`` floats at a time; when traced for export there is one chunk (a traced
    loop over chunks would fix the number of queries, i.e. the batch size). With ``index`` (a faiss
    index over ``bank``, see :func:`faiss_index`) faiss finds the neighbours.
    """
    if index is not None and not torch.jit.is_tracing():
        _, found = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        indices = torch.from_numpy(found).to(device=queries.device, dtype=torch.long)
        return exact_distances(queries, bank, indices), indices
    bank_norms = (bank * bank).sum(dim=1)
    if torch.jit.is_tracing():
        chunk_size = max(queries.shape[0], 1)
    all_distances, all_indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        chunk = queries[start:start + chunk_size]
        # ||b||^2 - 2 q.b in one fused product: ||q - b||^2 less ||q||^2, a constant of the row that
        # changes no ranking (the distances themselves are recomputed below)
        ranking = torch.addmm(bank_norms[None, :], chunk, bank.T, alpha=-2.0)
        indices = ranking.argmin(dim=1, keepdim=True) if k == 1 else torch.topk(ranking, k, dim=1, largest=False).indices
        all_distances.append(exact_distances(chunk, bank, indices))
        all_indices.append(indices)
    return torch.cat(all_distances), torch.cat(all_indices)


def exact_distances(queries: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``||q_i - bank[indices[i, j]]||`` (Q, k), computed directly."""
    return torch.linalg.vector_norm(queries[:, None, :] - bank[indices], dim=-1)


def faiss_index(bank: torch.Tensor) -> Any:
    """faiss's exact L2 index over ``bank`` (N, D), searching on as many threads as torch uses."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError("knn_backend='faiss' needs faiss-cpu: pip install 'anomalyzoo[faiss]'") from error
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.detach().float().cpu().contiguous().numpy())
    return index
