import numpy as np
import pytest

from anomalyzoo.metrics.normalization import NormalStatistics, min_max_normalize, normal_statistics


def test_threshold_maps_to_one_half_and_the_scale_is_the_normal_spread():
    # normal scores 1..5: min 1, max 5, threshold 4.5 -> (v - 4.5) / 4 + 0.5
    values = min_max_normalize(np.array([4.5, 6.5, 0.5, 2.5, 100.0]), threshold=4.5, minimum=1.0, maximum=5.0)
    np.testing.assert_allclose(values, [0.5, 1.0, 0.0, 0.0, 1.0])
    assert min_max_normalize(5.0, 4.5, 1.0, 5.0) == pytest.approx(0.625)
    # every normal score equal: still finite, the threshold still at 0.5
    assert min_max_normalize(3.0, 3.0, 3.0, 3.0) == pytest.approx(0.5)


def test_statistics_of_normal_scores_and_maps():
    rng = np.random.default_rng(0)
    scores = rng.normal(10.0, 2.0, size=40)
    maps = rng.random((40, 8, 8))
    maps[3, 2, 2] = 7.0  # one hot pixel in one normal image
    stats = normal_statistics(scores, maps, percentile=95.0)
    assert stats.num_images == 40 and stats.threshold_name == "normal_val_p95"
    assert stats.image_threshold == pytest.approx(np.percentile(scores, 95))
    assert (stats.image_min, stats.image_max) == (pytest.approx(scores.min()), pytest.approx(scores.max()))
    # pixel threshold: the percentile over images of each image's hottest pixel
    assert stats.pixel_threshold == pytest.approx(np.percentile(maps.reshape(40, -1).max(axis=1), 95))
    assert stats.pixel_max == pytest.approx(7.0)
    low, high = stats.map_display_range()
    np.testing.assert_allclose(stats.normalize_maps(np.array([low, stats.pixel_threshold, high])), [0.0, 0.5, 1.0], atol=1e-12)
    assert NormalStatistics.from_dict(stats.as_dict()) == stats
    # about 5 % of these normals are above their own p95 threshold
    assert np.mean(stats.normalize_scores(scores) > 0.5) == pytest.approx(0.05, abs=0.026)


def test_image_level_models_have_no_pixel_statistics():
    stats = normal_statistics(np.array([1.0, 2.0, 3.0]), None)
    assert stats.pixel_threshold is None and stats.map_display_range() is None
    with pytest.raises(ValueError, match="without anomaly maps"):
        stats.normalize_maps(np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        normal_statistics(np.array([1.0, np.nan]), None)
