import pytest
import torch
import torch.nn.functional as F

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import auroc
from anomalyzoo.models.cfa import (
    CfaTrainer,
    coordinate_channels,
    hypersphere_losses,
    kmeans,
    soft_min_scores,
)
from anomalyzoo.models.components.trainer import read_checkpoint
from anomalyzoo.predict import load_trainer


# ----------------------------------------------------------------------------- equations, against the authors' code
def authors_add_coords(features: torch.Tensor) -> torch.Tensor:
    """utils/coordconv.py AddCoords(rank=2, with_r=False), transcribed."""
    batch, _, dim_y, dim_x = features.shape
    xx_ones = torch.ones([1, 1, 1, dim_x], dtype=torch.int32)
    yy_ones = torch.ones([1, 1, 1, dim_y], dtype=torch.int32)
    xx_range = torch.arange(dim_y, dtype=torch.int32)[None, None, :, None]
    yy_range = torch.arange(dim_x, dtype=torch.int32)[None, None, :, None]
    xx_channel = torch.matmul(xx_range, xx_ones)
    yy_channel = torch.matmul(yy_range, yy_ones).permute(0, 1, 3, 2)
    xx_channel = xx_channel.float() / (dim_y - 1) * 2 - 1
    yy_channel = yy_channel.float() / (dim_x - 1) * 2 - 1
    return torch.cat([features, xx_channel.repeat(batch, 1, 1, 1), yy_channel.repeat(batch, 1, 1, 1)], dim=1)


def authors_soft_boundary(phi_p: torch.Tensor, memory_t: torch.Tensor, radius: torch.Tensor, K: int = 3, J: int = 3,
                          alpha: float = 0.1, nu: float = 1e-3) -> torch.Tensor:
    """utils/cfa.py DSVDD._soft_boundary, transcribed: phi_p (B, hw, C), C stored as (C, M)."""
    features = torch.sum(torch.pow(phi_p, 2), 2, keepdim=True)
    centers = torch.sum(torch.pow(memory_t, 2), 0, keepdim=True)
    f_c = 2 * torch.matmul(phi_p, memory_t)
    dist = features + centers - f_c
    dist = dist.topk(K + J, largest=False).values
    score = dist[:, :, :K] - radius ** 2
    l_att = (1 / nu) * torch.mean(torch.max(torch.zeros_like(score), score))
    score = radius ** 2 - dist[:, :, J:]
    l_rep = (1 / nu) * torch.mean(torch.max(torch.zeros_like(score), score - alpha))
    return l_att + l_rep


def authors_score(phi_p: torch.Tensor, memory_t: torch.Tensor, K: int = 3) -> torch.Tensor:
    """utils/cfa.py DSVDD.forward's score, transcribed: (B, hw)."""
    features = torch.sum(torch.pow(phi_p, 2), 2, keepdim=True)
    centers = torch.sum(torch.pow(memory_t, 2), 0, keepdim=True)
    dist = torch.sqrt(features + centers - 2 * torch.matmul(phi_p, memory_t))
    dist = dist.topk(K, largest=False).values
    return F.softmin(dist, dim=-1)[:, :, 0] * dist[:, :, 0]


def test_coordinate_channels_are_the_authors_row_and_column_channels():
    features = torch.randn(2, 4, 5, 7)
    ours = coordinate_channels(features)
    torch.testing.assert_close(ours, authors_add_coords(features))
    assert ours[0, 4, :, 0].tolist() == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])  # rows first


