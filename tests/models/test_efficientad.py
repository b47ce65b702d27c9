import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalyzoo import train
from anomalyzoo.models.components.backbone import BackboneWeightsNotFound, get_backbone_path
from anomalyzoo.models.efficientad import (
    Autoencoder,
    EfficientAdModel,
    EfficientAdTrainer,
    PatchDescriptionNetwork,
    color_jitter,
    distill_teacher,
    hard_feature_loss,
    quantile,
)
from anomalyzoo.predict import load_trainer
from anomalyzoo.settings import set_globals


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These CPU tests run small convolutions: on a shared runner one intra-op thread is several
    times faster than two (no oversubscription); the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model_size", ["small", "medium"])
@pytest.mark.parametrize("img_size, unpadded", [(256, 56), (128, 24)])
def test_pdn_output_shapes(model_size, img_size, unpadded):
    """Tables 6/7 without padding: 256 px -> 56x56 (the paper's maps); with padding: input / 4.
    Shapes are propagated on the meta device, so no arithmetic is done."""
    with torch.device("meta"):
        images = torch.empty(2, 3, img_size, img_size)
        teacher = PatchDescriptionNetwork(model_size, 384, padding=False)
        student = PatchDescriptionNetwork(model_size, 768, padding=False)
        padded = PatchDescriptionNetwork(model_size, 384, padding=True)
        autoencoder = Autoencoder(384)
        assert teacher(images).shape == (2, 384, unpadded, unpadded)
        assert student(images).shape == (2, 768, unpadded, unpadded)
        assert padded(images).shape == (2, 384, img_size // 4, img_size // 4)
        assert autoencoder(images, (unpadded, unpadded)).shape == (2, 384, unpadded, unpadded)
    convs = [m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == (4 if model_size == "small" else 6)


def test_model_forward_returns_input_sized_maps():
    model = EfficientAdModel("small", pretrained=False).eval()
    with torch.no_grad():
        output = model(torch.rand(2, 3, 64, 64))
    assert output["pred_score"].shape == (2,)
    assert output["anomaly_map"].shape == (2, 64, 64)


def test_quantile_matches_torch_quantile():
    values = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.9, 0.995, 0.999, 1.0):
        assert torch.allclose(quantile(values, q), torch.quantile(values, q))


def test_hard_feature_loss_keeps_only_the_top_tenth_of_a_percent():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 16, 16, 16, generator=generator)  # 8192 differences
    student = torch.randn(2, 16, 16, 16, generator=generator, requires_grad=True)
    loss = hard_feature_loss(teacher, student)
    distance = ((teacher - student.detach()) ** 2).numpy().ravel()
    threshold = np.quantile(distance, 0.999)
    kept = distance >= threshold
    assert 1 <= kept.sum() <= int(np.ceil(0.001 * distance.size)) + 1
    assert loss.item() == pytest.approx(distance[kept].mean(), rel=1e-5)
    loss.backward()  # only the hard elements receive a gradient
    assert int((student.grad != 0).sum()) == kept.sum()


def test_map_normalisation_and_combination_follow_algorithm_1(monkeypatch):
    """0.5 * 0.1 (local - q_a) / (q_b - q_a) + 0.5 * 0.1 (global - q_a') / (q_b' - q_a'); the score
    is the map's max, the 4-cell border lost by the unpadded PDN comes back as zeros."""
    model = EfficientAdModel("small", pretrained=False).eval()
    model.quantiles.copy_(torch.tensor([1.0, 2.0, 3.0, 5.0]))
    local_map = torch.full((1, 1, 8, 8), 1.5)
    local_map[0, 0, 2, 3] = 4.0
    global_map = torch.full((1, 1, 8, 8), 3.0)
    monkeypatch.setattr(model, "raw_maps", lambda images: (local_map, global_map))
    output = model(torch.rand(1, 3, 64, 64))
    expected_peak = 0.5 * 0.1 * (4.0 - 1.0) / 1.0 + 0.5 * 0.1 * 0.0
    assert output["pred_score"].item() == pytest.approx(expected_peak)
    anomaly_map = output["anomaly_map"][0]
    assert anomaly_map.shape == (64, 64)
    assert anomaly_map[0, 0].item() == pytest.approx(0.0)  # padded border
    assert anomaly_map[32, 32].item() == pytest.approx(0.5 * 0.1 * 0.5)  # interior, normal cell


def test_color_jitter_applies_one_of_brightness_contrast_saturation():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 8, 8, generator=generator) * 0.5 + 0.25  # no clamping needed at factors <= 1.2
    augmented = color_jitter(images, torch.Generator().manual_seed(1))
    gray = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    for image, gray_image, result in zip(images, gray, augmented):
        explained = []
        for base in (torch.zeros_like(image), gray_image.mean().expand_as(image), gray_image.expand_as(image)):
            factor = ((result - base) * (image - base)).sum() / ((image - base) ** 2).sum()  # least squares
            if torch.allclose(factor * image + (1 - factor) * base, result, atol=1e-5):
                explained.append(float(factor))
        assert explained and 0.8 - 1e-5 <= explained[0] <= 1.2 + 1e-5


def test_missing_teacher_file_says_where_and_how(tmp_path):
    set_globals(backbone_dir=tmp_path)
    expected = get_backbone_path("efficientad_teacher_medium")
    with pytest.raises(BackboneWeightsNotFound) as error:
        EfficientAdTrainer(model_size="medium", device="cpu")
    assert isinstance(error.value, FileNotFoundError)
    assert str(expected) in str(error.value)
    assert "distill-teacher" in str(error.value)
    EfficientAdTrainer(model_size="medium", pretrained=False, device="cpu")  # random teacher, no file needed


