"""pix2pix (Isola et al., 2017): a conditional GAN for paired image-to-image tasks.

    G: U-Net (skip connections between mirrored encoder and decoder stages), dropout as the noise
    D: 70x70 PatchGAN on (condition, image) pairs: a map of real/fake logits, one per patch
    L_G = L_adv + lambda_l1 * ‖y − G(c)‖₁,   lambda_l1 = 100

Two offline tasks, both from crops of the same photos:
- `inpaint`: condition = masked image + mask (the masks of ganforge.masks), target = the photo.
  G then has the context encoder's signature `G(masked_image, mask)`, so it exports, serves and
  is benchmarked exactly like the context encoder.
- `edges`: condition = the photo's edge map (Sobel magnitude, thresholded), target = the photo.

The training doctor (training/monitor.py) watches the adversarial part: s_G / s_D of the
PatchGAN (averaged over its patches) on a fixed held-out batch, in metrics.jsonl, scores.png and
doctor.md.
"""

from __future__ import annotations

import json
import os
import shlex
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
from ganforge.training.autoencoders import training_photos
from ganforge.training.gan import CONFIGS, save_checkpoint
from ganforge.training.loop import to_tensor, to_uint8
from ganforge.training.monitor import Doctor, Monitor, log_step, write_run_report

TASKS = ("inpaint", "edges")


@dataclass(frozen=True)
class Pix2PixConfig:
    task: str = "inpaint"      # inpaint (masked image + mask -> image) or edges (edge map -> image)
    ngf: int = 16              # U-Net filters at the first stage (x2 per stage, capped at 8x)
    ndf: int = 32              # PatchGAN filters in its first layer (the paper's C64 at 64)
    depth: int = 6             # U-Net down-sampling stages: a 64 tile reaches 1x1 at depth 6
    dropout: float = 0.5       # in the innermost three decoder stages: pix2pix's noise

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
                    layers.append(nn.Dropout(cfg.dropout))
            else:
                layers.append(nn.Tanh())
            self.up.append(nn.Sequential(*layers))

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
class Pix2PixTrainConfig:
    data: str = "photos"
    steps: int = 2000
    batch_size: int = 16
    tile: int = 64
    lambda_l1: float = 100.0
    lr: float = 2e-4
    n_images: int = 4096       # training crops drawn once; masks: a quarter as many, at least 64
    seed: int = 0
    threads: int = 0
    log_every: int = 25
    doctor_every: int = 100    # steps between s_G / s_D measurements on the held-out batch
    network: Pix2PixConfig = field(default_factory=Pix2PixConfig)


def command(cfg: Pix2PixTrainConfig, out: str | Path) -> str:
    """The `ganforge train pix2pix` command line that reproduces a run, every flag explicit."""
    n = cfg.network
    flags = [("--task", n.task), ("--data", cfg.data), ("--steps", cfg.steps), ("--batch-size", cfg.batch_size),
             ("--tile", cfg.tile), ("--lambda-l1", cfg.lambda_l1), ("--lr", cfg.lr), ("--ngf", n.ngf),
             ("--ndf", n.ndf), ("--dropout", n.dropout), ("--seed", cfg.seed), ("--out", str(out))]
    return " ".join(["ganforge", "train", "pix2pix", *(f"{k} {shlex.quote(str(v))}" for k, v in flags)])


def condition_batch(task: str, x: torch.Tensor, m: torch.Tensor | None, edges: torch.Tensor | None) -> torch.Tensor:
    if task == "inpaint":
        return torch.cat([x * (1 - m), m], dim=1)
    return edges


