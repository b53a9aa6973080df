"""Weight averages of a generator (Karras et al., 2018, §A.1; StyleGAN2's G_ema): samples are
drawn from an exponential moving average of G's weights, which smooths the step-to-step swing
of adversarial training."""

from __future__ import annotations

import copy

import torch
from torch import nn


def averaged_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of `net` in eval mode, to hold its weight average."""
    return copy.deepcopy(net).eval().requires_grad_(False)


def ema_beta(batch_size: int, shown: int, half_life_images: float, rampup: float) -> float:
    """beta = 0.5 ** (batch / half-life); the half-life is capped at `rampup` of the images shown
    so far, so the first steps' noise fades fast."""
    half_life = min(half_life_images, shown * rampup)
    return 0.5 ** (batch_size / max(half_life, 1e-8))


@torch.no_grad()
def update_average(avg: nn.Module, net: nn.Module, beta: float) -> None:
    """avg <- beta avg + (1 - beta) net for the parameters; buffers (BatchNorm statistics) are
    copied."""
    for pe, p in zip(avg.parameters(), net.parameters()):
        pe.lerp_(p, 1.0 - beta)
    for be, b in zip(avg.buffers(), net.buffers()):
        be.copy_(b)
