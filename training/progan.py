"""Progressive GAN (Karras et al., 2018): G and D grow from 4x4 to the target resolution.

Both networks are built for the target resolution from the start; a stage index says how many
blocks are in use. Stage 0 is 4x4, stage k is 4 * 2^k. When stage k is added its output is
faded in: G returns `lerp(upsample(toRGB[k-1](x)), toRGB[k](block[k](x)), alpha)` and D mirrors
it with `lerp(fromRGB[k-1](avgpool(x)), block[k](fromRGB[k](x)), alpha)`, alpha ramping 0 -> 1
over `fade_images` images shown. Blocks never get re-initialised: growing keeps the trained
weights. The paper's three stabilisers are here: equalized learning rate (weights N(0, 1),
scaled by He's constant at run time), pixel-wise feature normalisation in G and a minibatch
standard deviation channel in D (groups of 4).

A run directory is laid out as training/loop.py's (checkpoint.pt, train.json, metrics.jsonl,
samples/, scores.png, doctor.md, doctor.json); the checkpoint also records images shown, the
stage, alpha, the optimizer states and the doctor's knobs, so `--resume` continues mid-stage.

The training doctor (training/monitor.py) runs per stage: every `doctor_every` steps and at the
last step of each stage, s_G and s_D are measured on a fixed held-out batch (64 real images at
full resolution, brought to the current stage's side and blended at the current alpha exactly
as the training batches are, and 64 fixed latents through G at the current stage and alpha).
Each stage is a phase of the monitor: its detectors are re-armed when a stage begins and "G
dominates early" is judged from the stage's start; mode collapse is judged after
`collapse_after` of the whole run, as for every GAN (only the run's start is random). In auto
mode the on-the-fly remedies (label smoothing, instance noise, the learning rates; D has no
dropout) go through `knobs()` / `set_knob()`; a larger z_dim is a restart decision.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ganforge.errors import CheckpointError, UsageError
from ganforge.images import save_grid
from ganforge.progress import Progress
from ganforge.training import datasets
from ganforge.training.ema import averaged_copy, ema_beta, update_average
from ganforge.training.gan import CONFIGS, config_from_checkpoint, load_checkpoint, save_checkpoint
from ganforge.training.loop import check_flags, to_tensor, to_uint8
from ganforge.training.monitor import (Doctor, Intervention, Monitor, Thresholds, follow_stages, log_step,
                                       write_run_report)


@dataclass(frozen=True)
class ProGANConfig:
    z_dim: int = 64           # latent dimension of G's input
    resolution: int = 64      # final output side in pixels, a power of two in [8, 1024]
    channels: int = 3         # image channels
    fmap_base: int = 1024     # feature maps at side s: min(fmap_max, fmap_base // s) ...
    fmap_max: int = 64        # ... at most this many
    fmap_min: int = 16        # ... and at least this many
    d_fmap_min: int = 0       # D's own minimum, for a D wider than G at the top sides (0: fmap_min)
    mbstd_group: int = 4      # minibatch-stddev group size in D

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


# ---------------------------------------------------------------------------------------------
# Training

@dataclass
class ProGANTrainConfig:
    data: str = "shapes"          # 'shapes', 'photos' or a folder of images
    n_images: int = 8192          # size of the training pool drawn from `data`
    steps: int = 3000             # optimizer steps of D and G each, over all stages
    batch_size: int = 32
    lr: float = 1e-3              # Adam, the paper's settings (equalized LR makes 1e-3 safe)
    beta1: float = 0.0
    beta2: float = 0.99
    stable_images: int = 12800    # images shown per stage at alpha = 1 (the last stage: the rest)
    fade_images: int = 12800      # images shown while a new stage fades in (alpha 0 -> 1)
    r1_gamma: float = 1.0         # R1 penalty on D's real gradients (0: off), applied lazily
    r1_every: int = 8             # steps between R1 penalties
    ema_images: int = 10_000      # half-life, in images shown, of G's weight average (0: none)
    ema_rampup: float = 0.05      # ... at most this fraction of the images shown since the block was born
    seed: int = 0
    sample_every: int = 200       # steps between sample grids
    log_every: int = 10           # steps between metrics lines
    checkpoint_every: int = 500   # steps between checkpoints (and always at the end)
    threads: int = 0              # torch intra-op threads; 0 = all cores
    label_smoothing: float = 0.0  # real target 1 - this (the doctor's knob; Salimans et al., 2016)
    instance_noise: float = 0.0   # std of Gaussian noise on D's inputs (the doctor's knob)
    doctor: str = "report"        # 'auto' (diagnose and remedy), 'report' (diagnose), 'off'
    doctor_every: int = 50        # steps between s_G / s_D measurements (and each stage's last step)
    thresholds: Thresholds = field(default_factory=Thresholds)
    network: ProGANConfig = field(default_factory=ProGANConfig)

    def validate(self) -> None:
        check_flags(self, {
            "--lr": (self.lr, self.lr > 0, "> 0"),
            "--stable-images": (self.stable_images, self.stable_images >= 1, ">= 1"),
            "--fade-images": (self.fade_images, self.fade_images >= 1, ">= 1"),
            "--r1-gamma": (self.r1_gamma, self.r1_gamma >= 0, ">= 0"),
            "--r1-every": (self.r1_every, self.r1_every >= 1, ">= 1"),
            "--ema-images": (self.ema_images, self.ema_images >= 0, ">= 0"),
            "--ema-rampup": (self.ema_rampup, self.ema_rampup > 0, "> 0"),
        })


def schedule(shown: int, n_stages: int, stable_images: int, fade_images: int) -> tuple[int, float]:
    """(stage, alpha) after `shown` images: stage 0 stable, then per new stage a fade-in
    (alpha 0 -> 1) and a stable phase; the last stage stays until training ends."""
    t = shown - stable_images
    stage = 0
    while t >= 0 and stage < n_stages - 1:
        stage += 1
        if t < fade_images:
            return stage, t / fade_images
        t -= fade_images + stable_images
    return stage, 1.0


def stage_birth(stage: int, stable_images: int, fade_images: int) -> int:
    """The images shown when `stage`'s block first trains: the start of its fade-in (0 for
    stage 0)."""
    return 0 if stage == 0 else stable_images + (stage - 1) * (fade_images + stable_images)


def stage_spans(cfg: ProGANTrainConfig, steps: int | None = None,
                resumed: tuple[int, int] = (0, 0)) -> list[dict]:
    """The stages a run of `steps` (default cfg.steps) trains, as the doctor reports them:
    {"stage", "side", "start", "end", "fade_end"}, the first and last step trained at the stage
    (steps count from 1; step s trains at the schedule of the images shown before it) and the
    last step of its fade-in (None for stage 0). `resumed`: (step, images shown) of the
    checkpoint a resumed run continues from; the steps before it showed the same number of
    images each, the steps after it `cfg.batch_size`."""
    steps = cfg.steps if steps is None else steps
    net, B = cfg.network, cfg.batch_size
    step0, shown0 = resumed
    b0 = shown0 // step0 if step0 else B
    spans: list[dict] = []
    for s in range(1, steps + 1):
        shown = (s - 1) * b0 if s <= step0 else shown0 + (s - 1 - step0) * B
        stage, alpha = schedule(shown, net.n_stages, cfg.stable_images, cfg.fade_images)
        if not spans or spans[-1]["stage"] != stage:
            spans.append({"stage": stage, "side": net.side(stage), "start": s, "end": s, "fade_end": None})
        spans[-1]["end"] = s
        if alpha < 1.0:
            spans[-1]["fade_end"] = s
    return spans


def to_stage(x: torch.Tensor, side: int, alpha: float) -> torch.Tensor:
    """Full-resolution reals (B, C, R, R) brought to the stage's side and, during a fade-in,
    blended like G's output: the lower-resolution version, upsampled, towards the sharp one."""
    if x.shape[-1] != side:
        x = F.adaptive_avg_pool2d(x, side)                           # (B, C, s, s)
    if alpha < 1.0:
        low = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
        x = lerp(low, x, alpha)
    return x


