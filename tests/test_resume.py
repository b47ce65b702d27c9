"""Resuming: a run stopped after 2 of 4 epochs and resumed ends exactly where an uninterrupted
4-epoch run under the same seed ends (weights, optimiser state, shuffle order, RNG)."""

from __future__ import annotations

import torch

from anomalyzoo import train
from anomalyzoo.models.components.trainer import BaseTrainer, read_checkpoint

TINY = dict(backbone="resnet18", pretrained=False, img_size=64, batch_size=8, num_epochs=4, progress=False)


class StopAfterTwoEpochs(Exception):
    pass


def test_resume_continues_a_stopped_run_with_the_result_of_an_uninterrupted_one(synthetic_dataset_dir, tmp_path, monkeypatch):
    uninterrupted = train("mvtec", "synthetic_texture", "stfpm", dataset_dir=synthetic_dataset_dir,
                          output_dir=tmp_path / "whole", **TINY)

    original_hook = BaseTrainer.on_epoch_end

    def stop_after_two(self, epoch, record):
        original_hook(self, epoch, record)
        if self.epoch == 2:
            raise StopAfterTwoEpochs

    monkeypatch.setattr(BaseTrainer, "on_epoch_end", stop_after_two)
    try:
        train("mvtec", "synthetic_texture", "stfpm", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path / "split", **TINY)
    except StopAfterTwoEpochs:
        pass
    else:
        raise AssertionError("the first half of the run was expected to stop after epoch 2")
    monkeypatch.setattr(BaseTrainer, "on_epoch_end", original_hook)
    # the stopped run left a checkpoint after epoch 1 only (last.pth is written after the hook)
    stopped = read_checkpoint(tmp_path / "split" / "mvtec" / "synthetic_texture" / "stfpm" / "checkpoints" / "last.pth")
    assert stopped["epoch"] == 1

    resumed = train("mvtec", "synthetic_texture", "stfpm", dataset_dir=synthetic_dataset_dir,
                    output_dir=tmp_path / "split", resume=True, **TINY)
    assert resumed["output_dir"] == str(tmp_path / "split" / "mvtec" / "synthetic_texture" / "stfpm")
    assert resumed["num_epochs"] == uninterrupted["num_epochs"] == 4

    whole_state = read_checkpoint(uninterrupted["checkpoint"])
    resumed_state = read_checkpoint(resumed["checkpoint"])
    assert [round(r["loss"], 6) for r in whole_state["history"]] == [round(r["loss"], 6) for r in resumed_state["history"]]
    for key, value in whole_state["model_state"].items():
        assert torch.equal(value, resumed_state["model_state"][key]), key
    assert resumed["image_auroc"] == uninterrupted["image_auroc"]
    assert resumed["pixel_auroc"] == uninterrupted["pixel_auroc"]


def test_resume_without_a_checkpoint_is_a_clear_error(synthetic_dataset_dir, tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="Nothing to resume"):
        train("mvtec", "synthetic_texture", "stfpm", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, resume=True, **TINY)
