import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import compute_metrics
from anomalyzoo.models.components.dynamic_buffer import resize_buffers_to_state_dict
from anomalyzoo.models.components.pca import PCA
from anomalyzoo.models.dfm import DfmModel
from anomalyzoo.predict import load_trainer


def spectrum_data(scales: list[float], num_points: int = 200, seed: int = 0) -> np.ndarray:
    """Points with the given standard deviations along random orthogonal axes, plus an offset."""
    rng = np.random.default_rng(seed)
    dims = len(scales)
    rotation, _ = np.linalg.qr(rng.normal(size=(dims, dims)))
    return (rng.normal(size=(num_points, dims)) * np.asarray(scales)) @ rotation.T + rng.normal(size=dims) * 5


def test_pca_matches_numpy_svd():
    data = spectrum_data([9.0, 5.0, 3.0, 1.0, 0.5, 0.2])
    pca = PCA(n_components=3).fit(torch.from_numpy(data))
    mean = data.mean(axis=0)
    _, singular_values, right = np.linalg.svd(data - mean, full_matrices=False)
    axes = right[:3].T
    signs = np.sign(np.sum(axes * pca.components.numpy(), axis=0))  # an axis is defined up to its sign
    assert np.allclose(np.abs(signs), 1.0)
    assert np.allclose(pca.components.numpy(), axes * signs, atol=1e-10)
    assert np.allclose(pca.singular_values.numpy(), singular_values[:3])
    coefficients = pca.transform(torch.from_numpy(data)).numpy()
    assert np.allclose(coefficients, (data - mean) @ axes * signs, atol=1e-10)
    # the reconstruction is the orthogonal projection onto the principal subspace
    reconstruction = pca.inverse_transform(torch.from_numpy(coefficients)).numpy()
    assert np.allclose(reconstruction, (data - mean) @ axes @ axes.T + mean, atol=1e-10)
    # keeping every component reconstructs the data exactly
    full = PCA(n_components=6).fit(torch.from_numpy(data))
    assert np.allclose(full.inverse_transform(full.transform(torch.from_numpy(data))).numpy(), data, atol=1e-9)


@pytest.mark.parametrize("level", [0.5, 0.9, 0.97, 0.999, 1.0])
def test_pca_variance_fraction_keeps_the_fewest_components_that_reach_it(level):
    data = spectrum_data([9.0, 5.0, 3.0, 1.0, 0.5, 0.2])
    _, singular_values, _ = np.linalg.svd(data - data.mean(axis=0), full_matrices=False)
    ratios = np.cumsum(singular_values**2) / np.sum(singular_values**2)
    expected = int(np.argmax(ratios >= level - 1e-12)) + 1
    pca = PCA(n_components=level).fit(torch.from_numpy(data))
    assert pca.num_components == expected
    assert ratios[expected - 1] >= level - 1e-12 and (expected == 1 or ratios[expected - 2] < level)


def test_pca_round_trips_through_its_state_dict_and_rejects_bad_settings():
    data = torch.from_numpy(spectrum_data([4.0, 2.0, 1.0, 0.5])).float()
    pca = PCA(0.9).fit(data)
    restored = PCA(0.9)
    state = pca.state_dict()
    resize_buffers_to_state_dict(restored, state)
    restored.load_state_dict(state)
    assert torch.equal(restored.transform(data), pca.transform(data))
    with pytest.raises(ValueError):
        PCA(1.5)
    with pytest.raises(ValueError, match="only 4"):
        PCA(5).fit(data)
    with pytest.raises(RuntimeError):
        PCA(2).transform(data)


