"""Loose reconstruction's loss (arXiv 2405.14325, sec. 3, "Loose Reconstruction"; authors' ``utils.py``
``global_cosine_hm_percent``, the loss their training scripts use).

For each group k of fused layers (two groups: the encoder's first and last four target
blocks against the decoder's), the *global* cosine distance between the whole feature maps of
an image, ``1 - cos(vec(f_E^k), vec(f_D^k))`` (one cosine per image: not point-by-point), averaged
over the batch and the groups. The encoder side is detached.

Hard mining: the gradient is what changes, never the value. Per group, the point-wise distances
``1 - cos(f_E(h, w), f_D(h, w))`` of the batch are ranked; the share ``p`` of the points that are
reconstructed best (distance below the ``1 - p`` quantile, i.e. all but the
``int(N * (1 - p))`` hardest) pass only ``factor`` (0.1) of their gradient back into the decoder.
The authors do this with a tensor hook; :class:`ScaleGradient` does the same without one.
``p`` rises linearly from 0 to ``P_FINAL`` 0.9 over the first 1000 of their 10,000 iterations
(``p = min(0.9 * it / 1000, 0.9)``), see :func:`hard_mining_share`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

P_FINAL = 0.9  # share of easy points whose gradient is damped (scripts: p_final = 0.9)
EASY_GRADIENT_FACTOR = 0.1  # their gradient factor (scripts: factor=0.1)
RAMP_FRACTION = 1000 / 10000  # p reaches P_FINAL after 1000 of the 10,000 iterations


class ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` (broadcast) on the way back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(scale)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def hard_mining_share(step: int, total_steps: int, p_final: float = P_FINAL, ramp_fraction: float = RAMP_FRACTION) -> float:
    """``p`` at optimisation step ``step`` (0-based): linear from 0 to ``p_final`` over the first
    ``ramp_fraction`` of ``total_steps``, then constant (the authors' 1000 of 10,000 iterations)."""
    ramp_steps = max(1.0, ramp_fraction * total_steps)
    return min(p_final * step / ramp_steps, p_final)


def easy_points(distance: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean mask of the points strictly below the k-th largest distance, k = int(N * (1 - p))."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"the hard-mining share p must be in [0, 1), got {p}")
    flat = distance.reshape(-1)
    hardest = max(1, int(flat.numel() * (1.0 - p)))
    threshold = torch.topk(flat, k=hardest).values[-1]
    return distance < threshold


def global_cosine_hard_mining_loss(
    encoder_features: Sequence[torch.Tensor],
    decoder_features: Sequence[torch.Tensor],
    p: float,
    factor: float = EASY_GRADIENT_FACTOR,
) -> torch.Tensor:
    """Mean over groups of the batch mean of 1 - cos(vec(f_E), vec(f_D)); the gradient of the
    easy share ``p`` of decoder points is multiplied by ``factor``. Features are (B, C, h, w)."""
    total = encoder_features[0].new_zeros(())
    for encoder, decoder in zip(encoder_features, decoder_features, strict=True):
        encoder = encoder.detach()
        with torch.no_grad():
            distance = 1.0 - F.cosine_similarity(encoder, decoder, dim=1)[:, None]  # (B, 1, h, w)
            easy = easy_points(distance, p)
            scale = torch.where(easy, torch.full_like(distance, factor), torch.ones_like(distance))
        decoder = ScaleGradient.apply(decoder, scale)
        total = total + (1.0 - F.cosine_similarity(encoder.flatten(1), decoder.flatten(1), dim=1)).mean()
    return total / len(encoder_features)
