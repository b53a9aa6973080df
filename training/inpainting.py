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

Training runs on the engine (engine.py): `ganforge train inpainter`, its options the fields of
`InpaintTrainConfig` and `ContextEncoderConfig`, presets in presets/inpainter/. Crops and hole
masks come per item from the data set (a blend's pairs, with their precomputed fills, by index),
so a run on several ranks trains as one process does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ganforge import masks as maskgen
from ganforge.errors import UsageError
from ganforge.images import save_grid
from ganforge.progress import Progress
from ganforge.training import data as tdata
from ganforge.training import datasets
from ganforge.training.autoencoders import REC_REDUCTIONS, image_crops, masked_mse, psnr
from ganforge.training.options import comma_ints, join_ints
from ganforge.training.distributed import rank_local
from ganforge.training.engine import SCHEDULES, Engine, Task, atomic_save, option
from ganforge.training.gan import CONFIGS
from ganforge.training.loop import GANDoctor, GANOptions, to_tensor, to_uint8
from ganforge.training.loop import _describe as describe_doctor
from ganforge.training.models import ModelSpec


FILLS = ("harmonic", "cascade")
HEADS = ("residual", "blend")


@dataclass(frozen=True)
class ContextEncoderConfig:
    width: int = option(24, "F's feature maps after the first conv (x2 per downsampling); the blend's "
                        "width", min=1)
    dilations: tuple[int, ...] = option((2, 4, 8, 2), "F's bottleneck: dilated 3x3 convs, their dilations",
                                        min=1, parse=comma_ints("--dilations", "2,4,8,2"), format=join_ints,
                                        metavar="D,D,...", show="2,4,8,2")
    d_width: int = option(32, "D's filters in its first block", min=1)
    prefill: bool = option(False, "fill the hole classically first (pull-push, then harmonic diffusion) "
                           "and learn on top of the fill")
    diffuse: int = option(32, "--prefill: harmonic (Jacobi) steps after pull-push; per pyramid level "
                          "for the cascade", min=0)
    # "cascade": at every pyramid level, coarse to fine, `diffuse` harmonic steps then `bilaplace`
    # biharmonic steps (cascade_fill); "harmonic": pull-push, then `diffuse` steps
    fill: str = option("harmonic", "--prefill: harmonic (pull-push, then --diffuse steps) or cascade (every "
                       "pyramid level smoothed, harmonic then biharmonic; docs/inpainting.md)",
                       choices=FILLS)
    bilaplace: int = option(0, "--fill cascade: biharmonic steps per pyramid level", min=0)
    thinplate: int = option(0, "--prefill: conjugate-gradient steps on the thin-plate energy after the fill",
                            min=0)
    # what F learns on the prefill: "residual" (added to the fill) or "blend" (per-pixel convex
    # weights over three classical fills: the thin plate, it run `blend_thinplate` CG steps
    # further, the cascade before the thin plate)
    head: str = option("residual", "--prefill: learn a residual on the fill, or blend: per-pixel weights "
                       "over three classical fills (needs --fill cascade --thinplate N)",
                       choices=HEADS)
    blend_thinplate: int = option(350, "--head blend: further thin-plate steps of the converged fill", min=0)
    # blend: width in pixels of the band of known pixels around the hole that is re-filled, as if
    # it were hole too, to score each fill on pixels whose answer is known (0: no scoring)
    blend_validate: int = option(0, "--head blend: score each fill on a band of this many known pixels "
                                 "around the hole, filled as if it were hole, and weigh the fills by it "
                                 "(0: off)", min=0)


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


def check_network(cfg: ContextEncoderConfig) -> None:
    """Refuse a context encoder whose settings do not go together, naming them."""
    if cfg.fill not in FILLS or min(cfg.diffuse, cfg.bilaplace, cfg.thinplate) < 0:
        raise UsageError(f"inpainter: fill {cfg.fill!r}, diffuse {cfg.diffuse}, bilaplace {cfg.bilaplace}, "
                         f"thinplate {cfg.thinplate} not allowed; fill is one of {', '.join(FILLS)}, steps >= 0")
    if cfg.head not in HEADS:
        raise UsageError(f"inpainter: head {cfg.head!r} not allowed; one of {', '.join(HEADS)}")
    if cfg.head == "blend":
        if not (cfg.prefill and cfg.fill == "cascade" and cfg.thinplate > 0 and cfg.blend_thinplate >= 0
                and cfg.blend_validate >= 0):
            raise UsageError(f"inpainter: head blend needs --prefill --fill cascade --thinplate N > 0, "
                             f"--blend-thinplate >= 0 and --blend-validate >= 0 (got prefill {cfg.prefill}, "
                             f"fill {cfg.fill!r}, thinplate {cfg.thinplate}, blend_thinplate "
                             f"{cfg.blend_thinplate}, blend_validate {cfg.blend_validate})")
    elif cfg.blend_validate:
        raise UsageError(f"inpainter: --blend-validate {cfg.blend_validate} needs --head blend (got head {cfg.head!r})")


class ContextEncoder(nn.Module):
    """F: (masked image (B, 3, T, T) in [-1, 1], mask (B, 1, T, T)) -> image (B, 3, T, T)."""

    def __init__(self, cfg: ContextEncoderConfig):
        super().__init__()
        check_network(cfg)
        self.cfg = cfg
        c = cfg.width
        if cfg.head == "blend":
            self.blend = FillBlend(3, c, scored=cfg.blend_validate > 0)
            return
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
class InpaintTrainConfig(GANOptions):
    """Context encoder training: the engine's settings, the doctor's, and these."""
    data: str = option("photos", "photos (scikit-image's training split), a folder of images, or a "
                       ".txt / .jsonl list of image paths (streamed)")
    steps: int = option(2000, "optimizer steps of D and F each", min=1)
    batch_size: int = option(16, "global batch size, split evenly across the ranks", min=2)
    tile: int = option(64, "training crop side, a multiple of 4", min=16)
    lambda_rec: float = option(0.999, "weight of L_rec, the masked L2 over the hole", min=0)
    lambda_adv: float = option(0.001, "weight of L_adv, the adversarial loss", min=0)
    lr: float = option(5e-4, "F's Adam learning rate; D's is a fifth of it", min=0)
    lr_schedule: str = option("cosine", "learning rate over the run: constant, cosine (to --lr-floor), "
                              "linear-decay (hold, then to --lr-floor over the second half)", choices=SCHEDULES)
    lr_floor: float = option(0.05, "the learning rate falls no lower than this share of --lr", min=0, max=1)
    # one bad batch cannot throw F off; D is not clipped
    grad_clip: float = option(1.0, "clip F's gradient norm to this (0: off); D's is not clipped", min=0)
    doctor_every: int = option(100, "steps between s_G / s_D measurements on the held-out batch", min=1)
    pool: int = option(4096, "bundled photos: training crops drawn once per run; with --head blend, "
                       "crop-mask pairs whose fills are computed once", min=1)
    rec_reduce: str = option("pixels", "how L_rec weighs a batch's holes: pooled over pixels, each image's "
                             "hole MSE averaged, or each image's log hole MSE averaged (mean hole PSNR)",
                             choices=REC_REDUCTIONS)
    balance_fills: bool = option(False, "--head blend: draw the training pairs so each candidate fill is the "
                                 "best one (lowest hole MSE) in an equal share of them")
    val_every: int = option(0, "score hole PSNR on the validation photos (docs/inpainting.md) every N steps "
                            "and keep the best-scoring weights (0: keep the last)", min=0)
    val_crops: int = option(96, "--val-every: validation crops per mask type", min=1)
    network: ContextEncoderConfig = option(default_factory=ContextEncoderConfig)

    def validate(self) -> None:
        if self.tile % 4:
            raise UsageError(f"--tile: {self.tile} is not allowed; must be a multiple of 4")
        if self.lr <= 0:
            raise UsageError(f"--lr: {self.lr!r} is not allowed; must be > 0")
        if self.lambda_rec + self.lambda_adv <= 0:
            raise UsageError(f"--lambda-rec: {self.lambda_rec!r} is not allowed with --lambda-adv "
                             f"{self.lambda_adv!r}; the two must not both be 0")
        if self.balance_fills and self.network.head != "blend":
            raise UsageError(f"--balance-fills: not allowed with --head {self.network.head}; "
                             f"it needs --head blend")
        check_network(self.network)


def completed(x: torch.Tensor, pred: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Known pixels from x, hole pixels from the prediction."""
    return x * (1 - m) + pred * m


VAL_SETTINGS = ("centre25", "freeform")


class Validation:
    """Hole PSNR on crops of the validation photos (`datasets.VALIDATION_PHOTOS`: never trained
    on, never part of the held-out test), each with a centre 25 % hole and with seeded free-form
    strokes, measured as the inpainting benchmark measures it: uint8 answers, each crop's PSNR
    over its hole, the mean over crops. Its `score` is the mean over the two mask types. For a
    blend the candidate fills and band errors are computed once here, on F's device."""

    def __init__(self, cfg: InpaintTrainConfig, G: ContextEncoder):
        t, dev = cfg.tile, next(G.parameters()).device
        crops = datasets.random_crops(datasets.validation_photos(), cfg.val_crops, t, seed=cfg.seed + 104729,
                                      scale=(0.2, 0.6))
        self.sets = {}
        for setting in VAL_SETTINGS:
            ms = (np.stack([maskgen.centre(t, t, 0.25)] * len(crops)) if setting == "centre25"
                  else np.stack([maskgen.strokes(t, t, 8000 + i) for i in range(len(crops))]))
            x = to_tensor(crops).to(dev)
            m = torch.from_numpy(ms).float().div(255)[:, None].to(dev)
            pre = _pair_fills(G, crops, ms, False, dtype=torch.float32) if G.cfg.head == "blend" else None
            self.sets[setting] = (crops, ms > 0, x, m, pre)

    def __call__(self, G: ContextEncoder) -> dict:
        out = {}
        with torch.no_grad():
            for setting, (crops, hole, x, m, pre) in self.sets.items():
                pred = G.blend(pre[0], m, pre[1]) if pre is not None else G(x * (1 - m), m)
                got = to_uint8(completed(x, pred.float(), m))
                # a crop answered exactly counts 99 dB, as in the benchmark
                out[setting] = round(float(np.mean([min(psnr(g[h], c[h]), 99.0) for g, c, h in zip(got, crops, hole)])), 3)
        out["score"] = round(float(np.mean([out[s] for s in VAL_SETTINGS])), 3)
        return out


def _pair_fills(G: ContextEncoder, crops: np.ndarray, masks: np.ndarray, progress: bool,
                chunk: int = 64, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The blend's candidate fills for every crop-mask pair, (N, 3, 3, T, T) in `dtype` (float16
    for the training pool, which is large), and their band errors (N, 3) (None without
    `blend_validate`), on F's device."""
    dev = next(G.parameters()).device
    out, errs = [], []
    bar = Progress(len(crops), "classical fills", unit="crop", enabled=progress)
    with torch.no_grad():
        for i in range(0, len(crops), chunk):
            x = to_tensor(crops[i:i + chunk]).to(dev)
            m = torch.from_numpy(masks[i:i + chunk]).float().div(255)[:, None].to(dev)
            out.append(G.fills(x * (1 - m), m).to(dtype))
            e = G.band_errors(x * (1 - m), m)
            if e is not None:
                errs.append(e)
            bar.update(len(x))
    bar.close()
    return torch.cat(out), (torch.cat(errs) if errs else None)


MASK_SEEDS = 1024   # a residual model's training masks: maskgen.mixed of one of these seeds


class HoledCrops(tdata.Dataset):
    """Training crops with a hole: (T, T, 4) uint8, the crop and its mask (255 = hole) as a fourth
    channel. The mask is one of MASK_SEEDS training masks (centre, blocks, strokes), drawn per
    item and epoch by `item_rng`: the same on any rank, in any worker, after a resume."""

    def __init__(self, crops: tdata.Dataset, tile: int, seed: int):
        self.crops, self.tile, self.seed = crops, tile, seed

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key) -> tuple[np.ndarray, list]:
        index, epoch = key
        crop, bad = self.crops[key]
        s = int(tdata.item_rng(self.seed, epoch, index, stream=2).integers(MASK_SEEDS))
        return np.concatenate([crop, maskgen.mixed(self.tile, self.tile, s)[..., None]], axis=-1), bad


class PairDraw(tdata.Dataset):
    """The blend's training pairs, drawn by index: (3,) int64, the pair, a mirror flag and the
    quarter turns it is seen under. With `p`, item (index, epoch) draws its pair with those
    probabilities (`balanced_draw`); without, item i is pair i."""

    def __init__(self, n: int, seed: int, p: np.ndarray | None = None):
        self.n, self.seed, self.p = n, seed, p

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> tuple[np.ndarray, list]:
        index, epoch = key
        rng = tdata.item_rng(self.seed, epoch, index, stream=3)
        pair = index if self.p is None else int(rng.choice(self.n, p=self.p))
        return np.array([pair, rng.random() < 0.5, rng.integers(4)], np.int64), []


def orient(t: torch.Tensor, flip: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """(B, ..., T, T) square tiles, each mirrored where `flip` (B,), then turned `turns` (B,)
    quarter turns."""
    shape = (-1,) + (1,) * (t.dim() - 1)
    t = torch.where(flip.bool().view(shape), t.flip(-1), t)
    out = t
    for k in (1, 2, 3):
        out = torch.where((turns == k).view(shape), t.rot90(k, (-2, -1)), out)
    return out


def crop_pool(crops: tdata.Dataset, n: int) -> tuple[np.ndarray, list]:
    """`n` crops of a data set, fixed for the run (a folder's files taken in turn, a fresh crop
    of each on every pass), and the files that could not be read."""
    items = [crops[(i % len(crops), i // len(crops))] for i in range(n)]
    return np.stack([a for a, _ in items]), [b for _, bs in items for b in bs]


def fill_winners(crops: np.ndarray, masks: np.ndarray, fills: torch.Tensor) -> np.ndarray:
    """For each crop-mask pair, the index of the candidate fill with the lowest hole MSE."""
    won = []
    for i in range(0, len(crops), 256):
        x = to_tensor(crops[i:i + 256]).to(fills.device)
        m = torch.from_numpy(masks[i:i + 256]).to(fills.device).float().div(255)[:, None, None]  # (B, 1, 1, T, T)
        won.append((((fills[i:i + 256].float() - x[:, None]) ** 2) * m).sum((2, 3, 4)).argmin(1).cpu())
    return torch.cat(won).numpy()


def balanced_draw(winners: np.ndarray, k: int) -> np.ndarray:
    """Sampling probabilities over the pairs under which each of the `k` fills that wins any
    pair wins an equal share: a pair's probability is 1 / (how many pairs its fill wins)."""
    count = np.bincount(winners, minlength=k)
    p = 1.0 / count[winners]
    return p / p.sum()


def _doctor(cfg: InpaintTrainConfig, dev: torch.device, log: bool):
    """The doctor on a fixed held-out batch: real = held-out crops; its `z` = the masked inputs
    (image and mask stacked); `watched(G)` = the completions F gives for them."""
    held = datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), 32, cfg.tile, seed=cfg.seed + 7919)
    x = to_tensor(held).to(dev)
    m = torch.from_numpy(np.stack([maskgen.mixed(cfg.tile, cfg.tile, 9000 + i) for i in range(32)])).float().div(255)
    m = m[:, None].to(dev)

    def watched(G):
        return lambda z: completed(x, G(z[:, :3], z[:, 3:]), z[:, 3:])
    return GANDoctor(cfg, x, torch.cat([x * (1 - m), m], dim=1), log=log), watched


class InpaintTask(Task):
    """The context encoder: D on real crops against completions, F on λ_rec L_rec + λ_adv L_adv.
    A blend learns on crop-mask pairs whose candidate fills are computed once (they have no
    learned parameters); a residual model on crops of the training photos and masks drawn per
    item. With --val-every, rank 0 scores F on the validation photos and the best-scoring
    step's weights are what the final checkpoint holds."""

    kind = "inpainter"

    def __init__(self, cfg: InpaintTrainConfig, progress: bool = True):
        super().__init__(cfg)
        self.progress = progress
        self.first: dict | None = None      # validation of the untrained start: the reference
        self.best: dict | None = None       # the best validated step: score, step, weights of F and D

    def setup(self, eng: Engine) -> None:
        cfg, net, dev = self.cfg, self.cfg.network, eng.device
        torch.manual_seed(cfg.seed)
        self.G, self.D = ContextEncoder(net).to(dev), Critic(net)
        self.D_train = eng.wrap(self.D)
        self.blend = net.head == "blend"
        # a blend trains its weights network on precomputed fills; a residual model trains F whole
        self.G_train = eng.wrap(self.G.blend if self.blend else self.G)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg.lr * 0.2, betas=(0.5, 0.999))
        self.nets, self.opts = {"net": self.G, "D": self.D}, {"net": self.opt_G, "D": self.opt_D}
        crops = image_crops(cfg.data, max(cfg.pool, cfg.batch_size), cfg.tile, cfg.seed, (0.1, 0.6))
        if self.blend:   # one mask per crop: the pairs' fills have no learned parameters, computed once here
            pool, bad = crop_pool(crops, max(cfg.pool, cfg.batch_size))
            for path, why in bad:
                eng.bad_files.setdefault(path, why)
            masks = np.stack([maskgen.mixed(cfg.tile, cfg.tile, s) for s in range(len(pool))])
            self.fill_pool, self.error_pool = _pair_fills(self.G, pool, masks, self.progress and eng.main)
            self.winners = fill_winners(pool, masks, self.fill_pool)
            self.crop_pool = torch.from_numpy(pool).to(dev)
            self.mask_pool = torch.from_numpy(masks).to(dev)
            draw = balanced_draw(self.winners, self.fill_pool.shape[1]) if cfg.balance_fills else None
            self.data = PairDraw(len(pool), cfg.seed, draw)
        else:
            self.data = HoledCrops(crops, cfg.tile, cfg.seed)
        self.watch, self.watched = _doctor(cfg, dev, log=self.progress and eng.main)
        if eng.main:     # the picture of held-out crops, and the validation, are rank 0's alone
            held = datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), 8, cfg.tile, seed=1)
            m = np.stack([maskgen.mixed(cfg.tile, cfg.tile, 5000 + i) for i in range(8)])
            self.held = (held, to_tensor(held).to(dev), torch.from_numpy(m).float().div(255)[:, None].to(dev))
            if cfg.val_every:
                with rank_local():
                    self.validation = Validation(cfg, self.G)
                    self.first = self.validation(self.G)

    def dataset(self):
        return self.data

    def before_step(self, step: int, eng: Engine) -> None:
        f = self.cfg.lr_floor          # the engine set lr = base x schedule; lift it to the floor
        for o in self.opts.values():
            for g in o.param_groups:
                g["lr"] = g["lr"] * (1 - f) + g["base_lr"] * f

    def _complete(self, batch: torch.Tensor, eng: Engine):
        """This rank's crops x, masks m (B, 1, T, T), and F's prediction for them."""
        if self.blend:
            idx, flip, turns = batch.unbind(1)
            x = orient(to_tensor(self.crop_pool[idx]), flip, turns)
            m = orient(self.mask_pool[idx].float().div(255)[:, None], flip, turns)
            # the fills come from symmetric stencils and pyramids: they turn with the image; the
            # band errors, sums over the tile, do not change
            fills = orient(self.fill_pool[idx].float(), flip, turns)
            errors = None if self.error_pool is None else self.error_pool[idx]
            with eng.autocast():
                return x, m, self.G_train(fills, m, errors).float()
        x = to_tensor(batch[..., :3])
        m = batch[..., 3:].permute(0, 3, 1, 2).float().div(255)
        # a prefill's classical solves (hundreds of small steps, CG to 1e-14) need float32
        with eng.autocast() if not self.cfg.network.prefill else contextlib.nullcontext():
            return x, m, self.G_train(x * (1 - m), m).float()

    def _rec(self, pred: torch.Tensor, x: torch.Tensor, m: torch.Tensor, eng: Engine) -> torch.Tensor:
        """L_rec of the global batch: each rank's masked MSE weighted by its share of the batch's
        hole pixels (or holed images), so the ranks' mean is the loss of the whole batch."""
        reduce = self.cfg.rec_reduce
        loss = masked_mse(pred, x, m, reduce)
        if eng.rt.world == 1:
            return loss
        count = 3 * m.sum() if reduce == "pixels" else (m.flatten(1).sum(1) > 0).sum().float()
        mean = eng.rt.mean({"count": count})["count"]
        return loss * (count.clamp(min=1) / max(mean, 1e-12))

    def step(self, batch: torch.Tensor, eng: Engine) -> dict:
        cfg = self.cfg
        x, m, pred = self._complete(batch, eng)
        fake = completed(x, pred, m)
        # D: real photos -> 1, completions -> 0
        with eng.autocast():
            d_real, d_fake = self.D_train(x).float(), self.D_train(fake.detach()).float()
            loss_D = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                      + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        eng.update(loss_D, self.opt_D, clip=0.0)
        # F: masked L2 over the hole + the adversarial term
        with eng.autocast():
            d_gen = self.D_train(fake).float()
            l_adv = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        l_rec = self._rec(pred, x, m, eng)
        eng.update(cfg.lambda_rec * l_rec + cfg.lambda_adv * l_adv, self.opt_G)
        p_real, p_fake = torch.sigmoid(d_real.detach()).mean(), torch.sigmoid(d_fake.detach()).mean()
        hole_mse = masked_mse(pred.detach(), x, m).clamp_min(1e-12)
        return {"l_rec": l_rec.detach(), "l_adv": l_adv.detach(), "loss_D": loss_D.detach(),
                "s_G": p_fake, "s_D": 0.5 * p_real + 0.5 * (1 - p_fake),
                "hole_psnr": 10 * torch.log10(4.0 / hole_mse)}

    def status(self, row: dict) -> str:
        if "l_rec" not in row:
            return ""
        best = f" val {self.best['score']:.2f} dB @ {self.best['step']}" if self.best else ""
        return f"l_rec {row['l_rec']:.4f} l_adv {row['l_adv']:.3f}{best}"

    # -- the doctor, and the validation (both measured on rank 0) --
    def _validation_due(self, step: int) -> bool:
        return bool(self.cfg.val_every) and (step % self.cfg.val_every == 0 or step == self.cfg.steps)

    def doctor_due(self, step: int) -> bool:
        return self.watch.due(step) or self._validation_due(step)

    def doctor_observe(self, step: int) -> dict:
        row = {}
        if self.watch.due(step):
            row.update(self.watch.observe(step, self.D, self.watched(self.G), self, {}))
        if self._validation_due(step):
            v = self.validation(self.G)
            row.update({f"val_{k}": score for k, score in v.items()})
            if self.best is None or v["score"] > self.best["score"]:
                self.best = {"score": v["score"], "step": step,
                             **{name: {k: t.detach().cpu().clone() for k, t in net.state_dict().items()}
                                for name, net in self.nets.items()}}
        return row

    def knobs(self) -> dict:
        return {"lr_d": self.opt_D.param_groups[0]["base_lr"]}

    def set_knob(self, name: str, value: float) -> None:
        if name != "lr_d":
            raise KeyError(name)
        for g in self.opt_D.param_groups:
            g["lr"] = g["base_lr"] = value

    def extra_state(self) -> dict:
        return {"knobs": self.knobs(), "doctor": self.watch.state(),
                "validation": {"first": self.first, "best": self.best}}

    def load_extra_state(self, state: dict) -> None:
        for k, v in state.get("knobs", {}).items():
            self.set_knob(k, v)
        self.watch.load_state(state.get("doctor", {}))
        val = state.get("validation") or {}
        self.first, self.best = val.get("first") or self.first, val.get("best")

    @torch.no_grad()
    def samples(self) -> np.ndarray:
        """Held-out crops, masked, completed by F: three rows of eight."""
        held, x, m = self.held
        return np.concatenate([held, to_uint8(x * (1 - m)), to_uint8(completed(x, self.G(x * (1 - m), m), m))])

    def finish(self, out: Path, eng: Engine) -> dict:
        summary = {}
        if self.best is not None:   # keep the weights that scored best on the validation photos
            for name, net in self.nets.items():
                net.load_state_dict(self.best[name])
            record = {"step": self.best["step"], "first": self.first, "best": self.best["score"]}
            path = eng.checkpoint_path()
            payload = torch.load(path, map_location="cpu", weights_only=True)
            payload["state"] = {name: net.state_dict() for name, net in self.nets.items()}
            payload["validation"] = record
            atomic_save(payload, path)
            summary.update(selected_step=self.best["step"], val_psnr=self.best["score"],
                           val_psnr_untrained=self.first["score"])
        if self.blend:
            summary["fill_wins"] = np.bincount(self.winners, minlength=3).tolist()
        grid = save_grid(self.samples(), out / "samples.png", nrow=8)
        return {"samples": str(grid), **summary,
                **self.watch.report(out, f"context encoder on {self.cfg.data}, {eng.step} steps")}


def train_inpainter(cfg: InpaintTrainConfig, out: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Train the context encoder into run directory `out`; return the engine's summary."""
    return Engine(cfg, out, progress=progress, resume=resume).fit(InpaintTask(cfg, progress))


def _describe(s: dict) -> list[str]:
    lines = []
    if "fill_wins" in s:
        lines.append("best fill per training pair (thin plate, converged thin plate, cascade): "
                     + ", ".join(str(n) for n in s["fill_wins"]))
    if "selected_step" in s:
        lines.append(f"validation: kept step {s['selected_step']} at {s['val_psnr']:.3f} dB mean hole PSNR "
                     f"(untrained {s['val_psnr_untrained']:.3f} dB)")
    return lines + describe_doctor(s)


MODEL = ModelSpec("inpainter", InpaintTrainConfig, train_inpainter, _describe)
