"""Principal component analysis in torch, with its state in buffers.

DFM (Ahuja et al., arXiv 1909.11786, sec. 3) reduces deep features with PCA before modelling
them, and DFKDE (anomalib) projects pooled features to 16 components before its kernel density
estimate. Both need the fitted projection to travel inside the model's ``state_dict``, so the
mean, components and singular values are buffers (empty until ``fit``; ``dynamic_buffer``
resizes them when a checkpoint is loaded).
"""

from __future__ import annotations

import torch
from torch import nn


class PCA(nn.Module):
    """``n_components``: an ``int`` keeps that many components; a ``float`` in (0, 1] keeps the
    fewest components whose cumulative explained variance reaches that fraction (like
    scikit-learn; DFM keeps 97 % of the variance)."""

    def __init__(self, n_components: int | float) -> None:
        super().__init__()
        if isinstance(n_components, bool) or not isinstance(n_components, (int, float)):
            raise TypeError(f"n_components must be an int or a float fraction, got {n_components!r}")
        if isinstance(n_components, float) and not 0.0 < n_components <= 1.0:
            raise ValueError(f"A variance fraction must be in (0, 1], got {n_components}")
        if isinstance(n_components, int) and n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        self.n_components = n_components
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("components", torch.empty(0))  # (D, k): one principal axis per column
        self.register_buffer("singular_values", torch.empty(0))  # (k,) of the centred training data

    @property
    def is_fitted(self) -> bool:
        return self.components.numel() > 0

    @property
    def num_components(self) -> int:
        return self.components.shape[1] if self.is_fitted else 0

    def choose_num_components(self, singular_values: torch.Tensor) -> int:
        """Resolve ``n_components`` against the spectrum of the training data."""
        available = singular_values.shape[0]
        if isinstance(self.n_components, int):
            if self.n_components > available:
                raise ValueError(f"PCA asked for {self.n_components} components, but the data (N x D) has only {available}")
            return self.n_components
        variance = singular_values.square()
        cumulative = torch.cumsum(variance, dim=0) / variance.sum()
        # fewest components whose cumulative ratio reaches the level (tolerance for float rounding)
        reached = torch.nonzero(cumulative >= self.n_components - 1e-12)
        return int(reached[0]) + 1 if reached.numel() else available

    @torch.no_grad()
    def fit(self, data: torch.Tensor) -> "PCA":
        """``data`` (N, D). The SVD runs in float64: features of deep layers span several orders of
        magnitude of variance and the variance fraction is read off the spectrum."""
        if data.ndim != 2 or data.shape[0] < 2:
            raise ValueError(f"PCA needs an (N, D) matrix with N >= 2, got shape {tuple(data.shape)}")
        mean = data.mean(dim=0)
        centred = (data - mean).double()
        _, singular_values, right_vectors = torch.linalg.svd(centred, full_matrices=False)
        k = self.choose_num_components(singular_values)
        components = right_vectors[:k].T  # (D, k)
        # a deterministic sign (largest-magnitude entry of each axis positive), as scikit-learn's
        # svd_flip, so refits on the same data give the same coefficients on every device
        largest = components.abs().argmax(dim=0)
        signs = torch.sign(components[largest, torch.arange(k, device=components.device)])
        signs[signs == 0] = 1.0
        self.mean = mean.to(data.dtype)
        self.components = (components * signs).to(data.dtype)
        self.singular_values = singular_values[:k].to(data.dtype)
        return self

    def transform(self, data: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, k) coefficients on the principal axes."""
        if not self.is_fitted:
            raise RuntimeError("PCA is not fitted yet")
        return (data - self.mean) @ self.components

    def inverse_transform(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(N, k) -> (N, D): the point of the principal subspace with these coefficients."""
        if not self.is_fitted:
            raise RuntimeError("PCA is not fitted yet")
        return coefficients @ self.components.T + self.mean

    def fit_transform(self, data: torch.Tensor) -> torch.Tensor:
        return self.fit(data).transform(data)

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        return self.transform(data)
