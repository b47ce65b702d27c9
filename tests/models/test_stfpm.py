import pytest
import torch
import torch.nn.functional as F

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import auroc
from anomalyzoo.models.components.trainer import read_checkpoint
from anomalyzoo.models.stfpm import StfpmTrainer, normalized_squared_distance, stfpm_loss
from anomalyzoo.predict import load_trainer


def direct_stfpm_loss(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> float:
    """The authors' loss written out position by position: per layer, the mean over images and
    positions of ||t_hat - s_hat||^2; summed over layers."""
    total = 0.0
    for layer in teacher:
        t, s = teacher[layer].double(), student[layer].double()
        batch, _, height, width = t.shape
        layer_sum = 0.0
        for b in range(batch):
            for i in range(height):
                for j in range(width):
                    t_hat = t[b, :, i, j] / t[b, :, i, j].norm()
                    s_hat = s[b, :, i, j] / s[b, :, i, j].norm()
                    layer_sum += float(((t_hat - s_hat) ** 2).sum())
        total += layer_sum / (batch * height * width)
    return total


def random_pyramid(seed: int, batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"layer1": torch.randn(batch, 5, 6, 6, generator=generator), "layer2": torch.randn(batch, 7, 3, 3, generator=generator)}


def test_loss_of_identical_or_rescaled_features_is_zero():
    teacher = random_pyramid(0)
    assert float(stfpm_loss(teacher, teacher)) == 0.0
    # the features are L2-normalised per position, so a positive per-position scale changes nothing
    scale = torch.rand(2, 1, 6, 6) + 0.5
    rescaled = {"layer1": teacher["layer1"] * scale, "layer2": teacher["layer2"] * 3.0}
    assert float(stfpm_loss(teacher, rescaled)) == pytest.approx(0.0, abs=1e-6)


def test_loss_is_the_authors_form_a_mean_over_images_and_positions():
    teacher, student = random_pyramid(1), random_pyramid(2)
    assert float(stfpm_loss(teacher, student)) == pytest.approx(direct_stfpm_loss(teacher, student), rel=1e-5)
    # ||t_hat - s_hat||^2 == 2 (1 - cos(t, s))
    expected = 2 * (1 - F.cosine_similarity(teacher["layer1"], student["layer1"], dim=1))
    assert torch.allclose(normalized_squared_distance(teacher["layer1"], student["layer1"]), expected, atol=1e-6)
    # a mean over the batch: four copies of the same two images give the same loss (a sum would give 4x)
    repeated_t = {k: v.repeat(4, 1, 1, 1) for k, v in teacher.items()}
    repeated_s = {k: v.repeat(4, 1, 1, 1) for k, v in student.items()}
    assert float(stfpm_loss(repeated_t, repeated_s)) == pytest.approx(float(stfpm_loss(teacher, student)), rel=1e-6)


@pytest.fixture(scope="module")
def untrained_trainer() -> StfpmTrainer:
    return StfpmTrainer(backbone="efficientnet_lite0", pretrained=False, train_config={"img_size": 64, "batch_size": 2}, device="cpu")


def test_anomaly_map_is_the_product_of_layer_distances_on_the_first_grid(untrained_trainer):
    """Authors' test(): per layer ||t_hat - s_hat||^2 resized to layer1's grid, multiplied, then
    resized to the image; the image score is the map's maximum."""
    model = untrained_trainer.model.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = model(images)
        teacher, student = model.features(images)
    grid = teacher["layer1"].shape[-2:]
    product = torch.ones(2, 1, *grid)
    for layer in ("layer1", "layer2", "layer3"):
        distance = ((F.normalize(teacher[layer], dim=1) - F.normalize(student[layer], dim=1)) ** 2).sum(1, keepdim=True)
        product = product * F.interpolate(distance, size=grid, mode="bilinear", align_corners=False)
    expected = F.interpolate(product, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert output["anomaly_map"].shape == (2, 64, 64)
    assert torch.allclose(output["anomaly_map"], expected, rtol=1e-4, atol=1e-7)
    assert torch.allclose(output["pred_score"], expected.amax(dim=(-2, -1)), rtol=1e-4)


def test_train_step_changes_the_student_and_never_the_teacher(untrained_trainer):
    trainer = untrained_trainer
    teacher_before = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    trainer.model.train()
    assert not trainer.model.teacher.feature_extractor.training  # teacher BatchNorm stays in eval mode
    assert trainer.model.student.feature_extractor.training
    assert all(not p.requires_grad for p in trainer.model.teacher.parameters())
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    logs = trainer.train_step({"image": images})
    assert logs["loss"] > 0
    teacher_after, student_after = trainer.model.teacher.state_dict(), trainer.model.student.state_dict()
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)  # weights and BN statistics
    changed = [k for k in student_before if not torch.equal(student_before[k], student_after[k])]
    assert any(k.endswith("weight") for k in changed)
    # only the student is optimised
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.model.student.parameters()}


def test_stfpm_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_texture", "stfpm", num_epochs=2, batch_size=2, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, backbone="efficientnet_lite0",
                   max_maps=1, progress=False)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds")})
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
    # the checkpoint holds the pretrained teacher: load_trainer rebuilds with random weights
    # (pretrained=False) and must still reproduce the scores
    state = read_checkpoint(result["checkpoint"])["model_state"]
    assert any(key.startswith("teacher.") for key in state) and any(key.startswith("student.") for key in state)
    trainer = load_trainer(result["checkpoint"], device="cpu")
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=4, dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
    normal, defective = predictions.scores[predictions.labels == 0], predictions.scores[predictions.labels == 1]
    assert defective.mean() > normal.mean()
