"""The "all-in-one" affine coupling block of FrEIA (Ardizzone et al., the INN library the CFlow,
FastFlow and U-Flow authors build on: ``FrEIA.modules.AllInOneBlock``), with the same maths and
parameter names, so that the flows here compute what the published numbers were computed with.

One block, in the forward direction (FrEIA's docstring and ``forward``):

1. affine coupling: split the channels into ``x1`` (the first ``C - C // 2``) and ``x2``; a
   subnetwork reads ``x1`` (and the condition, concatenated along the channels) and outputs
   ``a`` with ``2 * len(x2)`` channels; after ``a *= 0.1``, ``s = clamp * tanh(a_s)`` and
   ``x2' = x2 * exp(s) + a_t``;
2. global affine transformation ``x * scale + offset`` with a per-channel learned scale, kept
   positive by ``0.1 * softplus_{beta=0.5}`` (``SOFTPLUS``), ``10 * sigmoid(. - 2)``
   (``SIGMOID``) or ``exp`` (``EXP``), initialised so that ``scale == global_affine_init``;
3. a fixed channel permutation (a random permutation matrix, or with ``permute_soft`` a random
   rotation), applied as a 1x1 convolution.

``log_jac_det`` is the sum of ``s`` over channels and positions plus ``n_positions * sum(log
scale)``; the permutation is volume-preserving. Why write it rather than depend on FrEIA: it is
the one FrEIA part the flows use, 150 lines, and CS-Flow and U-Flow need graph pieces FrEIA's
block does not give anyway. Differences from FrEIA: permutations are drawn from torch's RNG
(seeded by the trainer) rather than numpy's global one, and stored as buffers; the
``gin_block`` and learned-Householder options are left out (no model here uses them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

SubnetConstructor = Callable[[int, int], nn.Module]
PERMUTE_FUNCTIONS = {0: F.linear, 1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def random_rotation(channels: int) -> torch.Tensor:
    """A Haar-random rotation (det +1), FrEIA's ``special_ortho_group.rvs`` for ``permute_soft``."""
    q, r = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


def random_permutation_matrix(channels: int) -> torch.Tensor:
    """``w[i, perm[i]] = 1`` for a random permutation, as FrEIA builds it."""
    matrix = torch.zeros(channels, channels)
    matrix[torch.arange(channels), torch.randperm(channels)] = 1.0
    return matrix


class AllInOneBlock(nn.Module):
    """Affine coupling, global affine scaling and a fixed (soft) permutation in one invertible block.

    ``forward(x, condition=None, reverse=False) -> (y, log_jac_det)``: ``x`` is ``(B, channels,
    *spatial)`` with any number of spatial dimensions (0 for vectors); ``log_jac_det`` is ``(B,)``.
    """

    def __init__(
        self,
        channels: int,
        subnet_constructor: SubnetConstructor,
        *,
        condition_channels: int = 0,
        affine_clamping: float = 2.0,
        global_affine_init: float = 1.0,
        global_affine_type: str = "SOFTPLUS",
        permute_soft: bool = False,
        reverse_permutation: bool = False,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"AllInOneBlock needs at least 2 channels to split, got {channels}")
        self.channels = channels
        self.condition_channels = condition_channels
        self.splits = [channels - channels // 2, channels // 2]
        self.clamp = affine_clamping
        self.reverse_pre_permute = reverse_permutation
        self.global_affine_type = global_affine_type
        if global_affine_type == "SIGMOID":
            initial = 2.0 - math.log(10.0 / global_affine_init - 1.0)
        elif global_affine_type == "SOFTPLUS":
            initial = 2.0 * math.log(math.exp(0.5 * 10.0 * global_affine_init) - 1.0)
        elif global_affine_type == "EXP":
            initial = math.log(global_affine_init)
        else:
            raise ValueError(f"global_affine_type must be SIGMOID, SOFTPLUS or EXP, got {global_affine_type!r}")
        # the rank of the input is only known at the first call: parameters are stored (1, C) and
        # viewed to (1, C, 1, ...) there
        self.global_scale = nn.Parameter(torch.full((1, channels), float(initial)))
        self.global_offset = nn.Parameter(torch.zeros(1, channels))
        permutation = random_rotation(channels) if permute_soft else random_permutation_matrix(channels)
        self.register_buffer("w_perm", permutation)
        self.register_buffer("w_perm_inv", permutation.T.contiguous())
        self.subnet = subnet_constructor(self.splits[0] + condition_channels, 2 * self.splits[1])

    def global_scale_activation(self) -> torch.Tensor:
        if self.global_affine_type == "SIGMOID":
            return 10.0 * torch.sigmoid(self.global_scale - 2.0)
        if self.global_affine_type == "SOFTPLUS":
            return 0.1 * F.softplus(self.global_scale, beta=0.5)
        return torch.exp(self.global_scale)

    def _permute(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        rank = x.dim() - 2
        return PERMUTE_FUNCTIONS[rank](x, matrix.view(self.channels, self.channels, *([1] * rank)))

    def _affine(self, x2: torch.Tensor, a: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Clamped affine coupling of ``x2`` from the subnet output ``a``; (result, log-det (B,))."""
        a = a * 0.1
        channels = x2.shape[1]
        log_scale = self.clamp * torch.tanh(a[:, :channels])
        sum_dims = tuple(range(1, x2.dim()))
        if not reverse:
            return x2 * torch.exp(log_scale) + a[:, channels:], log_scale.sum(dim=sum_dims)
        return (x2 - a[:, channels:]) * torch.exp(-log_scale), -log_scale.sum(dim=sum_dims)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] != self.channels:
            raise ValueError(f"AllInOneBlock built for {self.channels} channels got input {tuple(x.shape)}")
        spatial = [1] * (x.dim() - 2)
        scale = self.global_scale_activation().view(1, self.channels, *spatial)
        offset = self.global_offset.view(1, self.channels, *spatial)
        scale_log_det = torch.log(scale).sum()

        if reverse:
            x = (self._permute(x, self.w_perm_inv) - offset) / scale
        elif self.reverse_pre_permute:
            x = self._permute(x, self.w_perm_inv)

        x1, x2 = torch.split(x, self.splits, dim=1)
        subnet_input = x1 if condition is None else torch.cat([x1, condition], dim=1)
        x2, log_jac_det = self._affine(x2, self.subnet(subnet_input), reverse)
        y = torch.cat([x1, x2], dim=1)

        if not reverse:
            y = self._permute(y * scale + offset, self.w_perm)
        elif self.reverse_pre_permute:
            y = self._permute(y, self.w_perm)
        positions = y[0, :1].numel()  # FrEIA's count of the non-channel dimensions
        sign = -1.0 if reverse else 1.0
        return y, log_jac_det + sign * positions * scale_log_det


class SequenceINN(nn.Module):
    """A chain of invertible blocks sharing one condition (FrEIA's ``SequenceINN``)."""

    def __init__(self, blocks: Iterable[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_jac_det = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for block in (reversed(self.blocks) if reverse else self.blocks):
            x, block_log_det = block(x, condition, reverse=reverse)
            log_jac_det = log_jac_det + block_log_det
        return x, log_jac_det
