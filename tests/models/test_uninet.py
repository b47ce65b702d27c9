import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalyzoo import train
from anomalyzoo.models.components.resnet_decoder import resnet_layout
from anomalyzoo.models.uninet import (
    TwoBranchBlock,
    UniNetBottleneck,
    UniNetModel,
    UniNetTrainer,
    decision_fractions,
    domain_related_feature_selection,
    pair_loss,
    top_fraction_mean,
    uninet_loss,
)
from anomalyzoo.predict import load_trainer


def test_bottleneck_has_the_authors_two_branch_blocks_for_wide_resnet():
    bottleneck = UniNetBottleneck((256, 512, 1024), resnet_layout("wide_resnet50_2")).eval()
    features = [torch.randn(1, 256, 16, 16), torch.randn(1, 512, 8, 8), torch.randn(1, 1024, 4, 4)]
    with torch.no_grad():
        embedding = bottleneck(features)
    assert embedding.shape == (1, 2048, 2, 2)
    blocks = list(bottleneck.embedding)
    assert len(blocks) == 3 and all(isinstance(b, TwoBranchBlock) for b in blocks)  # BN_layer(..., 3)
    first = blocks[0]
    # AttnBottleneck(halve=2): 3 x 1024 fused channels split in halves, each 1536 -> width/2 = 512, stride 2
    assert (first.branch1[0].in_channels, first.branch1[0].out_channels, first.branch1[0].stride) == (1536, 512, (2, 2))
    assert first.expand[0].in_channels == 1024 and first.expand[0].out_channels == 2048
    assert first.branch2[0].bias is not None and torch.count_nonzero(first.branch2[0].bias) == 0
    # the parameters BN_layer(AttnBottleneck, 3, width_per_group=128) of the authors' resnet.py uses
    # (without its unused conv4/bn4 and the blocks' unused bn7)
    assert sum(p.numel() for p in bottleneck.parameters()) == 70_422_528


def tiny_model() -> UniNetModel:
    torch.manual_seed(0)
    model = UniNetModel("resnet18", pretrained=False).eval()
    with torch.no_grad():  # make the target teacher differ from the source, as training does
        for parameter in model.target_teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_each_teacher_meets_the_student_of_the_other_teachers_embedding():
    model = tiny_model()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        teacher, student = model.teacher_student_features(images)
        source = [model.source_teacher(images)[layer] for layer in model.layers]
        target = [model.target_teacher(images)[layer] for layer in model.layers]
        # eval mode: every image is decoded independently of the rest of the batch
        from_target = model.student(model.bottleneck(target))
        from_source = model.student(model.bottleneck(source))
    assert len(teacher) == len(student) == 6
    for got, expected in zip(teacher, source + target):
        torch.testing.assert_close(got, expected)
    for got, expected in zip(student, from_target + from_source):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert [f.shape for f in student] == [f.shape for f in teacher]


def test_feature_selection_against_hand_computed_weights():
    # one image, one channel, two positions: teacher (0, ln 3) -> softmax (1/4, 3/4), mean ln(3)/2
    teacher = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)
    student = torch.tensor([2.0, 4.0]).view(1, 1, 1, 2)
    (selected,) = domain_related_feature_selection([student], [teacher])
    scale = 1.0 + math.log(3.0) / 2
    torch.testing.assert_close(selected.flatten(), torch.tensor([2.0 * 0.25 * scale, 4.0 * 0.75 * scale]))
    # per channel, per image: a second channel with a flat teacher gets uniform weights x (1 + its mean)
    teacher = torch.tensor([[0.0, math.log(3.0)], [5.0, 5.0]]).view(1, 2, 1, 2)
    student = torch.ones(1, 2, 1, 2)
    (selected,) = domain_related_feature_selection([student], [teacher])
    torch.testing.assert_close(selected[0, 1].flatten(), torch.tensor([0.5 * 6.0, 0.5 * 6.0]))


