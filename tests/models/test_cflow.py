import math

import pytest
import torch
import torch.nn.functional as F

from anomalyzoo import train
from anomalyzoo.data import get_dataloaders
from anomalyzoo.metrics import auroc
from anomalyzoo.models.cflow import (
    LOG_INV_SQRT_2PI,
    CflowTrainer,
    cflow_decoder,
    cflow_loss,
    fiber_batches,
    fibres_of,
    gaussian_log_likelihood,
    likelihood_anomaly_map,
    positional_encoding_2d,
)
from anomalyzoo.predict import load_trainer


def direct_positional_encoding(channels: int, height: int, width: int) -> torch.Tensor:
    """The authors' layout written out entry by entry: the first half of the channels encodes the
    column x, the second the row y; channel 2i of a half is sin(pos * w_i), 2i+1 is cos(pos * w_i),
    w_i = 10000 ** (-2i / half)."""
    half = channels // 2
    encoding = torch.zeros(channels, height, width, dtype=torch.float64)
    for channel in range(channels):
        i = (channel % half) // 2
        frequency = 10000.0 ** (-2 * i / half)
        wave = math.sin if channel % 2 == 0 else math.cos
        for y in range(height):
            for x in range(width):
                position = x if channel < half else y
                encoding[channel, y, x] = wave(position * frequency)
    return encoding


def test_positional_encoding_is_the_authors_sin_cos_layout():
    encoding = positional_encoding_2d(128, 5, 7)
    assert encoding.shape == (128, 5, 7)
    torch.testing.assert_close(encoding.double(), direct_positional_encoding(128, 5, 7), atol=2e-5, rtol=0)
    # at the origin every sin is 0 and every cos 1; the first half does not change along a column
    assert torch.equal(encoding[:, 0, 0], torch.tensor([0.0, 1.0] * 64))
    assert torch.equal(encoding[:64, 0, :], encoding[:64, 4, :])
    assert torch.equal(encoding[64:, :, 0], encoding[64:, :, 6])
    with pytest.raises(ValueError, match="divisible by 4"):
        positional_encoding_2d(126, 2, 2)


def test_fibres_are_positions_in_b_h_w_order_with_their_encoding():
    feature_map = torch.randn(2, 3, 4, 5)
    fibres, conditions = fibres_of(feature_map, 8)
    assert fibres.shape == (2 * 4 * 5, 3) and conditions.shape == (2 * 4 * 5, 8)
    encoding = positional_encoding_2d(8, 4, 5)
    row = 1 * 20 + 2 * 5 + 3  # image 1, y 2, x 3
    assert torch.equal(fibres[row], feature_map[1, :, 2, 3])
    assert torch.equal(conditions[row], encoding[:, 2, 3])


def test_log_likelihood_is_the_standard_normal_density_plus_the_log_det():
    assert LOG_INV_SQRT_2PI == pytest.approx(-0.5 * math.log(2 * math.pi), abs=1e-15)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    log_jac_det = torch.randn(6, generator=generator, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=1) + log_jac_det
    torch.testing.assert_close(gaussian_log_likelihood(z, log_jac_det), expected)


def test_decoder_likelihood_is_the_change_of_variables_density_given_the_condition():
    """log p(x|c) from the decoder equals log N(f(x; c); 0, I) + log|det df/dx|, the Jacobian by autograd."""
    torch.manual_seed(0)
    decoder = cflow_decoder(channels=6, condition_vector=4, coupling_blocks=3, clamp_alpha=1.9, permute_soft=True)
    decoder = decoder.double()
    x = torch.randn(6, dtype=torch.float64)
    condition = torch.randn(4, dtype=torch.float64)
    z, log_jac_det = decoder(x[None], condition[None])
    jacobian = torch.autograd.functional.jacobian(lambda v: decoder(v[None], condition[None])[0][0], x)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z[0]).sum() + torch.linalg.slogdet(jacobian).logabsdet
    torch.testing.assert_close(gaussian_log_likelihood(z, log_jac_det)[0], expected.detach())
    # the condition is an input of the coupling subnets: another position gives another z
    other, _ = decoder(x[None], -condition[None])
    assert not torch.allclose(other, z)


def test_loss_is_minus_log_sigmoid_of_the_per_dimension_log_likelihood():
    log_likelihood = torch.tensor([-300.0, -12.0, 0.0, 40.0], dtype=torch.float64)
    channels = 8
    expected = sum(-math.log(1.0 / (1.0 + math.exp(-value / channels))) for value in log_likelihood.tolist()) / 4
    assert float(cflow_loss(log_likelihood, channels)) == pytest.approx(expected, rel=1e-12)


