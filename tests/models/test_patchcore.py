import numpy as np
import pytest
import torch

from anomalyzoo import train
from anomalyzoo.models.components.k_center_greedy import greedy_coreset, k_center_greedy, projection_matrix
from anomalyzoo.models.components.nearest_neighbors import nearest_neighbors
from anomalyzoo.models.patchcore import PatchcoreModel
from anomalyzoo.predict import load_trainer


def brute_force_k_center(features: torch.Tensor, size: int, start: int) -> list[int]:
    chosen = [start]
    for _ in range(size - 1):
        distances = torch.cdist(features, features[chosen]).min(dim=1).values
        chosen.append(int(distances.argmax()))
    return chosen


def test_k_center_greedy_matches_the_definition_on_clustered_data():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 16, generator=generator) * 10
    points = (centers[:, None, :] + 0.1 * torch.randn(6, 50, 16, generator=generator)).reshape(-1, 16)
    selected = k_center_greedy(points, 30, projection_dim=128, seed=3, progress=False)
    assert len(set(selected.tolist())) == 30
    assert selected.tolist() == brute_force_k_center(points, 30, int(selected[0]))
    # six well separated clusters: the first six centers hit every cluster once
    assert sorted(int(i) // 50 for i in selected[:6]) == list(range(6))


def test_pruned_selection_is_the_exact_greedy_one_with_its_coverage_radius():
    """Many small blocks and a point bound on 6 of 48 dimensions (so both prunings skip work), a
    point count that leaves padding slots (37 over a power of two): every pick is the farthest point from
    the picks before it (in float64, up to float32 rounding between near-equal distances), the
    picks equal those of the unpruned loop, and the radius returned is the coverage radius."""
    generator = torch.Generator().manual_seed(5)
    mixture = torch.randn(12, 200, generator=generator) * 4
    labels = torch.randint(12, (2048 + 37,), generator=generator)
    features = mixture[labels] + torch.randn(2048 + 37, 200, generator=generator) * torch.rand(1, 200, generator=generator)
    selection = greedy_coreset(features, 200, projection_dim=48, seed=7, progress=False, block_size=32, low_dims=6)
    projected = (features @ projection_matrix(200, 48, torch.Generator().manual_seed(7))).double()
    picks = selection.indices.tolist()
    assert len(set(picks)) == 200
    min_distances = torch.full((len(features),), float("inf"), dtype=torch.float64)
    for pick in picks:
        assert min_distances[pick] >= min_distances.max() * (1 - 1e-5)
        min_distances = torch.minimum(min_distances, (projected - projected[pick]).norm(dim=1))
    assert selection.coverage_radius == pytest.approx(float(min_distances.max()), rel=1e-4)
    unpruned = greedy_coreset(features, 200, projection_dim=48, seed=7, progress=False, block_size=len(features), low_dims=48)
    assert unpruned.indices.tolist() == picks


def test_nearest_neighbors_is_exact_across_chunks():
    generator = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(300, 8, generator=generator), torch.randn(500, 8, generator=generator)
    distances, indices = nearest_neighbors(queries, bank, k=3, chunk_size=64)
    reference = torch.cdist(queries, bank).topk(3, largest=False)
    assert torch.equal(indices, reference.indices)
    assert torch.allclose(distances, reference.values, atol=1e-4)


def test_reweighting_follows_equation_7():
    model = PatchcoreModel("resnet18", ["layer2", "layer3"], num_neighbors=3, pretrained=False)
    model.memory_bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    patches = torch.tensor([[[0.0, 0.5], [3.0, 0.0]]])  # one image, two patches
    distances, index = nearest_neighbors(patches[0], model.memory_bank, k=1)
    score = model.reweighted_image_scores(patches, distances[:, 0][None], index[:, 0][None])
    # worst patch (3, 0): m* = (1, 0), s* = 2; N_3(m*) = {(1,0), (0,0), (0,2)}
    to_support = torch.tensor([2.0, 3.0, 13.0**0.5])
    expected = (1 - torch.exp(to_support[0]) / torch.exp(to_support).sum()) * 2.0
    assert torch.allclose(score, expected[None], atol=1e-5)


def test_patchcore_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_texture", "patchcore", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path,
                   backbone="efficientnet_lite0", img_size=128)
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
    # the saved model reproduces the evaluation scores
    trainer = load_trainer(result["checkpoint"])
    from anomalyzoo.data import get_dataloaders

    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=128, batch_size=4, dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    patches_per_image = (128 // 8) ** 2  # layer2 grid
    assert trainer.model.memory_bank.shape[0] == round(0.1 * result["num_train_images"] * patches_per_image)
    from anomalyzoo.metrics import auroc

    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)


