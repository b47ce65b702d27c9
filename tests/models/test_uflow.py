import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as st
import torch
import torch.nn.functional as F

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import auroc
from anomalyzoo.models.uflow import (
    MultiScaleCait,
    UflowModel,
    UflowTrainer,
    UShapedFlow,
    binomial_log10_tail,
    chi2_one_dof_quantile,
    likelihood_map,
    log10_nfa_map,
    uflow_negative_log_likelihood,
)
from anomalyzoo.predict import load_trainer


def tiny_flow(seed: int = 0) -> UShapedFlow:
    """Three scales (4 ch at 8x8, 8 at 4x4, 16 at 2x2), float64, every parameter perturbed so
    that no block is near the identity."""
    torch.manual_seed(seed)
    flow = UShapedFlow([4, 8, 16], flow_steps=2).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return flow


def tiny_pyramid(seed: int, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=generator, dtype=torch.float64) for c, s in ((4, 8), (8, 4), (16, 2))]


def test_graph_has_the_authors_channel_bookkeeping():
    """ResNet50 layer1-3 at 256 px: 1024 -> 512 up (128 ch at 32^2) + 512 out; 512 + 128 = 640 ->
    320 up (80 ch at 64^2) + 320 out; 256 + 80 = 336 -> all out (authors' Split v // 8 * 4)."""
    flow = UShapedFlow([256, 512, 1024], flow_steps=1)
    assert flow.stage_channels == [336, 640, 1024]
    assert flow.latent_channels == [336, 320, 512]
    # as many latent numbers as feature numbers (a bijection)
    sizes = [64, 32, 16]
    numbers = [sum(c * s * s for c, s in zip(channels, sizes)) for channels in (flow.latent_channels, [256, 512, 1024])]
    assert numbers[0] == numbers[1]
    # subnet kernels alternate 3x3 / 1x1, hidden channels = subnet input channels
    subnets = [block.subnet for block in UShapedFlow([256, 512, 1024], flow_steps=4).stages[2].blocks]
    assert [net[0].kernel_size for net in subnets] == [(3, 3), (1, 1), (3, 3), (1, 1)]
    assert subnets[0][0].in_channels == subnets[0][0].out_channels == 512


def test_upsampling_is_freias_irevnet_upsampling():
    """FrEIA's IRevNetUpsampling: a grouped transposed convolution whose kernel sends channel
    4k + (2i + j) of the input to position (i, j) of output channel k's 2x2 patches."""
    x = torch.randn(2, 8, 3, 5)
    kernel = torch.zeros(4, 1, 2, 2)
    kernel[0, 0, 0, 0] = kernel[1, 0, 0, 1] = kernel[2, 0, 1, 0] = kernel[3, 0, 1, 1] = 1
    expected = F.conv_transpose2d(x, torch.cat([kernel] * 2), stride=2, groups=2)
    assert torch.equal(F.pixel_shuffle(x, 2), expected)


def test_inverse_reconstructs_the_pyramid_and_log_det_is_autograds():
    flow, features = tiny_flow(), tiny_pyramid(1)
    latents, log_jac_det = flow.encode(features)
    assert [tuple(z.shape[1:]) for z in latents] == [(5, 8, 8), (6, 4, 4), (8, 2, 2)]
    reconstructed, inverse_log_det = flow.decode(latents)
    for original, again in zip(features, reconstructed):
        torch.testing.assert_close(again, original, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inverse_log_det, -log_jac_det)

    sizes = [f[0].numel() for f in features]

    def flat_map(vector: torch.Tensor) -> torch.Tensor:
        pyramid = [part.reshape(1, *f.shape[1:]) for part, f in zip(torch.split(vector, sizes), features)]
        return torch.cat([z.reshape(-1) for z in flow.encode(pyramid)[0]])

    for image in range(2):
        vector = torch.cat([f[image].reshape(-1) for f in features])
        jacobian = torch.autograd.functional.jacobian(flat_map, vector, vectorize=True)
        assert jacobian.shape == (448, 448)
        sign, log_abs_det = torch.linalg.slogdet(jacobian)
        assert sign != 0
        assert float(log_jac_det[image].detach()) == pytest.approx(float(log_abs_det), rel=1e-8, abs=1e-8)


def test_loss_is_the_authors_negative_log_likelihood():
    generator = torch.Generator().manual_seed(2)
    latents = [torch.randn(3, 5, 4, 4, generator=generator), torch.randn(3, 6, 2, 2, generator=generator)]
    log_jac_det = torch.randn(3, generator=generator)
    naive = 0.0
    for image in range(3):
        squared = sum(float((z[image] ** 2).sum()) for z in latents)
        naive += 0.5 * squared - float(log_jac_det[image])
    assert float(uflow_negative_log_likelihood(latents, log_jac_det)) == pytest.approx(naive / 3, rel=1e-6)


