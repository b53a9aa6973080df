"""The context encoder (Pathak et al., 2016): a network that paints the hole.

    L_rec = ‖M ⊙ (x − F((1−M) ⊙ x, M))‖²            (masked L2: the hole's pixels only)
    L_adv = max_D E[log D(x) + log(1 − D(x̂))],  x̂ = (1−M) ⊙ x + M ⊙ F((1−M) ⊙ x, M)
    L     = λ_rec L_rec + λ_adv L_adv,  λ_rec = 0.999, λ_adv = 0.001

F is fed the masked image and the mask, never a classical fill: what the hole holds is the
decoder's output alone. D judges the completed image x̂ in its context (the whole tile, the
known pixels around the painted ones), so a completion whose hole does not continue its
surroundings is what it learns to catch.

F is a U-Net (Ronneberger et al., 2015) whose bottleneck is a stack of dilated 3x3 convolutions
(Iizuka et al., 2017), not Pathak's channel-wise fully connected layer:
- it is fully convolutional, so one set of weights runs on any tile size: the export's tile
  (serving/inpaint.py cuts large images into tiles) need not be the training crop, where a
  fully connected bottleneck fixes the spatial size it was trained at;
- at 1/8 scale the dilated stack (dilations 1, 2, 4 by default) reaches across the whole 64 px
  tile, so the middle of a 40 % centre hole (40x40 px) still sees the known ring around it,
  which is what the channel-wise layer was there for;
- skip connections carry the known pixels' detail to the decoder at every scale, so the hole's
  border continues edges and gradients sharply; a plain encoder-decoder blurs them.
Gated convolutions (Yu et al., 2019) would help free-form masks on photos more than the
structured holes this model is measured on, at twice the convolutions' cost on a CPU.

Training runs on the engine (engine.py): `ganforge train context-encoder`, its options the
fields of `ContextEncoderTrainConfig` and `UNetConfig`, presets in presets/context-encoder/.
Each item's hole is drawn by `item_rng` from its index and epoch (a centre square of 20-40 %
of the area, or random rectangles or strokes covering 20-30 %), so a run on several ranks
trains as one process does. The doctor watches the adversarial part (s_G, s_D on a fixed
held-out batch with fixed holes) through `GANDoctor`. `--init-from RUN` starts F from a masked
autoencoder's weights (training/mae.py: the same UNet pre-trained to fill hidden patches); D
starts fresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ganforge import masks as maskgen
from ganforge.errors import UsageError
from ganforge.images import save_grid
from ganforge.training import data as tdata
from ganforge.training import datasets
from ganforge.training.autoencoders import completed, image_crops, masked_mse, paint_update
from ganforge.training.options import comma_ints, join_ints
from ganforge.training.engine import Engine
from ganforge.training.gan import CONFIGS
from ganforge.training.gan_task import GANTask, GANDoctor, GANOptions, to_tensor, to_uint8
from ganforge.training.gan_task import describe_doctor
from ganforge.training.models import ModelSpec
from ganforge.training.remedies import dropout_control
from ganforge.training.task import SCHEDULES, option

KIND = "context-encoder"
HOLES = ("centre", "random", "mixed")
CENTRE_AREA = (0.2, 0.4)     # a centre hole's share of the tile
RANDOM_AREA = (0.2, 0.3)     # random rectangles' or strokes' share of the tile
BUNDLED = ("shapes", "stacked_digits")   # made in memory by data.gan_images; photos come as crops


@dataclass(frozen=True)
class UNetConfig:
    width: int = option(32, "F's feature maps at half resolution (x2 per further downsampling)", min=1)
    depth: int = option(3, "F's downsamplings, the first in its stem (the tile must divide by 2^depth)",
                        min=2, max=6)
    dilations: tuple[int, ...] = option((1, 2, 4), "F's bottleneck: residual dilated 3x3 convs, their "
                                        "dilations", min=1, parse=comma_ints("--dilations", "1,2,4"), format=join_ints,
                                        metavar="D,D,...", show="1,2,4")
    d_width: int = option(32, "D's filters in its first block", min=1)


class UNet(nn.Module):
    """F: (masked image (B, 3, T, T) in [-1, 1], mask (B, 1, T, T), 1 = hole) -> image (B, 3, T, T)
    in [-1, 1]; T a multiple of 2^depth.

    Its finest features are at half resolution: a strided stem in, a pixel shuffle out (Shi et
    al., 2016). Full-resolution convolutions cost four times as much and add little inside a
    hole, whose known border the output keeps anyway (the completion takes the known pixels)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        act = lambda: nn.LeakyReLU(0.2, inplace=True)
        w = [cfg.width * 2 ** i for i in range(cfg.depth)]        # at T/2, T/4, ..., T/2^depth
        self.stem = nn.Sequential(nn.Conv2d(4, w[0], 4, stride=2, padding=1), act(),
                                  nn.Conv2d(w[0], w[0], 3, padding=1), act())                   # w0 x T/2
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1), act(),
                                                nn.Conv2d(w[i + 1], w[i + 1], 3, padding=1), act())
                                  for i in range(cfg.depth - 1))                                # w[i+1] x T/2^(i+2)
        self.context = nn.ModuleList(nn.Sequential(nn.Conv2d(w[-1], w[-1], 3, padding=d, dilation=d), act())
                                     for d in cfg.dilations)                                    # w[-1] x T/2^depth
        # decoder: upsample, a conv to the finer scale's width, the skip added, a conv
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(w[i + 1], w[i], 3, padding=1), act())
                                for i in reversed(range(cfg.depth - 1)))
        self.fuse = nn.ModuleList(nn.Sequential(nn.Conv2d(w[i], w[i], 3, padding=1), act())
                                  for i in reversed(range(cfg.depth - 1)))
        self.head = nn.Sequential(nn.Conv2d(w[0], 12, 3, padding=1), nn.PixelShuffle(2), nn.Tanh())  # 3 x T x T
        # He initialisation for the leaky ReLUs: without normalisation layers, torch's default
        # shrinks the signal at every one of the ~15 convolutions and F learns more slowly
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.head[0].weight, std=1e-2)     # an untrained F answers mid grey

    def forward(self, masked_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([masked_image, mask], dim=1))
        skips = [h]
        for block in self.down:
            h = block(h)
            skips.append(h)
        for block in self.context:
            h = h + block(h)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips[:-1])):
            h = fuse(up(h) + skip)
        return self.head(h)