class ProGANTrainer:
    """Non-saturating logistic loss with lazy R1 on D, one D and one G step per iteration; the
    schedule sets (stage, alpha) from the images shown before each step."""

    def __init__(self, cfg: ProGANTrainConfig, out: Path, images: np.ndarray | None = None):
        cfg.validate()
        self.cfg, self.out = cfg, Path(out)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        net = cfg.network
        self.G, self.D = Generator(net), Discriminator(net)
        # G's exponential moving average (Karras et al. 2018, sec. A.1; half-life and ramp-up as
        # in StyleGAN2): what samples, the benchmark and export use; the doctor watches G itself
        self.G_ema = averaged_copy(self.G) if cfg.ema_images else None
        betas = (cfg.beta1, cfg.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg.lr, betas=betas)
        if images is None:
            images = datasets.load_images(cfg.data, cfg.n_images, net.resolution, cfg.seed)
        self.images = images
        self.fixed_z = torch.from_numpy(
            np.random.default_rng(cfg.seed + 1).standard_normal((64, net.z_dim)).astype(np.float32))
        # the doctor's fixed held-out batch: real images outside the training pool (full
        # resolution; `held_at_stage` brings them to the stage) and latents
        held = datasets.load_images(cfg.data, 64, net.resolution, cfg.seed + 7919)
        self.held_real = to_tensor(held)                              # (64, C, R, R)
        self.held_z = torch.from_numpy(
            np.random.default_rng(cfg.seed + 2).standard_normal((64, net.z_dim)).astype(np.float32))
        self.step, self.shown = 0, 0
        self._set_stage()
        self.command = " ".join(["ganforge", *sys.argv[1:]]) if Path(sys.argv[0]).name == "ganforge" else None

    def _set_stage(self) -> None:
        cfg = self.cfg
        stage, alpha = schedule(self.shown, cfg.network.n_stages, cfg.stable_images, cfg.fade_images)
        for net in (self.G, self.D, self.G_ema):
            if net is not None:
                net.stage, net.alpha = stage, alpha

    @torch.no_grad()
    def update_ema(self) -> None:
        """G_ema <- beta G_ema + (1 - beta) G, stage by stage: beta = 0.5 ** (batch / half-life),
        the half-life capped at `ema_rampup` of the images shown since the stage's block first
        trained. A block born at a fade-in is in its first, fastest-moving steps, as the whole
        net is at step 0; averaged over the run's images instead, its copy in G_ema would lag
        the block being faded in by a half-life as long as the fade itself. Blocks not yet
        trained are copied (they equal G's initial ones)."""
        if self.G_ema is None:
            return
        cfg = self.cfg
        for k in range(cfg.network.n_stages):
            since = max(self.shown - stage_birth(k, cfg.stable_images, cfg.fade_images), 0)
            beta = ema_beta(cfg.batch_size, since, cfg.ema_images, cfg.ema_rampup)
            update_average(self.G_ema.blocks[k], self.G.blocks[k], beta)
            update_average(self.G_ema.to_rgb[k], self.G.to_rgb[k], beta)

    @property
    def stage(self) -> int:
        return self.G.stage

    @property
    def alpha(self) -> float:
        return self.G.alpha

    def real_batch(self) -> torch.Tensor:
        """Full-resolution reals brought to the stage's side; during a fade-in they are blended
        like G's output (the lower-resolution version, upsampled, towards the sharp one)."""
        idx = self.rng.integers(0, len(self.images), self.cfg.batch_size)
        batch = self.images[idx]
        if datasets.mirrorable(self.cfg.data):  # a mirrored digit is no digit
            flip = self.rng.random(len(idx)) < 0.5
            batch[flip] = batch[flip, :, ::-1]
        x = to_tensor(batch)                                          # (B, C, R, R)
        return to_stage(x, self.cfg.network.side(self.stage), self.alpha)

    def held_at_stage(self) -> torch.Tensor:
        """The doctor's held-out reals at the current stage and alpha, as a training batch is."""
        return to_stage(self.held_real, self.cfg.network.side(self.stage), self.alpha)

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cfg.instance_noise * torch.randn_like(x) if self.cfg.instance_noise else x

    def train_step(self) -> dict:
        cfg = self.cfg
        self._set_stage()
        x = self.real_batch()
        z = torch.randn(cfg.batch_size, cfg.network.z_dim)
        fake = self.G(z)

        self.opt_D.zero_grad(set_to_none=True)
        r1 = cfg.r1_gamma > 0 and self.step % cfg.r1_every == 0
        if r1:
            x.requires_grad_(True)
        logit_real = self.D(self._noisy(x))
        logit_fake = self.D(self._noisy(fake.detach()))
        loss_real = F.softplus(-logit_real).mean()                   # -log D(x): real target 1
        if cfg.label_smoothing:                                      # real target 1 - smoothing
            ls = cfg.label_smoothing
            loss_real = (1 - ls) * loss_real + ls * F.softplus(logit_real).mean()
        loss_D = loss_real + F.softplus(logit_fake).mean()
        if r1:
            (grad,) = torch.autograd.grad(logit_real.sum(), x, create_graph=True)
            penalty = grad.pow(2).sum(dim=(1, 2, 3)).mean()
            loss_D = loss_D + 0.5 * cfg.r1_gamma * cfg.r1_every * penalty
        loss_D.backward()
        self.opt_D.step()

        self.opt_G.zero_grad(set_to_none=True)
        loss_G = F.softplus(-self.D(self._noisy(fake))).mean()
        loss_G.backward()
        self.opt_G.step()
        self.step += 1
        self.shown += cfg.batch_size
        self.update_ema()
        return {"step": self.step, "shown": self.shown, "stage": self.stage,
                "side": cfg.network.side(self.stage), "alpha": round(self.alpha, 4),
                "loss_D": float(loss_D.detach()), "loss_G": float(loss_G.detach()),
                "D_real": float(torch.sigmoid(logit_real.detach()).mean()),
                "D_fake": float(torch.sigmoid(logit_fake.detach()).mean())}

    # -- Tunable (the doctor's auto remedies); D has no dropout, so no d_dropout knob --
    def knobs(self) -> dict:
        return {"label_smoothing": self.cfg.label_smoothing, "instance_noise": self.cfg.instance_noise,
                "lr_g": self.opt_G.param_groups[0]["lr"], "lr_d": self.opt_D.param_groups[0]["lr"]}

    def set_knob(self, name: str, value: float) -> None:
        if name in ("label_smoothing", "instance_noise"):
            setattr(self.cfg, name, value)
        elif name in ("lr_g", "lr_d"):
            for g in (self.opt_G if name == "lr_g" else self.opt_D).param_groups:
                g["lr"] = value
        else:
            raise KeyError(name)

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """The output of G_ema (G without one) upsampled to the final resolution, float NCHW."""
        if self.G_ema is not None:
            return Upsampled(self.G_ema)(z)
        self.G.eval()
        try:
            return Upsampled(self.G)(z)
        finally:
            self.G.train()

    def samples(self) -> np.ndarray:
        return to_uint8(self.generate(self.fixed_z))

    def save(self) -> Path:
        self._set_stage()  # record the (stage, alpha) the next step trains at
        return save_checkpoint(
            self.out / "checkpoint.pt", "progan", self.cfg.network,
            {"G": self.G, "D": self.D, **({"G_ema": self.G_ema} if self.G_ema is not None else {})},
            step=self.step, shown=self.shown, stage=self.stage, alpha=float(self.alpha),
            optim={"G": self.opt_G.state_dict(), "D": self.opt_D.state_dict()},
            rng=json.loads(json.dumps(self.rng.bit_generator.state)),
            torch_rng=torch.get_rng_state(), data=self.cfg.data, seed=self.cfg.seed,
            knobs={"label_smoothing": self.cfg.label_smoothing,
                   "instance_noise": self.cfg.instance_noise},
            command=self.command, train=json.loads(json.dumps(dataclasses.asdict(self.cfg))))

    def restore(self, payload: dict) -> None:
        """Continue from a checkpoint: weights, optimizer states, images shown, stage, alpha."""
        if payload["config"] != dataclasses.asdict(self.cfg.network):
            raise CheckpointError(f"--resume: {payload['path']} was trained with network "
                                  f"{payload['config']}, not {dataclasses.asdict(self.cfg.network)}")
        self.G.load_state_dict(payload["state"]["G"])
        self.D.load_state_dict(payload["state"]["D"])
        if self.G_ema is not None:  # a checkpoint from before the average: it starts from G
            self.G_ema.load_state_dict(payload["state"].get("G_ema", payload["state"]["G"]))
        self.opt_G.load_state_dict(payload["optim"]["G"])
        self.opt_D.load_state_dict(payload["optim"]["D"])   # with the learning rates in force
        for name, value in payload.get("knobs", {}).items():  # as the doctor left them
            setattr(self.cfg, name, value)
        self.step, self.shown = int(payload["step"]), int(payload["shown"])
        self.rng.bit_generator.state = payload["rng"]
        torch.set_rng_state(payload["torch_rng"])
        self._set_stage()
        assert (self.stage, round(self.alpha, 6)) == (payload["stage"], round(payload["alpha"], 6))


