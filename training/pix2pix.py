"""pix2pix (Isola et al., 2017): a conditional GAN for paired image-to-image tasks.

    G: U-Net (skip connections between mirrored encoder and decoder stages), dropout as the noise
    D: 70x70 PatchGAN on (condition, image) pairs: a map of real/fake logits, one per patch
    L_G = L_adv + lambda_l1 * ‖y − G(c)‖₁,   lambda_l1 = 100

Two offline tasks, both from crops of the same photos (or from the bundled shapes and digits):
- `inpaint`: condition = masked image (the hole at 0, mid grey) + mask, target = the photo; the
  masks of ganforge.masks (`--holes masks`) or the context encoder's holes (`--holes centre`,
  `random`, `mixed`: with `--data shapes`, the pairs `ganforge bench inpaint-shapes` scores).
  G then has the context encoder's signature `G(masked_image, mask)`, so it exports, serves and
  is benchmarked exactly like the context encoder.
- `edges`: condition = the photo's edge map (Sobel magnitude, thresholded), target = the photo.

`ganforge train pix2pix` runs `Pix2PixTask` on the training engine (engine.py): the crops come
from the data sets of data.py (a fixed pool of crops of the bundled photos, or a streamed folder
/ list), each with its condition as a fourth channel (`Pairs`); the masks are chosen per crop and
epoch (data.item_rng), G's dropout masks are drawn from the engine's shared generator, so 2
ranks train as 1 process does. The training doctor (training/monitor.py) watches the
adversarial part: s_G / s_D of the PatchGAN (averaged over its patches) on a fixed held-out
batch, in metrics.jsonl, scores.png and doctor.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ganforge import masks as maskgen
from ganforge.errors import UsageError
from ganforge.images import save_grid
from ganforge.training import datasets
from ganforge.training.autoencoders import image_crops
from ganforge.training.context_encoder import BUNDLED, HOLES, hole
from ganforge.training.data import gan_images, item_rng
from ganforge.training.engine import Engine
from ganforge.training.gan import CONFIGS, SharedDropout, dropout_masks
from ganforge.training.gan_task import GANTask, GANDoctor, GANOptions, to_tensor, to_uint8
from ganforge.training.models import ModelSpec
from ganforge.training.remedies import dropout_control
from ganforge.training.task import option

TASKS = ("inpaint", "edges")


@dataclass(frozen=True)
class Pix2PixConfig:
    task: str = option("inpaint", "inpaint (masked image + mask -> image) or edges (edge map -> image)",
                       choices=TASKS)
    ngf: int = option(16, "U-Net filters at the first stage (x2 per stage, capped at 8x)", min=1)
    ndf: int = option(32, "PatchGAN filters in its first layer (the paper's C64 at 64)", min=1)
    depth: int = option(6, "U-Net down-sampling stages: a 64 tile reaches 1x1 at depth 6", min=1)
    dropout: float = option(0.5, "dropout in the innermost three decoder stages: pix2pix's noise",
                            min=0, below=1)

    @property
    def in_channels(self) -> int:
        return 4 if self.task == "inpaint" else 1


class UNet(nn.Module):
    """The pix2pix generator: encoder C64-C128-C256-C512..., decoder mirrored, with skips."""

    def __init__(self, cfg: Pix2PixConfig):
        super().__init__()
        if cfg.task not in TASKS:
            raise ValueError(f"task {cfg.task!r} is not one of {TASKS}")
        self.cfg = cfg
        ch = [min(cfg.ngf * 2 ** i, cfg.ngf * 8) for i in range(cfg.depth)]   # e.g. 32 64 128 256 256 256
        self.down = nn.ModuleList()
        prev = cfg.in_channels
        for i, c in enumerate(ch):  # each stage halves the side: T -> T / 2**depth
            layers = [] if i == 0 else [nn.LeakyReLU(0.2, True)]
            layers.append(nn.Conv2d(prev, c, 4, 2, 1))
            if 0 < i < cfg.depth - 1:   # no norm on the first layer nor on the 1x1 bottleneck
                layers.append(nn.BatchNorm2d(c))
            self.down.append(nn.Sequential(*layers))
            prev = c
        self.up = nn.ModuleList()
        for i in reversed(range(cfg.depth)):  # decoder stage i mirrors encoder stage i
            out_c = ch[i - 1] if i > 0 else 3
            in_c = ch[i] if i == cfg.depth - 1 else 2 * ch[i]   # skip: concatenated encoder features
            layers = [nn.ReLU(True), nn.ConvTranspose2d(in_c, out_c, 4, 2, 1)]
            if i > 0:
                layers.append(nn.BatchNorm2d(out_c))
                if i >= cfg.depth - 3 and cfg.dropout > 0:
                    layers.append(SharedDropout(cfg.dropout))
            else:
                layers.append(nn.Tanh())
            self.up.append(nn.Sequential(*layers))

    def noise(self, tile: int) -> list[tuple[SharedDropout, tuple[int, int, int]]]:
        """Each dropout layer and the shape (C, H, W) of its input for a `tile` x `tile` input
        (see gan.dropout_masks)."""
        out = []
        for k, stage in enumerate(self.up):       # decoder stage k mirrors encoder stage depth-1-k
            i = self.cfg.depth - 1 - k
            for m in stage:
                if isinstance(m, SharedDropout):
                    c = stage[1].out_channels      # after the ConvTranspose2d: ch[i-1] x T/2**i
                    out.append((m, (c, tile >> i, tile >> i)))
        return out

    def translate(self, c: torch.Tensor) -> torch.Tensor:
        """Condition (B, in_channels, T, T) in [-1, 1] -> image (B, 3, T, T) in [-1, 1]."""
        skips = []
        h = c
        for stage in self.down:
            h = stage(h)                # (B, ch[i], T / 2**(i+1), ...)
            skips.append(h)
        h = self.up[0](skips.pop())     # innermost: no skip into it
        for stage in self.up[1:]:
            h = stage(torch.cat([h, skips.pop()], dim=1))
        return h

    def forward(self, masked_image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.task == "inpaint":
            return self.translate(torch.cat([masked_image, mask], dim=1))
        return self.translate(masked_image)


class PatchGAN(nn.Module):
    """70x70 PatchGAN: C64-C128-C256-C512 (4x4, strides 2, 2, 2, 1) then a 4x4 conv to one logit
    per patch; each output sees a 70x70 window of the input pair."""

    def __init__(self, cfg: Pix2PixConfig):
        super().__init__()
        c = cfg.ndf
        self.main = nn.Sequential(
            nn.Conv2d(cfg.in_channels + 3, c, 4, 2, 1), nn.LeakyReLU(0.2, True),                 # c  x T/2
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, True),        # 2c x T/4
            nn.Conv2d(2 * c, 4 * c, 4, 2, 1), nn.BatchNorm2d(4 * c), nn.LeakyReLU(0.2, True),    # 4c x T/8
            nn.Conv2d(4 * c, 8 * c, 4, 1, 1), nn.BatchNorm2d(8 * c), nn.LeakyReLU(0.2, True),    # 8c x (T/8 - 1)
            nn.Conv2d(8 * c, 1, 4, 1, 1))                                                       # 1  x (T/8 - 2)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.main(torch.cat([condition, image], dim=1))


def receptive_field(D: PatchGAN) -> int:
    """Side of the input window one PatchGAN output sees (70 for the paper's layout)."""
    rf, jump = 1, 1
    for m in D.main:
        if isinstance(m, nn.Conv2d):
            rf += (m.kernel_size[0] - 1) * jump
            jump *= m.stride[0]
    return rf


CONFIGS["pix2pix"] = Pix2PixConfig


def edge_map(images: np.ndarray, threshold: float = 0.12) -> np.ndarray:
    """(N, H, W, 3) uint8 photos -> (N, H, W, 1) uint8 edges (255 on an edge): Sobel magnitude of
    the grey image, thresholded at `threshold` of full scale."""
    grey = images.astype(np.float32).mean(axis=3) / 255.0
    p = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    mag = np.sqrt(gx ** 2 + gy ** 2) / 4.0
    return np.where(mag >= threshold, 255, 0).astype(np.uint8)[..., None]


@dataclass
class Pix2PixTrainConfig(GANOptions):
    """pix2pix training: the engine's settings, the doctor's, and these."""
    data: str = option("photos", "photos (scikit-image's training split), shapes, stacked_digits (made in "
                       "memory), a folder of images, or a .txt / .jsonl list of image paths (streamed)")
    holes: str = option("masks", "inpaint: masks (one of --n-images / 4 seeded blocks, strokes or centre "
                        "squares), or the context encoder's, drawn per image and epoch: centre (a centred square "
                        "over 0.2-0.4 of the area), random, mixed", choices=("masks",) + HOLES)
    steps: int = option(1000, "optimizer steps of D and G each", min=1)
    batch_size: int = option(16, "global batch size, split evenly across the ranks", min=2)
    tile: int = option(64, "training crop side: >= 32 and a multiple of 2 ** --depth", min=32)
    lambda_l1: float = option(100.0, "weight of the L1 loss (the paper's 100)", min=0)
    lr: float = option(2e-4, "Adam learning rate of G and D (betas 0.5, 0.999)", min=0)
    n_images: int = option(4096, "photos: training crops drawn once per run (1/10 to 6/10 of the "
                           "photo's shorter side); shapes, stacked_digits: images made; --holes masks: "
                           "masks, a quarter as many, at least 64", min=2)
    doctor_every: int = option(100, "steps between s_G / s_D measurements on the held-out batch", min=1)
    network: Pix2PixConfig = option(default_factory=Pix2PixConfig)

    def validate(self) -> None:
        side = 2 ** self.network.depth
        if self.tile % side:
            raise UsageError(f"--tile: {self.tile} is not allowed; must be a multiple of {side} (2 ** --depth)")


CROP_SCALE = (0.1, 0.6)   # crop side as a share of the photo's shorter side


class Pairs(Dataset):
    """pix2pix's training pairs: each crop of `crops` (a data.py data set) with its condition as
    a fourth channel, uint8 (T, T, 4): a hole mask (inpaint: one of `n_masks` seeded masks, or a
    context encoder's hole of kind `holes`, chosen per item and epoch) or the crop's edge map."""

    def __init__(self, crops: Dataset, task: str, n_masks: int, seed: int, holes: str = "masks"):
        self.crops, self.task, self.n_masks, self.seed, self.holes = crops, task, n_masks, seed, holes

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key) -> tuple[np.ndarray, list]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        crop, bad = self.crops[(index, epoch)]
        if self.task == "inpaint" and self.holes != "masks":
            condition = hole(crop.shape[0], self.holes, item_rng(self.seed, epoch, index, stream=2))[..., None]
        elif self.task == "inpaint":
            pick = int(item_rng(self.seed, epoch, index, stream=2).integers(self.n_masks))
            condition = maskgen.mixed(crop.shape[0], crop.shape[1], pick)[..., None]
        else:
            condition = edge_map(crop[None])[0]
        return np.concatenate([crop, condition], axis=2), bad


