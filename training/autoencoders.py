"""From PCA to denoising: the linear baseline, the autoencoder as nonlinear PCA, corruption
processes q0(x, x̂), denoising / masked autoencoders and a convolutional denoiser.

    PCA          Y' = W Wᵀ (Y − μ) + μ, W the top-k principal directions (numpy SVD)
    AE           Y' = H(G(Y)): encoder G to a k-dim code, decoder H back
    error        E = Σ_p Σ_i (Y_i − Y'_i)²_p   (sum over patterns p and components i)
    DAE / MAE    argmin E_{q0(x, x̂)} L_H(x, g(f(x̂))), x̂ a corrupted x (noise, masking)

The denoiser is fully convolutional (any image size) and learns the residual (the noise), as
in DnCNN (Zhang et al., 2017).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ganforge.errors import UsageError
from ganforge.images import save_grid
from ganforge.training import datasets
from ganforge.training.engine import Engine
from ganforge.training.gan import CONFIGS, load_checkpoint
from ganforge.training.models import ModelSpec
from ganforge.training.task import SCHEDULES, RunConfig, Task, option

# ---------------------------------------------------------------------------------------------
# PCA, the linear baseline


@dataclass
class PCA:
    mean: np.ndarray        # (D,)
    components: np.ndarray  # (k, D), orthonormal rows
    eigenvalues: np.ndarray  # (D',) all eigenvalues of the sample covariance, descending

    @classmethod
    def fit(cls, Y: np.ndarray, k: int) -> "PCA":
        """Y: (P, D) patterns. Eigen-decomposition of the covariance through the SVD of Y − μ."""
        Y = np.asarray(Y, np.float64)
        mean = Y.mean(0)
        _, s, vt = np.linalg.svd(Y - mean, full_matrices=False)
        return cls(mean=mean, components=vt[:k], eigenvalues=s ** 2 / (len(Y) - 1))

    def encode(self, Y: np.ndarray) -> np.ndarray:
        return (np.asarray(Y, np.float64) - self.mean) @ self.components.T

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return codes @ self.components + self.mean

    def reconstruct(self, Y: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(Y))


def reconstruction_error(Y: np.ndarray, Y_rec: np.ndarray) -> float:
    """E = Σ_p Σ_i (Y_i − Y'_i)²_p."""
    return float(((np.asarray(Y, np.float64) - np.asarray(Y_rec, np.float64)) ** 2).sum())


# ---------------------------------------------------------------------------------------------
# Corruption processes q0(x, x̂): torch, seeded through the generator passed in


def gaussian_noise(x: torch.Tensor, sigma: float | tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """x in [-1, 1]; sigma on the 0-255 scale, one value or a (low, high) range per image."""
    if isinstance(sigma, tuple):
        s = torch.empty(x.shape[0], 1, 1, 1).uniform_(sigma[0], sigma[1], generator=gen)
    else:
        s = torch.full((x.shape[0], 1, 1, 1), float(sigma))
    return x + torch.randn(x.shape, generator=gen) * (s * 2.0 / 255.0)


def salt_and_pepper(x: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor:
    r = torch.rand(x.shape[0], 1, *x.shape[2:], generator=gen)
    out = x.clone()
    out = torch.where(r < ratio / 2, torch.full_like(x, -1.0), out)
    return torch.where((r >= ratio / 2) & (r < ratio), torch.full_like(x, 1.0), out)


def random_mask(shape: tuple[int, ...], ratio: float, gen: torch.Generator, patch: int = 1) -> torch.Tensor:
    """(B, 1, H, W) mask, 1 = hidden, over pixels (patch=1) or patch×patch blocks."""
    b, _, h, w = shape
    gh, gw = -(-h // patch), -(-w // patch)
    m = (torch.rand(b, 1, gh, gw, generator=gen) < ratio).float()
    if patch > 1:
        m = m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]
    return m


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hide the masked pixels (set to 0, the middle grey of [-1, 1])."""
    return x * (1 - mask)


REC_REDUCTIONS = ("pixels", "images", "log-images")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, reduce: str = "pixels") -> torch.Tensor:
    """Mean squared error over the masked (hidden) pixels only; the known region adds nothing.

    `reduce` says how the batch's hole pixels are weighed: "pixels" pools them (a large hole
    counts as many times more as it has pixels), "images" averages each image's own hole MSE
    (a thin stroke counts as much as a large block), "log-images" averages each image's
    log hole MSE, which is minus the mean hole PSNR over ln(10) / 10 plus a constant: the
    objective an inpainting benchmark that averages PSNR per image scores. An image without a
    hole adds nothing to the per-image reductions."""
    m = mask.expand_as(pred)
    err = (pred - target) ** 2 * m
    if reduce == "pixels":
        return err.sum() / m.sum().clamp(min=1.0)
    if reduce not in REC_REDUCTIONS:
        raise ValueError(f"reduce {reduce!r} not allowed; one of {', '.join(REC_REDUCTIONS)}")
    count = m.flatten(1).sum(1)
    per_image = err.flatten(1).sum(1) / count.clamp(min=1.0)
    if reduce == "log-images":
        per_image = torch.log(per_image + 1e-8)
    has = count > 0
    return (per_image * has).sum() / has.sum().clamp(min=1)


def completed(x: torch.Tensor, pred: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Known pixels from x, hole pixels from the prediction."""
    return x * (1 - m) + pred * m


def paint_update(task, eng: Engine, x: torch.Tensor, m: torch.Tensor, pred: torch.Tensor,
                 fake: torch.Tensor, judged=lambda t: t) -> dict:
    """F's step of an inpainter trained on λ_rec L_rec + λ_adv L_adv (the inpainter's and the
    context encoder's): the task's masked L2 over the hole (`task._rec`) and the non-saturating
    term for fooling D with the completed image `fake` (as `judged` hands it to D). Returns the
    two losses and the hole PSNR of the batch."""
    cfg = task.cfg
    with eng.autocast():
        d_gen = task.D_train(judged(fake)).float()
        l_adv = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
    l_rec = task._rec(pred, x, m, eng)
    eng.update(cfg.lambda_rec * l_rec + cfg.lambda_adv * l_adv, task.opt_G)
    hole_mse = masked_mse(pred.detach(), x, m).clamp_min(1e-12)
    return {"l_rec": l_rec.detach(), "l_adv": l_adv.detach(), "hole_psnr": 10 * torch.log10(4.0 / hole_mse)}


# ---------------------------------------------------------------------------------------------
# Networks


@dataclass(frozen=True)
class AEConfig:
    """A fully connected autoencoder on flattened patches: nonlinear PCA."""

    input_dim: int = 3 * 16 * 16   # D, the flattened pattern size
    code_dim: int = 32             # k, the bottleneck
    hidden: int = 512              # width of the hidden layer on each side


class AutoEncoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        # patterns are centred and scaled with the training set's statistics, as PCA centres
        self.register_buffer("mean", torch.zeros(cfg.input_dim))
        self.register_buffer("scale", torch.ones(()))
        self.G = nn.Sequential(nn.Linear(cfg.input_dim, cfg.hidden), nn.ReLU(True),
                               nn.Linear(cfg.hidden, cfg.code_dim))            # encoder: (B, D) -> (B, k)
        self.H = nn.Sequential(nn.Linear(cfg.code_dim, cfg.hidden), nn.ReLU(True),
                               nn.Linear(cfg.hidden, cfg.input_dim))            # decoder: (B, k) -> (B, D)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.H(self.G((y - self.mean) / self.scale)) * self.scale + self.mean


@dataclass(frozen=True)
class DenoiserConfig:
    channels: int = 3       # image channels
    width: int = 48         # feature maps per hidden layer
    depth: int = 8          # conv layers in all (receptive field 2*depth+1 pixels)
    residual: bool = True   # predict the noise and subtract it (DnCNN)


class Denoiser(nn.Module):
    """(B, C, H, W) in [-1, 1] -> (B, C, H, W), any H and W."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, cfg.width, 3, padding=1), nn.ReLU(True)]
        for _ in range(cfg.depth - 2):
            layers += [nn.Conv2d(cfg.width, cfg.width, 3, padding=1), nn.ReLU(True)]
        layers.append(nn.Conv2d(cfg.width, cfg.channels, 3, padding=1))
        self.body = nn.Sequential(*layers)   # state size. C x H x W throughout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x - y if self.cfg.residual else y


CONFIGS["ae"] = AEConfig
CONFIGS["denoiser"] = DenoiserConfig


# ---------------------------------------------------------------------------------------------
# Training the denoiser


@dataclass
class DenoiserTrainConfig(RunConfig):
    """Denoiser training: the engine's settings and these."""
    data: str = option("photos", "photos (scikit-image's training split), a folder of images, or a "
                       ".txt / .jsonl list of image paths (streamed)")
    steps: int = option(2000, "optimizer steps", min=1)
    batch_size: int = option(32, "global batch size, split evenly across the ranks", min=1)
    patch: int = option(48, "training crop side", min=8)
    sigma: tuple[float, float] = option((5.0, 55.0), "Gaussian noise range per image, 0-255 scale",
                                        min=0, ordered=True)
    lr: float = option(1e-3, "Adam learning rate", min=0)
    lr_schedule: str = option("cosine", "learning rate over the run: constant, cosine (to 0), "
                              "linear-decay (hold, then to 0 over the second half)", choices=SCHEDULES)
    # crop side as a fraction of the photo's shorter side, resized to `patch`; a side at or
    # under `patch` pixels is a crop at the photo's own resolution (what the denoiser meets)
    crop_scale: tuple[float, float] = option((0.05, 0.5), "crop side as a share of the photo's shorter "
                                             "side, resized to --patch", min=0, max=1, ordered=True)
    pool: int = option(4096, "bundled photos: training crops drawn once per run", min=1)
    init: str | None = option(None, "start from this denoiser run's (or checkpoint's) weights")
    network: DenoiserConfig = option(default_factory=DenoiserConfig)

    def validate(self) -> None:
        if self.init:
            start = load_checkpoint(self.init, ("denoiser",))
            if start["config"] != asdict(self.network):
                raise UsageError(f"--init: {self.init} holds a denoiser {start['config']}, not the one asked "
                                 f"for {asdict(self.network)}; give the same --width and --depth")


def training_photos(data: str) -> list[np.ndarray]:
    if data == "photos":
        return datasets.skimage_photos(datasets.TRAIN_PHOTOS)
    if Path(data).is_dir():
        return datasets.folder_photos(data)
    raise UsageError(f"--data: {data!r} is neither 'photos' nor an existing folder")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def image_crops(data: str, pool: int, size: int, seed: int, scale: tuple[float, float]):
    """Training crops of an image model: a fixed pool of `pool` crops of the bundled photos, or
    a streamed folder / list (a fresh crop of each file every epoch)."""
    from ganforge.training import data as tdata

    if data == "photos":
        return tdata.PhotoCrops(datasets.skimage_photos(datasets.TRAIN_PHOTOS), pool, size, seed, scale)
    if tdata.is_streamed(data):
        return tdata.FolderImages(data, tdata.SquareCrop(size, scale), seed)
    raise UsageError(f"--data: {data!r} is neither 'photos', a folder of images nor a .txt / .jsonl list")


class DenoiserTask(Task):
    """The DnCNN-style denoiser: clean crops, Gaussian noise of a random sigma per image, MSE."""

    kind = "denoiser"

    def setup(self, eng: Engine) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.net = Denoiser(cfg.network)
        if cfg.init:
            self.net.load_state_dict(load_checkpoint(cfg.init, ("denoiser",))["state"]["net"])
        self.train_net = eng.wrap(self.net)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.nets, self.opts = {"net": self.net}, {"net": self.opt}

    def dataset(self):
        c = self.cfg
        return image_crops(c.data, max(c.pool, c.batch_size), c.patch, c.seed, c.crop_scale)

    def step(self, batch: torch.Tensor, eng: Engine) -> dict:
        x = batch.permute(0, 3, 1, 2).float() / 127.5 - 1
        lo, hi = self.cfg.sigma
        sigma = (lo + (hi - lo) * eng.rand(x.shape[0], 1, 1, 1)) * (2.0 / 255.0)
        noisy = x + eng.randn(*x.shape) * sigma
        with eng.autocast():
            loss = F.mse_loss(self.train_net(noisy).float(), x)
        eng.update(loss, self.opt)
        loss = loss.detach()
        # PSNR in grey levels of the clean vs denoised batch
        return {"loss": loss, "psnr": 10 * torch.log10(4.0 / loss.clamp_min(1e-12))}

    def status(self, row: dict) -> str:
        return f"loss {row['loss']:.5f}" if "loss" in row else ""

    def finish(self, out: Path, eng: Engine) -> dict:
        """A picture: held-out crops, noisy at sigma 25, denoised."""
        net = self.net.eval()
        held = datasets.random_crops(datasets.skimage_photos(datasets.HELD_OUT_PHOTOS), 8, 96, seed=1)
        x = torch.from_numpy(held).permute(0, 3, 1, 2).float() / 127.5 - 1
        noisy = gaussian_noise(x, 25.0, torch.Generator().manual_seed(1))
        with torch.no_grad():
            den = net(noisy.to(eng.device)).float().cpu()
        to8 = lambda t: ((t + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        save_grid(np.concatenate([held, to8(noisy), to8(den)]), out / "samples.png", nrow=8)
        net.train()
        return {"samples": str(out / "samples.png")}


def train_denoiser(cfg: DenoiserTrainConfig, out: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Train the convolutional denoiser on noisy crops; write checkpoint, metrics, samples."""
    return Engine(cfg, out, progress=progress, resume=resume).fit(DenoiserTask(cfg))


# ---------------------------------------------------------------------------------------------
# The autoencoder as nonlinear PCA, trained on E


def train_autoencoder(Y: np.ndarray, code_dim: int, steps: int = 1500, batch_size: int = 256,
                      hidden: int = 512, lr: float = 1e-3, seed: int = 0) -> AutoEncoder:
    """Fit Y' = H(G(Y)) to (P, D) patterns by minimising E (per batch, mean over patterns)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    Yt = torch.from_numpy(np.asarray(Y, np.float32))
    ae = AutoEncoder(AEConfig(input_dim=Yt.shape[1], code_dim=code_dim, hidden=hidden))
    ae.mean.copy_(Yt.mean(0))
    ae.scale.fill_(float((Yt - Yt.mean(0)).std()))
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        y = Yt[rng.integers(0, len(Yt), batch_size)]
        loss = ((ae(y) - y) ** 2).sum(dim=1).mean()   # E per pattern
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return ae.eval()


def patches(photos: list[np.ndarray], n: int, size: int, seed: int) -> np.ndarray:
    """(n, size*size*3) patterns in [0, 1] from random crops (no resizing)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size * size * 3), np.float32)
    for i in range(n):
        ph = photos[int(rng.integers(len(photos)))]
        y, x = int(rng.integers(0, ph.shape[0] - size + 1)), int(rng.integers(0, ph.shape[1] - size + 1))
        out[i] = ph[y:y + size, x:x + size].reshape(-1) / 255.0
    return out


MODEL = ModelSpec("denoiser", DenoiserTrainConfig, train_denoiser)
