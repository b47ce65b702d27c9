"""SSPCAB (components/sspcab.py): shapes, the masked receptive field, a per-position
transcription of the block (sec. 3 of arXiv 2111.09099) and its MSE loss."""

from __future__ import annotations

import pytest
import torch

from anomalyzoo.models.components.sspcab import SSPCAB, ChannelAttention, sspcab_loss


@pytest.mark.parametrize("kernel_dim, dilation", [(1, 1), (1, 2), (2, 1), (3, 0)])
def test_output_has_the_input_shape(kernel_dim, dilation):
    block = SSPCAB(16, kernel_dim=kernel_dim, dilation=dilation)
    features = torch.randn(2, 16, 9, 12)
    assert block(features).shape == features.shape


@pytest.mark.parametrize("kernel_dim, dilation", [(1, 1), (2, 1), (1, 2)])
def test_each_position_sees_only_the_four_corner_sub_kernels(kernel_dim, dilation):
    """The gradient of one output position reaches exactly the four k' x k' corner squares at
    offsets d+1 .. d+k' from it (both axes): never the masked centre."""
    torch.manual_seed(0)
    block = SSPCAB(8, kernel_dim=kernel_dim, dilation=dilation)
    for conv in (block.conv1, block.conv2, block.conv3, block.conv4):
        torch.nn.init.uniform_(conv.weight, 0.5, 1.0)  # positive weights and inputs: the ReLU stays open
        torch.nn.init.constant_(conv.bias, 1.0)
    features = torch.rand(1, 8, 15, 15, requires_grad=True)
    centre = 7
    block.masked_convolution(features)[0, :, centre, centre].sum().backward()
    touched = features.grad[0].abs().sum(dim=0) > 0
    near = list(range(dilation + 1, dilation + kernel_dim + 1))
    offsets = [-o for o in near] + near
    expected = torch.zeros(15, 15, dtype=torch.bool)
    for dy in offsets:
        for dx in offsets:
            expected[centre + dy, centre + dx] = True
    assert torch.equal(touched, expected)
    assert not touched[centre, centre]


def test_block_matches_a_per_position_transcription():
    """k' = 1, d = 1: out = SE(relu(sum_q W_q x[p + o_q] + b_q)), o_q in {(-2, -2), (2, -2), (-2, 2), (2, 2)}."""
    torch.manual_seed(1)
    channels, height, width = 8, 6, 7
    block = SSPCAB(channels)  # k' = 1, d = 1, r = 8
    features = torch.randn(2, channels, height, width)
    corners = [(block.conv1, -2, -2), (block.conv2, 2, -2), (block.conv3, -2, 2), (block.conv4, 2, 2)]
    masked = torch.zeros_like(features)
    for b in range(2):
        for i in range(height):
            for j in range(width):
                total = torch.zeros(channels)
                for conv, dy, dx in corners:
                    y, x = i + dy, j + dx
                    neighbour = features[b, :, y, x] if 0 <= y < height and 0 <= x < width else torch.zeros(channels)
                    total += conv.weight[:, :, 0, 0] @ neighbour + conv.bias
                masked[b, :, i, j] = torch.relu(total)
    squeezed = masked.mean(dim=(2, 3))
    attention = block.attention
    scale = torch.sigmoid(attention.fc2.weight @ torch.relu(attention.fc1.weight @ squeezed.T + attention.fc1.bias[:, None])
                          + attention.fc2.bias[:, None]).T
    expected = masked * scale[:, :, None, None]
    with torch.no_grad():
        torch.testing.assert_close(block.masked_convolution(features), masked, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block(features), expected, rtol=1e-5, atol=1e-5)
    assert attention.fc1.out_features == channels // 8


def test_loss_is_the_mse_between_block_input_and_output():
    torch.manual_seed(2)
    block = SSPCAB(16)
    features = torch.randn(2, 16, 5, 5, requires_grad=True)
    output = block(features)
    loss = sspcab_loss(features, output)
    assert float(loss.detach()) == pytest.approx(float(((output - features) ** 2).mean().detach()), rel=1e-6)
    loss.backward()
    assert features.grad.abs().sum() > 0  # the input is not detached
    assert all(p.grad is not None for p in block.parameters())
    assert float(sspcab_loss(features, features).detach()) == 0.0


def test_attention_needs_at_least_r_channels():
    with pytest.raises(ValueError, match="reduction ratio"):
        ChannelAttention(4, reduction_ratio=8)
