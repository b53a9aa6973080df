"""The context encoder for inpainting (Pathak et al., 2016), as in the course:

    L_rec = ‖M ⊙ (x − F((1−M) ⊙ x))‖²          (masked L2: the hole only)
    L_adv = max_D E[log D(x) + log(1 − D(F((1−M) ⊙ x)))]
    L     = λ_rec L_rec + λ_adv L_adv,  λ_rec = 0.999, λ_adv = 0.001

F, the generator, is fed the masked image (and the mask), not noise. Here F is a convolutional
encoder-decoder with dilated convolutions at the bottleneck (a receptive field wider than the
holes, as in Iizuka et al. 2017), so it runs on any tile size; D is a DCGAN-style discriminator
on the completed image. The training doctor (training/monitor.py) watches the adversarial part:
s_G / s_D on a fixed held-out batch (held-out photos, fixed masks; its "latents" are the masked
inputs), diagnoses in metrics.jsonl, scores.png and doctor.md in the run directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ganforge import masks as maskgen
from ganforge.errors import UsageError
from ganforge.images import save_grid
from ganforge.progress import Progress
from ganforge.training import datasets
from ganforge.training.autoencoders import REC_REDUCTIONS, masked_mse, psnr, training_photos
from ganforge.training.gan import CONFIGS, save_checkpoint
from ganforge.training.monitor import Doctor, Monitor, log_step, write_run_report


@dataclass(frozen=True)
class ContextEncoderConfig:
    width: int = 24            # feature maps after the first conv (x2 per downsampling)
    dilations: tuple[int, ...] = (2, 4, 8, 2)   # bottleneck dilated 3x3 convs
    d_width: int = 32          # discriminator filters in its first block
    prefill: bool = False      # fill the hole first (pull-push, then harmonic diffusion), learn a residual
    diffuse: int = 32          # prefill: Jacobi iterations of the harmonic fill after pull-push
    # prefill "cascade": at every pyramid level, coarse to fine, `diffuse` harmonic steps then
    # `bilaplace` biharmonic steps (cascade_fill); "harmonic": pull-push, then `diffuse` steps
    fill: str = "harmonic"
    bilaplace: int = 0
    thinplate: int = 0         # prefill: conjugate-gradient steps on the thin-plate energy after the fill
    # what F learns on the prefill: "residual" (added to the fill) or "blend" (per-pixel convex
    # weights over three classical fills: the thin plate, it run `blend_thinplate` CG steps
    # further, the cascade before the thin plate)
    head: str = "residual"
    blend_thinplate: int = 350
    # blend: width in pixels of the band of known pixels around the hole that is re-filled, as if
    # it were hole too, to score each fill on pixels whose answer is known (0: no scoring)
    blend_validate: int = 0


def repeat(n: int, step, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`state = step(*state)`, `n` times. Run eagerly it is a Python loop; under torch.export
    (so in `ganforge export`) it is one `while_loop`, which the ONNX exporter writes as one ONNX
    Loop: the graph holds a single step's ops whatever `n` is, instead of `n` copies of them
    (the blend inpainter's 500-odd fill steps made a 58 MB graph that took ONNX Runtime half a
    minute to load). `step` must return new tensors of the shapes and dtypes it was given."""
    if n <= 0:
        return state
    if not torch.compiler.is_exporting():
        for _ in range(n):
            state = step(*state)
        return state
    from torch._higher_order_ops.while_loop import while_loop

    def cond(i, *_):
        return i < n

    def body(i, *s):
        return (i + 1, *step(*s))

    return tuple(while_loop(cond, body, (torch.zeros((), dtype=torch.int64), *state))[1:])


