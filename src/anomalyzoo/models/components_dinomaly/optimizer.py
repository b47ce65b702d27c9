"""Dinomaly's optimiser and schedule (arXiv 2405.14325, implementation details; authors'
``optimizers/StableAdamW.py`` and ``utils.py`` ``WarmCosineScheduler``).

- :class:`StableAdamW` (Wortsman et al. 2023): AdamW with decoupled weight decay
  (``p <- p (1 - lr wd)``) whose step is divided by ``max(1, RMS(g / denom) / clip_threshold)``,
  an update clipping per tensor; AMSGrad optional. Written after the authors' file, which
  differs from torch's AdamW only by that clipping. Their scripts: lr 2e-3, betas (0.9, 0.999),
  weight decay 1e-4, ``amsgrad=True``, eps 1e-10 in the multi-class scripts (1e-8 in the
  class-separated ones), clip threshold 1.
- :class:`WarmCosineSchedule`: per step, linear warm-up from 0 to the base lr over the first
  ``warmup_steps``, then cosine from the base lr to the final lr (2e-3 -> 2e-4) over the rest;
  the final lr after ``total_steps``. The authors' numpy schedule, in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class StableAdamW(Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, clip_threshold: float = 1.0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "amsgrad": amsgrad, "clip_threshold": clip_threshold}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                if grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                parameter.mul_(1.0 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                state = self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(parameter)
                    state["exp_avg_sq"] = torch.zeros_like(parameter)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(parameter)
                state["step"] += 1
                bias_correction1 = 1.0 - beta1 ** state["step"]
                bias_correction2 = 1.0 - beta2 ** state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                second_moment = exp_avg_sq
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second_moment = state["max_exp_avg_sq"]
                denom = (second_moment.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                update_rms = float((grad / denom).norm(2)) / math.sqrt(grad.numel())
                clip = max(1.0, update_rms / group["clip_threshold"])
                parameter.addcdiv_(exp_avg, denom, value=-group["lr"] / bias_correction1 / clip)
        return loss


def warm_cosine_lr(step: int, base_lr: float, final_lr: float, total_steps: int, warmup_steps: int) -> float:
    """The learning rate at ``step`` (0-based), as the authors' ``WarmCosineScheduler`` tabulates it:
    ``linspace(0, base, warmup)`` then ``final + (base - final) (1 + cos(pi i / n)) / 2`` for
    ``i < n = total - warmup``; ``final`` from ``total_steps`` on."""
    if step >= total_steps:
        return final_lr
    if step < warmup_steps:
        return base_lr * step / (warmup_steps - 1) if warmup_steps > 1 else 0.0
    cosine_steps = total_steps - warmup_steps
    progress = (step - warmup_steps) / cosine_steps
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


class WarmCosineSchedule(LRScheduler):
    """Sets every group's lr to :func:`warm_cosine_lr` of the step count (step per optimisation step)."""

    def __init__(self, optimizer: Optimizer, base_lr: float, final_lr: float, total_steps: int, warmup_steps: int = 0,
                 last_epoch: int = -1) -> None:
        self.base_lr, self.final_lr = base_lr, final_lr
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        value = warm_cosine_lr(self.last_epoch, self.base_lr, self.final_lr, self.total_steps, self.warmup_steps)
        return [value for _ in self.optimizer.param_groups]
