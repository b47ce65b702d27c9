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


def test_map_is_the_bilinear_upsampled_distance_grid_blurred_with_sigma_4(monkeypatch):
    """Post-processing against a direct computation: bilinear (align_corners=False) upsampling of
    the per-position Mahalanobis grid, then a Gaussian of sigma 4 truncated at 4 sigma with
    whole-sample reflection at the borders (scipy 'mirror', anomalib's 'reflect'); score = max."""
    import numpy as np
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    model = PadimModel("resnet18", ["layer1", "layer2"], n_features=10, pretrained=False).eval()
    model.gaussian.mean = torch.zeros(10, 16 * 16)  # fitted: forward may run
    grid = torch.zeros(1, 16 * 16)
    grid[0, 5 * 16 + 9] = 10.0  # one hot position on the 16x16 layer1 grid of a 64 px image
    grid[0, 0] = 4.0  # one at the corner, where the border rule matters
    monkeypatch.setattr(model.gaussian, "mahalanobis", lambda embedding: grid.expand(embedding.shape[0], -1))
    with torch.no_grad():
        output = model(torch.zeros(2, 3, 64, 64))
    upsampled = F.interpolate(grid.reshape(1, 1, 16, 16), size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    nearest = F.interpolate(grid.reshape(1, 1, 16, 16), size=(64, 64), mode="nearest")[0, 0]
    expected = gaussian_filter(upsampled.numpy().astype(np.float64), sigma=4, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(output["anomaly_map"][0].numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(output["pred_score"].numpy(), [expected.max()] * 2, rtol=1e-5)
    wrong = gaussian_filter(nearest.numpy().astype(np.float64), sigma=4, mode="mirror", truncate=4.0)
    assert np.abs(wrong - expected).max() > 1e-2  # the test tells bilinear from nearest
    assert np.abs(gaussian_filter(upsampled.numpy(), sigma=2, mode="mirror") - expected).max() > 1e-2  # and sigma 4 from 2
