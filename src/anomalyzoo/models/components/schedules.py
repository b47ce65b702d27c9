"""Learning-rate schedules as multiplicative factors of the optimiser's base rate, for
``torch.optim.lr_scheduler.LambdaLR`` stepped once per optimisation step
(``scheduler_interval = "step"`` on the trainer)."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, total_steps: int, final_factor: float = 0.0,
                  initial_factor: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up from ``initial_factor`` to 1 over ``warmup_steps``, then a cosine decay to
    ``final_factor`` at ``total_steps`` (held there after). The schedule of Dinomaly and of most
    ViT training (timm's ``CosineLRScheduler`` with warm-up)."""
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got {warmup_steps}, {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return initial_factor + (1.0 - initial_factor) * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def step_drop(drop_at_step: float, factor: float = 0.1) -> Callable[[int], float]:
    """1 before ``drop_at_step``, ``factor`` from it on (EfficientAD: x0.1 after 95 % of the steps)."""
    return lambda step: factor if step >= drop_at_step else 1.0