def test_hypersphere_loss_and_its_gradients_equal_the_authors_full_distance_matrix():
    generator = torch.Generator().manual_seed(0)
    memory = torch.randn(40, 6, generator=generator).double()
    # patches near the memory, so that some distances fall inside the spheres and some outside
    patches = (memory[torch.randint(0, 40, (2 * 30,), generator=generator)] + 0.3 * torch.randn(60, 6, generator=generator, dtype=torch.float64))
    for radius_value in (1e-5, 1.0):
        ours_patches = patches.clone().requires_grad_(True)
        ours_radius = torch.tensor([radius_value], dtype=torch.float64, requires_grad=True)
        ours = hypersphere_losses(ours_patches, memory, ours_radius)
        ours["loss"].backward()
        ref_patches = patches.clone().requires_grad_(True)
        ref_radius = torch.tensor([radius_value], dtype=torch.float64, requires_grad=True)
        reference = authors_soft_boundary(ref_patches.view(2, 30, 6), memory.T, ref_radius)
        reference.backward()
        assert float(ours["loss"].detach()) == pytest.approx(float(reference.detach()), rel=1e-9)
        assert float(ours["loss"].detach()) > 0
        torch.testing.assert_close(ours_patches.grad, ref_patches.grad)
        torch.testing.assert_close(ours_radius.grad, ref_radius.grad)


def test_hypersphere_loss_hand_computed_case():
    """One patch at the origin, memory at squared distances 0.01, 0.04, 0.09 (attract) and 0.16,
    0.25, 0.36 (repel) with r^2 = 0.05 and alpha = 0.1: L_att = (0 + 0 + 0.04)/3 / nu,
    L_rep = mean(relu(0.05 - d - 0.1)) = 0."""
    memory = torch.tensor([[0.1], [0.2], [0.3], [0.4], [0.5], [0.6]]).double()
    radius = torch.tensor([0.05 ** 0.5]).double()
    losses = hypersphere_losses(torch.zeros(1, 1).double(), memory, radius)
    assert float(losses["loss_att"]) == pytest.approx(0.04 / 3 / 1e-3)
    assert float(losses["loss_rep"]) == 0.0
    # a radius larger than the hard negatives' distances makes them repel: r^2 = 1 ->
    # mean(1 - [0.16, 0.25, 0.36] - 0.1) / nu
    losses = hypersphere_losses(torch.zeros(1, 1).double(), memory, torch.tensor([1.0]).double())
    assert float(losses["loss_rep"]) == pytest.approx((0.74 + 0.65 + 0.54) / 3 / 1e-3)


def test_soft_min_score_is_the_authors():
    generator = torch.Generator().manual_seed(1)
    memory, patches = torch.randn(50, 8, generator=generator).double(), torch.randn(2, 20, 8, generator=generator).double()
    ours = soft_min_scores(patches.reshape(-1, 8), memory).view(2, 20)
    torch.testing.assert_close(ours, authors_score(patches, memory.T))


def test_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(2)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(30, 2, generator=generator) for c in centres])
    found = kmeans(points, 3, seed=0)
    distances = torch.cdist(centres, found)
    assert distances.min(dim=1).values.max() < 0.1


# ----------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(3, 3, 64, 64, generator=generator), torch.randn(2, 3, 64, 64, generator=generator)]


