"""Gaussian kernel density estimation in torch (the density model of DFKDE, anomalib).

It reproduces ``scipy.stats.gaussian_kde`` with its default Scott bandwidth: the kernel is a
Gaussian whose covariance is the data covariance (unbiased, ``ddof = 1``) times ``factor ** 2``
with ``factor = n ** (-1 / (d + 4))`` (Scott, 1992). Instead of the kernel covariance we keep
the Cholesky factor ``L`` of its inverse (``L L^T = (factor^2 C)^-1``): the whitened training
points ``x_i L`` then make every kernel an isotropic unit Gaussian, and

    log p(y) = logsumexp_i(-||y L - x_i L||^2 / 2) - log n + log|det L| - d/2 log(2 pi).

Working in log space with ``logsumexp`` keeps far-away test points finite (anomalib adds 1e-300
to the density before taking the log instead).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def logsumexp(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum exp`` along ``dim``, as ``max + log sum exp(values - max)`` (what torch.logsumexp
    computes), written out because OpenVINO mis-reads ONNX's ReduceLogSumExp (it drops the kept axis)."""
    peak = values.amax(dim=dim, keepdim=True)
    return (peak + torch.log(torch.exp(values - peak).sum(dim=dim, keepdim=True))).squeeze(dim)


def scott_factor(num_points: int, dims: int) -> float:
    """Scott's rule, as ``scipy.stats.gaussian_kde.scotts_factor`` for unweighted data."""
    return num_points ** (-1.0 / (dims + 4))


class GaussianKDE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("whitening", torch.empty(0))  # L (d, d): x L whitens the kernel
        self.register_buffer("dataset", torch.empty(0))  # (n, d) training points, already whitened
        self.register_buffer("log_norm", torch.empty(0))  # log|det L| - d/2 log(2 pi) - log n

    @property
    def is_fitted(self) -> bool:
        return self.dataset.numel() > 0

    @torch.no_grad()
    def fit(self, points: torch.Tensor) -> "GaussianKDE":
        """``points`` (n, d) with n > d, so that their covariance is invertible."""
        num_points, dims = points.shape
        if num_points <= dims:
            raise ValueError(f"A Gaussian KDE in {dims} dimensions needs more than {dims} points, got {num_points}")
        data = points.double()
        covariance = torch.cov(data.T, correction=1).reshape(dims, dims)
        kernel_covariance = covariance * scott_factor(num_points, dims) ** 2
        try:
            whitening = torch.linalg.cholesky(torch.linalg.inv(kernel_covariance))
        except torch.linalg.LinAlgError as error:
            raise ValueError("The KDE's training points are degenerate (singular covariance); "
                             "use fewer dimensions or more training images") from error
        log_norm = torch.log(torch.diagonal(whitening)).sum() - 0.5 * dims * math.log(2 * math.pi) - math.log(num_points)
        self.whitening = whitening.to(points.dtype)
        self.dataset = (data @ whitening).to(points.dtype)
        self.log_norm = log_norm.to(points.dtype).reshape(1)
        return self

    def log_density(self, points: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
        """(m, d) -> (m,) log of the estimated density at each point (``gaussian_kde.logpdf``)."""
        if not self.is_fitted:
            raise RuntimeError("GaussianKDE is not fitted yet")
        whitened = points.to(self.whitening.dtype) @ self.whitening
        # chunk over the training points: the (m, n) distance matrix of 40,000 points stays small
        partial = []
        for start in range(0, self.dataset.shape[0], chunk_size):
            squared = torch.cdist(whitened, self.dataset[start:start + chunk_size],
                                  compute_mode="donot_use_mm_for_euclid_dist").square()
            partial.append(logsumexp(-0.5 * squared, dim=1))
        return logsumexp(torch.stack(partial, dim=1), dim=1) + self.log_norm

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """The density itself, ``exp(log_density)``."""
        return self.log_density(points).exp()
