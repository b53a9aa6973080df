"""Progressive GAN (Karras et al., 2018) networks: G and D, their layers and the config they
are built from.

Both networks are built for the target resolution from the start; a stage index says how many
blocks are in use. Stage 0 is 4x4, stage k is 4 * 2^k. When stage k is added its output is
faded in: G returns `lerp(upsample(toRGB[k-1](x)), toRGB[k](block[k](x)), alpha)` and D mirrors
it with `lerp(fromRGB[k-1](avgpool(x)), block[k](fromRGB[k](x)), alpha)`, alpha ramping 0 -> 1
over `fade_images` images shown. Blocks never get re-initialised: growing keeps the trained
weights. The paper's three stabilisers are here: equalized learning rate (weights N(0, 1),
scaled by He's constant at run time), pixel-wise feature normalisation in G and a minibatch
standard deviation channel in D (groups of 4).

The networks are apart from their trainer (progan.py): export and the benchmarks rebuild G from a
checkpoint (`build_progan`, `Upsampled`) without the training schedule, Task or doctor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ganforge.training.gan import CONFIGS, config_from_checkpoint
from ganforge.training.task import option


@dataclass(frozen=True)
class ProGANConfig:
    z_dim: int = option(64, "latent dimension of G's input")
    resolution: int = option(64, "final output side in pixels, a power of two in [8, 1024]")
    channels: int = option(3, "image channels", cli=False)
    fmap_base: int = option(1024, "feature maps at side s are min(fmap-max, fmap-base / s) ...")
    fmap_max: int = option(64, "... at most this many ...")
    fmap_min: int = option(16, "... and at least this many")
    d_fmap_min: int = option(0, "D's own minimum, for a D wider than G at the top sides (0: --fmap-min)")
    mbstd_group: int = option(4, "minibatch standard deviation group size in D")

    def __post_init__(self):
        if not 8 <= self.resolution <= 1024 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two in [8, 1024], got {self.resolution}")
        for name in ("z_dim", "channels", "fmap_base", "fmap_max", "fmap_min", "mbstd_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_fmap_min < 0:
            raise ValueError(f"d_fmap_min must be >= 0 (0: fmap_min), got {self.d_fmap_min}")

    @property
    def n_stages(self) -> int:
        return int(math.log2(self.resolution)) - 1  # 4x4 .. resolution

    def side(self, stage: int) -> int:
        return 4 * 2 ** stage

    def nf(self, stage: int) -> int:
        """G's feature maps at the stage's side."""
        return max(self.fmap_min, min(self.fmap_max, self.fmap_base // self.side(stage)))

    def d_nf(self, stage: int) -> int:
        """D's feature maps at the stage's side: G's, with D's own minimum where one is set."""
        return max(self.d_fmap_min or self.fmap_min, min(self.fmap_max, self.fmap_base // self.side(stage)))


# ---------------------------------------------------------------------------------------------
# Layers

class EqualizedLinear(nn.Module):
    """y = x (w * c)^T + b with w ~ N(0, 1) and c = gain / sqrt(fan_in) applied at run time, so
    Adam's per-parameter step sizes act alike on every layer (equalized learning rate)."""

    def __init__(self, in_features: int, out_features: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class EqualizedConv2d(nn.Module):
    """Conv with stride 1, 'same' padding and the equalized-LR scale gain / sqrt(C_in * k * k)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class PixelNorm(nn.Module):
    """Normalise each pixel's feature vector to unit mean square: x / sqrt(mean_c(x^2) + eps)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)


class MinibatchStd(nn.Module):
    """Append one channel: the standard deviation of each feature over a group of samples,
    averaged over features and pixels, the same value for every pixel of the group's samples.
    Sample b belongs to group member b // M and slot b % M (M = B / group), as in the paper."""

    def __init__(self, group: int = 4, eps: float = 1e-8):
        super().__init__()
        self.group, self.eps = group, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        g = min(self.group, B)
        while B % g:
            g -= 1                                       # largest group size dividing B
        y = x.reshape(g, -1, C, H, W)                    # (g, M, C, H, W)
        y = (y - y.mean(dim=0)).pow(2).mean(dim=0)       # (M, C, H, W) variance over the group
        y = (y + self.eps).sqrt().mean(dim=(1, 2, 3))    # (M,)
        y = y.reshape(1, -1, 1, 1, 1).expand(g, -1, 1, H, W).reshape(B, 1, H, W)
        return torch.cat([x, y], dim=1)                  # (B, C + 1, H, W)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a + (b - a) * t


# ---------------------------------------------------------------------------------------------
# Networks

class GBlock(nn.Module):
    def __init__(self, cin: int, cout: int, first: bool, z_dim: int = 0):
        super().__init__()
        self.first = first
        self.pn = PixelNorm()
        if first:
            self.dense = EqualizedLinear(z_dim, cout * 16, gain=math.sqrt(2) / 4)
        else:
            self.conv0 = EqualizedConv2d(cin, cout, 3)
        self.conv1 = EqualizedConv2d(cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.pn(x)                                           # normalised latent (B, z_dim)
            x = self.dense(x).view(x.shape[0], -1, 4, 4)             # (B, nf0, 4, 4)
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")     # (B, cin, 2s, 2s)
            x = self.conv0(x)
        x = self.pn(_lrelu(x))
        return self.pn(_lrelu(self.conv1(x)))                        # (B, cout, side, side)


class Generator(nn.Module):
    """z (B, z_dim) -> image (B, C, s, s), s = 4 * 2^stage, values around [-1, 1] (no tanh, as
    in the paper; export clamps). `stage` and `alpha` default to the values G was set to."""

    def __init__(self, cfg: ProGANConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(
            [GBlock(0, cfg.nf(0), True, cfg.z_dim)]
            + [GBlock(cfg.nf(k - 1), cfg.nf(k), False) for k in range(1, cfg.n_stages)])
        self.to_rgb = nn.ModuleList(
            [EqualizedConv2d(cfg.nf(k), cfg.channels, 1, gain=1.0) for k in range(cfg.n_stages)])
        self.stage, self.alpha = cfg.n_stages - 1, 1.0

    def forward(self, z: torch.Tensor, stage: int | None = None,
                alpha: float | None = None) -> torch.Tensor:
        stage = self.stage if stage is None else stage
        alpha = self.alpha if alpha is None else alpha
        x = self.blocks[0](z)                                        # (B, nf0, 4, 4)
        for k in range(1, stage):
            x = self.blocks[k](x)
        if stage == 0:
            return self.to_rgb[0](x)
        new = self.to_rgb[stage](self.blocks[stage](x))              # (B, C, s, s)
        if alpha >= 1.0:
            return new
        old = F.interpolate(self.to_rgb[stage - 1](x), scale_factor=2, mode="nearest")
        return lerp(old, new, alpha)


class DBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv0 = EqualizedConv2d(cin, cin, 3)
        self.conv1 = EqualizedConv2d(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _lrelu(self.conv1(_lrelu(self.conv0(x))))
        return F.avg_pool2d(x, 2)                                    # (B, cout, s/2, s/2)


class DFinal(nn.Module):
    def __init__(self, nf: int, group: int):
        super().__init__()
        self.mbstd = MinibatchStd(group)
        self.conv = EqualizedConv2d(nf + 1, nf, 3)
        self.dense = EqualizedLinear(nf * 16, nf)
        self.out = EqualizedLinear(nf, 1, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _lrelu(self.conv(self.mbstd(x)))                         # (B, nf, 4, 4)
        x = _lrelu(self.dense(x.flatten(1)))                         # (B, nf)
        return self.out(x).view(-1)                                  # (B,)


class Discriminator(nn.Module):
    """image (B, C, s, s) at the stage's side -> logit (B,); mirrors G's fade-in."""

    def __init__(self, cfg: ProGANConfig):
        super().__init__()
        self.cfg = cfg
        self.from_rgb = nn.ModuleList(
            [EqualizedConv2d(cfg.channels, cfg.d_nf(k), 1) for k in range(cfg.n_stages)])
        self.blocks = nn.ModuleList(
            [DFinal(cfg.d_nf(0), cfg.mbstd_group)]
            + [DBlock(cfg.d_nf(k), cfg.d_nf(k - 1)) for k in range(1, cfg.n_stages)])
        self.stage, self.alpha = cfg.n_stages - 1, 1.0

    def forward(self, img: torch.Tensor, stage: int | None = None,
                alpha: float | None = None) -> torch.Tensor:
        stage = self.stage if stage is None else stage
        alpha = self.alpha if alpha is None else alpha
        assert img.shape[-1] == self.cfg.side(stage), (img.shape, stage)
        x = _lrelu(self.from_rgb[stage](img))
        if stage > 0:
            x = self.blocks[stage](x)                                # (B, nf(stage-1), s/2, s/2)
            if alpha < 1.0:
                old = _lrelu(self.from_rgb[stage - 1](F.avg_pool2d(img, 2)))
                x = lerp(old, x, alpha)
        for k in range(stage - 1, 0, -1):
            x = self.blocks[k](x)
        return self.blocks[0](x)


class Upsampled(nn.Module):
    """G at its recorded stage, output upsampled (nearest) to the final resolution: what a
    checkpoint taken before the last stage exports as."""

    def __init__(self, G: Generator):
        super().__init__()
        self.G = G

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.G(z)
        factor = self.G.cfg.resolution // x.shape[-1]
        return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


CONFIGS["progan"] = ProGANConfig


def build_progan(payload: dict) -> tuple[Generator, Discriminator]:
    """Rebuild G and D from a checkpoint payload at its recorded stage and alpha, in eval mode.
    The generator is the weight average G_ema where the checkpoint has one (the one samples,
    the benchmark and export use), else the trained G."""
    cfg = config_from_checkpoint(payload)
    G, D = Generator(cfg), Discriminator(cfg)
    G.load_state_dict(payload["state"].get("G_ema", payload["state"]["G"]))
    D.load_state_dict(payload["state"]["D"])
    for net in (G, D):
        net.stage, net.alpha = int(payload["stage"]), float(payload["alpha"])
    return G.eval(), D.eval()