def test_pair_loss_against_a_hand_computed_case():
    # teacher positions (1, 0) and (0, 1); the student puts (1, 0) at both
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    student = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    temperature = 0.5
    cosine = (0.0 + 1.0) / 2
    p11 = math.exp(2.0) / (math.exp(2.0) + 1.0)  # row 1: similarities (1, 0) / T
    p22 = 1.0 / (math.exp(2.0) + 1.0)  # row 2: similarities (1, 0) / T, the match is the second
    contrastive = -(math.log(p11 + 1e-8) + math.log(p22 + 1e-8)) / 2
    margin = ((1 - p11) + (1 - p22)) / 2
    expected = 0.7 * cosine + 0.3 * contrastive + margin
    assert pair_loss(teacher, student, temperature).item() == pytest.approx(expected, rel=1e-6)
    # scale does not matter (cosines), and a perfect match of orthonormal positions leaves only the
    # softmax's spread: p_ii = e^(1/T) / (e^(1/T) + HW - 1)
    teacher = torch.eye(3).view(1, 3, 1, 3)
    p = math.exp(2.0) / (math.exp(2.0) + 2.0)
    expected = 0.3 * -math.log(p + 1e-8) + (1 - p)
    assert pair_loss(teacher, 4.0 * teacher, temperature).item() == pytest.approx(expected, rel=1e-6)


def authors_losses(teachers, students, temperature, lam=0.7, margin=1.0):
    """Loss.py's ``losses`` with mask=None, transcribed (exp, row sum + 1e-8)."""
    loss = 0.0
    for t_, s_ in zip(teachers, students):
        n, c, h, w = s_.shape
        s = F.normalize(s_.view(n, c, -1).transpose(1, 2), p=2, dim=2)
        t = F.normalize(t_.view(n, c, -1).transpose(1, 2), p=2, dim=2)
        cos_loss = (1 - F.cosine_similarity(s, t, dim=2)).mean()
        simi = torch.exp(torch.matmul(s, t.transpose(1, 2)) / temperature)
        simi = simi / (simi.sum(dim=2, keepdim=True) + 1e-8)
        diag = torch.diagonal(simi, dim1=1, dim2=2)
        loss += cos_loss * lam + (-torch.log(diag + 1e-8).mean()) * (1 - lam) + F.relu(margin - diag).mean()
    return loss


@pytest.mark.parametrize("temperature", [0.1, 0.4, 2.0])
def test_loss_matches_the_authors_loss(temperature):
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 8, 4, 4), (2, 16, 2, 2)]
    teachers = [torch.randn(*s, generator=generator, dtype=torch.float64) for s in shapes]
    students = [torch.randn(*s, generator=generator, dtype=torch.float64) for s in shapes]
    expected = authors_losses(teachers, students, temperature)
    assert uninet_loss(teachers, students, temperature).item() == pytest.approx(expected.item(), rel=1e-9)
    with pytest.raises(ValueError, match="temperature"):
        uninet_loss(teachers, students, 0.0)


def constant_maps(maxima):
    """(1, 2, 2) maps whose maximum is each given value (the rest 0)."""
    maps = []
    for value in maxima:
        m = torch.zeros(1, 2, 2)
        m[0, 0, 0] = value
        maps.append(m)
    return maps


def test_decision_fractions_against_hand_computed_cases():
    maxima = [0.1, 0.1, 0.1, 0.1, 0.5, 0.7]
    # softmax: e^0.1 = 1.105 (x4), e^0.5 = 1.649, e^0.7 = 2.014 over 8.083 -> 0.137, 0.204, 0.249;
    # only 0.5 and 0.7 exceed the mean 1/6: fraction = 0.01 x mean(0.5, 0.7)
    fraction = decision_fractions(constant_maps(maxima), alpha=0.01, beta=3e-5)
    assert fraction.item() == pytest.approx(0.01 * 0.6, rel=1e-6)
    # small maxima: the floor beta
    assert decision_fractions(constant_maps([0.001] * 5 + [0.002]), 0.01, 3e-5).item() == pytest.approx(3e-5)
    # equal maxima (nothing stands out): all of them
    assert decision_fractions(constant_maps([0.4] * 6), 0.01, 3e-5).item() == pytest.approx(0.004, rel=1e-6)
    # per image
    batch = [torch.cat([a, b]) for a, b in zip(constant_maps(maxima), constant_maps([0.4] * 6))]
    torch.testing.assert_close(decision_fractions(batch, 0.01, 3e-5), torch.tensor([0.006, 0.004]))