def test_anomaly_map_is_one_minus_the_mean_upsampled_likelihood():
    model = UflowModel(backbone="resnet18", pretrained=False, input_size=(64, 64), flow_steps=2).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = model(images)
        latents, _ = model.latents(images)
    probability = torch.zeros(2, 1, 64, 64)
    for z in latents:  # authors' get_probability, position by position before the resize
        per_position = torch.exp(-0.5 * (z ** 2).sum(dim=1, keepdim=True) / z.shape[1])
        probability += F.interpolate(per_position, size=(64, 64), mode="bilinear", align_corners=False) / len(latents)
    expected = 1 - probability[:, 0]
    assert output["anomaly_map"].shape == (2, 64, 64)
    torch.testing.assert_close(output["anomaly_map"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output["pred_score"], expected.amax(dim=(-2, -1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(likelihood_map(latents, (64, 64)), probability[:, 0], rtol=1e-5, atol=1e-6)


def test_multiscale_cait_is_the_authors_feature_extraction():
    """Authors' MCaitFeatureExtractor: patch_embed + pos_embed, blocks[:k + 1], the model's final
    norm, tokens reshaped to a map; the second CaiT reads the image resized bicubically (corners
    aligned) to half size. Two small CaiTs stand in for CaiT-M48/S24 here."""
    extractor = MultiScaleCait(["cait_xxs24_224", "cait_xxs24_224"], [2, 1], (64, 64), pretrained=False,
                               input_normalized=True).eval()
    assert extractor.channels == [192, 192] and extractor.strides == [16, 32]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features = extractor(images)
        for scale, (wrapper, block) in enumerate(zip(extractor.extractors, [2, 1])):
            cait = wrapper.feature_extractor
            scaled = images if scale == 0 else F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=True)
            tokens = cait.patch_embed(scaled * wrapper.input_scale + wrapper.input_shift) + cait.pos_embed
            for index in range(block + 1):
                tokens = cait.blocks[index](tokens)
            tokens = cait.norm(tokens)
            side = 4 // 2**scale
            expected = tokens.permute(0, 2, 1).reshape(2, 192, side, side)
            torch.testing.assert_close(features[scale], expected, rtol=1e-5, atol=1e-5)


def test_cnn_features_are_layer1_to_3_each_layer_normed_over_c_h_w():
    model = UflowModel(backbone="resnet18", pretrained=False, input_size=(64, 64), flow_steps=1)
    pyramid = model.feature_extractor
    assert pyramid.strides == [4, 8, 16]
    assert [tuple(norm.normalized_shape) for norm in pyramid.norms] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert all(p.requires_grad for p in pyramid.norms.parameters())  # trained with the flow, as the authors
    assert not any(p.requires_grad for p in pyramid.extractor.parameters())
    with pytest.raises(ValueError, match="divisible by 16"):
        UflowModel(backbone="resnet18", pretrained=False, input_size=(72, 72))
    with pytest.raises(ValueError, match="img_size=448"):
        UflowModel(backbone="mcait", pretrained=True, input_size=(256, 256))


def test_chi2_quantile_and_binomial_tail_match_scipy():
    assert chi2_one_dof_quantile(0.5) == pytest.approx(st.chi2.ppf(0.5, 1), rel=1e-10)
    assert chi2_one_dof_quantile(0.9) == pytest.approx(st.chi2.ppf(0.9, 1), rel=1e-10)
    counts = torch.tensor([0.0, 0.4, 1.0, 2.7, 10.0, 24.99, 48.5], dtype=torch.float64)
    for trials, probability in ((49, 0.5), (9, 0.1), (25, 0.1)):
        inside = counts[counts < trials]
        expected = st.binom.logsf(inside.numpy(), trials, probability) / math.log(10)
        np.testing.assert_allclose(binomial_log10_tail(inside, trials, probability).numpy(), np.minimum(expected, 0),
                                   rtol=1e-9, atol=1e-12)
    # every value a candidate: scipy's tail P(X > n) is 0; we keep the last term P(X = n)
    assert float(binomial_log10_tail(torch.tensor([9.0]), 9, 0.5)) == pytest.approx(9 * math.log10(0.5))


def test_nfa_hand_case_detects_the_block_and_nothing_else():
    """One scale of 8x8, window 3: z = 10 on the 3x3 block around (4, 4), 0 elsewhere. At (4, 4)
    all 9 values are candidates: P = 0.5^9; 64 tests: log10 NFA = log10 64 + 9 log10 0.5 = -0.90
    (detected). At (4, 5) 6 of 9: P(X >= 7) = 46 / 512, log10 NFA = +0.76 (not detected)."""
    z = torch.zeros(1, 3, 8, 8)
    z[:, :, 3:6, 3:6] = 10.0
    log_nfa = log10_nfa_map([z], (8, 8), window_size=3, candidate_quantile=0.5)
    assert float(log_nfa[0, 4, 4]) == pytest.approx(math.log10(64) + 9 * math.log10(0.5), abs=1e-5)
    assert float(log_nfa[0, 4, 5]) == pytest.approx(math.log10(64) + math.log10(46 / 512), abs=1e-5)
    assert float(log_nfa[0, 0, 0]) == pytest.approx(math.log10(64) + math.log10(1 - 0.5**9), abs=1e-5)
    detected = log_nfa < 0
    assert detected.sum() == 1 and detected[0, 4, 4]
    # a second, normal scale (4x4, zeros; window 3 / 2 -> still 3x3) adds its 16 tests and its
    # log-probability log10(1 - 0.5^9), upsampled (bicubic, a constant stays constant)
    two_scales = log10_nfa_map([z, torch.zeros(1, 5, 4, 4)], (8, 8), window_size=3, candidate_quantile=0.5)
    expected = math.log10(80) + 9 * math.log10(0.5) + math.log10(1 - 0.5**9)
    assert float(two_scales[0, 4, 4]) == pytest.approx(expected, abs=1e-5)


def test_a_contrario_counts_on_a_labelled_batch(monkeypatch):
    trainer = UflowTrainer(backbone="resnet18", pretrained=False, flow_steps=1, train_config={"img_size": 64}, device="cpu")
    block = torch.zeros(2, 64, 16, 16)
    block[0, :, 4:13, 4:13] = 10.0  # image 0 has an anomaly (wider than the 7x7 window); image 1 is normal
    monkeypatch.setattr(trainer.model, "latents", lambda images: ([block], torch.zeros(2)))
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 16:52, 16:52] = 1
    batch = {"image": torch.zeros(2, 3, 64, 64), "label": torch.tensor([1, 0]), "mask": mask}
    detected = trainer.model.a_contrario_mask(batch["image"])
    assert detected[0].any() and not detected[1].any()
    counts = trainer.a_contrario_results([batch])
    assert (counts["image_tp"], counts["image_fp"], counts["image_fn"], counts["image_tn"]) == (1, 0, 0, 1)
    assert counts["pixel_tp"] == int((detected[0] & (mask[0, 0] > 0)).sum()) > 0
    assert sum(v for k, v in counts.items() if k.startswith("pixel")) == 2 * 64 * 64


def test_optimiser_is_adam_with_a_linear_decay_to_0_4_per_step():
    trainer = UflowTrainer(backbone="resnet18", pretrained=False, flow_steps=1, train_config={"img_size": 64}, device="cpu")
    trainer.total_steps = 10
    optimizer, scheduler = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and trainer.scheduler_interval == "step"
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 1e-5
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-3) and rates[5] == pytest.approx(1e-3 * (1 - 0.6 * 5 / 10))
    assert rates[10] == pytest.approx(4e-4) and rates[11] == pytest.approx(4e-4)


def test_uflow_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_texture", "uflow-resnet50", num_epochs=2, batch_size=4, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, backbone="efficientnet_lite0",
                   max_maps=0, progress=False)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds")})
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
    trainer = load_trainer(result["checkpoint"], device="cpu")
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=4,
                                     dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
    counts = trainer.a_contrario_results(test_loader)
    assert counts["image_tp"] + counts["image_fp"] + counts["image_fn"] + counts["image_tn"] == len(predictions.labels)
    # the run reports the paper's unsupervised threshold and its counts beside the library's thresholds
    reported = result["model_results"]
    assert reported["a_contrario_threshold"].startswith("log10 NFA < 0")
    assert {key: reported[f"a_contrario_{key}"] for key in counts} == counts
    results_file = next(Path(result["output_dir"]).glob("results_*_thresholds.txt")).read_text()
    assert "a_contrario_threshold" in results_file
    assert re.search(rf"a_contrario_image_tp\s*: {counts['image_tp']}\n", results_file)


def test_mcait_row_end_to_end_on_synthetic_data(synthetic_dataset_dir, tmp_path):
    """MS-CaiT on the registry's tiny pair of CaiTs (random weights: CaiT-M48/S24 cannot be had
    offline) at 64 and 32 px: the U-flow over the two token maps finds the painted defects."""
    from anomalyzoo import ModelRegistry

    tiny = ModelRegistry.get_tiny_config("uflow-mcait")
    options = {k: v for k, v in tiny.items() if k in ("cait_backbones", "cait_blocks", "pretrained")}
    result = train("mvtec", "synthetic_texture", "uflow-mcait", num_epochs=3, batch_size=4, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, max_maps=0, progress=False, **options)
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
