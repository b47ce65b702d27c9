import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import auroc
from anomalyzoo.models.csflow import (
    CrossConvolutions,
    CrossScaleFlow,
    CsFlowModel,
    CsFlowTrainer,
    ParallelCouplingBlock,
    ParallelPermute,
    cs_flow_loss,
    soft_clamp,
)
from anomalyzoo.predict import load_trainer

SIZES = ((4, 4), (2, 2), (1, 1))  # three scales, each half the previous


def random_scales(channels: int, batch: int = 2, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, *size, generator=generator, dtype=dtype) for size in SIZES]


def activate(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero gammas and larger output weights, so the couplings are far from the identity
    (a fresh block is the identity: every gamma starts at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for subnet in module.modules():
            if isinstance(subnet, CrossConvolutions):
                subnet.gammas.copy_(torch.rand(3, generator=generator, dtype=subnet.gammas.dtype) + 0.5)
                for conv in (*subnet.output_convs, *subnet.up_convs, *subnet.down_convs):
                    conv.weight.mul_(4.0)
    return module


def flat(maps: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.flatten(1) for m in maps], dim=1)


def unflat(vector: torch.Tensor, channels: int) -> list[torch.Tensor]:
    maps, start = [], 0
    for height, width in SIZES:
        count = channels * height * width
        maps.append(vector[:, start:start + count].reshape(-1, channels, height, width))
        start += count
    return maps


def autograd_log_det(function, inputs: list[torch.Tensor], channels: int) -> torch.Tensor:
    """log|det J| of ``function`` (three maps -> three maps) for each image, by autograd."""
    values = []
    for image in range(inputs[0].shape[0]):
        vector = flat([x[image:image + 1] for x in inputs])[0]
        jacobian = torch.autograd.functional.jacobian(lambda v: flat(function(unflat(v[None], channels)))[0], vector)
        values.append(torch.linalg.slogdet(jacobian).logabsdet)
    return torch.stack(values)


def test_soft_clamp_is_the_authors_arctan():
    values = torch.tensor([-100.0, -4.0, -1.0, -0.01, 0.0, 0.5, 3.0, 1e4])
    expected = [3.0 * 0.636 * math.atan(v / 3.0) for v in values.tolist()]
    assert torch.allclose(soft_clamp(values, 3.0), torch.tensor(expected), atol=1e-6)
    assert torch.equal(soft_clamp(-values, 3.0), -soft_clamp(values, 3.0))
    assert float(soft_clamp(torch.tensor(1e9), 3.0)) < 3.0  # bounded by 0.636 * pi / 2 * clamp = 0.999 clamp
    small = torch.tensor(1e-3, requires_grad=True)
    soft_clamp(small, 3.0).backward()
    assert float(small.grad) == pytest.approx(0.636, rel=1e-5)  # slope 0.636 at 0 (the authors' 2/pi)


def test_permutations_are_the_authors_and_invert():
    state = np.random.get_state()
    np.random.seed(2)  # freia_funcs.ParallelPermute: np.random.seed(k), then one permutation per scale
    expected = [np.random.permutation(7) for _ in range(3)]
    np.random.set_state(state)
    permute = ParallelPermute(7, seed=2)
    assert [p.tolist() for p in permute.permutations] == [e.tolist() for e in expected]
    inputs = random_scales(7)
    permuted = permute(inputs)
    assert torch.equal(permuted[0], inputs[0][:, torch.from_numpy(expected[0])])
    assert all(torch.equal(a, b) for a, b in zip(permute(permuted, reverse=True), inputs))


def test_cross_convolutions_follow_the_authors_wiring():
    """CrossConvolutions.forward written out as the authors do (out0 = conv0_1(y0) + up10(up(y1)),
    out1 = conv1_1(y1) + down01(y0) + up21(up(y2)), out2 = conv2_1(y2) + down12(y1), times gammas)."""
    torch.manual_seed(0)
    subnet = activate(CrossConvolutions(3, 4, hidden_channels=5, kernel_size=3).double())
    x0, x1, x2 = random_scales(3)
    y0, y1, y2 = (F.leaky_relu(conv(x), 0.1) for conv, x in zip(subnet.hidden_convs, (x0, x1, x2)))
    up = lambda y: F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    expected = [
        subnet.output_convs[0](y0) + subnet.up_convs[0](up(y1)),
        subnet.output_convs[1](y1) + subnet.down_convs[0](y0) + subnet.up_convs[1](up(y2)),
        subnet.output_convs[2](y2) + subnet.down_convs[1](y1),
    ]
    outputs = subnet([x0, x1, x2])
    for scale, (out, want) in enumerate(zip(outputs, expected)):
        assert torch.allclose(out, subnet.gammas[scale] * want)
    # only neighbouring scales talk: the finest output does not see the coarsest input
    changed = subnet([x0, x1, x2 + 1.0])
    assert torch.equal(changed[0], outputs[0]) and not torch.allclose(changed[1], outputs[1])


def test_fresh_flow_is_the_identity():
    """Every gamma starts at 0 (config.use_gamma), so s = t = 0 and each coupling is the identity."""
    torch.manual_seed(0)
    flow = CrossScaleFlow(6, n_coupling_blocks=2, hidden_channels=4, kernel_size=3, last_kernel_size=5, clamp=3.0).double()
    features = random_scales(6)
    latents, log_jac_det = flow(features)
    permuted = features
    for permute in flow.permutations:
        permuted = permute(permuted)
    assert all(torch.equal(z, p) for z, p in zip(latents, permuted))
    assert torch.equal(log_jac_det, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("channels", [4, 5])  # 5: unequal halves (2 and 3), as FrEIA splits odd channels
def test_parallel_coupling_inverts_and_its_log_det_matches_autograd(channels):
    torch.manual_seed(channels)
    block = activate(ParallelCouplingBlock(channels, hidden_channels=6, kernel_size=3, clamp=3.0).double(), seed=channels)
    inputs = random_scales(channels, seed=channels)
    outputs, log_jac_det = block(inputs)
    assert log_jac_det.shape == (2,)
    assert max(float((y - x).detach().abs().max()) for x, y in zip(inputs, outputs)) > 0.5  # far from the identity
    reconstructed, inverse_log_det = block(outputs, reverse=True)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(reconstructed, inputs))
    assert torch.allclose(inverse_log_det, -log_jac_det)
    expected = autograd_log_det(lambda maps: block(maps)[0], inputs, channels)
    assert torch.allclose(log_jac_det, expected, atol=1e-8)


def test_cross_scale_flow_inverts_and_its_log_det_matches_autograd():
    torch.manual_seed(1)
    flow = activate(CrossScaleFlow(5, n_coupling_blocks=3, hidden_channels=6, kernel_size=3, last_kernel_size=5,
                                   clamp=3.0).double(), seed=1)
    assert [c.first_half_subnet.hidden_convs[0].kernel_size for c in flow.couplings] == [(3, 3), (3, 3), (5, 5)]
    features = random_scales(5, seed=1)
    latents, log_jac_det = flow(features)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(flow.inverse(latents), features))
    expected = autograd_log_det(lambda maps: flow(maps)[0], features, 5)
    assert torch.allclose(log_jac_det, expected, atol=1e-8)