@pytest.fixture(scope="module")
def fitted_grids() -> tuple[DfmModel, DfmModel, torch.Tensor, torch.Tensor]:
    """Both score types fitted on the same random (N, C, h, w) grids (backbone not involved)."""
    generator = torch.Generator().manual_seed(0)
    channel_scale = torch.linspace(2.0, 0.05, 8, dtype=torch.float64)[None, :, None, None]
    train_grids = torch.randn(30, 8, 2, 3, generator=generator, dtype=torch.float64) * channel_scale
    test_grids = torch.randn(5, 8, 2, 3, generator=generator, dtype=torch.float64) * channel_scale * 1.5
    models = []
    for score_type in ("fre", "nll"):
        model = DfmModel("efficientnet_lite0", "layer3", score_type=score_type, pretrained=False)
        model.fit(train_grids.flatten(1))
        models.append(model)
    return models[0], models[1], train_grids, test_grids


def test_dfm_feature_reconstruction_error_and_its_map(fitted_grids):
    fre_model, _, train_grids, test_grids = fitted_grids
    data = train_grids.flatten(1).numpy()
    mean = data.mean(axis=0)
    _, singular_values, right = np.linalg.svd(data - mean, full_matrices=False)
    ratios = np.cumsum(singular_values**2) / np.sum(singular_values**2)
    k = int(np.argmax(ratios >= 0.97)) + 1
    axes = right[:k].T
    features = test_grids.flatten(1).numpy()
    residual = (features - mean) - (features - mean) @ axes @ axes.T  # f - PCA^-1(PCA(f))
    output = fre_model.score(test_grids, output_size=(2, 3))
    assert fre_model.pca.num_components == k
    assert np.allclose(output["pred_score"].numpy(), np.sum(residual**2, axis=1))
    # per position: the squared error summed over the channels of that cell
    per_position = (residual.reshape(test_grids.shape) ** 2).sum(axis=1)
    assert np.allclose(output["anomaly_map"].numpy(), per_position)
    assert fre_model.score(test_grids, output_size=(8, 12))["anomaly_map"].shape == (5, 8, 12)


def test_dfm_nll_is_the_gaussian_likelihood_of_the_pca_coefficients(fitted_grids):
    _, nll_model, train_grids, test_grids = fitted_grids
    train_coefficients = nll_model.pca.transform(train_grids.flatten(1)).numpy()
    test_coefficients = nll_model.pca.transform(test_grids.flatten(1)).numpy()
    # PCA coefficients are uncorrelated, so the full-covariance Gaussian (anomalib's SVD form)
    # and the diagonal one the model keeps are the same density
    full = multivariate_normal(train_coefficients.mean(axis=0), np.cov(train_coefficients.T, bias=True))
    output = nll_model.score(test_grids, output_size=(2, 3))
    assert "anomaly_map" not in output
    assert np.allclose(output["pred_score"].numpy(), -full.logpdf(test_coefficients), rtol=1e-8)


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_dfm_end_to_end_on_synthetic_textures(score_type, synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_texture", "dfm", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path,
                   backbone="efficientnet_lite0", img_size=128, score_type=score_type, max_maps=1)
    assert result["image_auroc"] >= 0.9
    if score_type == "fre":
        # the map lives on the 2 x 2 pooled grid of layer3 at 128 px: coarse, but it points to the defect
        assert result["pixel_auroc"] >= 0.75
    else:
        assert result["pixel_auroc"] is None
    # the saved model reproduces the evaluation scores (and maps), not only their order
    trainer = load_trainer(result["checkpoint"])
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=128, batch_size=4, dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    metrics = compute_metrics(predictions.labels, predictions.scores, predictions.masks, predictions.anomaly_maps)
    assert metrics["image_auroc"] == pytest.approx(result["image_auroc"], abs=1e-9)
    assert metrics["image_f1_threshold"] == pytest.approx(result["image_f1_threshold"], rel=1e-5)
    if score_type == "fre":
        # the heat-map colour range is fixed at training from the held-out normals, not from the test maps
        assert trainer.map_range == pytest.approx(trainer.normal_statistics.map_display_range(), rel=1e-9)
        assert predictions.anomaly_maps.max() > trainer.normal_statistics.pixel_threshold
    else:
        assert predictions.anomaly_maps is None