class Critic(nn.Module):
    """D: completed image (B, 3, T, T) -> logit (B,). No normalisation layers: its verdict on an
    image does not depend on the rest of the batch, so ranks need no synchronised statistics."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c = cfg.d_width
        act = lambda: nn.LeakyReLU(0.2, inplace=True)
        self.main = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), act(),                    # c x T/2
            nn.Conv2d(c, 2 * c, 4, 2, 1), act(),                # 2c x T/4
            nn.Conv2d(2 * c, 4 * c, 4, 2, 1), act(),            # 4c x T/8
            nn.Conv2d(4 * c, 1, 3, 1, 1), nn.AdaptiveAvgPool2d(1))   # 1 x 1 x 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(x.shape[0])


CONFIGS[KIND] = UNetConfig


# ---------------------------------------------------------------------------------------------
# Holes


def hole(size: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One training hole (size, size) uint8, 255 = hole: `centre` a centred square of 20-40 %
    of the area; `random` rectangles or strokes (even odds) covering 20-30 %; `mixed` either."""
    if kind == "mixed":
        kind = HOLES[int(rng.integers(2))]
    if kind == "centre":
        return maskgen.centre(size, size, float(rng.uniform(*CENTRE_AREA)))
    seed = int(rng.integers(2 ** 31))
    if rng.random() < 0.5:
        return maskgen.regions(size, size, seed, target=RANDOM_AREA)
    return maskgen.strokes(size, size, seed, target=RANDOM_AREA)


