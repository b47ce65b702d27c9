"""The training loop's features: num_steps, step-interval schedulers, warm-up, gradient clipping."""

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anomalyzoo.models.components.schedules import step_drop, warmup_cosine
from anomalyzoo.models.components.trainer import BaseTrainer


class TinyModel(nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        score = self.linear(images.flatten(1)[:, :3]).squeeze(1)
        return {"pred_score": score}


class TinyTrainer(BaseTrainer):
    model_class = TinyModel
    scheduler_interval = "step"

    def __init__(self, *, warmup_steps: int = 2, train_config: Any = None, device: Any = None, **model_options: Any) -> None:
        self.warmup_steps = warmup_steps
        self.learning_rates: list[float] = []
        super().__init__(train_config, device, **model_options)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.warmup_steps, self.total_steps))

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.learning_rates.append(self.optimizer.param_groups[0]["lr"] if self.optimizer else float("nan"))
        return {"loss": 1000.0 * self.model(batch["image"])["pred_score"].pow(2).mean()}


def batches(count: int) -> DataLoader:
    data = [{"image": torch.full((3, 2, 2), float(i + 1)), "label": 0, "path": f"{i}.png"} for i in range(count)]
    return DataLoader(data, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_warmup_cosine_factors():
    schedule = warmup_cosine(warmup_steps=4, total_steps=12, final_factor=0.1)
    assert [schedule(s) for s in range(5)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert schedule(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(12) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)
    assert step_drop(95)(94) == 1.0 and step_drop(95)(95) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        warmup_cosine(5, 3)


def test_num_steps_stops_mid_epoch_and_a_step_scheduler_steps_per_batch():
    trainer = TinyTrainer(train_config={"num_steps": 7, "progress": False, "batch_size": 1}, device="cpu")
    trainer.fit(batches(3))
    assert trainer.global_step == 7 and trainer.epoch == 3  # ceil(7 / 3) epochs, the last one cut short
    assert trainer.total_steps == 7
    expected = [warmup_cosine(2, 7)(step) for step in range(7)]
    assert trainer.learning_rates == pytest.approx(expected)  # the lr of each step follows the schedule per step


def test_gradient_clipping_bounds_the_step():
    unclipped = TinyTrainer(train_config={"num_steps": 3, "progress": False, "batch_size": 1}, device="cpu", warmup_steps=0)
    clipped = TinyTrainer(train_config={"num_steps": 3, "progress": False, "batch_size": 1, "gradient_clip_norm": 0.01},
                          device="cpu", warmup_steps=0)
    clipped.model.load_state_dict(unclipped.model.state_dict())
    start = [p.detach().clone() for p in clipped.model.parameters()]
    clipped.total_steps = unclipped.total_steps = 3
    batch = {"image": torch.full((1, 3, 2, 2), 5.0)}
    for trainer in (clipped, unclipped):
        trainer.optimize(trainer.training_loss(batch)["loss"])
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(clipped.model.parameters(), start)]).norm()
    moved_unclipped = torch.cat([(p.detach() - s).flatten() for p, s in zip(unclipped.model.parameters(), start)]).norm()
    assert float(moved) == pytest.approx(0.01, rel=1e-4)  # lr 1 x gradient of norm 0.01
    assert float(moved_unclipped) > 1.0


def test_optimizers_are_built_when_fitting_starts():
    trainer = TinyTrainer(train_config={"num_steps": 2, "progress": False, "batch_size": 1}, device="cpu")
    assert trainer.optimizer is None and trainer.scheduler is None
    trainer.fit(batches(2))
    assert trainer.optimizer is not None and trainer.total_steps == 2
