"""A masked autoencoder whose network is the context encoder's: pre-training for inpainting.

    M  = `--mask-ratio` (0.75) of the tile's `--patch` x `--patch` (8 px) patches, 1 = hidden
    x̂  = (1−M) ⊙ x                                    (the hidden patches set to 0, mid grey)
    L  = ‖M ⊙ (x − F(x̂, M))‖² / ‖M ⊙ 1‖              (MSE over the hidden patches only)

As in He et al. (2022), most of the image is hidden patch by patch and the loss is taken only
where it was hidden, so F cannot lower it by copying what shows. Unlike their ViT, F is the
context encoder's U-Net (context_encoder.UNet, built from the same UNetConfig) and it sees the
whole masked image with the mask as a fourth channel, not only the visible patches' tokens:
- a ViT-MAE's weights (patch embedding, attention, position embeddings, a decoder fed mask
  tokens) have no counterpart in the convolutional context encoder, so they could not start
  it; this F has exactly the context encoder's F's parameters, and its checkpoint is a drop-in
  start: `ganforge train context-encoder --init-from RUN` (context_encoder.init_weights);
- its input is what the context encoder's input is (masked image, mask), so what it learns,
  continuing what shows into what is hidden, is the context encoder's job with many small
  holes instead of one large one.
There is no adversary: the task is a denoiser-style Task (one network, one loss) on the engine
(engine.py), with its DDP, checkpoints, resume, sample grids and summary.

Each item's patches are drawn by `item_rng` from its index and epoch (`MaskedPatches`), and
every tile hides the same number of patches, round(ratio x patches): every rank's slice holds
as many hidden pixels as any other, so the ranks' mean of their masked MSE is the masked MSE of
the global batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ganforge.errors import UsageError
from ganforge.images import save_grid
from ganforge.training import data as tdata
from ganforge.training.autoencoders import masked_mse
from ganforge.training.context_encoder import (BUNDLED, UNet, UNetConfig, completed, held_out_images,
                                               training_images)
from ganforge.training.engine import Engine
from ganforge.training.gan import CONFIGS
from ganforge.training.gan_task import to_tensor, to_uint8
from ganforge.training.models import ModelSpec
from ganforge.training.task import SCHEDULES, RunConfig, Task, option

KIND = "mae"


@dataclass(frozen=True)
class MAEUNetConfig(UNetConfig):
    """The context encoder's UNetConfig, its critic's width kept off the command line: the MAE
    has no critic. Checkpoints hold the same keys as the context encoder's."""
    d_width: int = option(32, "D's filters (the context encoder's; unused here)", min=1, cli=False)


CONFIGS[KIND] = UNetConfig


def masked_count(patches: int, ratio: float) -> int:
    """How many of a tile's `patches` are hidden at `ratio`."""
    return int(round(ratio * patches))


