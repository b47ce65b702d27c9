"""FastFlow: the loss and the map against direct transcriptions, the flow's layout, the two feature
paths (CNN + LayerNorm, transformer block tokens + final norm), training, and accuracy on
synthetic data. The coupling block's inverse and log-det are tested with the block itself."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from anomalyzoo import train
from anomalyzoo.models.components.all_in_one_block import AllInOneBlock
from anomalyzoo.models.fastflow import FastflowModel, FastflowTrainer, fastflow_loss, position_likelihood


def direct_loss(latents: list[torch.Tensor], log_jac_dets: list[torch.Tensor]) -> float:
    """Per feature map and image: 0.5 * sum of z^2 over every channel and position minus the
    log-det; averaged over the images, summed over the feature maps."""
    total = 0.0
    for latent, log_jac_det in zip(latents, log_jac_dets):
        z = latent.double()
        batch, channels, height, width = z.shape
        per_image = []
        for b in range(batch):
            squares = sum(float(z[b, c, i, j]) ** 2 for c in range(channels) for i in range(height) for j in range(width))
            per_image.append(0.5 * squares - float(log_jac_det[b]))
        total += sum(per_image) / batch
    return total


def direct_map(latents: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """anomalib's AnomalyMapGenerator written out: per position exp(-0.5 * mean over channels
    of z^2), bilinear to the image, averaged over the feature maps, negated."""
    maps = []
    for latent in latents:
        batch, channels, height, width = latent.shape
        likelihood = torch.zeros(batch, 1, height, width)
        for b in range(batch):
            for i in range(height):
                for j in range(width):
                    likelihood[b, 0, i, j] = torch.exp(-0.5 * (latent[b, :, i, j] ** 2).sum() / channels)
        maps.append(F.interpolate(likelihood, size=size, mode="bilinear", align_corners=False))
    return -(sum(maps) / len(maps))[:, 0]


def random_latents(seed: int, batch: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    latents = [torch.randn(batch, 4, 5, 5, generator=generator), torch.randn(batch, 6, 3, 2, generator=generator)]
    log_jac_dets = [torch.randn(batch, generator=generator) * 10 for _ in latents]
    return latents, log_jac_dets


def test_loss_is_the_negative_log_likelihood_averaged_over_images_summed_over_maps():
    latents, log_jac_dets = random_latents(0)
    assert float(fastflow_loss(latents, log_jac_dets)) == pytest.approx(direct_loss(latents, log_jac_dets), rel=1e-5)
    # a mean over the batch: the same images twice give the same loss (a sum would double it)
    doubled = fastflow_loss([z.repeat(2, 1, 1, 1) for z in latents], [d.repeat(2) for d in log_jac_dets])
    assert float(doubled) == pytest.approx(float(fastflow_loss(latents, log_jac_dets)), rel=1e-6)
    # z = 0 leaves only minus the log-det
    zeros = [torch.zeros_like(z) for z in latents]
    assert float(fastflow_loss(zeros, log_jac_dets)) == pytest.approx(-sum(float(d.mean()) for d in log_jac_dets), rel=1e-6)


@pytest.fixture(scope="module")
def cnn_model() -> FastflowModel:
    torch.manual_seed(0)
    return FastflowModel(backbone="resnet18", pretrained=False, input_size=(64, 64)).eval()


def test_map_and_score_follow_anomalib_and_higher_means_more_anomalous(cnn_model):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = cnn_model(images)
        latents, _ = cnn_model.latents(images)
    assert output["anomaly_map"].shape == (2, 64, 64)
    assert output["pred_score"].shape == (2,)
    expected = direct_map(latents, (64, 64))
    assert torch.allclose(output["anomaly_map"], expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(output["pred_score"], output["anomaly_map"].amax(dim=(-2, -1)))
    assert (output["anomaly_map"] <= 0).all() and (output["anomaly_map"] >= -1).all()
    # sign: z = 0 (the mode of the normal distribution) is the least anomalous value, -1; latents
    # far from 0 give a map near 0, the most anomalous
    typical, unlikely = torch.zeros(1, 8, 2, 2), torch.full((1, 8, 2, 2), 3.0)
    assert torch.allclose(cnn_model.anomaly_map([typical], (4, 4)), torch.full((1, 4, 4), -1.0))
    assert (cnn_model.anomaly_map([unlikely], (4, 4)) > cnn_model.anomaly_map([typical], (4, 4))).all()
    assert torch.allclose(position_likelihood(unlikely), torch.full((1, 1, 2, 2), float(torch.exp(torch.tensor(-4.5)))))


def test_flow_layout_kernels_hidden_channels_clamp_and_hard_permutation(cnn_model):
    assert [flow.blocks[0].channels for flow in cnn_model.flows] == [64, 128, 256]  # resnet18 layer1-3
    for flow in cnn_model.flows:
        assert len(flow.blocks) == 8
        kernels = [block.subnet[0].kernel_size for block in flow.blocks]
        assert kernels == [(3, 3), (1, 1)] * 4  # alternating, starting with 3x3
        for block in flow.blocks:
            assert isinstance(block, AllInOneBlock) and block.clamp == 2.0
            first, second = block.subnet[0], block.subnet[2]
            assert first.in_channels == block.channels - block.channels // 2
            assert first.out_channels == first.in_channels  # hidden_ratio 1.0
            assert second.out_channels == 2 * (block.channels // 2)
            assert isinstance(block.subnet[1], nn.ReLU)
            assert set(block.w_perm.unique().tolist()) == {0.0, 1.0}  # a permutation, not a rotation
    only3x3 = FastflowModel(backbone="resnet18", pretrained=False, input_size=(64, 64), flow_steps=4,
                            conv3x3_only=True, hidden_ratio=0.5)
    assert [block.subnet[0].kernel_size for block in only3x3.flows[0].blocks] == [(3, 3)] * 4
    assert only3x3.flows[0].blocks[0].subnet[0].out_channels == 16  # int(32 * 0.5)


def test_cnn_features_pass_a_trainable_layernorm_over_channels_and_positions(cnn_model):
    shapes = [tuple(norm.normalized_shape) for norm in cnn_model.norms]
    assert shapes == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert all(norm.elementwise_affine for norm in cnn_model.norms)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        raw = cnn_model.feature_extractor(images)["layer2"]
        normalised = cnn_model.features(images)[1]
    flat = raw.flatten(1)
    expected = ((flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)).view_as(raw)
    assert torch.allclose(normalised, expected, atol=1e-4)  # the LayerNorm's affine starts as identity


@pytest.mark.parametrize("backbone, block", [("deit_tiny_distilled_patch16_224", 7), ("cait_xxs24_224", 20)])
def test_transformer_path_is_the_tokens_of_one_block_after_the_final_norm(backbone, block):
    """anomalib's _get_vit_features / _get_cait_features written out on a plain timm model with
    the same weights: patch embedding, prefix tokens (DeiT), position embedding, blocks 0..block,
    final norm, patch tokens reshaped to (C, H/16, W/16). No extra LayerNorm, one flow."""
    torch.manual_seed(3)
    size = 224 if backbone.startswith("deit") else 64  # DeiT at its native grid; CaiT is built for 64
    model = FastflowModel(backbone=backbone, layers=[block], pretrained=False, input_size=(size, size),
                          input_normalized=False, flow_steps=2).eval()
    assert len(model.norms) == 0 and len(model.flows) == 1 and model.flows[0].blocks[0].channels == 192
    reference = timm.create_model(backbone, pretrained=False, **({} if size == 224 else {"img_size": size})).eval()
    reference.load_state_dict(model.feature_extractor.feature_extractor.state_dict(), strict=False)
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        tokens = reference.patch_embed(x)
        prefix = 0
        if backbone.startswith("deit"):
            prefix = 2
            tokens = torch.cat([reference.cls_token.expand(1, -1, -1), reference.dist_token.expand(1, -1, -1), tokens], 1)
        tokens = reference.pos_drop(tokens + reference.pos_embed)
        for index in range(block + 1):
            tokens = reference.blocks[index](tokens)
        tokens = reference.norm(tokens)[:, prefix:]
        expected = tokens.permute(0, 2, 1).reshape(1, 192, size // 16, size // 16)
        features = model.features(images)
    assert len(features) == 1
    assert torch.allclose(features[0], expected, atol=1e-4)


def test_only_flows_and_layernorms_train_and_the_loss_decreases(synthetic_dataset_dir):
    from anomalyzoo.data import get_dataloaders

    torch.manual_seed(5)
    trainer = FastflowTrainer(backbone="resnet18", pretrained=False, train_config={"img_size": 64, "progress": False}, device="cpu")
    trainer.setup_optimization()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    expected = {id(p) for p in [*trainer.model.flows.parameters(), *trainer.model.norms.parameters()]}
    assert optimised == expected
    assert trainer.optimizer.defaults["lr"] == 1e-3 and trainer.optimizer.defaults["weight_decay"] == 1e-5
    assert all(not p.requires_grad for p in trainer.model.feature_extractor.parameters())
    loader, _ = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=8, dataset_dir=synthetic_dataset_dir)
    batch = trainer.to_device(next(iter(loader)))
    backbone_before = {k: v.clone() for k, v in trainer.model.feature_extractor.state_dict().items()}
    trainer.model.train()
    losses = [trainer.train_step(batch)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0]
    after = trainer.model.feature_extractor.state_dict()
    assert all(torch.equal(backbone_before[k], after[k]) for k in backbone_before)  # BatchNorm statistics too


def test_a_cnn_backbone_with_block_indices_is_a_clear_error():
    with pytest.raises(ValueError, match="CNN backbones take stage names"):
        FastflowModel(backbone="resnet18", layers=[40], pretrained=False, input_size=(64, 64))


def test_pretrained_cait_at_another_size_than_its_weights_is_a_clear_error(tmp_path):
    from anomalyzoo import set_globals

    torch.save(timm.create_model("cait_xxs24_224").state_dict(), tmp_path / "cait_xxs24_224.pth")  # built for 224 px
    set_globals(backbone_dir=tmp_path)
    with pytest.raises(ValueError, match="built for one input size"):
        FastflowModel(backbone="cait_xxs24_224", layers=[20], pretrained=True, input_size=(64, 64))


def test_fastflow_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_texture", "fastflow-resnet50", num_epochs=2, batch_size=4, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, backbone="efficientnet_lite0",
                   max_maps=1, progress=False)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds")})
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9


def test_transformer_rows_refuse_a_cnn_and_name_the_row_that_takes_it():
    with pytest.raises(ValueError, match="use fastflow-resnet50 with backbone='efficientnet_lite0'"):
        FastflowModel(backbone="efficientnet_lite0", layers=[40], pretrained=False, input_size=(64, 64))


@pytest.mark.parametrize("name", ["fastflow-cait", "fastflow-deit"])
def test_transformer_rows_end_to_end_on_synthetic_data(name, synthetic_dataset_dir, tmp_path):
    """The token-map path of each transformer row, on its registry tiny architecture (the pretrained
    CaiT-M48 / DeiT-B cannot be had offline): even random-weight tokens let the flow find the
    painted defects, and a broken map or score fails this."""
    from anomalyzoo import ModelRegistry

    tiny = ModelRegistry.get_tiny_config(name)
    options = {k: v for k, v in tiny.items() if k in ("backbone", "layers", "pretrained")}
    result = train("mvtec", "synthetic_texture", name, num_epochs=3, batch_size=4, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, max_maps=0, progress=False, **options)
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