def _pull(x: torch.Tensor, known: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The pull: (masked sum, known weight) per pyramid level, finest first, by 2x2 averages,
    and the coarsest level's masked mean."""
    levels = []
    v, w = x * known, known
    while min(v.shape[-2:]) >= 2:
        levels.append((v, w))
        v, w = F.avg_pool2d(v, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)
    fill = v / w.clamp_min(1e-6)
    return levels, fill


def pull_push(x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Fill the holes of `x` (B, C, H, W) from its known pixels (`known` (B, 1, H, W), 1 = known)
    by pull-push (Gortler et al., 1996): pull = masked averages down a pyramid, push = each level's
    holes filled from the level below, upsampled, blended by the level's known weight. Known
    pixels come back unchanged; a hole's value is a smooth average of the nearest known ones."""
    levels, fill = _pull(x, known)
    for v, w in reversed(levels):
        up = F.interpolate(fill, size=v.shape[-2:], mode="bilinear", align_corners=False)
        a = (w * 2).clamp(0, 1)   # a level's pixel counts as known when half its area is
        fill = a * (v / w.clamp_min(1e-6)) + (1 - a) * up
    return fill


def harmonic_fill(x: torch.Tensor, known: torch.Tensor, iterations: int) -> torch.Tensor:
    """Pull-push, then `iterations` Jacobi steps of Laplace's equation inside the holes (each hole
    pixel becomes the mean of its 3x3 neighbourhood; known pixels stay): the smooth membrane
    inpainting of classical image processing, in a few convolutions an ONNX graph can hold."""
    return _jacobi(x, known, pull_push(x, known), iterations)


def _jacobi(x: torch.Tensor, known: torch.Tensor, u: torch.Tensor, iterations: int) -> torch.Tensor:
    """`iterations` Jacobi steps of Laplace's equation inside the holes of `u`: each hole pixel
    becomes the mean of its 3x3 neighbourhood, edges replicated; known pixels stay `x`."""
    def step(u):
        return (known * x + (1 - known) * F.avg_pool2d(F.pad(u, (1, 1, 1, 1), mode="replicate"), 3, 1),)

    return repeat(iterations, step, (u,))[0]


BILAPLACIAN = ((0, 0, 1, 0, 0), (0, 2, -8, 2, 0), (1, -8, 20, -8, 1), (0, 2, -8, 2, 0), (0, 0, 1, 0, 0))
BILAPLACE_STEP = 1 / 40   # gradient step on the biharmonic energy: stable below 2/64


def _smooth(x: torch.Tensor, known: torch.Tensor, u: torch.Tensor, harmonic: int, bilaplace: int) -> torch.Tensor:
    """`harmonic` Jacobi steps of Laplace's equation, then `bilaplace` gradient steps of the
    biharmonic energy (13-point stencil), inside the holes of `u`; known pixels stay `x`."""
    u = _jacobi(x, known, u, harmonic)
    k = torch.tensor(BILAPLACIAN, dtype=u.dtype, device=u.device).view(1, 1, 5, 5).repeat(u.shape[1], 1, 1, 1)

    def step(u):
        grad = F.conv2d(F.pad(u, (2, 2, 2, 2), mode="replicate"), k, groups=u.shape[1])
        return (known * x + (1 - known) * (u - BILAPLACE_STEP * grad),)

    return repeat(bilaplace, step, (u,))[0]


def cascade_fill(x: torch.Tensor, known: torch.Tensor, harmonic: int, bilaplace: int) -> torch.Tensor:
    """Pull-push whose push smooths every level: down the pyramid by masked averages (pull);
    then from the coarsest level up, the level below is upsampled into this level's holes and
    smoothed there (`_smooth`), a pixel counting as known when its whole area is. The smooth
    membrane (harmonic) and thin-plate (biharmonic) fills of classical inpainting, converged on
    large holes in a few hundred fixed steps because each level starts from the coarser one:
    on 64x64 tiles of the held-out photos (harmonic 20, bilaplace 100) scores 20.28 / 24.78 dB
    hole PSNR (centre 25 % / free-form) against 19.38 / 23.78 for pull-push + 32 harmonic steps
    and 20.03 / 25.24 for scikit-image's inpaint_biharmonic."""
    levels, fill = _pull(x, known)
    for v, w in reversed(levels):
        up = F.interpolate(fill, size=v.shape[-2:], mode="bilinear", align_corners=False)
        k = (w > 0.999).to(v.dtype)
        xv = v / w.clamp_min(1e-6)
        fill = _smooth(xv, k, k * xv + (1 - k) * up, harmonic, bilaplace)
    return fill


LAPLACIAN = ((0, 1, 0), (1, -4, 1), (0, 1, 0))
CG_TOLERANCE = 1e-14   # thin_plate_fill: a system's squared residual, relative to its start, where it stops


def _laplacian_kernel(u: torch.Tensor) -> torch.Tensor:
    """LAPLACIAN as a depthwise (C, 1, 3, 3) kernel for `u`'s channels, dtype and device."""
    return torch.tensor(LAPLACIAN, dtype=u.dtype, device=u.device).view(1, 1, 3, 3).repeat(u.shape[1], 1, 1, 1)


def _laplacian(u: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
    """The 5-point Laplacian of (B, C, H, W) `u`, edges replicated (zero flux across the border)."""
    k = _laplacian_kernel(u) if k is None else k
    return F.conv2d(F.pad(u, (1, 1, 1, 1), mode="replicate"), k, groups=u.shape[1])


def _laplacian_adjoint(v: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
    """The transpose of `_laplacian`: the transposed convolution, then each replicated border
    row and column folded back onto the edge it copies."""
    k = _laplacian_kernel(v) if k is None else k
    g = F.conv_transpose2d(v, k, groups=v.shape[1])                                  # (B, C, H+2, W+2)
    g = torch.cat([g[:, :, 1:2] + g[:, :, :1], g[:, :, 2:-2], g[:, :, -2:-1] + g[:, :, -1:]], dim=2)
    return torch.cat([g[..., 1:2] + g[..., :1], g[..., 2:-2], g[..., -2:-1] + g[..., -1:]], dim=3)  # (B, C, H, W)


def thin_plate_fill(x: torch.Tensor, known: torch.Tensor, u: torch.Tensor, iterations: int) -> torch.Tensor:
    """`iterations` conjugate-gradient steps, from the fill `u`, towards the minimum of the
    thin-plate energy `sum (Laplacian u)^2` over the hole's pixels, known pixels held at `x`:
    the biharmonic inpainting that scikit-image's `inpaint_biharmonic` solves with a sparse
    factorisation, here as fixed convolutions and per-image sums an ONNX graph can hold. Each
    image and channel is its own system (its own step sizes); an image without a hole is left
    as it is. CG needs a good start: from the cascade, 50 steps come within 0.02 dB of the
    solver's hole PSNR on the strokes of `ganforge bench inpaint` (docs/inpainting.md)."""
    hole, k = 1 - known, _laplacian_kernel(u)              # the kernel built once, not per step
    u = known * x + hole * u
    r = -hole * _laplacian_adjoint(_laplacian(u, k), k)    # minus the energy's gradient, in the hole
    rr = (r * r).sum((2, 3), keepdim=True)                 # (B, C, 1, 1)
    # A system stops where it has converged as far as float32 goes (squared residual 1e-14 of
    # its start): past that, rounding makes the step sizes noise and the iterates blow up
    # (ONNX Runtime's sums reach NaN within a few hundred steps where torch's happen not to).
    done = rr * CG_TOLERANCE

    def step(u, r, p, rr):
        ap = hole * _laplacian_adjoint(_laplacian(p, k), k)
        pap = (p * ap).sum((2, 3), keepdim=True)
        live = (rr > done) & (pap > 0)
        alpha = torch.where(live, rr / torch.where(live, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        r_next = r - alpha * ap
        rr_next = (r_next * r_next).sum((2, 3), keepdim=True)
        beta = torch.where(live, rr_next / torch.where(live, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        return u + alpha * p, r_next, r_next + beta * p, rr_next

    return repeat(iterations, step, (u, r, r.clone(), rr))[0]


FILLS = ("harmonic", "cascade")
HEADS = ("residual", "blend")
BLEND_PRIOR = 5.0   # the blend's initial logit for the thin plate: an untrained blend is 99 % the thin plate
# with --blend-validate: each fill's logit starts at -VALIDATE_TEMPERATURE times its band error
# over the mean of the fills' band errors (a tile's best-scoring fill gets the largest weight)
VALIDATE_TEMPERATURE = 3.0


class FillBlend(nn.Module):
    """Per-pixel softmax weights over K candidate fills, from a full-resolution stack of dilated
    3x3 convolutions (dilations 1, 2, 4, 1, 1: no downsampling, so a thin stroke is not averaged
    into a coarse grid). It sees the first candidate, every other candidate's difference from it
    and the mask; its output is a convex combination of the fills, so it cannot paint what none
    of them holds: it learns where each classical fill is right.

    With `scored`, each call also gets the fills' band errors (B, K) (`ContextEncoder.band_errors`:
    how well each fill predicts known pixels next to the hole, in this very tile). Divided by
    their mean they are K more input channels, and `-VALIDATE_TEMPERATURE` times them is added
    to the logits, so an untrained blend weighs the fills by how they score on this tile (its last
    conv starts at zero) instead of taking the thin plate."""

    def __init__(self, k: int, width: int, scored: bool = False):
        super().__init__()
        act = lambda: nn.ELU(inplace=True)
        self.scored = scored
        self.net = nn.Sequential(nn.Conv2d(3 * k + 1 + (k if scored else 0), width, 3, padding=1), act(),
                                 nn.Conv2d(width, width, 3, padding=2, dilation=2), act(),
                                 nn.Conv2d(width, width, 3, padding=4, dilation=4), act(),
                                 nn.Conv2d(width, width, 3, padding=1), act(),
                                 nn.Conv2d(width, k, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.zeros(k) if scored else torch.tensor([BLEND_PRIOR] + [0.0] * (k - 1)))

    def weights(self, fills: torch.Tensor, mask: torch.Tensor, errors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, 3, H, W) fills, (B, 1, H, W) mask [, (B, K) band errors] -> (B, K, H, W)
        weights summing to 1."""
        if self.scored != (errors is not None):
            raise ValueError(f"FillBlend(scored={self.scored}) called {'without' if self.scored else 'with'} band errors")
        base = fills[:, 0]
        feats = [base] + [fills[:, k] - base for k in range(1, fills.shape[1])] + [mask]
        if errors is None:
            return torch.softmax(self.net(torch.cat(feats, dim=1)), dim=1)
        rel = (errors / errors.mean(1, keepdim=True).clamp_min(1e-12))[..., None, None]  # (B, K, 1, 1)
        feats.append(rel.expand(-1, -1, *mask.shape[-2:]))
        return torch.softmax(self.net(torch.cat(feats, dim=1)) - VALIDATE_TEMPERATURE * rel, dim=1)

    def forward(self, fills: torch.Tensor, mask: torch.Tensor, errors: torch.Tensor | None = None) -> torch.Tensor:
        return (self.weights(fills, mask, errors).unsqueeze(2) * fills).sum(1)


class ContextEncoder(nn.Module):
    """F: (masked image (B, 3, T, T) in [-1, 1], mask (B, 1, T, T)) -> image (B, 3, T, T)."""

    def __init__(self, cfg: ContextEncoderConfig):
        super().__init__()
        if cfg.fill not in FILLS or min(cfg.diffuse, cfg.bilaplace, cfg.thinplate) < 0:
            raise UsageError(f"inpainter: fill {cfg.fill!r}, diffuse {cfg.diffuse}, bilaplace {cfg.bilaplace}, "
                             f"thinplate {cfg.thinplate} not allowed; fill is one of {', '.join(FILLS)}, steps >= 0")
        if cfg.head not in HEADS:
            raise UsageError(f"inpainter: head {cfg.head!r} not allowed; one of {', '.join(HEADS)}")
        self.cfg = cfg
        c = cfg.width
        if cfg.head == "blend":
            if not (cfg.prefill and cfg.fill == "cascade" and cfg.thinplate > 0 and cfg.blend_thinplate >= 0
                    and cfg.blend_validate >= 0):
                raise UsageError(f"inpainter: head blend needs --prefill --fill cascade --thinplate N > 0, "
                                 f"--blend-thinplate >= 0 and --blend-validate >= 0 (got prefill {cfg.prefill}, "
                                 f"fill {cfg.fill!r}, thinplate {cfg.thinplate}, blend_thinplate "
                                 f"{cfg.blend_thinplate}, blend_validate {cfg.blend_validate})")
            self.blend = FillBlend(3, c, scored=cfg.blend_validate > 0)
            return
        if cfg.blend_validate:
            raise UsageError(f"inpainter: --blend-validate {cfg.blend_validate} needs --head blend (got head {cfg.head!r})")
        act = lambda: nn.ELU(inplace=True)
        self.encode = nn.Sequential(
            nn.Conv2d(4, c, 5, padding=2), act(),                           # c x T x T
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), act(),             # 2c x T/2 x T/2
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), act(),         # 4c x T/4 x T/4
        )
        self.context = nn.Sequential(*[m for d in cfg.dilations for m in
                                       (nn.Conv2d(4 * c, 4 * c, 3, padding=d, dilation=d), act())])
        self.decode = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(4 * c, 2 * c, 3, padding=1), act(),  # 2c x T/2
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * c, c, 3, padding=1), act(),      # c x T
            nn.Conv2d(c, 3, 3, padding=1),                                                              # 3 x T x T
        )
        if cfg.prefill:  # the residual starts at zero: an untrained network is pull-push itself
            nn.init.zeros_(self.decode[-1].weight)
            nn.init.zeros_(self.decode[-1].bias)
        else:
            self.decode.append(nn.Tanh())

    def fill(self, masked_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The classical prefill the residual is learned on (`prefill` models only)."""
        known = 1 - mask
        if self.cfg.fill == "cascade":
            coarse = cascade_fill(masked_image, known, self.cfg.diffuse, self.cfg.bilaplace)
        else:
            coarse = harmonic_fill(masked_image, known, self.cfg.diffuse)
        if self.cfg.thinplate:
            coarse = thin_plate_fill(masked_image, known, coarse, self.cfg.thinplate)
        return coarse

    def fills(self, masked_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The blend's three candidate fills, (B, 3, 3, H, W): the thin plate (the prefill), it
        run `blend_thinplate` steps further, and the cascade it starts from. They have no learned
        parameters, so training computes them once per crop-mask pair."""
        known, cfg = 1 - mask, self.cfg
        cascade = cascade_fill(masked_image, known, cfg.diffuse, cfg.bilaplace)
        early = thin_plate_fill(masked_image, known, cascade, cfg.thinplate)
        late = thin_plate_fill(masked_image, known, early, cfg.blend_thinplate) if cfg.blend_thinplate else early
        return torch.stack([early, late, cascade], dim=1)

    def band_errors(self, masked_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Each candidate fill's mean squared error, (B, K), on the band of known pixels within
        `blend_validate` pixels of the hole, when that band is filled too: how well each fill
        predicts this tile's own known pixels next to the hole. None without `blend_validate`.
        A tile without a band (no hole, or a hole that dilates over everything) scores every
        fill 0, and the blend weighs them by its network alone."""
        r = self.cfg.blend_validate
        if not r:
            return None
        grown = F.max_pool2d(mask, 2 * r + 1, 1, r)
        band = grown - mask                                                  # (B, 1, H, W)
        fills = self.fills(masked_image * (1 - grown), grown)                # (B, K, 3, H, W)
        sq = (fills - masked_image.unsqueeze(1)) ** 2 * band.unsqueeze(1)
        return sq.sum((2, 3, 4)) / (3 * band.sum((1, 2, 3))).clamp_min(1).unsqueeze(1)

    def refine(self, coarse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The learned residual added to the prefill `coarse`."""
        residual = self.decode(self.context(self.encode(torch.cat([coarse, mask], dim=1))))
        return (coarse + residual).clamp(-1, 1)

    def forward(self, masked_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.head == "blend":
            return self.blend(self.fills(masked_image, mask), mask, self.band_errors(masked_image, mask))
        if not self.cfg.prefill:
            return self.decode(self.context(self.encode(torch.cat([masked_image, mask], dim=1))))
        return self.refine(self.fill(masked_image, mask), mask)


class Critic(nn.Module):
    """D: completed image (B, 3, T, T) -> logit (B,)."""

    def __init__(self, cfg: ContextEncoderConfig):
        super().__init__()
        c = cfg.d_width
        self.main = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2, True),                            # c x T/2
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, True),  # 2c x T/4
            nn.Conv2d(2 * c, 4 * c, 4, 2, 1), nn.BatchNorm2d(4 * c), nn.LeakyReLU(0.2, True),  # 4c x T/8
            nn.Conv2d(4 * c, 1, 3, 1, 1), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(x.shape[0])


CONFIGS["inpainter"] = ContextEncoderConfig


@dataclass
class InpaintTrainConfig:
    data: str = "photos"
    steps: int = 2000
    batch_size: int = 16
    tile: int = 64
    lambda_rec: float = 0.999
    lambda_adv: float = 0.001
    lr: float = 5e-4
    lr_floor: float = 0.05     # cosine decay of both learning rates to this fraction at the last step
    clip: float = 1.0          # F's gradient-norm clip (0 = off): one bad batch cannot throw it off
    seed: int = 0
    threads: int = 0
    log_every: int = 25
    doctor_every: int = 100    # steps between s_G / s_D measurements on the held-out batch
    pool: int = 4096           # training crops drawn once per run (with --head blend: crop-mask pairs)
    rec_reduce: str = "pixels"  # how L_rec weighs the batch's holes: autoencoders.masked_mse
    balance_fills: bool = False  # blend: draw pairs so each fill is the best one in an equal share
    val_every: int = 0         # steps between validation scores; > 0 keeps the best-scoring weights
    val_crops: int = 96        # validation crops per mask type
    network: ContextEncoderConfig = field(default_factory=ContextEncoderConfig)


def completed(x: torch.Tensor, pred: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Known pixels from x, hole pixels from the prediction."""
    return x * (1 - m) + pred * m


VAL_SETTINGS = ("centre25", "freeform")


class Validation:
    """Hole PSNR on crops of the validation photos (`datasets.VALIDATION_PHOTOS`: never trained
    on, never part of the held-out test), each with a centre 25 % hole and with seeded free-form
    strokes, measured as the inpainting benchmark measures it: uint8 answers, each crop's PSNR
    over its hole, the mean over crops. Its `score` is the mean over the two mask types. For a
    blend the candidate fills and band errors are computed once here."""

    def __init__(self, cfg: InpaintTrainConfig, G: ContextEncoder):
        t = cfg.tile
        crops = datasets.random_crops(datasets.validation_photos(), cfg.val_crops, t, seed=cfg.seed + 104729,
                                      scale=(0.2, 0.6))
        self.sets = {}
        for setting in VAL_SETTINGS:
            ms = (np.stack([maskgen.centre(t, t, 0.25)] * len(crops)) if setting == "centre25"
                  else np.stack([maskgen.strokes(t, t, 8000 + i) for i in range(len(crops))]))
            x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
            m = torch.from_numpy(ms).float().div(255)[:, None]
            pre = _pair_fills(G, crops, ms, False, dtype=torch.float32) if G.cfg.head == "blend" else None
            self.sets[setting] = (crops, ms > 0, x, m, pre)

    def __call__(self, G: ContextEncoder) -> dict:
        out = {}
        with torch.no_grad():
            for setting, (crops, hole, x, m, pre) in self.sets.items():
                pred = G.blend(pre[0], m, pre[1]) if pre is not None else G(x * (1 - m), m)
                got = ((completed(x, pred, m) + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
                # a crop answered exactly counts 99 dB, as in the benchmark
                out[setting] = round(float(np.mean([min(psnr(g[h], c[h]), 99.0) for g, c, h in zip(got, crops, hole)])), 3)
        out["score"] = round(float(np.mean([out[s] for s in VAL_SETTINGS])), 3)
        return out


def _doctor(cfg: InpaintTrainConfig, G: nn.Module, D: nn.Module):
    """The monitor on a fixed held-out batch: real = held-out crops; its `z` = the masked inputs
    (image and mask stacked), G_sample = the completion F gives for them."""
    held = datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), 32, cfg.tile, seed=cfg.seed + 7919)
    x = torch.from_numpy(held).permute(0, 3, 1, 2).float() / 127.5 - 1
    m = torch.from_numpy(np.stack([maskgen.mixed(cfg.tile, cfg.tile, 9000 + i) for i in range(32)])).float().div(255)[:, None]
    monitor = Monitor(x, torch.cat([x * (1 - m), m], dim=1), every=cfg.doctor_every, total_steps=cfg.steps)
    doctor = Doctor(monitor, "report")

    def watched(G):
        return lambda z: completed(x, G(z[:, :3], z[:, 3:]), z[:, 3:])
    return monitor, doctor, watched


def _pair_fills(G: ContextEncoder, crops: np.ndarray, masks: np.ndarray, progress: bool,
                chunk: int = 64, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The blend's candidate fills for every crop-mask pair, (N, 3, 3, T, T) in `dtype` (float16
    for the training pool, which is large), and their band errors (N, 3) (None without
    `blend_validate`)."""
    out, errs = [], []
    bar = Progress(len(crops), "classical fills", unit="crop", enabled=progress)
    with torch.no_grad():
        for i in range(0, len(crops), chunk):
            x = torch.from_numpy(crops[i:i + chunk]).permute(0, 3, 1, 2).float() / 127.5 - 1
            m = torch.from_numpy(masks[i:i + chunk]).float().div(255)[:, None]
            out.append(G.fills(x * (1 - m), m).to(dtype))
            e = G.band_errors(x * (1 - m), m)
            if e is not None:
                errs.append(e)
            bar.update(len(x))
    bar.close()
    return torch.cat(out), (torch.cat(errs) if errs else None)


def fill_winners(crops: np.ndarray, masks: np.ndarray, fills: torch.Tensor) -> np.ndarray:
    """For each crop-mask pair, the index of the candidate fill with the lowest hole MSE."""
    won = []
    for i in range(0, len(crops), 256):
        x = torch.from_numpy(crops[i:i + 256]).permute(0, 3, 1, 2).float() / 127.5 - 1
        m = torch.from_numpy(masks[i:i + 256]).float().div(255)[:, None, None]     # (B, 1, 1, T, T)
        won.append((((fills[i:i + 256].float() - x[:, None]) ** 2) * m).sum((2, 3, 4)).argmin(1))
    return torch.cat(won).numpy()


def balanced_draw(winners: np.ndarray, k: int) -> np.ndarray:
    """Sampling probabilities over the pairs under which each of the `k` fills that wins any
    pair wins an equal share: a pair's probability is 1 / (how many pairs its fill wins)."""
    count = np.bincount(winners, minlength=k)
    p = 1.0 / count[winners]
    return p / p.sum()


def _pair_batch(crops: np.ndarray, masks: np.ndarray, fills: torch.Tensor, rng: np.random.Generator,
                n: int, errors: torch.Tensor | None = None, p: np.ndarray | None = None):
    """A batch of (crop, mask, fills, band errors or None) pairs under one random flip and
    quarter turn: the fills are built from symmetric stencils and pyramids, so they turn with
    the image, and the band errors, sums over the tile, do not change. `p`: the pairs'
    sampling probabilities (uniform without)."""
    idx = rng.integers(0, len(crops), n) if p is None else rng.choice(len(crops), n, p=p)
    x = torch.from_numpy(crops[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
    m = torch.from_numpy(masks[idx]).float().div(255)[:, None]
    f = fills[torch.from_numpy(idx)].float()
    e = None if errors is None else errors[torch.from_numpy(idx)]
    if rng.random() < 0.5:
        x, m, f = x.flip(-1), m.flip(-1), f.flip(-1)
    turns = int(rng.integers(4))
    return x.rot90(turns, (-2, -1)), m.rot90(turns, (-2, -1)), f.rot90(turns, (-2, -1)), e


def train_inpainter(cfg: InpaintTrainConfig, out: str | Path, progress: bool = True) -> dict:
    out = Path(out)
    if cfg.steps < 1 or cfg.batch_size < 2 or cfg.tile < 16 or cfg.tile % 4 or cfg.pool < 1:
        raise UsageError(f"inpainter: steps {cfg.steps}, batch size {cfg.batch_size}, tile {cfg.tile}, pool "
                         f"{cfg.pool} not allowed; need steps >= 1, batch >= 2, tile a multiple of 4 >= 16, pool >= 1")
    if not (cfg.lambda_rec >= 0 and cfg.lambda_adv >= 0 and cfg.lambda_rec + cfg.lambda_adv > 0):
        raise UsageError(f"--lambda-rec/--lambda-adv: {cfg.lambda_rec}/{cfg.lambda_adv} not allowed; "
                         f"both >= 0, not both 0")
    if cfg.rec_reduce not in REC_REDUCTIONS:
        raise UsageError(f"--rec-reduce: {cfg.rec_reduce!r} not allowed; one of {', '.join(REC_REDUCTIONS)}")
    if cfg.balance_fills and cfg.network.head != "blend":
        raise UsageError(f"--balance-fills needs --head blend (got head {cfg.network.head!r})")
    if cfg.val_every < 0 or cfg.val_crops < 1:
        raise UsageError(f"--val-every {cfg.val_every}, val crops {cfg.val_crops} not allowed; "
                         f"--val-every >= 0 (0 = keep the last weights), val crops >= 1")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pool = datasets.random_crops(training_photos(cfg.data), cfg.pool, cfg.tile, cfg.seed, scale=(0.1, 0.6))
    G, D = ContextEncoder(cfg.network), Critic(cfg.network)
    blend = cfg.network.head == "blend"
    if blend:   # one mask per crop: the pairs' fills have no learned parameters, computed once here
        mask_pool = np.stack([maskgen.mixed(cfg.tile, cfg.tile, s) for s in range(len(pool))])
        fill_pool, error_pool = _pair_fills(G, pool, mask_pool, progress)
        winners = fill_winners(pool, mask_pool, fill_pool)
        draw = balanced_draw(winners, fill_pool.shape[1]) if cfg.balance_fills else None
    else:
        mask_pool = np.stack([maskgen.mixed(cfg.tile, cfg.tile, s) for s in range(1024)])
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr * 0.2, betas=(0.5, 0.999))
    decay = lambda i: cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * i / cfg.steps))
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_G, opt_D)]
    (out / "train.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    monitor, doctor, watched = _doctor(cfg, G, D)
    validate = Validation(cfg, G) if cfg.val_every else None
    best = None                # (score, step, F's weights, D's weights) of the best validation so far
    bar = Progress(cfg.steps, "train inpainter", unit="step", enabled=progress)
    t0 = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as metrics:
        if validate:           # the untrained start, for reference: not a candidate
            first = validate(G)
            log_step(metrics, {"step": 0, **{f"val_{k}": v for k, v in first.items()}}, t0)
        for step in range(1, cfg.steps + 1):
            if blend:
                x, m, fills, errors = _pair_batch(pool, mask_pool, fill_pool, rng, cfg.batch_size, error_pool, draw)
                pred = G.blend(fills, m, errors)
            else:
                x = torch.from_numpy(pool[rng.integers(0, len(pool), cfg.batch_size)]).permute(0, 3, 1, 2).float() / 127.5 - 1
                m = torch.from_numpy(mask_pool[rng.integers(0, len(mask_pool), cfg.batch_size)]).float().div(255)[:, None]
                pred = G(x * (1 - m), m)
            fake = completed(x, pred, m)
            # D step: real photos -> 1, completions -> 0
            opt_D.zero_grad(set_to_none=True)
            d_real, d_fake = D(x), D(fake.detach())
            loss_D = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                      + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
            loss_D.backward()
            opt_D.step()
            # F step: masked L2 over the hole + the adversarial term
            opt_G.zero_grad(set_to_none=True)
            l_rec = masked_mse(pred, x, m, cfg.rec_reduce)
            d_gen = D(fake)
            l_adv = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
            loss = cfg.lambda_rec * l_rec + cfg.lambda_adv * l_adv
            loss.backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(G.parameters(), cfg.clip)
            opt_G.step()
            for sched in schedules:
                sched.step()
            if step % cfg.log_every == 0 or step == cfg.steps or monitor.due(step):
                p_real = torch.sigmoid(d_real.detach()).mean().item()
                p_fake = torch.sigmoid(d_fake.detach()).mean().item()
                rec = {"step": step, "l_rec": float(l_rec.detach()), "l_adv": float(l_adv.detach()),
                       "loss_D": float(loss_D.detach()),
                       "s_G": p_fake, "s_D": 0.5 * p_real + 0.5 * (1 - p_fake),
                       "hole_psnr": round(10 * np.log10(4.0 / max(float(masked_mse(pred.detach(), x, m)), 1e-12)), 3)}
                if monitor.due(step):  # the doctor's held-out scores replace the batch's
                    found = doctor.observe(step, D, watched(G))
                    log_step(metrics, rec, t0, monitor, found)
                else:
                    log_step(metrics, rec, t0)
            if validate and (step % cfg.val_every == 0 or step == cfg.steps):
                v = validate(G)
                log_step(metrics, {"step": step, **{f"val_{k}": score for k, score in v.items()}}, t0)
                if best is None or v["score"] > best[0]:
                    best = (v["score"], step, copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict()))
            status = f"l_rec {float(l_rec.detach()):.4f} l_adv {float(l_adv.detach()):.3f}"
            bar.update(1, status=status + (f" val {best[0]:.2f} dB @ {best[1]}" if best else ""))
    bar.close()
    selected = cfg.steps
    if best is not None:       # keep the weights that scored best on the validation photos
        G.load_state_dict(best[2])
        D.load_state_dict(best[3])
        selected = best[1]
    write_run_report(out, monitor, doctor, title=f"context encoder on {cfg.data}, {cfg.steps} steps")
    G.eval()
    ckpt = save_checkpoint(out / "checkpoint.pt", "inpainter", cfg.network, {"net": G, "D": D},
                           step=selected, data=cfg.data, seed=cfg.seed,
                           train=json.loads(json.dumps(asdict(cfg))),
                           **({"validation": {"step": selected, "first": first, "best": best[0]}} if best else {}))
    held = datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), 8, cfg.tile, seed=1)
    x = torch.from_numpy(held).permute(0, 3, 1, 2).float() / 127.5 - 1
    m = torch.from_numpy(np.stack([maskgen.mixed(cfg.tile, cfg.tile, 5000 + i) for i in range(8)])).float().div(255)[:, None]
    with torch.no_grad():
        fill = completed(x, G(x * (1 - m), m), m)
    to8 = lambda t: ((t + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    save_grid(np.concatenate([held, to8(x * (1 - m)), to8(fill)]), out / "samples.png", nrow=8)
    return {"checkpoint": str(ckpt), "samples": str(out / "samples.png"), "steps": cfg.steps,
            "seconds": round(time.perf_counter() - t0, 1), "l_rec": float(l_rec.detach()),
            **({"fill_wins": np.bincount(winners, minlength=3).tolist()} if blend else {}),
            **({"selected_step": selected, "val_psnr": best[0], "val_psnr_untrained": first["score"]} if best else {})}