def patch_mask(size: int, patch: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(size, size) uint8, 255 on the hidden patches: `masked_count` of the (size / patch)²
    patches, chosen uniformly by `rng`."""
    side = size // patch
    hidden = np.zeros(side * side, np.uint8)
    hidden[rng.permutation(side * side)[:masked_count(side * side, ratio)]] = 255
    return hidden.reshape(side, side).repeat(patch, 0).repeat(patch, 1)      # (size, size)


def mae_loss(pred: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The MSE of F's output `pred` against the image `x` over the hidden patches (m = 1) only:
    what F answers on the visible patches adds nothing."""
    return masked_mse(pred, x, m)


class MaskedPatches(tdata.Dataset):
    """Training images with hidden patches: (T, T, 4) uint8, the image and its patch mask (255 =
    hidden) as a fourth channel, drawn by `item_rng` from the item's index and epoch."""

    def __init__(self, images: tdata.Dataset, size: int, patch: int, ratio: float, seed: int):
        self.images, self.size, self.patch, self.ratio, self.seed = images, size, patch, ratio, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> tuple[np.ndarray, list]:
        index, epoch = key
        image, bad = self.images[key]
        m = patch_mask(self.size, self.patch, self.ratio, tdata.item_rng(self.seed, epoch, index, stream=2))
        return np.concatenate([image, m[..., None]], axis=-1), bad


@dataclass
class MAETrainConfig(RunConfig):
    """Masked autoencoder training: the engine's settings and these."""
    data: str = option("shapes", "shapes, stacked_digits (made in memory), photos (crops of scikit-image's "
                       "training split), a folder of images, or a .txt / .jsonl list of image paths (streamed)")
    n_images: int = option(8192, "images made for a bundled set (shapes, stacked_digits); crops of the "
                           "bundled photos drawn once per run", min=2)
    tile: int = option(64, "training image side", min=16)
    mask_ratio: float = option(0.75, "share of the tile's patches hidden (He et al.'s 0.75)", min=0, below=1)
    patch: int = option(8, "side of a hidden patch in pixels (the tile must divide by it)", min=1)
    steps: int = option(3000, "optimizer steps", min=1)
    batch_size: int = option(32, "global batch size, split evenly across the ranks", min=1)
    lr: float = option(1e-3, "F's Adam learning rate", min=0)
    lr_schedule: str = option("cosine", "learning rate over the run: constant, cosine (to 0), linear-decay "
                              "(hold, then to 0 over the second half)", choices=SCHEDULES)
    grad_clip: float = option(1.0, "clip F's gradient norm to this (0: off)", min=0)
    sample_every: int = option(250, "steps between sample grids", min=1)
    network: MAEUNetConfig = option(default_factory=MAEUNetConfig)

    def validate(self) -> None:
        step = 2 ** self.network.depth
        if self.tile % step:
            raise UsageError(f"--tile: {self.tile} is not allowed with --depth {self.network.depth}; "
                             f"must be a multiple of {step}")
        if self.tile % self.patch:
            raise UsageError(f"--patch: {self.patch} is not allowed with --tile {self.tile}; "
                             f"the tile must divide by it")
        patches = (self.tile // self.patch) ** 2
        if not 0 < masked_count(patches, self.mask_ratio) < patches:
            raise UsageError(f"--mask-ratio: {self.mask_ratio!r} is not allowed with {patches} patches of "
                             f"--patch {self.patch} px; must hide at least one patch and leave one visible")
        if self.lr <= 0:
            raise UsageError(f"--lr: {self.lr!r} is not allowed; must be > 0")
        if self.data not in BUNDLED and self.data != "photos" and not tdata.is_streamed(self.data):
            raise UsageError(f"--data: {self.data!r} is not allowed; must be shapes, stacked_digits, photos, "
                             f"a folder of images or a .txt / .jsonl list of image paths")


def fixed_masks(cfg: MAETrainConfig, n: int, seed: int) -> torch.Tensor:
    """`n` patch masks of the run's ratio, fixed by `seed`: (n, 1, T, T) float, 1 = hidden."""
    rng = np.random.default_rng(seed)
    masks = np.stack([patch_mask(cfg.tile, cfg.patch, cfg.mask_ratio, rng) for _ in range(n)])
    return torch.from_numpy(masks).float().div(255)[:, None]


class MAETask(Task):
    """One step of F on the masked MSE per iteration."""

    kind = KIND

    def setup(self, eng: Engine) -> None:
        cfg, dev = self.cfg, eng.device
        torch.manual_seed(cfg.seed)
        self.G = UNet(cfg.network)
        self.G_train = eng.wrap(self.G)
        self.opt = torch.optim.Adam(self.G.parameters(), lr=cfg.lr)
        self.nets, self.opts = {"net": self.G}, {"net": self.opt}    # "net": the context encoder's key
        images = training_images(cfg)
        self.data = MaskedPatches(images, cfg.tile, cfg.patch, cfg.mask_ratio, cfg.seed)
        if eng.main:    # the sample grid's images and masks: rank 0's alone
            held = held_out_images(cfg, images, 8, cfg.seed + 1)
            self.held = (held, to_tensor(held).to(dev), fixed_masks(cfg, 8, cfg.seed + 5000).to(dev))

    def network_config(self) -> UNetConfig:
        return UNetConfig(**asdict(self.cfg.network))     # the context encoder's class, same fields

    def dataset(self):
        return self.data

    def step(self, batch: torch.Tensor, eng: Engine) -> dict:
        x = to_tensor(batch[..., :3])                              # (B, 3, T, T)
        m = batch[..., 3:].permute(0, 3, 1, 2).float().div(255)    # (B, 1, T, T), 1 = hidden
        with eng.autocast():
            pred = self.G_train(x * (1 - m), m).float()
        loss = mae_loss(pred, x, m)
        eng.update(loss, self.opt)
        loss = loss.detach()
        return {"loss": loss, "masked_psnr": 10 * torch.log10(4.0 / loss.clamp_min(1e-12))}

    def status(self, row: dict) -> str:
        return f"loss {row['loss']:.4f} masked PSNR {row['masked_psnr']:.2f} dB" if "loss" in row else ""

    @torch.no_grad()
    def samples(self) -> np.ndarray:
        """Held-out images, with their hidden patches (white), completed by F: three rows of eight."""
        held, x, m = self.held
        shown = to_uint8(x * (1 - m) + m)
        return np.concatenate([held, shown, to_uint8(completed(x, self.G(x * (1 - m), m), m))])

    def finish(self, out: Path, eng: Engine) -> dict:
        grid = save_grid(self.samples(), out / "samples.png", nrow=8)
        return {"samples": str(grid)}


def train_mae(cfg: MAETrainConfig, out: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Train the masked autoencoder into run directory `out`; return the engine's summary."""
    return Engine(cfg, out, progress=progress, resume=resume).fit(MAETask(cfg))


def _describe(s: dict) -> list[str]:
    if "masked_psnr" not in s:
        return []
    return [f"masked-patch PSNR {s['masked_psnr']:.2f} dB (last logged step); start a context encoder from it: "
            f"ganforge train context-encoder --init-from {Path(s['checkpoint']).parent} ..."]


MODEL = ModelSpec(KIND, MAETrainConfig, train_mae, _describe)