@pytest.fixture(scope="module")
def teacher_dir(synthetic_dataset_dir, lite0_weights, tmp_path_factory):
    """A BACKBONE_DIR with a (briefly) distilled small teacher: EfficientNet-Lite0 layer2+3
    features of the synthetic training images, 32 px for the PDN (64 px for the backbone)."""
    root = tmp_path_factory.mktemp("backbones")
    distill_teacher(synthetic_dataset_dir / "mvtec" / "synthetic_texture" / "train", model_size="small",
                    backbone="efficientnet_lite0", output_path=root / "efficientad" / "pretrained_teacher_small.pth",
                    num_steps=5, batch_size=4, img_size=32, progress=False, device="cpu")
    return root


def test_distilled_teacher_is_what_the_trainer_loads(teacher_dir, synthetic_dataset_dir):
    set_globals(backbone_dir=teacher_dir)
    path = get_backbone_path("efficientad_teacher_small")
    assert path.is_file()
    with pytest.raises(FileExistsError):
        distill_teacher(synthetic_dataset_dir / "mvtec" / "synthetic_texture" / "train", backbone="efficientnet_lite0",
                        num_steps=1, progress=False)
    saved = torch.load(path, weights_only=True)
    trainer = EfficientAdTrainer(model_size="small", device="cpu")
    assert set(saved) == set(trainer.model.teacher.state_dict())
    for key, value in trainer.model.teacher.state_dict().items():
        assert torch.equal(value, saved[key])
    assert not any(p.requires_grad for p in trainer.model.teacher.parameters())
    with pytest.raises(ValueError, match="medium"):  # a small teacher is not a medium one
        path.with_name("pretrained_teacher_medium.pth").write_bytes(path.read_bytes())
        try:
            EfficientAdTrainer(model_size="medium", device="cpu")
        finally:
            path.with_name("pretrained_teacher_medium.pth").unlink()


def test_efficientad_end_to_end_on_synthetic_data(teacher_dir, synthetic_dataset_dir, tmp_path):
    """One epoch at 64 px (24 train images: 2 held out for the map quantiles)."""
    set_globals(backbone_dir=teacher_dir)
    result = train("mvtec", "synthetic_texture", "efficientad-small", num_epochs=1, batch_size=4, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, progress=False, max_maps=1)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "fit_seconds")})
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] is not None

    set_globals(backbone_dir=tmp_path / "no_backbones")  # the checkpoint carries the teacher
    trainer = load_trainer(result["checkpoint"], device="cpu")
    q_st_start, q_st_end, q_ae_start, q_ae_end = trainer.model.quantiles.tolist()
    assert q_st_end > q_st_start and q_ae_end > q_ae_start
    assert trainer.global_step == 6  # ceil(22 / 4) steps
    from anomalyzoo.data import get_dataloaders
    from anomalyzoo.metrics import auroc

    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=4, normalize=False,
                                     dataset_dir=synthetic_dataset_dir)
    first = trainer.validation_epoch(test_loader)
    second = load_trainer(result["checkpoint"], device="cpu").validation_epoch(test_loader)
    assert auroc(first.labels, first.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
    np.testing.assert_allclose(first.scores, second.scores, rtol=1e-5)
    np.testing.assert_allclose(first.anomaly_maps, second.anomaly_maps, rtol=1e-4, atol=1e-6)


def test_learning_rate_drops_tenfold_after_95_percent_of_the_steps():
    trainer = EfficientAdTrainer(pretrained=False, device="cpu")
    trainer.total_steps = 100
    trainer.global_step = 94
    assert trainer.current_lr() == pytest.approx(1e-4)
    trainer.global_step = 95
    assert trainer.current_lr() == pytest.approx(1e-5)
    group = trainer.optimizer.param_groups[0]
    assert group["weight_decay"] == pytest.approx(1e-5)
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in [*trainer.model.student.parameters(), *trainer.model.autoencoder.parameters()]}


def test_imagenet_penalty_images_are_used_when_imagenette_exists(tmp_path):
    from PIL import Image

    folder = tmp_path / "imagenette2" / "train" / "n01440764"
    folder.mkdir(parents=True)
    for index in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * index, dtype=np.uint8)).save(folder / f"img{index}.JPEG")
    set_globals(dataset_dir=tmp_path)
    trainer = EfficientAdTrainer(pretrained=False, device="cpu", train_config={"img_size": 64, "normalize": False})
    trainer.train_loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2)
    penalty = next(trainer.penalty_images())
    assert penalty.shape == (2, 3, 64, 64)  # resized to 128, cropped back to 64
    assert 0.0 <= float(penalty.min()) and float(penalty.max()) <= 1.0
    trainer.penalty_iterator = trainer.penalty_images()
    logs = trainer.train_step({"image": torch.rand(2, 3, 64, 64)})
    assert np.isfinite(logs["loss"]) and logs["loss_st"] > 0
    set_globals(dataset_dir=tmp_path / "elsewhere")
    assert trainer.penalty_images() is None  # no Imagenette: no penalty, as the paper's ablation


def test_distillation_projection_matrix_equals_the_two_channel_poolings():
    from anomalyzoo.models.efficientad import channel_pooling_matrix

    generator = torch.Generator().manual_seed(0)
    channels = [40, 112]
    vectors = [torch.randn(30, c, generator=generator) for c in channels]
    per_layer = [F.adaptive_avg_pool1d(v[:, None, :], 1024) for v in vectors]
    expected = F.adaptive_avg_pool1d(torch.cat(per_layer, dim=2), 384)[:, 0]
    projected = torch.cat(vectors, dim=1) @ channel_pooling_matrix(channels, 1024, 384)
    assert torch.allclose(projected, expected, atol=1e-5)