class HoledImages(tdata.Dataset):
    """Training images with a hole: (T, T, 4) uint8, the image and its hole (255) as a fourth
    channel, the hole drawn by `item_rng` from the item's index and epoch: the same on any
    rank, in any worker, after a resume."""

    def __init__(self, images: tdata.Dataset, size: int, holes: str, seed: int):
        self.images, self.size, self.holes, self.seed = images, size, holes, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> tuple[np.ndarray, list]:
        index, epoch = key
        image, bad = self.images[key]
        m = hole(self.size, self.holes, tdata.item_rng(self.seed, epoch, index, stream=2))
        return np.concatenate([image, m[..., None]], axis=-1), bad


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class ContextEncoderTrainConfig(GANOptions):
    """Context encoder training: the engine's settings, the doctor's, and these."""
    data: str = option("shapes", "shapes, stacked_digits (made in memory), photos (crops of scikit-image's "
                       "training split), a folder of images, or a .txt / .jsonl list of image paths (streamed)")
    n_images: int = option(8192, "images made for a bundled set (shapes, stacked_digits); crops of the "
                           "bundled photos drawn once per run", min=2)
    tile: int = option(64, "training image side", min=16)
    holes: str = option("mixed", "centre (a centred square over 0.2-0.4 of the area), random (rectangles "
                        "or strokes over 0.2-0.3) or mixed (either, even odds)", choices=HOLES)
    steps: int = option(3000, "optimizer steps of D and F each", min=1)
    batch_size: int = option(32, "global batch size, split evenly across the ranks", min=2)
    lambda_rec: float = option(0.999, "weight of L_rec, the masked L2 over the hole", min=0)
    lambda_adv: float = option(0.001, "weight of L_adv, the adversarial loss", min=0)
    lr: float = option(1e-3, "F's Adam learning rate", min=0)
    lr_d: float = option(2e-4, "D's Adam learning rate", min=0)
    init_from: str | None = option(None, "start F from a masked autoencoder's run directory or checkpoint "
                                   "(ganforge train mae, the same --width, --depth, --dilations); D starts fresh")
    lr_schedule: str = option("cosine", "learning rate over the run: constant, cosine (to 0), linear-decay "
                              "(hold, then to 0 over the second half)", choices=SCHEDULES)
    instance_noise: float = option(0.0, "std of Gaussian noise on D's inputs (Sønderby et al., 2017)", min=0)
    label_smoothing: float = option(0.0, "D's real label = 1 - this (Salimans et al., 2016)", min=0, below=0.5)
    grad_clip: float = option(1.0, "clip F's gradient norm to this (0: off); D's is not clipped", min=0)
    doctor_every: int = option(100, "steps between s_G / s_D measurements on the held-out batch", min=1)
    sample_every: int = option(250, "steps between sample grids", min=1)
    network: UNetConfig = option(default_factory=UNetConfig)

    def validate(self) -> None:
        step = 2 ** self.network.depth
        if self.tile % step:
            raise UsageError(f"--tile: {self.tile} is not allowed with --depth {self.network.depth}; "
                             f"must be a multiple of {step}")
        if self.lambda_rec + self.lambda_adv <= 0:
            raise UsageError(f"--lambda-rec: {self.lambda_rec!r} is not allowed with --lambda-adv "
                             f"{self.lambda_adv!r}; the two must not both be 0")
        for flag, v in (("--lr", self.lr), ("--lr-d", self.lr_d)):
            if v <= 0:
                raise UsageError(f"{flag}: {v!r} is not allowed; must be > 0")
        if self.data not in BUNDLED and self.data != "photos" and not tdata.is_streamed(self.data):
            raise UsageError(f"--data: {self.data!r} is not allowed; must be shapes, stacked_digits, photos, "
                             f"a folder of images or a .txt / .jsonl list of image paths")
        if self.init_from:
            init_weights(self.init_from, self.network)


INIT_KINDS = ("mae", KIND)      # checkpoints whose "net" is this UNet: a masked autoencoder's, or ours
SHAPE_FIELDS = ("width", "depth", "dilations")   # what fixes F's parameters' shapes


