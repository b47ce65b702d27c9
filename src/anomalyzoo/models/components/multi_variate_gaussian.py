"""Per-position multivariate Gaussian (PaDiM, arXiv 2011.08785, sec. 3.2, eq. 1-2)."""

from __future__ import annotations

import torch
from torch import nn


class MultiVariateGaussian(nn.Module):
    """Mean (D, P) and inverse covariance (P, D, D) for P patch positions.

    The covariance is regularised with ``epsilon * I`` (eq. 1, epsilon = 0.01 in the paper) so it
    is invertible even with fewer training images than dimensions.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inv_covariance", torch.empty(0))

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, epsilon: float = 0.01, chunk_positions: int = 512) -> None:
        """``embeddings`` (N, D, P): N training images, D channels, P positions."""
        num_images, dims, positions = embeddings.shape
        if num_images < 2:
            raise ValueError("PaDiM needs at least 2 training images to estimate a covariance")
        mean = embeddings.mean(dim=0)
        identity = torch.eye(dims, dtype=embeddings.dtype, device=embeddings.device)
        inverses = []
        for start in range(0, positions, chunk_positions):
            centred = embeddings[:, :, start:start + chunk_positions] - mean[None, :, start:start + chunk_positions]
            covariance = torch.einsum("ndp,nep->pde", centred, centred) / (num_images - 1)
            inverses.append(torch.linalg.inv(covariance + epsilon * identity))
        self.mean = mean
        self.inv_covariance = torch.cat(inverses)

    def mahalanobis(self, embedding: torch.Tensor, chunk_positions: int = 1024) -> torch.Tensor:
        """(B, D, P) -> (B, P) Mahalanobis distances (eq. 2)."""
        distances = []
        for start in range(0, embedding.shape[2], chunk_positions):
            stop = start + chunk_positions
            delta = embedding[:, :, start:stop] - self.mean[None, :, start:stop]
            squared = torch.einsum("bdp,pde,bep->bp", delta, self.inv_covariance[start:stop], delta)
            distances.append(squared.clamp_min(0).sqrt())
        return torch.cat(distances, dim=1)