def test_top_fraction_mean():
    maps = torch.arange(1.0, 17.0).view(1, 4, 4)
    assert top_fraction_mean(maps, torch.tensor([0.25])).item() == pytest.approx((13 + 14 + 15 + 16) / 4)
    assert top_fraction_mean(maps, torch.tensor([0.2])).item() == pytest.approx((14 + 15 + 16) / 3)  # int(3.2)
    assert top_fraction_mean(maps, torch.tensor([1e-6])).item() == 16.0  # at least one pixel


def test_forward_map_is_the_unsmoothed_sum_and_score_its_weighted_decision():
    model = tiny_model()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        output = model(images)
        teacher, student = model.teacher_student_features(images)
    distances = [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student)]
    expected_map = sum(F.interpolate(d[:, None], size=(64, 64), mode="bilinear", align_corners=True)[:, 0] for d in distances)
    torch.testing.assert_close(output["anomaly_map"], expected_map, rtol=1e-4, atol=1e-5)
    smoothed = model.blur(expected_map[:, None])[:, 0]
    expected_scores = top_fraction_mean(smoothed, decision_fractions(distances, 0.01, 3e-5))
    torch.testing.assert_close(output["pred_score"], expected_scores, rtol=1e-4, atol=1e-5)
    # the score is a mean of the highest smoothed values: between their mean and their maximum
    assert torch.all(output["pred_score"] <= smoothed.flatten(1).amax(1) + 1e-6)
    assert torch.all(output["pred_score"] >= smoothed.flatten(1).mean(1))


def test_train_step_moves_the_student_the_bottleneck_and_the_target_teacher_only():
    trainer = UniNetTrainer(backbone="resnet18", pretrained=False, device="cpu",
                            train_config={"img_size": 64, "batch_size": 2, "progress": False})
    model = trainer.model
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model.train()
    assert not model.source_teacher.feature_extractor.training and model.target_teacher.feature_extractor.training
    logs = trainer.train_step({"image": torch.randn(2, 3, 64, 64)})
    assert logs["loss"] > 0 and math.isfinite(logs["loss"])
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert not any(name.startswith("source_teacher.") for name in changed)
    for part in ("target_teacher.", "bottleneck.", "student."):
        assert any(name.startswith(part) for name in changed), part
    assert all(not p.requires_grad for p in model.source_teacher.parameters())
    student_group, teacher_group = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert (student_group["lr"], teacher_group["lr"]) == (5e-3, 1e-6)
    assert student_group["weight_decay"] == 1e-5 and student_group["betas"] == (0.9, 0.999)
    assert {id(p) for p in teacher_group["params"]} == {id(p) for p in model.target_teacher.parameters()}


def test_warns_when_teacher_features_are_signed():
    trainer = UniNetTrainer(backbone="resnet18", pretrained=False, device="cpu", train_config={"progress": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.warn_if_signed_priors([torch.rand(1, 4, 2, 2)])  # ReLU-like: silent
    with pytest.warns(UserWarning, match="feature_selection=False"):
        trainer.warn_if_signed_priors([torch.full((1, 4, 2, 2), -2.0)])


def test_uninet_end_to_end_on_synthetic_data(synthetic_dataset_dir, tmp_path):
    # the authors' configuration (feature selection on) on a ReLU backbone with random weights
    result = train("mvtec", "synthetic_texture", "uninet", dataset_dir=synthetic_dataset_dir, output_dir=tmp_path,
                   backbone="resnet18", pretrained=False, img_size=64, num_epochs=2, max_maps=1)
    assert result["image_auroc"] >= 0.9
    assert result["pixel_auroc"] >= 0.9
    # the saved model reproduces the trained model's evaluation, scores and maps
    trainer = load_trainer(result["checkpoint"])
    from anomalyzoo.data import get_dataloaders
    from anomalyzoo.metrics import compute_metrics

    _, test_loader = get_dataloaders("mvtec", "synthetic_texture", img_size=64, batch_size=8, dataset_dir=synthetic_dataset_dir)
    predictions = trainer.validation_epoch(test_loader)
    metrics = compute_metrics(predictions.labels, predictions.scores, predictions.masks, predictions.anomaly_maps)
    assert metrics["image_auroc"] == pytest.approx(result["image_auroc"], abs=1e-6)
    assert metrics["pixel_auroc"] == pytest.approx(result["pixel_auroc"], abs=1e-6)
    assert predictions.anomaly_maps.shape == (len(predictions.labels), 64, 64)
