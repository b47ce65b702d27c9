"""DSR (Zavrtanik, Kristan & Skocaj, ECCV 2022): the VQ-VAE (:mod:`.vq_vae`), the networks and the
method with every deviation (:mod:`.model`), the two training stages (:mod:`.trainer`) and the
VQ-VAE pretraining (:mod:`.pretraining`)."""

from anomalyzoo.models.components.variants import ModelVariant
from anomalyzoo.models.dsr.model import DsrModel, distant_codes, insert_latent_anomalies
from anomalyzoo.models.dsr.pretraining import pretrain_dsr
from anomalyzoo.models.dsr.trainer import PAPER_NUM_STEPS, DsrTrainer, stage_one_batch, stage_two_batch
from anomalyzoo.models.dsr.vq_vae import DiscreteLatentModel, VectorQuantizerEMA, load_vq_weights

__all__ = [
    "VARIANTS",
    "DiscreteLatentModel",
    "DsrModel",
    "DsrTrainer",
    "VectorQuantizerEMA",
    "distant_codes",
    "insert_latent_anomalies",
    "load_vq_weights",
    "pretrain_dsr",
    "stage_one_batch",
    "stage_two_batch",
]

VARIANTS = {
    "dsr": ModelVariant(
        trainer=DsrTrainer, family="reconstruction",
        train={"num_epochs": 50, "batch_size": 8, "img_size": 256, "normalize": False},  # SPEC sec. 7
        tiny={"pretrained": False, "embedding_dim": 8, "num_embeddings": 32, "num_hiddens": 8,
              "num_residual_hiddens": 4, "detection_width": 4, "img_size": 64, "num_steps": 3, "batch_size": 4},
        paper={"num_steps": PAPER_NUM_STEPS},  # 100 + 50 authors' epochs of 8,000 draws, batch 8
        note="Needs the VQ-VAE at BACKBONE_DIR/dsr/vq_model_pretrained_128_4096.pckl (the authors' file, or "
             "`anomalyzoo pretrain-dsr --images DIR`). The first 2/3 of the steps train stage one, the last "
             "1/3 the upsampling module.",
    ),
}
