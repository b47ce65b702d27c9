import pytest
import torch
import torch.nn.functional as F

from anomalyzoo import train
from anomalyzoo.models.components.resnet_decoder import DeBasicBlock, DeBottleneck, ResNetDecoder, resnet_layout
from anomalyzoo.models.reverse_distillation import (
    OneClassBottleneckEmbedding,
    ReverseDistillationModel,
    ReverseDistillationTrainer,
    anomaly_map,
    distillation_loss,
)
from anomalyzoo.predict import load_trainer


@pytest.mark.parametrize(("backbone", "channels"), [("resnet18", [64, 128, 256]), ("efficientnet_lite0", [24, 40, 112])])
def test_decoder_mirrors_the_encoder(backbone, channels):
    model = ReverseDistillationModel(backbone, pretrained=False).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        encoder_features, decoder_features = model.encode_decode(images)
        embedding = model.bottleneck(encoder_features)
    assert [f.shape[1] for f in encoder_features] == channels
    assert [f.shape for f in decoder_features] == [f.shape for f in encoder_features]
    assert [f.shape[-1] for f in encoder_features] == [32, 16, 8]
    # OCBE: twice layer3's channels at half its grid (layer4's shape for a ResNet)
    assert embedding.shape == (2, 2 * channels[2], 4, 4)
    block = DeBasicBlock  # resnet18 by definition, EfficientNet by our documented choice
    assert all(isinstance(stage[0], block) for stage in model.decoder.stages)
    assert [len(stage) for stage in model.decoder.stages] == [2, 2, 2]


def test_wide_resnet_layout_follows_the_paper():
    layout = resnet_layout("wide_resnet50_2")
    channels = (256, 512, 1024)
    bottleneck = OneClassBottleneckEmbedding(channels, layout)
    decoder = ResNetDecoder(bottleneck.out_channels, channels, layout)
    features = [torch.randn(1, 256, 16, 16), torch.randn(1, 512, 8, 8), torch.randn(1, 1024, 4, 4)]
    with torch.no_grad():
        embedding = bottleneck(features)
        reconstructed = decoder(embedding)
    assert embedding.shape == (1, 2048, 2, 2)  # layer4 of Wide-ResNet50-2
    assert [f.shape for f in reconstructed] == [f.shape for f in features]
    assert len(bottleneck.one_class_embedding) == 3  # layer4's three bottlenecks
    assert [len(stage) for stage in decoder.stages] == [3, 4, 6]  # de_wide_resnet50_2, deep to shallow
    first = decoder.stages[0][0]
    assert isinstance(first, DeBottleneck)
    assert first.conv1.out_channels == 512  # planes 256 x width multiplier 2
    assert isinstance(first.conv2, torch.nn.ConvTranspose2d) and first.conv2.stride == (2, 2)


def test_loss_is_zero_for_identical_features_and_is_the_authors_flattened_cosine():
    generator = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 5, 4, 4, generator=generator), torch.randn(2, 7, 2, 2, generator=generator)]
    assert distillation_loss(teacher, [t.clone() for t in teacher]).item() == pytest.approx(0.0, abs=1e-6)
    # scaling does not change a cosine
    assert distillation_loss(teacher, [3.0 * t for t in teacher]).item() == pytest.approx(0.0, abs=1e-6)
    student = [torch.randn(2, 5, 4, 4, generator=generator), torch.randn(2, 7, 2, 2, generator=generator)]
    # RD4AD loss_fucntion: per scale, mean over images of 1 - cos(vec(f_E), vec(f_D)), one cosine per image
    expected = 0.0
    for t, s in zip(teacher, student):
        per_image = []
        for b in range(t.shape[0]):
            u, v = t[b].reshape(-1).double(), s[b].reshape(-1).double()
            per_image.append(1.0 - float(u @ v) / float(u.norm() * v.norm()))
        expected += sum(per_image) / len(per_image)
    assert distillation_loss(teacher, student).item() == pytest.approx(expected, rel=1e-5)
    # and not the per-position form of eq. 2 as printed: two positions, one matched in direction with
    # a large norm, one orthogonal. Per position: mean(1 - 1, 1 - 0) = 0.5; flattened, the large
    # matched position dominates: 1 - 10 / (sqrt(2) sqrt(101)) = 0.2964
    encoder = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2 channels, 1, 2 positions)
    decoder = torch.tensor([[[[10.0, 1.0]], [[0.0, 0.0]]]])
    assert distillation_loss([encoder], [decoder]).item() == pytest.approx(1 - 10 / (2 ** 0.5 * 101 ** 0.5), rel=1e-5)


def test_anomaly_map_sums_or_multiplies_the_upsampled_cosine_distances():
    # two channels: the cosine between (1, 0) and (cos a, sin a) is cos a
    def features(angle: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.cos(angle), torch.sin(angle)])[None]

    teacher = [features(torch.zeros(2, 2)), features(torch.zeros(1, 1))]
    angles = [torch.tensor([[0.0, 1.0], [2.0, 0.5]]), torch.tensor([[1.5]])]
    student = [features(a) for a in angles]
    distances = [1.0 - torch.cos(a)[None, None] for a in angles]
    upsampled = [F.interpolate(d, size=(4, 4), mode="bilinear", align_corners=False) for d in distances]
    assert torch.allclose(anomaly_map(teacher, student, (4, 4), "add"), upsampled[0] + upsampled[1], atol=1e-6)
    assert torch.allclose(anomaly_map(teacher, student, (4, 4), "multiply"), upsampled[0] * upsampled[1], atol=1e-6)
    with pytest.raises(ValueError):
        anomaly_map(teacher, student, (4, 4), "max")


def test_train_step_updates_only_the_student():
    trainer = ReverseDistillationTrainer(backbone="resnet18", pretrained=False, device="cpu",
                                         train_config={"img_size": 64, "batch_size": 2, "progress": False})
    encoder_before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in trainer.model.decoder.state_dict().items()}
    bottleneck_before = {k: v.clone() for k, v in trainer.model.bottleneck.state_dict().items()}
    trainer.model.train()
    logs = trainer.train_step({"image": torch.randn(2, 3, 64, 64)})
    assert logs["loss"] > 0
    assert not trainer.model.encoder.feature_extractor.training  # BatchNorm statistics stay frozen
    for name, value in trainer.model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name
    assert all(not p.requires_grad for p in trainer.model.encoder.parameters())
    assert any(not torch.equal(v, decoder_before[k]) for k, v in trainer.model.decoder.state_dict().items())
    assert any(not torch.equal(v, bottleneck_before[k]) for k, v in trainer.model.bottleneck.state_dict().items())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised.isdisjoint(id(p) for p in trainer.model.encoder.parameters())
    assert trainer.optimizer.defaults["lr"] == 0.005 and trainer.optimizer.defaults["betas"] == (0.5, 0.999)


def test_rejects_non_consecutive_layers():
    with pytest.raises(ValueError, match="consecutive"):
        ReverseDistillationModel("resnet18", layers=["layer1", "layer3"], pretrained=False)


def test_reverse_distillation_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_texture", "reverse-distillation", dataset_dir=synthetic_dataset_dir,
                   output_dir=tmp_path, backbone="efficientnet_lite0", img_size=128, num_epochs=8, max_maps=1)
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
    # the saved model reproduces the evaluation scores and maps
    trainer = load_trainer(result["checkpoint"])
    from anomalyzoo.data import get_dataloaders
    from anomalyzoo.metrics import auroc

    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=128, batch_size=8, dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
    assert predictions.anomaly_maps.shape == (len(predictions.labels), 128, 128)