def init_weights(path: str | Path, network: UNetConfig) -> dict:
    """The checkpoint `--init-from` names (a masked autoencoder's, training/mae.py), checked to
    hold F's parameters for `network`: a UsageError naming --init-from and the fields that
    differ otherwise."""
    from ganforge.errors import CheckpointError
    from ganforge.training.gan import load_checkpoint

    try:
        payload = load_checkpoint(path, INIT_KINDS)
    except CheckpointError as exc:
        raise UsageError(f"--init-from: {str(exc).removeprefix('checkpoint: ')}") from None
    show = lambda v: join_ints(v) if isinstance(v, (tuple, list)) else str(v)
    theirs, ours = payload["config"], {k: getattr(network, k) for k in SHAPE_FIELDS}
    differ = [k for k in SHAPE_FIELDS if show(theirs.get(k)) != show(ours[k])]
    if differ:
        raise UsageError(f"--init-from: {path} holds a U-Net with {', '.join(f'{k} {show(theirs.get(k))}' for k in differ)}"
                         f"; this context encoder has {', '.join(f'{k} {show(ours[k])}' for k in differ)}; "
                         f"give the same {', '.join('--' + k for k in differ)}")
    return payload


def training_images(cfg: ContextEncoderTrainConfig) -> tdata.Dataset:
    """The images holes are cut into: a bundled set made in memory, crops of the bundled photos'
    training split, or a streamed folder / list."""
    if cfg.data in BUNDLED:
        return tdata.gan_images(cfg.data, cfg.n_images, cfg.tile, cfg.seed)
    return image_crops(cfg.data, cfg.n_images, cfg.tile, cfg.seed, (0.1, 0.6))


def held_out_images(cfg: ContextEncoderTrainConfig, images: tdata.Dataset, n: int, seed: int) -> np.ndarray:
    """`n` images never trained on (a bundled set drawn with another seed, crops of the
    held-out photos) or, for a streamed set, `n` fixed items of it."""
    if cfg.data in BUNDLED:
        return datasets.load_images(cfg.data, n, cfg.tile, seed)
    if cfg.data == "photos":
        return datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), n, cfg.tile, seed=seed)
    return tdata.held_out(images, n, seed)


