"""DSR (models/dsr.py): the EMA vector quantiser (straight-through gradient, codebook update by
hand), the authors' VQ-VAE file layout and its loading rules, the latent anomaly generation of
train_dsr.py, the stage-one wiring, the scoring of test_dsr.py, the two-stage schedule,
pretrain_dsr, and a synthetic end-to-end run from a VQ-VAE pretrained by the test."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics.roc import auroc
from anomalyzoo.models.components.backbone import BackboneWeightsNotFound
from anomalyzoo.models.dsr import (
    DiscreteLatentModel,
    DsrModel,
    DsrTrainer,
    VectorQuantizerEMA,
    distant_codes,
    insert_latent_anomalies,
    pretrain_dsr,
    stage_two_batch,
)
from anomalyzoo.predict import load_trainer
from anomalyzoo.settings import set_globals

TINY = {"embedding_dim": 8, "num_embeddings": 32, "num_hiddens": 8, "num_residual_hiddens": 4, "detection_width": 4}
TINY_VQ = {"embedding_dim": 8, "num_embeddings": 32, "num_hiddens": 8, "num_residual_hiddens": 4}  # pretrain_dsr's


# ----------------------------------------------------------------------------- the quantiser
def test_quantiser_picks_the_nearest_code_and_passes_the_gradient_straight_through():
    torch.manual_seed(0)
    quantiser = VectorQuantizerEMA(num_embeddings=5, embedding_dim=3).eval()
    inputs = torch.randn(2, 3, 4, 4, requires_grad=True)
    output = quantiser(inputs)
    flat = inputs.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(flat, quantiser.codebook).argmin(dim=1)
    assert torch.equal(output.indices.reshape(-1), nearest)
    torch.testing.assert_close(output.quantized.detach().permute(0, 2, 3, 1).reshape(-1, 3), quantiser.codebook[nearest])
    weights = torch.randn_like(inputs)
    (output.quantized * weights).sum().backward()
    torch.testing.assert_close(inputs.grad, weights)  # identity: the straight-through estimator
    inputs.grad = None
    quantiser(inputs).loss.backward()  # 0.25 * MSE(codes, inputs): gradient 0.5 (x - code) / N
    codes = quantiser.codebook[nearest].reshape(2, 4, 4, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(inputs.grad, 0.5 * (inputs.detach() - codes) / inputs.numel())
    assert not quantiser.codebook.requires_grad and not quantiser._ema_w.requires_grad


def test_codebook_follows_the_ema_update_by_hand_and_only_in_training():
    quantiser = VectorQuantizerEMA(num_embeddings=3, embedding_dim=2, decay=0.9, epsilon=1e-5)
    with torch.no_grad():
        quantiser._embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
        quantiser._ema_w.copy_(quantiser._embedding.weight)
        quantiser._ema_cluster_size.fill_(1.0)
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]])  # two to code 0, one to code 1
    inputs = points.T.reshape(1, 2, 3, 1)
    quantiser.eval()(inputs)
    assert torch.equal(quantiser._ema_cluster_size, torch.ones(3))  # eval: nothing moves
    quantiser.train()(inputs)
    counts = torch.tensor([2.0, 1.0, 0.0])
    size = 0.9 * torch.ones(3) + 0.1 * counts
    total = size.sum()
    size = (size + 1e-5) / (total + 3 * 1e-5) * total  # Laplace smoothing
    ema_w = 0.9 * torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]) + 0.1 * torch.tensor([[1.0, 1.0], [9.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(quantiser._ema_cluster_size, size)
    torch.testing.assert_close(quantiser._ema_w.detach(), ema_w)
    torch.testing.assert_close(quantiser.codebook, ema_w / size[:, None])


def test_pretraining_restarts_dead_codes_on_inputs_and_dsr_never_does():
    torch.manual_seed(0)
    inputs = 0.01 * torch.randn(1, 4, 8, 8)  # near the origin, far from the N(0, 1) codes
    plain = VectorQuantizerEMA(num_embeddings=16, embedding_dim=4).train()
    plain(inputs)
    assert int((plain._ema_cluster_size > 0.05).sum()) <= 2  # without restarts: one or two codes take everything
    restarting = VectorQuantizerEMA(num_embeddings=16, embedding_dim=4).train()
    restarting.dead_code_threshold = 1.0
    restarting(inputs)
    flat = inputs.permute(0, 2, 3, 1).reshape(-1, 4)
    restarted = restarting._ema_cluster_size == 1.0
    assert int(restarted.sum()) >= 14
    for code in restarting.codebook[restarted]:
        assert (flat == code).all(dim=1).any()  # moved onto an input of the batch
    assert DsrModel(pretrained=False, **TINY).vq_model._vq_vae_bot.dead_code_threshold is None


def test_residual_blocks_compute_what_the_authors_in_place_relu_computes():
    """discrete_model.py: ``x + self._block(x)`` with ``ReLU(True)`` first rectifies ``x`` itself."""
    from anomalyzoo.models.dsr.vq_vae import Residual

    torch.manual_seed(0)
    ours = Residual(6, 6, 3)
    authors = torch.nn.Sequential(torch.nn.ReLU(True), torch.nn.Conv2d(6, 3, 3, padding=1, bias=False),
                                  torch.nn.ReLU(True), torch.nn.Conv2d(3, 6, 1, bias=False))
    authors.load_state_dict(ours._block.state_dict())
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        expected = (lambda t: t + authors(t))(x.clone())
        torch.testing.assert_close(ours(x), expected)
        assert not torch.allclose(ours(x), x + ours._block(x))  # not the textbook x + f(x)


# ----------------------------------------------------------------------------- the authors' VQ file
def official_vq_layout(hiddens: int = 128, residual_hiddens: int = 64, dim: int = 128, codes: int = 4096) -> dict[str, tuple]:
    """Key -> shape of ``DiscreteLatentModel(128, 2, 64, 4096, 128, 0.25, 0.99).state_dict()`` in the
    authors' discrete_model.py, written out from that file."""
    layout: dict[str, tuple] = {}

    def residual_stack(prefix: str) -> None:
        for layer in range(2):
            layout[f"{prefix}._residual_stack._layers.{layer}._block.1.weight"] = (residual_hiddens, hiddens, 3, 3)
            layout[f"{prefix}._residual_stack._layers.{layer}._block.3.weight"] = (hiddens, residual_hiddens, 1, 1)

    def conv(name: str, out_channels: int, in_channels: int, kernel: int, transposed: bool = False) -> None:
        layout[f"{name}.weight"] = (in_channels, out_channels, kernel, kernel) if transposed else (out_channels, in_channels, kernel, kernel)
        layout[f"{name}.bias"] = (out_channels,)

    conv("_encoder_t._conv_1", hiddens, hiddens, 4)
    conv("_encoder_t._conv_2", hiddens, hiddens, 3)
    residual_stack("_encoder_t")
    conv("_encoder_b._conv_1", hiddens // 2, 3, 4)
    conv("_encoder_b._conv_2", hiddens, hiddens // 2, 4)
    conv("_encoder_b._conv_3", hiddens, hiddens, 3)
    residual_stack("_encoder_b")
    conv("_pre_vq_conv_bot", dim, hiddens + dim, 1)
    conv("_pre_vq_conv_top", dim, hiddens, 1)
    for quantiser in ("_vq_vae_top", "_vq_vae_bot"):
        layout[f"{quantiser}._ema_w"] = (codes, dim)
        layout[f"{quantiser}._ema_cluster_size"] = (codes,)
        layout[f"{quantiser}._embedding.weight"] = (codes, dim)
    conv("_decoder_b._conv_1", hiddens, 2 * dim, 3)
    residual_stack("_decoder_b")
    conv("_decoder_b._conv_trans_1", hiddens // 2, hiddens, 4, transposed=True)
    conv("_decoder_b._conv_trans_2", 3, hiddens // 2, 4, transposed=True)
    conv("upsample_t", dim, dim, 4, transposed=True)
    return layout


def test_the_vq_model_has_the_authors_layout_key_for_key():
    ours = {key: tuple(value.shape) for key, value in DiscreteLatentModel().state_dict().items()}
    assert ours == official_vq_layout()


def write_official_file(backbone_dir, generator_seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(generator_seed)
    state = {key: torch.randn(shape, generator=generator) for key, shape in official_vq_layout().items()}
    path = backbone_dir / "dsr" / "vq_model_pretrained_128_4096.pckl"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_the_authors_file_loads_with_every_tensor_mapped(tmp_path):
    state = write_official_file(tmp_path)
    set_globals(backbone_dir=tmp_path)
    model = DsrModel(pretrained=True)
    loaded = model.vq_model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert not any(p.requires_grad for p in model.vq_model.parameters())


def test_a_missing_vq_file_names_both_fixes(tmp_path):
    set_globals(backbone_dir=tmp_path)
    with pytest.raises(BackboneWeightsNotFound) as error:
        DsrModel(pretrained=True)
    message = str(error.value)
    assert str(tmp_path / "dsr" / "vq_model_pretrained_128_4096.pckl") in message
    assert "anomalyzoo pretrain-dsr --images DIR" in message and "authors'" in message


class NotATensor:
    """Anything whose unpickling would need code from outside torch."""


def test_a_file_that_needs_arbitrary_unpickling_is_refused(tmp_path):
    path = tmp_path / "dsr" / "vq_model_pretrained_128_4096.pckl"
    path.parent.mkdir(parents=True)
    torch.save({"model": NotATensor()}, path)
    set_globals(backbone_dir=tmp_path)
    with pytest.raises(ValueError, match="Refusing to load .*arbitrary"):
        DsrModel(pretrained=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="truncated or not a PyTorch state dict"):
        DsrModel(pretrained=True)


def test_a_vq_file_of_other_sizes_is_a_clear_error(tmp_path):
    set_globals(backbone_dir=tmp_path)
    path = tmp_path / "dsr" / "vq_model_pretrained_128_4096.pckl"
    path.parent.mkdir(parents=True)
    torch.save(DiscreteLatentModel(num_embeddings=16, embedding_dim=8).state_dict(), path)
    with pytest.raises(ValueError, match=r"codebook: \(16, 8\)"):
        DsrModel(pretrained=True)


# ----------------------------------------------------------------------------- latent anomalies
def test_distant_codes_are_drawn_between_the_skipped_and_the_strength_rank():
    torch.manual_seed(0)
    codebook = torch.zeros(100, 2)
    codebook[:, 0] = torch.arange(100, dtype=torch.float32)  # rank of code i from the origin: i
    features = torch.zeros(4000, 2)
    picked = distant_codes(features, codebook, strength=0.2)[:, 0].long()
    # K = 100: skip int(0.05 K) = 5 nearest, draw among ranks up to max(1, min(int(0.2 K) + 1, K - 1)) = 21
    assert int(picked.min()) == 5 and int(picked.max()) == 20
    assert len(picked.unique()) == 16
    strongest = distant_codes(features, codebook, strength=0.999)[:, 0].long()
    assert int(strongest.max()) == 98  # at most K - 1 ranks


def test_only_positions_under_the_pooled_mask_change():
    torch.manual_seed(0)
    codebook = torch.randn(32, 4)
    features = torch.randn(2, 4, 4, 4)
    codes = codebook[torch.randint(32, (2, 4, 4))].permute(0, 3, 1, 2)
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, 0, 5, 6] = 1  # one pixel: its 4x4 cell (1, 1) of the grid
    altered = insert_latent_anomalies(features, codes, codebook, masks, torch.tensor([0.2, 0.2]))
    changed = (altered != codes).any(dim=1)
    assert changed[0, 1, 1] and int(changed.sum()) == 1
    assert any(torch.equal(altered[0, :, 1, 1], code) for code in codebook)  # a codebook vector


def test_stage_one_targets_follow_the_altered_grid_and_the_detection_module_sees_detached_images():
    torch.manual_seed(3)
    model = DsrModel(pretrained=False, **TINY).train()
    images = torch.rand(8, 3, 64, 64)
    masks = torch.zeros(8, 1, 64, 64)
    masks[:, :, 20:23, 30:33] = 1
    outputs = model.stage_one(images, masks)
    coarse = F.interpolate(F.max_pool2d(masks, 8), size=(64, 64))  # Q_lo: 8 x 8 pixel cells
    fine = F.interpolate(F.max_pool2d(masks, 4), size=(64, 64))  # Q_hi: 4 x 4
    for target in outputs.target_masks:
        assert torch.equal(target, coarse[0]) or torch.equal(target, fine[0])
    assert outputs.restored_top.shape == outputs.normal_top.shape == (8, 8, 8, 8)
    assert outputs.restored_bottom.shape == outputs.normal_bottom.shape == (8, 8, 16, 16)
    probabilities = torch.softmax(outputs.detection_logits, dim=1)
    from anomalyzoo.models.components.focal_loss import focal_loss
    focal_loss(probabilities, outputs.target_masks).backward(retain_graph=True)
    assert all(p.grad is None for p in model.image_reconstruction.parameters())  # detached input
    assert any(p.grad is not None for p in model.anomaly_detection.parameters())
    F.mse_loss(outputs.object_specific, images).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.subspace_restriction_hi.parameters())


def test_stage_two_paints_uniform_colours_inside_the_masks(monkeypatch):
    import anomalyzoo.models.dsr.trainer as dsr

    torch.manual_seed(0)
    images = torch.full((16, 3, 32, 32), 0.5)
    monkeypatch.setattr(dsr, "STAGE_TWO_ROTATION_PROBABILITY", 0.0)
    augmented, masks = stage_two_batch(images)
    outside = masks.expand_as(augmented) == 0
    assert torch.equal(augmented[outside], images[outside])
    empty = masks.flatten(1).amax(dim=1) == 0
    assert 3 <= int(empty.sum()) <= 13  # half stay normal
    for image, mask in zip(augmented[~empty], masks[~empty]):
        inside = image[:, mask[0] > 0]
        assert torch.allclose(inside, inside[:, :1].expand_as(inside), atol=1e-6)  # one colour per image
    monkeypatch.setattr(dsr, "STAGE_TWO_ROTATION_PROBABILITY", 1.0)  # rotated: corners leave the frame (zeros)
    rotated, _ = stage_two_batch(images)
    assert float(rotated[:, :, 0, 0].abs().max()) < 0.5 + 1e-6 and int((rotated[:, :, 0, 0] == 0).all(dim=1).sum()) >= 8


# ----------------------------------------------------------------------------- scoring
def test_the_map_is_the_upsampling_softmax_and_the_score_the_pooled_detection_maximum():
    torch.manual_seed(0)
    model = DsrModel(pretrained=False, **TINY).eval()
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        outputs = model.detect(images.flip(1))
        result = model(images)
    torch.testing.assert_close(result["anomaly_map"], torch.softmax(outputs.upsampled_logits, dim=1)[:, 1])
    detection = torch.softmax(outputs.detection_logits, dim=1)[:, 1].numpy().astype(np.float64)
    padded = np.pad(detection, ((0, 0), (10, 10), (10, 10)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (21, 21), axis=(1, 2))
    np.testing.assert_allclose(result["pred_score"].numpy(), (windows.sum(axis=(-2, -1)) / 441).max(axis=(1, 2)), rtol=1e-5)


def test_networks_see_bgr_images_like_the_authors_opencv_pipeline():
    model = DsrModel(pretrained=False, **TINY).eval()
    seen = {}
    model.vq_model._encoder_b.register_forward_hook(lambda module, inputs, output: seen.update(input=inputs[0]))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        model(images)
    torch.testing.assert_close(seen["input"], images[:, [2, 1, 0]])
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 48, 64))


# ----------------------------------------------------------------------------- schedule
def test_two_stages_split_the_steps_and_only_their_modules_learn():
    torch.manual_seed(0)
    trainer = DsrTrainer(pretrained=False, **TINY, train_config={"img_size": 64, "num_steps": 6}, device="cpu")
    trainer.total_steps = 6
    trainer.setup_optimization()
    assert trainer.stage_one_steps() == 4  # two thirds, then the upsampling module (authors: 100 + 50 epochs)
    assert [trainer.stage_one_lr_factor(step) for step in (2, 3)] == [1.0, 0.1]  # x 0.1 from int(0.8 * 4) = 3
    vq_before = {k: v.clone() for k, v in trainer.model.vq_model.state_dict().items()}
    batch = {"image": torch.rand(4, 3, 64, 64)}

    def snapshot(module: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()

    upsampling, detection = snapshot(trainer.model.upsampling), snapshot(trainer.model.anomaly_detection)
    trainer.model.train()
    trainer.train_step(batch)
    assert not torch.equal(snapshot(trainer.model.anomaly_detection), detection)
    assert torch.equal(snapshot(trainer.model.upsampling), upsampling)  # not in stage one
    trainer.global_step = 4
    detection = snapshot(trainer.model.anomaly_detection)
    logs = trainer.train_step(batch)
    assert set(logs) == {"loss", "loss_upsampling_focal"}
    assert torch.equal(snapshot(trainer.model.anomaly_detection), detection)
    assert not torch.equal(snapshot(trainer.model.upsampling), upsampling)
    assert not trainer.model.vq_model.training
    for key, value in trainer.model.vq_model.state_dict().items():
        assert torch.equal(value, vq_before[key]), key  # frozen: no gradient, no EMA


def test_stage_one_loss_is_focal_plus_both_feature_terms_plus_ten_times_the_image_term():
    torch.manual_seed(0)
    trainer = DsrTrainer(pretrained=False, **TINY, train_config={"img_size": 64, "num_steps": 3}, device="cpu")
    losses = trainer.training_loss({"image": torch.rand(4, 3, 64, 64)})
    assert set(losses) == {"loss", "loss_focal", "loss_feature_top", "loss_feature_bottom", "loss_image"}
    expected = losses["loss_focal"] + losses["loss_feature_top"] + losses["loss_feature_bottom"] + 10 * losses["loss_image"]
    torch.testing.assert_close(losses["loss"], expected)


def test_the_paper_schedule_is_listed():
    from anomalyzoo import ModelRegistry

    assert ModelRegistry.get("dsr").paper_schedule == {"num_steps": 150_000}


# ----------------------------------------------------------------------------- pretraining and end to end
def test_pretrain_dsr_writes_a_state_dict_that_dsr_loads_and_never_overwrites_it(synthetic_dataset_dir, tmp_path):
    images = synthetic_dataset_dir / "mvtec" / "synthetic_texture" / "train" / "good"
    set_globals(backbone_dir=tmp_path)
    path = pretrain_dsr(images, num_steps=2, batch_size=4, img_size=64, progress=False, **TINY_VQ)
    assert path == tmp_path / "dsr" / "vq_model_pretrained_128_4096.pckl"
    state = torch.load(path, weights_only=True)
    assert tuple(state["_vq_vae_bot._embedding.weight"].shape) == (32, 8)
    model = DsrModel(pretrained=True, **TINY)
    assert torch.equal(model.vq_model._vq_vae_bot.codebook, state["_vq_vae_bot._embedding.weight"])
    with pytest.raises(FileExistsError, match="overwrite"):
        pretrain_dsr(images, num_steps=1, img_size=64, progress=False, **TINY_VQ)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No images"):
        pretrain_dsr(tmp_path / "empty", output_path=tmp_path / "other.pckl", num_steps=1, img_size=64, progress=False)


def test_pretraining_lowers_the_reconstruction_error(synthetic_dataset_dir, tmp_path):
    images = synthetic_dataset_dir / "mvtec" / "synthetic_object" / "train" / "good"
    from anomalyzoo.data.images import find_images
    from anomalyzoo.data.transforms import image_to_tensor, load_rgb_image

    batch = torch.stack([image_to_tensor(load_rgb_image(f), 64, False).flip(0) for f in find_images(images)[:8]])

    def error(path) -> float:
        model = DiscreteLatentModel(**TINY_VQ).eval()
        if path is not None:
            model.load_state_dict(torch.load(path, weights_only=True))
        with torch.no_grad():
            return float(F.mse_loss(model(batch).reconstruction, batch))

    torch.manual_seed(0)
    path = pretrain_dsr(images, output_path=tmp_path / "vq.pckl", num_steps=60, batch_size=8, img_size=64, lr=2e-3,
                        progress=False, **TINY_VQ)
    assert error(path) < 0.3 * error(None)


def test_end_to_end_from_a_pretrained_vq_model_scores_and_round_trips(synthetic_dataset_dir, tmp_path):
    set_globals(backbone_dir=tmp_path / "backbones")
    images = synthetic_dataset_dir / "mvtec" / "synthetic_texture" / "train" / "good"
    pretrain_dsr(images, num_steps=60, batch_size=8, img_size=64, lr=2e-3, progress=False, **TINY_VQ)
    options = {key: value for key, value in TINY.items()}
    result = train("mvtec", "synthetic_texture", "dsr", num_epochs=3, batch_size=8, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path / "out", max_maps=1, progress=False, **options)
    assert result["num_steps"] == 3 * math.ceil(result["num_train_images"] / 8)
    assert "stage one" in result["notes"]["stages"]
    assert np.isfinite(result["image_auroc"]) and np.isfinite(result["pixel_auroc"])
    trainer = load_trainer(result["checkpoint"], device="cpu")
    assert trainer.model_config["latent_anomaly_strength"] == 0.2
    stage_one = [record["loss"] for record in trainer.history if "loss_focal" in record]
    assert len(stage_one) >= 2 and stage_one[-1] < stage_one[0], stage_one
    # the checkpoint alone (no VQ file needed: its weights travel in it) scores the test set again exactly
    shutil.rmtree(tmp_path / "backbones")
    trainer = load_trainer(result["checkpoint"], device="cpu")
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=8, normalize=False,
                                     dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
    maps = torch.from_numpy(predictions.anomaly_maps)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