def test_memory_bank_is_the_mean_target_feature_per_position(batches):
    torch.manual_seed(0)
    model = CfaTrainer(backbone="resnet18", pretrained=False, train_config={"img_size": 64}, device="cpu").model.eval()
    memory = model.build_memory_bank(iter(batches))
    with torch.no_grad():
        features = model.target_features(torch.cat(batches))  # (5, C, 16, 16)
        pooled = [F.avg_pool2d(f, 3, 1, 1) for f in model.feature_extractor(torch.cat(batches)).values()]
        concatenated = torch.cat([pooled[0]] + [F.interpolate(p, size=(16, 16), mode="bilinear", align_corners=False)
                                                for p in pooled[1:]], dim=1)
    assert memory.shape == (16 * 16, 64 + 128 + 256)  # resnet18 layer1-3, gamma_d = 1
    torch.testing.assert_close(memory, features.mean(dim=0).permute(1, 2, 0).reshape(256, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features, model.descriptor(concatenated))  # pooled, then upsampled

    compressed = CfaTrainer(backbone="resnet18", pretrained=False, gamma_c=4, gamma_d=2, train_config={"img_size": 64},
                            device="cpu").model.eval()
    assert compressed.build_memory_bank(iter(batches)).shape == (16 * 16 // 4, (64 + 128 + 256) // 2)


def test_scores_maps_and_a_training_step(batches):
    torch.manual_seed(0)
    trainer = CfaTrainer(backbone="resnet18", pretrained=False, train_config={"img_size": 64}, device="cpu")
    model = trainer.model
    with pytest.raises(RuntimeError, match="no memory bank"):
        model(batches[0])
    model.eval()
    model.build_memory_bank(iter(batches))
    with torch.no_grad():
        output = model(batches[0])
        features = model.target_features(batches[0])
        scores = soft_min_scores(model.flatten(features), model.memory_bank).view(3, 1, 16, 16)
    expected = model.blur(F.interpolate(scores, size=(64, 64), mode="bilinear", align_corners=False))[:, 0]
    torch.testing.assert_close(output["anomaly_map"], expected)
    torch.testing.assert_close(output["pred_score"], expected.amax(dim=(-2, -1)))

    memory_before, radius_before = model.memory_bank.clone(), model.radius.detach().clone()
    descriptor_before = model.descriptor.conv.weight.detach().clone()
    model.train()
    logs = trainer.train_step({"image": batches[0]})
    assert logs["loss"] > 0
    assert torch.equal(model.memory_bank, memory_before)  # the memory is fixed after its construction
    assert not torch.equal(model.descriptor.conv.weight, descriptor_before)
    assert not torch.equal(model.radius.detach(), radius_before)  # r is learnt (authors: nn.Parameter)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.descriptor.parameters()} | {id(model.radius)}


# ----------------------------------------------------------------------------- end to end
def test_cfa_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_texture", "cfa", num_epochs=2, batch_size=4, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, backbone="efficientnet_lite0",
                   max_maps=1, progress=False)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds")})
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
    trainer = load_trainer(result["checkpoint"], device="cpu")  # memory bank and radius come from the file
    assert trainer.model.has_memory_bank
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=4, dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
    normal, defective = predictions.scores[predictions.labels == 0], predictions.scores[predictions.labels == 1]
    assert defective.mean() > normal.mean()


class StopAfterTwoEpochs(Exception):
    pass


def test_a_resumed_run_keeps_its_memory_bank_and_ends_like_an_uninterrupted_one(synthetic_dataset_dir, tmp_path, monkeypatch):
    """Stopped after epoch 1's checkpoint and resumed: the memory bank comes from the checkpoint
    (it is not rebuilt with the trained descriptor) and the run ends where an uninterrupted one does."""
    tiny = dict(backbone="resnet18", pretrained=False, img_size=64, batch_size=8, num_epochs=2, progress=False, max_maps=0)
    whole = train("mvtec", "synthetic_texture", "cfa", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path / "whole", **tiny)
    original_hook = CfaTrainer.on_epoch_end

    def stop_after_two(self, epoch, record):
        original_hook(self, epoch, record)
        if self.epoch == 2:
            raise StopAfterTwoEpochs

    monkeypatch.setattr(CfaTrainer, "on_epoch_end", stop_after_two)
    with pytest.raises(StopAfterTwoEpochs):
        train("mvtec", "synthetic_texture", "cfa", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path / "split", **tiny)
    monkeypatch.setattr(CfaTrainer, "on_epoch_end", original_hook)
    built = []
    monkeypatch.setattr(CfaTrainer, "on_train_start", lambda self: built.append(self.model.has_memory_bank))
    resumed = train("mvtec", "synthetic_texture", "cfa", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path / "split",
                    resume=True, **tiny)
    assert built == [True]  # epoch 2 started with the checkpoint's memory bank
    assert resumed["image_auroc"] == whole["image_auroc"] and resumed["pixel_auroc"] == whole["pixel_auroc"]
    whole_state = read_checkpoint(whole["checkpoint"])["model_state"]
    resumed_state = read_checkpoint(resumed["checkpoint"])["model_state"]
    assert all(torch.equal(value, resumed_state[key]) for key, value in whole_state.items())