def condition_of(task: str, x: torch.Tensor, channel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(G's condition, hole mask or None) for images x (B, 3, T, T) in [-1, 1] and the pair's
    uint8 condition channel (B, 1, T, T): masked image + mask, or the edge map in [-1, 1]."""
    if task == "inpaint":
        m = channel.float() / 255.0
        return torch.cat([x * (1 - m), m], dim=1), m
    return channel.float() / 127.5 - 1.0, None


class _Bound(nn.Module):
    """D with its condition fixed: image -> patch logits (a Module, so the monitor can restore
    its batch-norm statistics after measuring)."""

    def __init__(self, D: nn.Module, c: torch.Tensor):
        super().__init__()
        self.D, self.c = D, c

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.D(self.c, image)


class _Completion(nn.Module):
    """G on the held-out conditions, composited for inpainting (a Module: see `_Bound`)."""

    def __init__(self, G: nn.Module, x: torch.Tensor, m: torch.Tensor | None):
        super().__init__()
        self.G, self.x, self.m = G, x, m

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.G.translate(z)
        return y if self.m is None else self.x * (1 - self.m) + y * self.m


def held_pairs(task: str, n: int, tile: int, seed: int, mask_seed: int, data: str = "photos",
               holes: str = "masks") -> tuple[np.ndarray, torch.Tensor]:
    """`n` images never trained on (a bundled set drawn with another seed, else crops of the
    held-out photos) and their uint8 condition channel."""
    if data in BUNDLED:
        held = datasets.load_images(data, n, tile, seed)
    else:
        held = datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), n, tile, seed=seed)
    if task == "inpaint" and holes != "masks":
        rng = np.random.default_rng(mask_seed)
        channel = np.stack([hole(tile, holes, rng) for _ in range(n)])[..., None]
    elif task == "inpaint":
        channel = np.stack([maskgen.mixed(tile, tile, mask_seed + i) for i in range(n)])[..., None]
    else:
        channel = edge_map(held)
    return held, torch.from_numpy(channel).permute(0, 3, 1, 2)


class Pix2PixTask(GANTask):
    """D on (condition, image) pairs, patch by patch; G against D plus lambda_l1 x L1. For
    inpainting, D judges the completion (known pixels kept, G's pixels in the hole)."""

    kind = "pix2pix"
    sizes = {"ndf": "ndf", "ngf": "ngf"}
    # G's learning rate drives the L1 term as much as the adversarial one: not a knob
    fixed_knobs = frozenset({"lr_g"})

    def __init__(self, cfg: Pix2PixTrainConfig, progress: bool = True):
        super().__init__(cfg)
        self.progress = progress

    def setup(self, eng: Engine) -> None:
        cfg, dev = self.cfg, eng.device
        self.start(eng, cfg.lr, cfg.lr)
        net = cfg.network
        # the doctor's fixed held-out batch: real = held-out crops, its `z` = their conditions;
        # D judges (condition, image) pairs, so the D it sees is bound to the held-out conditions
        held, channel = held_pairs(net.task, 32, cfg.tile, cfg.seed + 7919, 9000, cfg.data, cfg.holes)
        x = to_tensor(held).to(dev)
        c, m = condition_of(net.task, x, channel.to(dev))
        self.D_held, self.G_held = _Bound(self.D, c), _Completion(self.G, x, m)
        self.watch = GANDoctor(cfg, x, c, log=self.progress and eng.main)
        # the pictures: 8 held-out crops, their conditions, G's outputs
        self.shown, channel = held_pairs(net.task, 8, cfg.tile, 1, 5000, cfg.data, cfg.holes)
        self.shown_x = to_tensor(self.shown).to(dev)
        self.shown_c, self.shown_m = condition_of(net.task, self.shown_x, channel.to(dev))

    def build(self, eng: Engine, lr_g: float, lr_d: float) -> None:
        net = self.cfg.network
        self.G, self.D = UNet(net), PatchGAN(net)
        self.G_train, self.D_train = eng.wrap(self.G), eng.wrap(self.D)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=(0.5, 0.999))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=(0.5, 0.999))
        self.nets, self.opts = {"net": self.G, "D": self.D}, {"G": self.opt_G, "D": self.opt_D}
        self.noise = self.G.noise(self.cfg.tile)
        self.d_drop = dropout_control(self.D)
        if hasattr(self, "D_held"):     # a rebuild: the doctor's views follow the new networks
            self.D_held.D, self.G_held.G = self.D, self.G

    def dataset(self) -> Pairs:
        c = self.cfg
        if c.data in BUNDLED:
            crops = gan_images(c.data, max(c.n_images, c.batch_size), c.tile, c.seed)
        else:
            crops = image_crops(c.data, max(c.n_images, c.batch_size), c.tile, c.seed, CROP_SCALE)
        return Pairs(crops, c.network.task, max(64, c.n_images // 4), c.seed, c.holes)

    def step(self, batch: torch.Tensor, eng: Engine) -> dict:
        cfg = self.cfg
        # batch: (B, T, T, 4) uint8, the photo's RGB and the condition channel (Pairs)
        x = to_tensor(batch[..., :3])                                       # (B, 3, T, T)
        c, m = condition_of(cfg.network.task, x, batch[..., 3:].permute(0, 3, 1, 2))
        with dropout_masks(self.noise, x.shape[0], eng.rand), eng.autocast():   # G's noise
            pred = self.G_train(x * (1 - m), m) if m is not None else self.G_train(c)
        pred = pred.float()
        fake = x * (1 - m) + pred * m if m is not None else pred   # inpaint: D judges the completion
        # D step: (c, real) -> 1 on every patch, (c, fake) -> 0; halved as in the paper (the
        # doctor's label knobs, instance noise and D's steps applied)
        with self.d_grad(eng), eng.autocast():
            d_real = self.D_train(c, self._noisy(x, eng)).float()
            d_fake = self.D_train(c, self._noisy(fake.detach(), eng)).float()
            loss_D = 0.5 * self.d_loss(d_real, d_fake, eng)
        self.update_d(loss_D, eng)
        # G step: fool D on every patch + lambda_l1 * L1 to the target
        with eng.autocast():
            d_gen = self.D_train(c, self._noisy(fake, eng)).float()
            l_adv = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        l_l1 = (pred - x).abs().mean()
        eng.update(l_adv + cfg.lambda_l1 * l_l1, self.opt_G)
        p_real = torch.sigmoid(d_real.detach()).mean()
        p_fake = torch.sigmoid(d_fake.detach()).mean()
        return {"l_l1": l_l1.detach(), "l_adv": l_adv.detach(), "loss_D": loss_D.detach(),
                "s_G": p_fake, "s_D": 0.5 * p_real + 0.5 * (1 - p_fake)}

    def status(self, row: dict) -> str:
        return f"l1 {row['l_l1']:.4f} l_adv {row['l_adv']:.3f}" if "l_l1" in row else ""

    # -- the doctor (its held-out scores replace the batch's in the row) --
    def doctor_observe(self, step: int) -> dict:
        return self.watch.observe(step, self.D_held, self.G_held, self, self.network_sizes(), nets=self.nets)

    @torch.no_grad()
    def samples(self) -> np.ndarray:
        """Held-out crops: the condition, G's output (the completion for inpainting), the photo."""
        self.G.eval()
        try:
            y = self.G.translate(self.shown_c)
        finally:
            self.G.train()
        if self.shown_m is None:
            shown = to_uint8(self.shown_c.expand(-1, 3, -1, -1))
        else:
            y = self.shown_x * (1 - self.shown_m) + y * self.shown_m
            shown = to_uint8(self.shown_x * (1 - self.shown_m))
        return np.concatenate([shown, to_uint8(y), self.shown])

    def finish(self, out: Path, eng: Engine) -> dict:
        grid = save_grid(self.samples(), out / "samples.png", nrow=8)
        return {"samples": str(grid),
                **self.watch.report(out, f"pix2pix ({self.cfg.network.task}) on {self.cfg.data}, {eng.step} steps")}


def train_pix2pix(cfg: Pix2PixTrainConfig, out: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Train pix2pix into run directory `out`; return the engine's summary."""
    return Engine(cfg, out, progress=progress, resume=resume).fit(Pix2PixTask(cfg, progress))


def _describe(s: dict) -> list[str]:
    from ganforge.training import loop

    return [f"L1 to the target {s['l_l1']:.4f} (last logged step)"] + loop.MODEL.describe(s)


MODEL = ModelSpec("pix2pix", Pix2PixTrainConfig, train_pix2pix, _describe)
