"""The focal loss of the DRAEM and DSR authors' ``loss.py`` (``FocalLoss()``, copied there from
Hsuxu/Loss_ToolBox-PyTorch; Lin et al., "Focal Loss for Dense Object Detection", 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_GAMMA = 2.0  # loss.py FocalLoss(gamma=2)
FOCAL_SMOOTH = 1e-5  # loss.py FocalLoss(smooth=1e-5)


def focal_loss(probabilities: torch.Tensor, masks: torch.Tensor, gamma: float = FOCAL_GAMMA,
               smooth: float = FOCAL_SMOOTH) -> torch.Tensor:
    """The authors' ``FocalLoss()`` on softmax ``probabilities`` (B, C, H, W) and a {0, 1} mask
    (B, 1, H, W): mean over pixels of ``-(1 - p_t)^gamma log p_t`` with
    ``p_t = <clamp(one_hot, smooth / (C - 1), 1 - smooth), p> + smooth`` (alpha 1 for every class)."""
    num_classes = probabilities.shape[1]
    target = F.one_hot(masks[:, 0].long(), num_classes).permute(0, 3, 1, 2).to(probabilities.dtype)
    target = target.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    p_t = (target * probabilities).sum(dim=1) + smooth
    return (-(1 - p_t) ** gamma * p_t.log()).mean()