def _doctor(cfg: Pix2PixTrainConfig):
    """The monitor on a fixed held-out batch: real = held-out crops; its `z` = their conditions;
    D judges (condition, image) pairs, so the D it sees is bound to the held-out conditions."""
    net = cfg.network
    held = datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), 32, cfg.tile, seed=cfg.seed + 7919)
    x = to_tensor(held)
    if net.task == "inpaint":
        m = torch.from_numpy(np.stack([maskgen.mixed(cfg.tile, cfg.tile, 9000 + i) for i in range(32)])).float().div(255)[:, None]
        c = torch.cat([x * (1 - m), m], dim=1)
    else:
        m = None
        c = torch.from_numpy(edge_map(held)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    monitor = Monitor(x, c, every=cfg.doctor_every, total_steps=cfg.steps)

    def G_held(G):
        return _Completion(G, x, m)

    def D_held(D):
        return _Bound(D, c)
    return monitor, Doctor(monitor, "report"), D_held, G_held


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


def train_pix2pix(cfg: Pix2PixTrainConfig, out: str | Path, progress: bool = True) -> dict:
    out = Path(out)
    net = cfg.network
    if net.task not in TASKS:
        raise UsageError(f"--task: {net.task!r} is not allowed; choose {' or '.join(TASKS)}")
    if cfg.steps < 1 or cfg.batch_size < 2 or cfg.tile % (2 ** net.depth) or cfg.tile < 32:
        raise UsageError(f"pix2pix: steps {cfg.steps}, batch size {cfg.batch_size}, tile {cfg.tile} not allowed; "
                         f"need steps >= 1, batch >= 2, tile >= 32 and a multiple of {2 ** net.depth}")
    if cfg.lambda_l1 < 0:
        raise UsageError(f"--lambda-l1: {cfg.lambda_l1} is not allowed; must be >= 0")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pool = datasets.random_crops(training_photos(cfg.data), cfg.n_images, cfg.tile, cfg.seed, scale=(0.1, 0.6))
    mask_pool = np.stack([maskgen.mixed(cfg.tile, cfg.tile, s) for s in range(max(64, cfg.n_images // 4))])
    edge_pool = edge_map(pool) if net.task == "edges" else None
    G, D = UNet(net), PatchGAN(net)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    (out / "train.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    monitor, doctor, D_held, G_held = _doctor(cfg)
    bar = Progress(cfg.steps, f"train pix2pix ({net.task})", unit="step", enabled=progress)
    t0 = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as metrics:
        for step in range(1, cfg.steps + 1):
            idx = rng.integers(0, len(pool), cfg.batch_size)
            x = to_tensor(pool[idx])                                            # (B, 3, T, T)
            m = e = None
            if net.task == "inpaint":
                m = torch.from_numpy(mask_pool[rng.integers(0, len(mask_pool), cfg.batch_size)]).float().div(255)[:, None]
            else:
                e = torch.from_numpy(edge_pool[idx]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            c = condition_batch(net.task, x, m, e)
            pred = G.translate(c)
            fake = x * (1 - m) + pred * m if m is not None else pred   # inpaint: D judges the completion
            # D step: (c, real) -> 1 on every patch, (c, fake) -> 0; halved as in the paper
            opt_D.zero_grad(set_to_none=True)
            d_real, d_fake = D(c, x), D(c, fake.detach())
            loss_D = 0.5 * (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
            loss_D.backward()
            opt_D.step()
            # G step: fool D on every patch + lambda_l1 * L1 to the target
            opt_G.zero_grad(set_to_none=True)
            d_gen = D(c, fake)
            l_adv = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
            l_l1 = (pred - x).abs().mean()
            loss = l_adv + cfg.lambda_l1 * l_l1
            loss.backward()
            opt_G.step()
            if step % cfg.log_every == 0 or step == cfg.steps or monitor.due(step):
                p_real = torch.sigmoid(d_real.detach()).mean().item()
                p_fake = torch.sigmoid(d_fake.detach()).mean().item()
                rec = {"step": step, "l_l1": float(l_l1.detach()), "l_adv": float(l_adv.detach()),
                       "loss_D": float(loss_D.detach()), "s_G": p_fake, "s_D": 0.5 * p_real + 0.5 * (1 - p_fake)}
                if monitor.due(step):  # the doctor's held-out scores replace the batch's
                    found = doctor.observe(step, D_held(D), G_held(G))
                    log_step(metrics, rec, t0, monitor, found)
                else:
                    log_step(metrics, rec, t0)
            bar.update(1, status=f"l1 {float(l_l1.detach()):.4f} l_adv {float(l_adv.detach()):.3f}")
    bar.close()
    write_run_report(out, monitor, doctor, title=f"pix2pix ({net.task}) on {cfg.data}, {cfg.steps} steps")
    G.eval()
    ckpt = save_checkpoint(out / "checkpoint.pt", "pix2pix", net, {"net": G, "D": D},
                           step=cfg.steps, data=cfg.data, seed=cfg.seed, command=command(cfg, out),
                           train=json.loads(json.dumps(asdict(cfg))))
    # samples on held-out photos: condition, output, target
    held = datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), 8, cfg.tile, seed=1)
    x = to_tensor(held)
    if net.task == "inpaint":
        m = torch.from_numpy(np.stack([maskgen.mixed(cfg.tile, cfg.tile, 5000 + i) for i in range(8)])).float().div(255)[:, None]
        with torch.no_grad():
            y = x * (1 - m) + G(x * (1 - m), m) * m
        shown = to_uint8(x * (1 - m))
    else:
        edges = edge_map(held)
        with torch.no_grad():
            y = G(torch.from_numpy(edges).permute(0, 3, 1, 2).float().div(127.5).sub(1))
        shown = np.repeat(edges, 3, axis=3)
    save_grid(np.concatenate([shown, to_uint8(y), held]), out / "samples.png", nrow=8)
    return {"checkpoint": str(ckpt), "samples": str(out / "samples.png"), "steps": cfg.steps,
            "seconds": round(time.perf_counter() - t0, 1), "l_l1": float(l_l1.detach())}
