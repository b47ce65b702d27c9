import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import compute_metrics
from anomalyzoo.models.components.dynamic_buffer import resize_buffers_to_state_dict
from anomalyzoo.models.components.gaussian_kde import GaussianKDE
from anomalyzoo.models.dfkde import DfkdeTrainer
from anomalyzoo.predict import load_trainer


def correlated_points(num_points: int, dims: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dims, dims))
    return rng.normal(size=(num_points, dims)) @ mixing + rng.normal(size=dims)


@pytest.mark.parametrize("dims", [1, 3, 16])
def test_kde_log_density_matches_scipy(dims):
    train_points = correlated_points(60, dims, seed=dims)
    queries = np.concatenate([correlated_points(20, dims, seed=100 + dims),
                              train_points[:3] * 6.0])  # far outside the data: the tails must stay finite
    reference = gaussian_kde(train_points.T)  # Scott's rule, unbiased covariance
    kde = GaussianKDE().fit(torch.from_numpy(train_points))
    expected = reference.logpdf(queries.T)
    assert np.all(np.isfinite(expected))
    assert np.allclose(kde.log_density(torch.from_numpy(queries)).numpy(), expected, rtol=1e-8, atol=1e-8)
    # the same bandwidth: L L^T is the inverse of scipy's kernel covariance
    whitening = kde.whitening.numpy()
    assert np.allclose(np.linalg.inv(whitening @ whitening.T), reference.covariance, rtol=1e-8)
    # float32 inputs and chunking over the training points change nothing but rounding
    kde32 = GaussianKDE().fit(torch.from_numpy(train_points).float())
    chunked = kde32.log_density(torch.from_numpy(queries).float(), chunk_size=7).numpy()
    assert np.allclose(chunked, expected, rtol=1e-4, atol=1e-3)


def test_kde_refuses_too_few_points_and_round_trips_through_its_state_dict():
    with pytest.raises(ValueError, match="more than 4 points"):
        GaussianKDE().fit(torch.randn(4, 4))
    kde = GaussianKDE().fit(torch.randn(50, 4, generator=torch.Generator().manual_seed(0)))
    restored = GaussianKDE()
    state = kde.state_dict()
    resize_buffers_to_state_dict(restored, state)
    restored.load_state_dict(state)
    queries = torch.randn(5, 4)
    assert torch.equal(restored.log_density(queries), kde.log_density(queries))


def test_dfkde_score_is_the_negative_kde_log_likelihood_of_scaled_pca_coefficients():
    """PCA to 16 components, divide by the largest training norm, KDE: checked against numpy + scipy."""
    trainer = DfkdeTrainer(backbone="efficientnet_lite0", pretrained=False, device="cpu",
                           train_config={"progress": False})
    model = trainer.model
    generator = torch.Generator().manual_seed(0)
    train_embeddings = torch.randn(40, 320, generator=generator, dtype=torch.float64) * torch.linspace(3, 0.1, 320, dtype=torch.float64)
    test_embeddings = torch.randn(6, 320, generator=generator, dtype=torch.float64) * 2
    model.fit(train_embeddings)

    data = train_embeddings.numpy()
    mean = data.mean(axis=0)
    _, _, right = np.linalg.svd(data - mean, full_matrices=False)
    axes = right[:16].T
    train_coefficients = (data - mean) @ axes
    max_length = np.linalg.norm(train_coefficients, axis=1).max()
    reference = gaussian_kde((train_coefficients / max_length).T)
    test_coefficients = (test_embeddings.numpy() - mean) @ axes / max_length
    expected = -reference.logpdf(test_coefficients.T)  # PCA signs do not change a KDE

    scaled = model.scale(model.pca.transform(test_embeddings))
    assert model.max_length.item() == pytest.approx(max_length)
    assert torch.linalg.vector_norm(model.scale(model.pca.transform(train_embeddings)), dim=1).max().item() == pytest.approx(1.0)
    assert np.allclose(-model.kde.log_density(scaled).numpy(), expected, rtol=1e-6)


def test_dfkde_subsamples_training_vectors_reproducibly():
    def fitted_dataset() -> torch.Tensor:
        trainer = DfkdeTrainer(backbone="efficientnet_lite0", max_training_points=30, pretrained=False,
                               device="cpu", train_config={"progress": False, "seed": 3})
        trainer.fit_features(torch.randn(50, 320, generator=torch.Generator().manual_seed(1)))
        return trainer.model.kde.dataset

    first, second = fitted_dataset(), fitted_dataset()
    assert first.shape == (30, 16)
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="at least 17 training images"):
        DfkdeTrainer(backbone="efficientnet_lite0", pretrained=False, device="cpu").model.fit(torch.randn(10, 320))


def test_dfkde_end_to_end_on_synthetic_objects(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_object", "dfkde", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path,
                   backbone="efficientnet_lite0", img_size=128, max_maps=1)
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] is None and result["anomaly_maps"] is False  # image-level model
    from pathlib import Path

    report = next(Path(result["output_dir"]).glob("results_*_thresholds.txt")).read_text()
    assert "makes no anomaly map" in report
    # the saved model reproduces the evaluation scores, not only their order
    trainer = load_trainer(result["checkpoint"])
    _, test_loader = get_dataloaders("mvtec", "synthetic_object", img_size=128, batch_size=4, dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    assert predictions.anomaly_maps is None
    metrics = compute_metrics(predictions.labels, predictions.scores, predictions.masks, None)
    assert metrics["image_auroc"] == pytest.approx(result["image_auroc"], abs=1e-9)
    assert metrics["image_f1_threshold"] == pytest.approx(result["image_f1_threshold"], rel=1e-5)
    assert trainer.model.kde.dataset.shape == (result["num_train_images"], 16)


def test_dfkde_norm_scaling_makes_each_vector_unit_length():
    from anomalyzoo.models.dfkde import DfkdeModel

    with pytest.raises(ValueError, match="feature_scaling_method"):
        DfkdeModel("efficientnet_lite0", feature_scaling_method="minmax", pretrained=False)
    model = DfkdeModel("efficientnet_lite0", n_pca_components=4, feature_scaling_method="norm", pretrained=False)
    embeddings = torch.randn(20, 320, generator=torch.Generator().manual_seed(2))
    model.fit(embeddings)
    scaled = model.scale(model.pca.transform(embeddings))
    assert torch.allclose(torch.linalg.vector_norm(scaled, dim=1), torch.ones(20), atol=1e-5)
    assert model.kde.dataset.shape == (20, 4)