def test_map_is_the_bilinear_upsampled_patch_distance_blurred_with_sigma_4():
    """Post-processing against a direct computation: with a memory bank holding only the zero
    vector a patch score is its feature norm; the map is those norms upsampled bilinearly
    (align_corners=False) and blurred with sigma 4 (scipy 'mirror' = anomalib's reflect)."""
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    model = PatchcoreModel("resnet18", ["layer2", "layer3"], pretrained=False).eval()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedding = model.embed(images)  # (1, 384, 8, 8)
        model.memory_bank = torch.zeros(1, embedding.shape[1])
        output = model(images)
    norms = embedding.norm(dim=1, keepdim=True)
    upsampled = F.interpolate(norms, size=(64, 64), mode="bilinear", align_corners=False)[0, 0].double().numpy()
    expected = gaussian_filter(upsampled, sigma=4, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(output["anomaly_map"][0].numpy(), expected, rtol=1e-4, atol=1e-5)
    nearest = F.interpolate(norms, size=(64, 64), mode="nearest")[0, 0].double().numpy()
    assert np.abs(gaussian_filter(nearest, sigma=4, mode="mirror") - expected).max() > 1e-3 * expected.max()
    # one bank vector: the re-weighting softmax is over one neighbour, so eq. 7 gives weight 0
    assert output["pred_score"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.fixture()
def faiss_installed() -> None:
    import os

    try:
        import faiss  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("faiss-cpu is not installed (pip install '.[faiss]'; required in CI)")
        pytest.skip("faiss-cpu is not installed (pip install '.[faiss]')")


def test_faiss_finds_the_same_neighbours_and_distances_as_torch(faiss_installed):
    from anomalyzoo.models.components.nearest_neighbors import faiss_index

    generator = torch.Generator().manual_seed(2)
    queries, bank = torch.randn(700, 32, generator=generator) + 3.0, torch.randn(900, 32, generator=generator) + 3.0
    torch_distances, torch_indices = nearest_neighbors(queries, bank, k=4, chunk_size=256)
    faiss_distances, faiss_indices = nearest_neighbors(queries, bank, k=4, index=faiss_index(bank))
    reference = torch.cdist(queries.double(), bank.double()).topk(4, largest=False)
    assert torch.equal(torch_indices, reference.indices) and torch.equal(faiss_indices, reference.indices)
    # the distances are recomputed directly: no cancellation, the same numbers on both paths
    assert torch.equal(torch_distances, faiss_distances)
    assert torch.allclose(torch_distances.double(), reference.values, rtol=1e-6, atol=0)


def test_patchcore_scores_are_unchanged_with_the_faiss_search(faiss_installed, synthetic_dataset_dir, tmp_path):
    from anomalyzoo import ModelRegistry
    from anomalyzoo.data import get_dataloaders

    options = {"backbone": "resnet18", "pretrained": False}
    train_loader, test_loader = get_dataloaders("mvtec", "synthetic_object", img_size=64, batch_size=8, normalize=True,
                                                dataset_dir=synthetic_dataset_dir, seed=0)
    trainer = ModelRegistry.get_trainer("patchcore", options, {"img_size": 64, "progress": False}, device="cpu")
    trainer.fit(train_loader)
    checkpoint = trainer.save_model(tmp_path / "model.pth")
    with_faiss = ModelRegistry.get_trainer("patchcore", {**options, "knn_backend": "faiss"},
                                           {"img_size": 64, "progress": False}, device="cpu").load_model(checkpoint)
    expected, got = trainer.validation_epoch(test_loader), with_faiss.validation_epoch(test_loader)
    assert len(expected.scores) > 10 and len(np.unique(expected.scores)) > 10
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-4, atol=0)
    np.testing.assert_allclose(got.anomaly_maps, expected.anomaly_maps, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="knn_backend"):
        PatchcoreModel("resnet18", pretrained=False, knn_backend="annoy")
