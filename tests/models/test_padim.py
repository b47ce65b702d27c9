import torch

from anomalyzoo import train
from anomalyzoo.models.components.multi_variate_gaussian import MultiVariateGaussian
from anomalyzoo.models.padim import PadimModel, default_num_features
from anomalyzoo.predict import load_trainer


def test_channel_subset_sizes_follow_the_paper():
    assert default_num_features(448) == 100  # ResNet18 layer1-3
    assert default_num_features(1792) == 550  # WRN-50-2 layer1-3
    assert default_num_features(60) == 60
    model = PadimModel("resnet18", ["layer1", "layer2", "layer3"], pretrained=False)
    assert model.channel_index.numel() == 100 and model.channel_index.unique().numel() == 100


def test_gaussian_fit_and_mahalanobis_against_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(40, 3, 5, generator=generator, dtype=torch.float64)
    gaussian = MultiVariateGaussian()
    gaussian.fit(embeddings, epsilon=0.01, chunk_positions=2)
    position = 3
    samples = embeddings[:, :, position]
    covariance = torch.cov(samples.T) + 0.01 * torch.eye(3, dtype=torch.float64)
    query = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    delta = query[:, :, position] - samples.mean(0)
    expected = torch.sqrt(torch.einsum("bd,de,be->b", delta, torch.linalg.inv(covariance), delta))
    assert torch.allclose(gaussian.mahalanobis(query, chunk_positions=2)[:, position], expected)


def test_padim_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_object", "padim", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path,
                   backbone="efficientnet_lite0", img_size=128)
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
    trainer = load_trainer(result["checkpoint"])
    assert trainer.model.gaussian.inv_covariance.shape[0] == (128 // 4) ** 2
