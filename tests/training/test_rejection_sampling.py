"""Discriminator rejection sampling (training/mixtures.py) against hand-built G and D."""

import numpy as np
import pytest
import torch

from ganforge.errors import UsageError
from ganforge.training.mixtures import rejection_sample


class Identity(torch.nn.Module):
    def forward(self, z):
        return z


class LogRatio(torch.nn.Module):
    """The optimal D's logit for data N(0, s^2 I) against G = N(0, I): log p_data - log p_G."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        r2 = (x ** 2).sum(1)
        return -2 * np.log(self.s) - r2 / (2 * self.s ** 2) + r2 / 2


def test_kept_samples_follow_the_data_distribution_the_logit_describes():
    kept, accepted = rejection_sample(Identity(), LogRatio(0.5), z_dim=2, n=4000, seed=0)
    assert kept.shape == (4000, 2)
    # G draws have std 1; with D's logit at its optimum the kept ones move to the data's 0.5
    # (a little tighter: F grows faster than the log-ratio near the largest logit)
    assert 0.35 < kept.std(0).mean() < 0.55
    # acceptance is about the volume ratio s^2 = 0.25 times the sigmoid's share at gamma
    assert 0.02 < accepted < 0.3


def test_the_quantile_trades_acceptance_for_precision():
    loose, a_loose = rejection_sample(Identity(), LogRatio(0.5), 2, 3000, seed=1, quantile=0.2)
    tight, a_tight = rejection_sample(Identity(), LogRatio(0.5), 2, 3000, seed=1, quantile=0.99)
    assert a_loose > a_tight
    assert loose.std(0).mean() > tight.std(0).mean()


class FirstMemberPositive(torch.nn.Module):
    """A packed D (pack 2): one logit per pair, from the pair's first member, repeated for both."""

    def forward(self, x):
        first = x[0::2, 0]
        return torch.where(first > 0, 30.0, -30.0).repeat_interleave(2)


def test_a_packed_discriminator_keeps_or_drops_a_pack_as_a_whole():
    kept, accepted = rejection_sample(Identity(), FirstMemberPositive(), 2, 2000, seed=2, pack=2)
    assert kept.shape == (2000, 2)
    assert (kept[0::2, 0] > 0).all()            # D judged the first members
    second = kept[1::2, 0]
    assert 0.35 < (second < 0).mean() < 0.65    # their partners came along, whatever they were
    assert 0.1 < accepted < 0.6


def test_a_discriminator_with_non_finite_logits_is_an_error_not_a_hang():
    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x),), float("nan"))

    with pytest.raises(RuntimeError, match="non-finite logits on 10000 burn-in draws"):
        rejection_sample(Identity(), Broken(), 2, 100, seed=3)


@pytest.mark.parametrize("q", [0.0, 1.0, -0.5, 2.0])
def test_a_quantile_outside_0_1_is_refused(q):
    with pytest.raises(UsageError, match=f"quantile: {q} is not allowed"):
        rejection_sample(Identity(), LogRatio(0.5), 2, 10, seed=0, quantile=q)
