from pathlib import Path

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


def make_imagenette(root, count: int = 3) -> None:
    from PIL import Image

    folder = root / "imagenette2" / "train" / "n01440764"
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(np.full((40, 50, 3), 60 * index + 30, dtype=np.uint8)).save(folder / f"img{index}.JPEG")


def test_efficientad_end_to_end_on_synthetic_data(teacher_dir, synthetic_dataset_dir, tmp_path):
    """One epoch at 64 px, batch 1 (24 train images: 2 held out for validation and the map
    quantiles). Imagenette sits in the run's dataset_dir, not in the global setting: the
    penalty must follow the run's folder."""
    set_globals(backbone_dir=teacher_dir, dataset_dir=tmp_path / "global_datasets_without_imagenette")
    run_datasets = tmp_path / "run_datasets"
    run_datasets.mkdir()
    (run_datasets / "mvtec").symlink_to(synthetic_dataset_dir / "mvtec")
    make_imagenette(run_datasets)
    result = train("mvtec", "synthetic_texture", "efficientad-small", num_epochs=1, img_size=64,
                   dataset_dir=run_datasets, output_dir=tmp_path, progress=False, max_maps=1)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "fit_seconds")})
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.8
    assert result["num_val_images"] == 2 and result["num_train_images"] == 22
    assert result["notes"]["imagenet_penalty"].startswith("on: 3 images from " + str(run_datasets))
    report = next(Path(result["output_dir"]).glob("results_*_thresholds.txt")).read_text()
    assert "imagenet_penalty" in report and "on: 3 images" in report

    set_globals(backbone_dir=tmp_path / "no_backbones")  # the checkpoint carries the teacher
    trainer = load_trainer(result["checkpoint"], device="cpu")
    q_st_start, q_st_end, q_ae_start, q_ae_end = trainer.model.quantiles.tolist()
    assert q_st_end > q_st_start and q_ae_end > q_ae_start
    assert trainer.global_step == 22  # one step per image
    from anomalyzoo.data import get_dataloaders
    from anomalyzoo.metrics import auroc

    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=4, normalize=False,
                                     dataset_dir=synthetic_dataset_dir)
    first = trainer.validation_epoch(test_loader)
    second = load_trainer(result["checkpoint"], device="cpu").validation_epoch(test_loader)
    assert auroc(first.labels, first.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
    np.testing.assert_allclose(first.scores, second.scores, rtol=1e-5)
    np.testing.assert_allclose(first.anomaly_maps, second.anomaly_maps, rtol=1e-4, atol=1e-6)


def test_without_imagenette_the_run_says_the_penalty_is_off(teacher_dir, synthetic_dataset_dir, tmp_path, capsys):
    set_globals(backbone_dir=teacher_dir)
    result = train("mvtec", "synthetic_texture", "efficientad-small", num_steps=3, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, progress=False, max_maps=0)
    note = result["notes"]["imagenet_penalty"]
    assert note.startswith("off: no images under " + str(synthetic_dataset_dir / "imagenette2" / "train"))
    assert capsys.readouterr().out.count("ImageNet penalty off") == 1  # said once, at the start
    assert "imagenet_penalty" in next(Path(result["output_dir"]).glob("results_*_thresholds.txt")).read_text()
    # num_steps defines the stop (3 steps, inside the first epoch of 22 images)
    assert result["num_steps"] == 3 and result["num_epochs"] == 1


def test_batch_sizes_other_than_one_are_refused():
    with pytest.raises(ValueError, match="batch_size must be 1"):
        EfficientAdTrainer(pretrained=False, device="cpu", train_config={"batch_size": 4})


def lr_after_steps(trainer: EfficientAdTrainer, steps: int) -> float:
    """The learning rate of the next optimisation step after ``steps`` more scheduler steps."""
    trainer.setup_optimization()
    for _ in range(steps):
        trainer.optimizer.step()  # no gradients: nothing moves
        trainer.scheduler.step()
    return trainer.optimizer.param_groups[0]["lr"]


def test_num_steps_defines_the_schedule():
    trainer = EfficientAdTrainer(pretrained=False, device="cpu", train_config={"batch_size": 1, "num_steps": 1000})
    loader = torch.utils.data.DataLoader(list(range(30)), batch_size=1)
    assert trainer.planned_steps(loader) == 1000 and trainer.planned_epochs(loader) == 34  # ceil(1000 / 30)
    trainer.total_steps = trainer.planned_steps(loader)
    assert lr_after_steps(trainer, 949) == pytest.approx(1e-4)
    assert lr_after_steps(trainer, 1) == pytest.approx(1e-5)  # step 950: 95 % of num_steps, not of the epochs' steps
    plain = EfficientAdTrainer(pretrained=False, device="cpu", train_config={"batch_size": 1, "num_epochs": 20})
    assert plain.planned_steps(loader) == 600  # the spec's default: 20 epochs


def test_penalty_term_is_present_nonzero_and_trains_the_student(tmp_path):
    trainer = EfficientAdTrainer(pretrained=False, device="cpu", train_config={"img_size": 64, "normalize": False})
    images = {"image": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    penalty_images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    losses = trainer.training_loss(images, penalty_images)
    assert losses["loss_penalty"].item() > 0
    assert losses["loss_penalty"].requires_grad
    trainer.model.zero_grad()
    losses["loss_penalty"].backward()
    student_grads = [p.grad for p in trainer.model.student.parameters()]
    assert all(g is not None for g in student_grads) and sum(float(g.abs().sum()) for g in student_grads) > 0
    assert all(p.grad is None for p in trainer.model.autoencoder.parameters())  # the penalty is the student's alone
    # it is mean(S(P)[:384]^2) on the penalty image
    with torch.no_grad():
        expected = (trainer.model.student(penalty_images)[:, :384] ** 2).mean()
    assert losses["loss_penalty"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_terms_compose_as_in_algorithm_1():
    """L = L_ST + L_AE + L_STAE with L_ST = L_hard + L_penalty, each term as the paper defines it."""
    trainer = EfficientAdTrainer(pretrained=False, device="cpu", train_config={"img_size": 64, "normalize": False})
    model = trainer.model
    model.teacher_mean.normal_(0, 0.1)
    model.teacher_std.uniform_(0.5, 2.0)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    penalty_images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    model.eval()  # no dropout, so the terms can be recomputed
    torch.manual_seed(7)
    losses = trainer.training_loss({"image": images}, penalty_images)
    torch.manual_seed(7)
    augmented = color_jitter(images)  # the same jitter draw
    with torch.no_grad():
        teacher = (model.teacher(images) - model.teacher_mean) / model.teacher_std
        student = model.student(images)
        distance = (teacher - student[:, :384]) ** 2
        hard = distance[distance >= torch.quantile(distance.flatten(), 0.999)].mean()
        penalty = (model.student(penalty_images)[:, :384] ** 2).mean()
        teacher_augmented = (model.teacher(augmented) - model.teacher_mean) / model.teacher_std
        autoencoder = model.autoencoder(augmented, teacher_augmented.shape[-2:])
        ae = ((teacher_augmented - autoencoder) ** 2).mean()
        stae = ((autoencoder - model.student(augmented)[:, 384:]) ** 2).mean()
    for name, value in (("loss_hard", hard), ("loss_penalty", penalty), ("loss_ae", ae), ("loss_stae", stae)):
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-4), name
    assert losses["loss_st"].item() == pytest.approx((hard + penalty).item(), rel=1e-4)
    assert losses["loss"].item() == pytest.approx((hard + penalty + ae + stae).item(), rel=1e-4)


def test_teacher_statistics_and_map_quantiles_match_direct_computations():
    from anomalyzoo.models.efficientad import map_quantiles, teacher_channel_statistics

    model = EfficientAdModel("small", pretrained=False).eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    loader = torch.utils.data.DataLoader([{"image": image} for image in images], batch_size=1)
    mean, std = teacher_channel_statistics(model, loader, torch.device("cpu"))
    with torch.no_grad():
        outputs = model.teacher(images).double()  # (3, 384, h, w)
    # reference teacher_normalization: channel mean over all images and positions; std = sqrt of the
    # mean over images of the per-image mean squared deviation
    expected_mean = outputs.mean(dim=(0, 2, 3))
    expected_std = torch.stack([((o - expected_mean[:, None, None]) ** 2).mean(dim=(1, 2)) for o in outputs]).mean(0).sqrt()
    assert torch.allclose(mean.flatten().double(), expected_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(std.flatten().double(), expected_std, rtol=1e-4, atol=1e-6)

    model.teacher_mean.copy_(mean)
    model.teacher_std.copy_(std)
    values = map_quantiles(model, loader, torch.device("cpu"))
    with torch.no_grad():
        local_map, global_map = model.raw_maps(images)
    expected = [torch.quantile(local_map.flatten(), 0.9), torch.quantile(local_map.flatten(), 0.995),
                torch.quantile(global_map.flatten(), 0.9), torch.quantile(global_map.flatten(), 0.995)]
    assert torch.allclose(values, torch.stack(expected), rtol=1e-5)


def test_learning_rate_drops_tenfold_after_95_percent_of_the_steps():
    trainer = EfficientAdTrainer(pretrained=False, device="cpu")
    trainer.total_steps = 100
    assert lr_after_steps(trainer, 94) == pytest.approx(1e-4)
    assert lr_after_steps(trainer, 1) == pytest.approx(1e-5)  # the 96th step runs at lr / 10
    assert trainer.scheduler_interval == "step"
    group = trainer.optimizer.param_groups[0]
    assert group["weight_decay"] == pytest.approx(1e-5)
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in [*trainer.model.student.parameters(), *trainer.model.autoencoder.parameters()]}


def test_penalty_images_come_from_the_runs_dataset_folder_centre_cropped(tmp_path):
    make_imagenette(tmp_path)
    set_globals(dataset_dir=tmp_path / "elsewhere")
    trainer = EfficientAdTrainer(pretrained=False, device="cpu", train_config={"img_size": 64, "normalize": False})
    trainer.dataset_dir = tmp_path  # what train(..., dataset_dir=...) sets
    penalty = next(trainer.penalty_images())
    assert penalty.shape == (1, 3, 64, 64)  # resized to 128, cropped back to 64
    assert 0.0 <= float(penalty.min()) and float(penalty.max()) <= 1.0
    assert trainer.penalty_note.startswith("on: 3 images")
    # a centre crop (reference penalty_transform): the middle 64x64 of the 128x128 resize
    from anomalyzoo.data.transforms import image_to_tensor, load_rgb_image
    from anomalyzoo.data.penalty import PenaltyImages

    files = sorted((tmp_path / "imagenette2" / "train").rglob("*.JPEG"))
    patterned = tmp_path / "pattern.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(patterned)
    torch.manual_seed(0)
    crops = [PenaltyImages([patterned], 64)[0] for _ in range(10)]
    full = image_to_tensor(load_rgb_image(patterned), 128, normalize=False)
    colour_crops = [c for c in crops if not torch.equal(c[0], c[1])]  # those not made grayscale
    assert colour_crops and all(torch.equal(c, full[:, 32:96, 32:96]) for c in colour_crops)
    assert len(files) == 3
    trainer.dataset_dir = tmp_path / "no_imagenette"
    assert trainer.penalty_images() is None  # no Imagenette: no penalty, as the paper's ablation
    assert trainer.penalty_note.startswith("off:")


def test_distillation_projection_matrix_equals_the_two_channel_poolings():
    from anomalyzoo.models.efficientad import channel_pooling_matrix

    generator = torch.Generator().manual_seed(0)
    channels = [40, 112]
    vectors = [torch.randn(30, c, generator=generator) for c in channels]
    per_layer = [F.adaptive_avg_pool1d(v[:, None, :], 1024) for v in vectors]
    expected = F.adaptive_avg_pool1d(torch.cat(per_layer, dim=2), 384)[:, 0]
    projected = torch.cat(vectors, dim=1) @ channel_pooling_matrix(channels, 1024, 384)
    assert torch.allclose(projected, expected, atol=1e-5)


def test_a_path_given_as_imagenet_dir_survives_the_checkpoint(tmp_path):
    """Checkpoints load with weights_only=True, which refuses pathlib objects: the option is kept as text."""
    trainer = EfficientAdTrainer(model_size="small", pretrained=False, imagenet_dir=tmp_path / "imagenette2" / "train",
                                 train_config={"img_size": 64}, device="cpu")
    checkpoint = trainer.save_model(tmp_path / "model.pth")
    restored = load_trainer(checkpoint, device="cpu")
    assert restored.imagenet_dir == str(tmp_path / "imagenette2" / "train")
