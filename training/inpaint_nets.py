"""The inpainter's networks and the config they are built from: F, the context encoder (a
dilated encoder-decoder, or a learned residual on a classical prefill, or `FillBlend`, per-pixel
weights over three classical fills), and D, the critic of completed images.

They are apart from the trainer (inpainting.py) because export and the benchmarks rebuild F from
a checkpoint's config (registered in `CONFIGS` here) without the training data or the Task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ganforge.errors import UsageError
from ganforge.training.classical_fills import cascade_fill, harmonic_fill, thin_plate_fill
from ganforge.training.gan import CONFIGS
from ganforge.training.options import comma_ints, join_ints
from ganforge.training.task import option


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