def fixed_holes(cfg: ContextEncoderTrainConfig, n: int, seed: int) -> torch.Tensor:
    """`n` holes of the run's kind, fixed by `seed`: (n, 1, T, T) float, 1 = hole."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([hole(cfg.tile, cfg.holes, rng) for _ in range(n)])).float().div(255)[:, None]


class ContextEncoderTask(GANTask):
    """One D step (real images -> 1, completions -> 0) and one F step on λ_rec L_rec + λ_adv L_adv
    (non-saturating L_adv) per iteration."""

    kind = KIND
    sizes = {"ndf": "d_width", "ngf": "width"}
    # F's learning rate drives the reconstruction as much as the adversarial term: not a knob
    fixed_knobs = frozenset({"lr_g"})

    def __init__(self, cfg: ContextEncoderTrainConfig, progress: bool = True):
        super().__init__(cfg)
        self.progress = progress

    def setup(self, eng: Engine) -> None:
        cfg, dev = self.cfg, eng.device
        self.start(eng, cfg.lr, cfg.lr_d)
        if cfg.init_from and not (eng.resume and eng.checkpoint_path().is_file()):   # before step 0
            self.G.load_state_dict(init_weights(cfg.init_from, cfg.network)["state"]["net"])
        images = training_images(cfg)
        self.data = HoledImages(images, cfg.tile, cfg.holes, cfg.seed)
        # the doctor's batch: held-out images, fixed holes; its "latents" are the masked inputs
        x = to_tensor(held_out_images(cfg, images, 32, cfg.seed + 7919)).to(dev)
        m = fixed_holes(cfg, 32, cfg.seed + 9000).to(dev)
        self.watch = GANDoctor(cfg, x, torch.cat([x * (1 - m), m], dim=1), log=self.progress and eng.main)
        if eng.main:    # the sample grid's images and holes: rank 0's alone
            held = held_out_images(cfg, images, 8, cfg.seed + 1)
            self.held = (held, to_tensor(held).to(dev), fixed_holes(cfg, 8, cfg.seed + 5000).to(dev))

    def build(self, eng: Engine, lr_g: float, lr_d: float) -> None:
        self.G, self.D = UNet(self.cfg.network), Critic(self.cfg.network)
        self.G_train, self.D_train = eng.wrap(self.G), eng.wrap(self.D)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=(0.5, 0.999))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=(0.5, 0.999))
        self.nets, self.opts = {"net": self.G, "D": self.D}, {"net": self.opt_G, "D": self.opt_D}
        self.d_drop = dropout_control(self.D)

    def dataset(self):
        return self.data

    def _rec(self, pred: torch.Tensor, x: torch.Tensor, m: torch.Tensor, eng: Engine) -> torch.Tensor:
        """L_rec of the global batch: this rank's masked MSE weighted by its share of the batch's
        hole pixels, so the ranks' mean is the masked MSE over every hole pixel of the batch."""
        loss = masked_mse(pred, x, m)
        if eng.rt.world == 1:
            return loss
        count = 3 * m.sum()
        mean = eng.rt.mean({"count": count})["count"]
        return loss * (count.clamp(min=1) / max(mean, 1e-12))

    def step(self, batch: torch.Tensor, eng: Engine) -> dict:
        x = to_tensor(batch[..., :3])                              # (B, 3, T, T)
        m = batch[..., 3:].permute(0, 3, 1, 2).float().div(255)    # (B, 1, T, T)
        with eng.autocast():
            pred = self.G_train(x * (1 - m), m).float()
        fake = completed(x, pred, m)
        # D: real images -> 1 - label_smoothing, completions -> 0 (the label knobs applied)
        with self.d_grad(eng), eng.autocast():
            d_real = self.D_train(self._noisy(x, eng)).float()
            d_fake = self.D_train(self._noisy(fake.detach(), eng)).float()
            loss_D = self.d_loss(d_real, d_fake, eng)
        self.update_d(loss_D, eng, clip=0.0)
        # F: the masked L2 over the hole, and fooling D with the completed image
        row = paint_update(self, eng, x, m, pred, fake, judged=lambda t: self._noisy(t, eng))
        p_real, p_fake = torch.sigmoid(d_real.detach()).mean(), torch.sigmoid(d_fake.detach()).mean()
        return {**row, "loss_D": loss_D.detach(), "D_real": p_real, "D_fake": p_fake}

    def status(self, row: dict) -> str:
        return f"l_rec {row['l_rec']:.4f} l_adv {row['l_adv']:.3f}" if "l_rec" in row else ""

    # -- the doctor (rank 0) --
    def doctor_observe(self, step: int) -> dict:
        def watched(z):    # z = (masked image, hole): the held-out batch completed by F
            return z[:, :3] + self.G(z[:, :3], z[:, 3:]) * z[:, 3:]
        return self.watch.observe(step, self.D, watched, self, self.network_sizes(), nets=self.nets)

    @torch.no_grad()
    def samples(self) -> np.ndarray:
        """Held-out images, with their holes, completed by F: three rows of eight."""
        held, x, m = self.held
        shown = to_uint8(x * (1 - m) + m)       # the hole shown white
        return np.concatenate([held, shown, to_uint8(completed(x, self.G(x * (1 - m), m), m))])

    def finish(self, out: Path, eng: Engine) -> dict:
        grid = save_grid(self.samples(), out / "samples.png", nrow=8)
        return {"samples": str(grid), **({"init_from": self.cfg.init_from} if self.cfg.init_from else {}),
                **self.watch.report(out, f"context encoder on {self.cfg.data}, {eng.step} steps")}


def train_context_encoder(cfg: ContextEncoderTrainConfig, out: str | Path, progress: bool = True,
                          resume: bool = False) -> dict:
    """Train the context encoder into run directory `out`; return the engine's summary."""
    return Engine(cfg, out, progress=progress, resume=resume).fit(ContextEncoderTask(cfg, progress))


MODEL = ModelSpec(KIND, ContextEncoderTrainConfig, train_context_encoder, describe_doctor)
