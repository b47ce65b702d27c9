"""EfficientAD (Batzner, Heckler, Koenig; arXiv 2303.14535, WACV 2024): the networks and losses
(:mod:`.model`, whose docstring is the method with every deviation), the training loop
(:mod:`.trainer`) and the offline teacher pretraining (:mod:`.distillation`)."""

from anomalyzoo.models.components.variants import ModelVariant
from anomalyzoo.models.efficientad.distillation import channel_pooling_matrix, distill_teacher
from anomalyzoo.models.efficientad.model import (
    MODEL_SIZES,
    PAPER_NUM_STEPS,
    Autoencoder,
    EfficientAdModel,
    PatchDescriptionNetwork,
    hard_feature_loss,
    quantile,
    teacher_weights_name,
)
from anomalyzoo.models.efficientad.trainer import EfficientAdTrainer, color_jitter, map_quantiles, teacher_channel_statistics

__all__ = [
    "MODEL_SIZES",
    "Autoencoder",
    "EfficientAdModel",
    "EfficientAdTrainer",
    "PatchDescriptionNetwork",
    "VARIANTS",
    "channel_pooling_matrix",
    "color_jitter",
    "distill_teacher",
    "hard_feature_loss",
    "map_quantiles",
    "quantile",
    "teacher_channel_statistics",
    "teacher_weights_name",
]

# Variants are data: one registry row per PDN size (Tables 6 and 7).
VARIANTS = {
    f"efficientad-{size}": ModelVariant(
        trainer=EfficientAdTrainer, family="distillation", options={"model_size": size},
        train={"num_epochs": 20, "batch_size": 1, "img_size": 256, "normalize": False},
        tiny={"pretrained": False, "img_size": 64, "num_steps": 2},
        paper={"num_steps": PAPER_NUM_STEPS},
    )
    for size in MODEL_SIZES
}