def test_loss_against_a_naive_transcription():
    """utils.get_loss: mean over images of 0.5 * sum(z^2) - log|det J|, divided by D."""
    latents = random_scales(3, batch=3, seed=4)
    log_jac_det = torch.tensor([0.5, -2.0, 7.0], dtype=torch.float64)
    dims = sum(3 * h * w for h, w in SIZES)
    total = 0.0
    for image in range(3):
        squares = sum(float(v) ** 2 for z in latents for v in z[image].flatten())
        total += 0.5 * squares - float(log_jac_det[image])
    assert float(cs_flow_loss(latents, log_jac_det)) == pytest.approx(total / 3 / dims, rel=1e-12)
    # a mean over the batch: the same images twice give the same loss
    doubled = [torch.cat([z, z]) for z in latents]
    assert float(cs_flow_loss(doubled, log_jac_det.repeat(2))) == pytest.approx(total / 3 / dims, rel=1e-12)


@pytest.fixture(scope="module")
def tiny_model() -> CsFlowModel:
    torch.manual_seed(0)
    model = CsFlowModel("efficientnet_lite0", pretrained=False, feature_stage=3, hidden_channels=8, input_size=(64, 64))
    return activate(model).eval()


def test_score_and_map_follow_the_authors_evaluation(tiny_model):
    """Score: mean of z^2 / 2 over all latent entries of the three scales (train.py, evaluate.py);
    map: mean_c(z^2) of the finest scale, bilinearly upsampled; 'product': anomalib's product."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        output = tiny_model(images)
        latents, _ = tiny_model.latents(images)
    assert [tuple(z.shape[-2:]) for z in latents] == [(8, 8), (4, 4), (2, 2)]
    dims = sum(z[0].numel() for z in latents)
    expected_scores = [sum(float((z[i] ** 2).sum()) for z in latents) / 2 / dims for i in range(2)]
    assert output["pred_score"].tolist() == pytest.approx(expected_scores, rel=1e-5)
    per_scale = [F.interpolate((z ** 2).mean(1, keepdim=True), size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
                 for z in latents]
    assert torch.allclose(output["anomaly_map"], per_scale[0], rtol=1e-5)
    tiny_model.anomaly_map_mode = "product"
    try:
        with torch.no_grad():
            product = tiny_model(images)["anomaly_map"]
    finally:
        tiny_model.anomaly_map_mode = "largest_scale"
    assert torch.allclose(product, per_scale[0] * per_scale[1] * per_scale[2], rtol=1e-5)


def test_features_are_one_frozen_stage_at_three_nearest_resized_scales(tiny_model):
    extractor = tiny_model.feature_extractor
    assert len(extractor.backbone.blocks) == 3  # stages after feature_stage are pruned
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    features = tiny_model.features(images)
    half = F.interpolate(images, size=(32, 32), mode="nearest")
    expected = extractor.backbone.forward_intermediates(half * extractor.input_scale + extractor.input_shift, indices=[3],
                                                        intermediates_only=True, extra_blocks=True)[0]
    assert torch.allclose(features[1], expected)
    assert not any(p.requires_grad for p in extractor.parameters())
    tiny_model.train()
    assert not extractor.backbone.training  # BatchNorm stays in eval mode while the flow trains
    tiny_model.eval()


def test_sizes_that_do_not_halve_and_non_efficientnet_backbones_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):  # stage 3 (stride 8) at 48 px: maps 6, 3, 2
        CsFlowModel("efficientnet_lite0", pretrained=False, feature_stage=3, hidden_channels=4, input_size=(48, 48))
    with pytest.raises(ValueError, match="EfficientNet"):
        CsFlowModel("resnet18", pretrained=False, hidden_channels=4, input_size=(64, 64))
    with pytest.raises(ValueError, match="feature_stage"):
        CsFlowModel("efficientnet_lite0", pretrained=False, feature_stage=8, hidden_channels=4, input_size=(64, 64))


def test_optimiser_and_clipping_are_the_authors():
    trainer = CsFlowTrainer(backbone="efficientnet_lite0", pretrained=False, feature_stage=3, hidden_channels=4,
                            train_config={"img_size": 64}, device="cpu")
    trainer.setup_optimization()
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.Adam) and trainer.scheduler is None
    assert (group["lr"], group["eps"], group["weight_decay"], tuple(group["betas"])) == (2e-4, 1e-4, 1e-5, (0.9, 0.999))
    assert {id(p) for p in group["params"]} == {id(p) for p in trainer.model.flow.parameters()}
    assert trainer.train_config.gradient_clip_norm == 1.0  # config.max_grad_norm


def test_csflow_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    # ImageNet Lite0 weights; stage 5 (stride 16) gives 8/4/2 maps at 128 px, as stage 6 does at 256 px
    result = train("mvtec", "synthetic_texture", "csflow", num_epochs=2, batch_size=4, img_size=128,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, backbone="efficientnet_lite0",
                   feature_stage=5, hidden_channels=64, max_maps=1, progress=False)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds")})
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
    trainer = load_trainer(result["checkpoint"], device="cpu")
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=128, batch_size=4,
                                     dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