def authors_map(log_likelihoods: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """train.py after test_meta_epoch: per layer subtract the maximum over all evaluated images,
    exp, bilinear (align_corners=True) upsampling, sum over layers, then max(sum) - sum."""
    total = 0
    for log_likelihood in log_likelihoods:
        probability = torch.exp(log_likelihood.double() - log_likelihood.double().max())
        total = total + F.interpolate(probability[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
    return total.max() - total


def test_map_is_the_authors_map_up_to_one_constant():
    generator = torch.Generator().manual_seed(1)
    log_likelihoods = [torch.randn(3, 8, 8, generator=generator) * 2 - 3, torch.randn(3, 4, 4, generator=generator) - 5,
                       torch.randn(3, 2, 2, generator=generator) * 3]
    # with the authors' constants (the evaluated set's per-layer maxima) the maps differ by one constant
    reference = torch.stack([m.max() for m in log_likelihoods])
    ours = likelihood_anomaly_map(log_likelihoods, reference, (16, 16)).double()
    difference = ours - authors_map(log_likelihoods, (16, 16))
    torch.testing.assert_close(difference, torch.full_like(difference, float(difference[0, 0, 0])), atol=1e-6, rtol=0)
    # any stored constants: -sum_l up(exp(log p_l / C - reference_l)), direct
    reference = torch.tensor([-1.0, -4.0, 2.0])
    upsampled = [F.interpolate(torch.exp(m.double() - r.double())[:, None], size=(16, 16), mode="bilinear",
                               align_corners=True)[:, 0] for m, r in zip(log_likelihoods, reference)]
    expected = -sum(upsampled)
    torch.testing.assert_close(likelihood_anomaly_map(log_likelihoods, reference, (16, 16)), expected.float())


def test_map_keeps_unlikely_positions_apart_in_float32():
    """Positions 20 and 25 nats per dimension below the reference at every layer: max(S) - S
    would round both to max(S) in float32; -S keeps their order."""
    log_likelihoods = [torch.tensor([[[0.0, -20.0], [-25.0, -1.0]]])] * 2
    anomaly_map = likelihood_anomaly_map(log_likelihoods, torch.zeros(2), (2, 2))[0]
    assert anomaly_map[1, 0] > anomaly_map[0, 1] > anomaly_map[1, 1] > anomaly_map[0, 0]
    authors = authors_map(log_likelihoods, (2, 2))[0].float()
    assert authors[1, 0] == authors[0, 1]  # the tie the deviation avoids


@pytest.fixture(scope="module")
def small_trainer() -> CflowTrainer:
    torch.manual_seed(0)
    return CflowTrainer({"img_size": 64, "batch_size": 2, "progress": False}, device="cpu",
                        backbone="efficientnet_lite0", pretrained=False, coupling_blocks=2)


def test_forward_scores_each_image_independently_of_its_batch(small_trainer):
    model = small_trainer.model.eval()
    model.set_reference_log_likelihood(torch.tensor([-1.5, -2.0, -2.5]))
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        output = model(images)
        log_likelihoods = model.log_likelihood_maps(model.features(images))
        alone = [model(images[i:i + 1]) for i in range(3)]
    expected = likelihood_anomaly_map(log_likelihoods, model.reference_log_likelihood, (64, 64))
    assert output["anomaly_map"].shape == (3, 64, 64)
    torch.testing.assert_close(output["anomaly_map"], expected)
    torch.testing.assert_close(output["pred_score"], expected.amax(dim=(-2, -1)))
    torch.testing.assert_close(torch.cat([o["pred_score"] for o in alone]), output["pred_score"], rtol=1e-5, atol=1e-6)


def test_fibre_batches_are_a_random_partition_without_the_remainder():
    torch.manual_seed(3)
    batches = list(fiber_batches(200, 64))
    assert [len(b) for b in batches] == [64, 64, 64]  # 200 // 64 batches, 8 fibres left out
    chosen = torch.cat(batches)
    assert chosen.unique().numel() == 192 and int(chosen.max()) < 200
    assert not torch.equal(chosen, torch.arange(192))  # shuffled
    short = list(fiber_batches(32, 64))  # fewer fibres than N: one step on all of them
    assert len(short) == 1 and sorted(short[0].tolist()) == list(range(32))


def test_train_step_takes_one_adam_step_per_fibre_batch_on_the_decoders_only(small_trainer):
    trainer = small_trainer
    trainer.setup_optimization()
    trainer.model.train()
    steps = []
    original_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *args, **kwargs: (steps.append(1), original_step(*args, **kwargs))[1]
    encoder_before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    decoders_before = {k: v.clone() for k, v in trainer.model.decoders.state_dict().items()}
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    trainer.on_train_start()
    try:
        logs = trainer.train_step({"image": images})
    finally:
        trainer.optimizer.step = original_step
    # 64 px, batch 2: layer1 2*16*16 = 512 fibres -> 8 batches of 64; layer2 128 -> 2; layer3 32 -> 1 short one
    assert len(steps) == 8 + 2 + 1
    assert logs["loss"] > 0
    assert all(torch.equal(encoder_before[k], v) for k, v in trainer.model.encoder.state_dict().items())
    assert all(not torch.equal(decoders_before[k], v) for k, v in trainer.model.decoders.state_dict().items()
               if k.endswith("global_scale"))
    # after the epoch the map's constants are the largest log p / C met on the training fibres
    maxima = trainer.epoch_max_log_likelihood.clone()
    assert torch.isfinite(maxima).all()
    trainer.on_train_end()
    torch.testing.assert_close(trainer.model.reference_log_likelihood, maxima)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.model.decoders.parameters()}


def test_cflow_end_to_end_on_synthetic_data(synthetic_dataset_dir, lite0_weights, tmp_path):
    result = train("mvtec", "synthetic_texture", "cflow-resnet18", num_epochs=1, batch_size=4, img_size=64,
                   dataset_dir=synthetic_dataset_dir, output_dir=tmp_path, backbone="efficientnet_lite0",
                   max_maps=1, progress=False)
    print({k: result[k] for k in ("image_auroc", "pixel_auroc", "fit_seconds")})
    assert result["image_auroc"] >= 0.8
    assert result["pixel_auroc"] >= 0.9
    trainer = load_trainer(result["checkpoint"], device="cpu")
    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=4,
                                     dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    assert auroc(predictions.labels, predictions.scores) == pytest.approx(result["image_auroc"], abs=1e-6)
