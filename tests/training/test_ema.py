"""G's weight average (training/ema.py) against hand-computed values."""

import pytest
import torch
from torch import nn

from ganforge.training.ema import averaged_copy, ema_beta, update_average


def test_beta_is_half_per_half_life_and_ramps_up_with_the_images_shown():
    assert ema_beta(32, 10**9, 10_000, 0.05) == pytest.approx(0.5 ** (32 / 10_000))
    # 1,000 images shown: the half-life is capped at 5% of them, 50 images
    assert ema_beta(32, 1_000, 10_000, 0.05) == pytest.approx(0.5 ** (32 / 50))
    assert ema_beta(32, 0, 10_000, 0.05) == 0.0           # the first step copies G


def test_update_lerps_parameters_copies_buffers_and_leaves_the_average_frozen():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    avg = averaged_copy(net)
    assert not avg.training and not any(p.requires_grad for p in avg.parameters())
    w0 = avg[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(3.0)
    update_average(avg, net, beta=0.75)
    assert torch.allclose(avg[0].weight, 0.75 * w0 + 0.25 * net[0].weight)
    assert torch.equal(avg[1].running_mean, torch.full((2,), 3.0))
    assert avg[0].weight.data_ptr() != net[0].weight.data_ptr()
