"""The shared invertible block: exact inverse, and a log-determinant equal to autograd's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anomalyzoo.models.components.all_in_one_block import AllInOneBlock, SequenceINN


def conv_subnet(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, out_channels, 3, padding=1))


def mlp_subnet(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_channels, 16), nn.ReLU(), nn.Linear(16, out_channels))


def randomise(module: nn.Module) -> None:
    """Non-trivial parameters everywhere (zero-ish inits would hide errors in the coupling)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.5)


def jacobian_log_det(function, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of ``function`` at a single sample ``x`` (its batch dimension is 1), by autograd."""
    flat = x.reshape(-1)
    jacobian = torch.autograd.functional.jacobian(lambda v: function(v.view_as(x)).reshape(-1), flat)
    return torch.linalg.slogdet(jacobian.double())[1]


@pytest.mark.parametrize("affine_type", ["SOFTPLUS", "SIGMOID", "EXP"])
@pytest.mark.parametrize("permute_soft", [False, True])
@pytest.mark.parametrize("reverse_permutation", [False, True])
def test_conv_block_inverse_and_log_det(affine_type, permute_soft, reverse_permutation):
    torch.manual_seed(0)
    block = AllInOneBlock(5, conv_subnet, affine_clamping=1.9, global_affine_type=affine_type,
                          global_affine_init=0.8, permute_soft=permute_soft, reverse_permutation=reverse_permutation).double()
    randomise(block.subnet)
    with torch.no_grad():
        block.global_scale.add_(torch.randn_like(block.global_scale) * 0.3)
        block.global_offset.normal_()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    y, log_det = block(x)
    back, back_log_det = block(y, reverse=True)
    # a soft permutation is a float32 rotation whose transpose inverts it to float32 precision
    tolerance = 1e-6 if permute_soft else 1e-9
    torch.testing.assert_close(back, x, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(back_log_det, -log_det)
    for i in range(2):
        expected = jacobian_log_det(lambda v: block(v)[0], x[i:i + 1])
        torch.testing.assert_close(log_det[i], expected.to(log_det))


def test_global_scale_starts_at_global_affine_init():
    for affine_type in ("SOFTPLUS", "SIGMOID", "EXP"):
        block = AllInOneBlock(4, mlp_subnet, global_affine_type=affine_type, global_affine_init=0.7)
        torch.testing.assert_close(block.global_scale_activation(), torch.full((1, 4), 0.7))


def test_conditional_sequence_on_vectors():
    """CFlow's use: vectors with a condition, a chain of blocks."""
    torch.manual_seed(1)
    flow = SequenceINN(AllInOneBlock(6, mlp_subnet, condition_channels=3, affine_clamping=1.9) for _ in range(4)).double()
    randomise(flow)
    x = torch.randn(3, 6, dtype=torch.float64)
    condition = torch.randn(3, 3, dtype=torch.float64)
    z, log_det = flow(x, condition)
    back, back_log_det = flow(z, condition, reverse=True)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(back_log_det, -log_det)
    for i in range(3):
        expected = jacobian_log_det(lambda v: flow(v, condition[i:i + 1])[0], x[i:i + 1])
        torch.testing.assert_close(log_det[i], expected.to(log_det))
    other_z, _ = flow(x, torch.randn(3, 3, dtype=torch.float64))
    assert not torch.allclose(other_z, z), "the condition must change the output"


def test_permutations_follow_the_seed_and_live_in_the_state_dict():
    torch.manual_seed(3)
    first = AllInOneBlock(8, mlp_subnet)
    torch.manual_seed(3)
    second = AllInOneBlock(8, mlp_subnet)
    assert torch.equal(first.w_perm, second.w_perm)
    assert "w_perm" in first.state_dict() and "w_perm_inv" in first.state_dict()
    assert sorted(first.w_perm.argmax(dim=1).tolist()) == list(range(8))


def test_wrong_channel_count_is_refused():
    block = AllInOneBlock(4, mlp_subnet)
    with pytest.raises(ValueError, match="4 channels"):
        block(torch.randn(2, 5))
