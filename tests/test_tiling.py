"""Tiled inference equals the one-pass output wherever the network can be tiled exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deconvlab.models import get_model_spec
from deconvlab.tiling import equivariance_step, plan_tiles, receptive_radius, tiled_forward


def _trained_like(name: str) -> nn.Module:
    """A catalogue model whose weights are no longer their initial values (a zero-initialised residual
    branch would otherwise have no reach)."""
    torch.manual_seed(0)
    model = get_model_spec(name).build_tiny().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_the_radius_is_the_architectures_whatever_the_weights():
    stack = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    nn.init.zeros_(stack[2].weight)  # a zero layer hides nothing from the probe
    assert receptive_radius(stack, 1, 2) == 3
    dilated = nn.Conv3d(1, 1, 3, padding=4, dilation=4)
    assert receptive_radius(dilated, 1, 3) == 4


def test_a_deblurring_cnn_tiled_in_2d_equals_one_pass():
    model = _trained_like("residual_deblur_cnn")
    plan = plan_tiles(model, 1, 2)
    assert plan is not None and plan.multiple == 1 and plan.halo >= 3
    x = torch.rand(1, 1, 150, 133)
    with torch.no_grad():
        whole = model(x)
    assert torch.allclose(tiled_forward(model, x, 40, plan.halo, plan.multiple), whole, atol=1e-6)
    # Too little context is visible: the check above can fail.
    assert not torch.allclose(tiled_forward(model, x, 40, 0, 1), whole, atol=1e-6)


def test_a_3d_conv_net_tiled_equals_one_pass():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 3, padding=2, dilation=2)).eval()
    plan = plan_tiles(net, 2, 3)
    assert plan == (plan.__class__(3, 1))
    x = torch.rand(1, 2, 30, 26, 21)
    with torch.no_grad():
        whole = net(x)
    assert torch.allclose(tiled_forward(net, x, 12, plan.halo, plan.multiple), whole, atol=1e-6)


def test_a_strided_segmenter_tiles_exactly_on_its_stride():
    model = _trained_like("fcn8s")
    radius = receptive_radius(model, 3, 2)
    assert equivariance_step(model, 3, 2, radius) == 32
    x = torch.rand(1, 3, 2 * radius + 96, 2 * radius + 64)
    with torch.no_grad():
        whole = model(x)
    assert torch.allclose(tiled_forward(model, x, 128, radius, 32), whole, atol=1e-5)


def test_a_network_that_is_not_translation_equivariant_is_not_tiled():
    class PositionCoded(nn.Module):  # adds each pixel's absolute column, as coordinate channels do
        def forward(self, x):
            return x + torch.arange(x.shape[-1], dtype=x.dtype)

    assert plan_tiles(PositionCoded(), 1, 2) is None


@pytest.mark.parametrize("shape", [(1, 1, 40, 40), (2, 1, 17, 9)])
def test_inputs_that_fit_one_tile_take_one_pass(shape):
    calls = []

    def forward(x):
        calls.append(tuple(x.shape))
        return x * 2

    x = torch.rand(*shape)
    assert torch.equal(tiled_forward(forward, x, 64, 5), x * 2) and calls == [shape]