def train_progan(cfg: ProGANTrainConfig, out: str | Path, resume: bool = False,
                 progress: bool = True) -> dict:
    """Train (or with `resume`, continue) a Progressive GAN in run directory `out`."""
    out = Path(out)
    cfg.validate()
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {out} ({exc.strerror})") from exc
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    trainer = ProGANTrainer(cfg, out)
    monitor = Monitor(trainer.held_at_stage(), trainer.held_z, cfg.thresholds, every=cfg.doctor_every,
                      total_steps=cfg.steps)
    doctor = Doctor(monitor, cfg.doctor, log=(lambda m: print("\n" + m, file=sys.stderr)) if progress else None)
    if resume:
        trainer.restore(load_checkpoint(out, kinds=("progan",)))
    else:
        (out / "train.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    spans = stage_spans(cfg, max(cfg.steps, trainer.step), resumed=(trainer.step, trainer.shown))
    stage_ends = {span["end"] for span in spans}
    if resume and cfg.doctor != "off":
        _resume_doctor(out, doctor, spans, trainer.step)
    start = trainer.step
    bar = Progress(max(cfg.steps - start, 0), "train progan", unit="step", enabled=progress)
    t0 = time.perf_counter()
    last: dict = {}
    with open(out / "metrics.jsonl", "a" if resume else "w") as metrics:
        while trainer.step < cfg.steps:
            last = trainer.train_step()
            s = trainer.step
            if cfg.doctor != "off" and (monitor.due(s) or s in stage_ends):
                # D and G at the stage and alpha step s trained at; the held reals likewise
                follow_stages(monitor, spans, s)
                monitor.set_real(trainer.held_at_stage())
                found = doctor.observe(s, trainer.D, trainer.G, trainer, {"z_dim": cfg.network.z_dim},
                                       extra={"stage": last["stage"], "side": last["side"],
                                              "alpha": last["alpha"]})
                log_step(metrics, last, t0, monitor, found)
            elif s % cfg.log_every == 0 or s == cfg.steps:
                log_step(metrics, last, t0)
            if s % cfg.sample_every == 0 or s == cfg.steps:
                save_grid(trainer.samples(), out / "samples" / f"step_{s:06d}.png", nrow=8)
            if s % cfg.checkpoint_every == 0 and s != cfg.steps:
                trainer.save()
            bar.update(1, status=f"{last['side']}px a={last['alpha']:.2f} "
                                 f"loss_D {last['loss_D']:.3f} loss_G {last['loss_G']:.3f}")
    bar.close()
    ckpt = trainer.save()
    grid_path = save_grid(trainer.samples(), out / "samples.png", nrow=8)
    if cfg.doctor != "off":
        write_run_report(out, monitor, doctor, stages=spans,
                         title=f"progan on {cfg.data}, {trainer.step} steps, {cfg.network.resolution} px")
    return {"checkpoint": str(ckpt), "samples": str(grid_path), "steps": trainer.step,
            "resumed_from": start if resume else None, "stage": trainer.stage,
            "alpha": trainer.alpha, "seconds": round(time.perf_counter() - t0, 1),
            "diagnoses": [(d.failure, d.evidence.get("stage")) for d in monitor.diagnoses],
            "interventions": len(doctor.interventions)}


def _resume_doctor(out: Path, doctor: Doctor, spans: list[dict], step: int) -> None:
    """Carry the doctor over a resume: the observations metrics.jsonl recorded up to the
    checkpoint's step are taken in again, stage by stage (the same diagnoses and detector state
    as if the run had not stopped), and the interventions doctor.json recorded up to it."""
    records = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "s_G" in row and row.get("step", step + 1) <= step:
                records.append({k: v for k, v in row.items() if k != "diagnoses"})
    doctor.monitor.replay(records, spans)
    saved = out / "doctor.json"
    if saved.is_file():
        try:
            past = json.loads(saved.read_text()).get("interventions", [])
            doctor.interventions += [Intervention(**i) for i in past if i["step"] <= step]
        except (json.JSONDecodeError, TypeError, KeyError):
            pass  # a damaged report: the interventions before the resume are not carried over


def train_from_args(args) -> int:
    """`ganforge train progan ...` (the flags are declared in ganforge/cli.py)."""
    try:
        net = ProGANConfig(z_dim=args.z_dim, resolution=args.resolution, fmap_base=args.fmap_base,
                           fmap_max=args.fmap_max, fmap_min=args.fmap_min, d_fmap_min=args.d_fmap_min)
    except ValueError as exc:
        raise UsageError(f"network: {exc}") from None
    cfg = ProGANTrainConfig(data=args.data or "shapes", n_images=args.n_images, steps=args.steps,
                            batch_size=args.batch_size or 32, lr=args.lr or 1e-3, seed=args.seed,
                            stable_images=args.stable_images, fade_images=args.fade_images,
                            ema_images=args.ema_images,
                            sample_every=args.sample_every, network=net, doctor=args.doctor,
                            doctor_every=args.doctor_every,
                            thresholds=Thresholds.parse(args.thresholds or ""))
    if args.resume and not (Path(args.out) / "checkpoint.pt").is_file():
        raise UsageError(f"--resume: {args.out} holds no checkpoint.pt to continue from")
    summary = train_progan(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"trained to step {summary['steps']} (stage {summary['stage']}, "
          f"{cfg.network.side(summary['stage'])} px, alpha {summary['alpha']:.2f}) in "
          f"{summary['seconds']} s; checkpoint {summary['checkpoint']}; samples {summary['samples']}")
    if cfg.doctor != "off":
        found = ", ".join(f"{f} (stage {st})" for f, st in summary["diagnoses"]) or "none"
        print(f"doctor ({cfg.doctor}): diagnoses {found}; {summary['interventions']} interventions; "
              f"report {Path(args.out) / 'doctor.md'}")
    return 0
