"""The two layers Dinomaly adds to a plain ViT (arXiv 2405.14325, sec. 3).

- :class:`DinomalyMLP`, the *noisy bottleneck* ("Noisy Bottleneck"): an ordinary ViT MLP whose dropout
  (rate 0.2) is the only noise injected; dropout is applied to its input as well as after each
  layer (authors' ``models/vision_transformer.py``, ``bMlp``; both linear layers keep their bias
  as there; anomalib drops the biases, we follow the authors).
- :class:`LinearAttention` ("Linear Attention"): attention with the feature map phi(x) = elu(x) + 1
  instead of the softmax (Katharopoulos et al. 2020), which "naturally cannot focus" and so does
  not learn the identity mapping. Computed in O(N) as phi(Q) (phi(K)^T V) normalised by
  phi(Q) sum_s phi(K_s) (authors' ``LinearAttention2``, the one their training scripts use).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DinomalyMLP(nn.Module):
    """dropout -> fc1 -> GELU -> dropout -> fc2 -> dropout (authors' ``bMlp``)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.drop(self.act(self.fc1(self.drop(tokens))))
        return self.drop(self.fc2(hidden))


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1.0


def linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) each -> (B, heads, N, d):
    out_i = phi(q_i)^T (sum_s phi(k_s) v_s^T) / (phi(q_i)^T sum_s phi(k_s))."""
    query, key = elu_feature_map(query), elu_feature_map(key)
    key_value = torch.einsum("bhsd,bhse->bhde", key, value)  # sum_s phi(k_s) v_s^T
    normaliser = 1.0 / torch.einsum("bhsd,bhd->bhs", query, key.sum(dim=-2))
    return torch.einsum("bhde,bhsd,bhs->bhse", key_value, query, normaliser)


class LinearAttention(nn.Module):
    """Multi-head linear attention with the ViT's qkv and output projections."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = linear_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
