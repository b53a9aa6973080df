"""The GAN training loop: DCGAN on images, with sample grids, metrics and checkpoints.

A run directory holds:
    checkpoint.pt     the latest checkpoint (config dataclass + weights + step)
    train.json        the settings the run was started with
    metrics.jsonl     one JSON object per logged step
    samples/          PNG grids of G's output for a fixed set of latents
    samples.png       the last grid
    scores.png        s_G and s_D over steps, the doctor's diagnoses marked
    doctor.md         the doctor's report: diagnoses, evidence, remedies, interventions
    doctor.json       the same, as data
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ganforge.errors import UsageError
from ganforge.images import save_grid
from ganforge.progress import Progress
from ganforge.training import datasets
from ganforge.training.gan import (DCGANConfig, Discriminator, Generator, init_weights,
                                   save_checkpoint)
from ganforge.training.monitor import (DOCTOR_MODES, Doctor, Monitor, Thresholds, log_step,
                                       write_run_report)


@dataclass
class TrainConfig:
    data: str = "shapes"          # 'shapes', 'stacked_digits', 'photos' or a folder of images
    n_images: int = 8192          # size of the training pool drawn from `data`
    steps: int = 1000             # optimizer steps of D and G each
    batch_size: int = 64
    lr_g: float = 2e-4            # Adam, DCGAN's settings
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    seed: int = 0
    label_smoothing: float = 0.0  # real label = 1 - label_smoothing (Salimans et al., 2016)
    instance_noise: float = 0.0   # std of Gaussian noise added to D's inputs (Sønderby et al., 2017)
    sample_every: int = 100       # steps between sample grids
    log_every: int = 10           # steps between metrics lines
    checkpoint_every: int = 500   # steps between checkpoints (and always at the end)
    threads: int = 0              # torch intra-op threads; 0 = all cores
    doctor: str = "report"        # 'auto' (diagnose and remedy), 'report' (diagnose), 'off'
    doctor_every: int = 50        # steps between s_G / s_D measurements on the held-out batch
    thresholds: Thresholds = field(default_factory=Thresholds)
    network: DCGANConfig = field(default_factory=DCGANConfig)

    def validate(self) -> None:
        check_flags(self, {"--lr-g": (self.lr_g, self.lr_g > 0, "> 0"),
                           "--lr-d": (self.lr_d, self.lr_d > 0, "> 0")})


def check_flags(cfg, own: dict[str, tuple]) -> None:
    """Refuse a GAN trainer config (DCGAN or ProGAN) whose settings are out of range: the
    settings every GAN trainer has, then `own` ({flag: (value, ok, allowed)}), each with one
    UsageError naming the flag, the value and what is allowed."""
    checks = {
        "--steps": (cfg.steps, cfg.steps >= 1, ">= 1"),
        "--batch-size": (cfg.batch_size, cfg.batch_size >= 2, ">= 2"),
        "--n-images": (cfg.n_images, cfg.n_images >= cfg.batch_size, ">= --batch-size"),
        **own,
        "--label-smoothing": (cfg.label_smoothing, 0 <= cfg.label_smoothing < 0.5, "in [0, 0.5)"),
        "--instance-noise": (cfg.instance_noise, cfg.instance_noise >= 0, ">= 0"),
        "--doctor": (cfg.doctor, cfg.doctor in DOCTOR_MODES, "one of " + ", ".join(DOCTOR_MODES)),
        "--doctor-every": (cfg.doctor_every, cfg.doctor_every >= 1, ">= 1"),
    }
    for name, (value, ok, allowed) in checks.items():
        if not ok:
            raise UsageError(f"{name}: {value!r} is not allowed; must be {allowed}")


# Presets that reproduce each failure on purpose on image data (and a healthy reference).
# They override the flags they name.
IMAGE_PRESETS: dict[str, dict] = {
    "healthy": {},
    # a much stronger, faster D against a weak, slow G
    "d-dominates": {"lr_d": 2e-3, "lr_g": 2e-5, "label_smoothing": 0.0, "instance_noise": 0.0,
                    "network": {"ndf": 64, "ngf": 4}},
    # a crippled D (2 filters, a learning rate that barely moves it) against a fast G
    "g-dominates": {"lr_d": 1e-7, "lr_g": 2e-3, "network": {"ndf": 2}},
    # a one-dimensional latent and a tiny G
    "mode-collapse": {"lr_d": 1e-3, "network": {"z_dim": 1, "ngf": 4}},
}


def apply_preset(cfg: TrainConfig, name: str) -> TrainConfig:
    if name not in IMAGE_PRESETS:
        raise UsageError(f"--preset: {name!r} is not one of {', '.join(IMAGE_PRESETS)}")
    p = dict(IMAGE_PRESETS[name])
    net = dataclasses.replace(cfg.network, **p.pop("network", {}))
    return dataclasses.replace(cfg, **p, network=net)


def train_command(kind: str, train: dict, out: str | Path) -> str:
    """The full `ganforge train` command line that reproduces a run from its recorded settings:
    every flag explicit, so later changes of defaults do not change what it means."""
    net = train["network"]
    if kind == "dcgan":
        flags = [("--data", train["data"]), ("--steps", train["steps"]),
                 ("--batch-size", train["batch_size"]), ("--n-images", train["n_images"]),
                 ("--z-dim", net["z_dim"]), ("--ngf", net["ngf"]), ("--ndf", net["ndf"]),
                 ("--resolution", net["resolution"]), ("--lr-g", train["lr_g"]), ("--lr-d", train["lr_d"]),
                 ("--label-smoothing", train["label_smoothing"]),
                 ("--instance-noise", train["instance_noise"]), ("--d-dropout", net["d_dropout"]),
                 ("--sample-every", train["sample_every"])]
    elif kind == "denoiser":
        flags = [("--data", train["data"]), ("--steps", train["steps"]), ("--batch-size", train["batch_size"]),
                 ("--patch", train["patch"]), ("--sigma-min", train["sigma"][0]),
                 ("--sigma-max", train["sigma"][1]), ("--lr", train["lr"]), ("--width", net["width"]),
                 ("--depth", net["depth"])]
        if "crop_scale" in train:   # recorded since fine-tuning was added; older runs used the defaults
            flags += [("--crop-scale-min", train["crop_scale"][0]), ("--crop-scale-max", train["crop_scale"][1]),
                      ("--pool", train["pool"])]
        if train.get("init"):
            flags.append(("--init", train["init"]))
    elif kind == "inpainter":
        flags = [("--data", train["data"]), ("--steps", train["steps"]), ("--batch-size", train["batch_size"]),
                 ("--tile", train["tile"]), ("--lambda-rec", train["lambda_rec"]),
                 ("--lambda-adv", train["lambda_adv"]), ("--lr", train["lr"]), ("--width", net["width"]),
                 ("--pool", train.get("pool", 4096))]   # runs from before the flag drew 4,096
        if train.get("rec_reduce", "pixels") != "pixels":
            flags.append(("--rec-reduce", train["rec_reduce"]))
        if train.get("balance_fills"):
            flags.append(("--balance-fills", ""))
        if train.get("val_every"):
            flags.append(("--val-every", train["val_every"]))
        if net.get("prefill"):
            flags.append(("--prefill", ""))
            flags += [("--fill", net.get("fill", "harmonic")), ("--diffuse", net.get("diffuse", 32)),
                      ("--bilaplace", net.get("bilaplace", 0))]
            if net.get("thinplate"):
                flags.append(("--thinplate", net["thinplate"]))
            if net.get("head", "residual") != "residual":
                flags += [("--head", net["head"]), ("--blend-thinplate", net["blend_thinplate"])]
                if net.get("blend_validate"):
                    flags.append(("--blend-validate", net["blend_validate"]))
    elif kind == "progan":
        flags = [("--data", train["data"]), ("--steps", train["steps"]), ("--batch-size", train["batch_size"]),
                 ("--n-images", train["n_images"]), ("--z-dim", net["z_dim"]),
                 ("--resolution", net["resolution"]), ("--lr", train["lr"]),
                 ("--stable-images", train["stable_images"]), ("--fade-images", train["fade_images"]),
                 ("--ema-images", train.get("ema_images", 0)),   # runs from before the average had none
                 ("--fmap-base", net["fmap_base"]), ("--fmap-max", net["fmap_max"]), ("--fmap-min", net["fmap_min"]),
                 ("--d-fmap-min", net.get("d_fmap_min", 0)),   # runs from before D had its own widths
                 ("--sample-every", train["sample_every"])]
    else:
        raise ValueError(f"no train command for kind {kind!r}")
    flags += [("--seed", train["seed"]), ("--out", str(out))]
    return " ".join(["ganforge", "train", kind, *(f"{k} {v}".rstrip() for k, v in flags)])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC, the same arithmetic as the exported graph."""
    return ((x.detach() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class GANTrainer:
    """One D step and one G step per iteration, non-saturating G loss, logits throughout."""

    def __init__(self, cfg: TrainConfig, out: Path):
        cfg.validate()
        self.cfg, self.out = cfg, Path(out)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        net = cfg.network
        self.G, self.D = Generator(net), Discriminator(net)
        self.G.apply(init_weights)
        self.D.apply(init_weights)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=betas)
        self.images = datasets.load_images(cfg.data, cfg.n_images, net.resolution, cfg.seed)
        self.mirror = datasets.mirrorable(cfg.data)  # a mirrored digit is no digit
        self.fixed_z = torch.from_numpy(
            np.random.default_rng(cfg.seed + 1).standard_normal((64, net.z_dim)).astype(np.float32))
        # the doctor's fixed held-out batch: real images outside the training pool, and latents
        held = datasets.load_images(cfg.data, 64, net.resolution, cfg.seed + 7919)
        self.held_real = to_tensor(held)
        self.held_z = torch.from_numpy(
            np.random.default_rng(cfg.seed + 2).standard_normal((64, net.z_dim)).astype(np.float32))
        self.step = 0

    def real_batch(self) -> torch.Tensor:
        idx = self.rng.integers(0, len(self.images), self.cfg.batch_size)
        batch = self.images[idx]
        if self.mirror:
            flip = self.rng.random(len(idx)) < 0.5
            batch[flip] = batch[flip, :, ::-1]
        return to_tensor(batch)

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cfg.instance_noise * torch.randn_like(x) if self.cfg.instance_noise else x

    def train_step(self) -> dict:
        cfg = self.cfg
        x = self.real_batch()
        z = torch.randn(cfg.batch_size, cfg.network.z_dim)
        fake = self.G(z)

        # D: real -> 1 (smoothed), fake -> 0
        self.opt_D.zero_grad(set_to_none=True)
        logit_real = self.D(self._noisy(x))
        logit_fake = self.D(self._noisy(fake.detach()))
        real_target = torch.full_like(logit_real, 1.0 - cfg.label_smoothing)
        loss_D = (F.binary_cross_entropy_with_logits(logit_real, real_target)
                  + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))
        loss_D.backward()
        self.opt_D.step()

        # G: non-saturating, maximise log D(G(z))
        self.opt_G.zero_grad(set_to_none=True)
        logit_gen = self.D(self._noisy(fake))
        loss_G = F.binary_cross_entropy_with_logits(logit_gen, torch.ones_like(logit_gen))
        loss_G.backward()
        self.opt_G.step()
        self.step += 1
        return {
            "step": self.step,
            "loss_D": float(loss_D.detach()),
            "loss_G": float(loss_G.detach()),
            "D_real": float(torch.sigmoid(logit_real.detach()).mean()),
            "D_fake": float(torch.sigmoid(logit_fake.detach()).mean()),
        }

    # -- Tunable (the doctor's auto remedies) --
    def knobs(self) -> dict:
        k = {"label_smoothing": self.cfg.label_smoothing, "instance_noise": self.cfg.instance_noise,
             "lr_g": self.opt_G.param_groups[0]["lr"], "lr_d": self.opt_D.param_groups[0]["lr"]}
        if self.cfg.network.d_dropout:  # D has dropout layers only when built with them
            k["d_dropout"] = self._d_dropout
        return k

    @property
    def _d_dropout(self) -> float:
        return next((m.p for m in self.D.modules() if isinstance(m, torch.nn.Dropout2d)), 0.0)

    def set_knob(self, name: str, value: float) -> None:
        if name in ("label_smoothing", "instance_noise"):
            setattr(self.cfg, name, value)
        elif name in ("lr_g", "lr_d"):
            for g in (self.opt_G if name == "lr_g" else self.opt_D).param_groups:
                g["lr"] = value
        elif name == "d_dropout":
            self.D.set_dropout(value)
        else:
            raise KeyError(name)

    @torch.no_grad()
    def samples(self) -> np.ndarray:
        self.G.eval()
        try:
            return to_uint8(self.G(self.fixed_z))
        finally:
            self.G.train()

    def save(self) -> Path:
        return save_checkpoint(
            self.out / "checkpoint.pt", "dcgan", self.cfg.network, {"G": self.G, "D": self.D},
            step=self.step, data=self.cfg.data, seed=self.cfg.seed,
            train=json.loads(json.dumps(dataclasses.asdict(self.cfg))))


def train_dcgan(cfg: TrainConfig, out: str | Path, progress: bool = True) -> dict:
    """Train a DCGAN into run directory `out`; return a summary dict."""
    out = Path(out)
    cfg.validate()
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {out} ({exc.strerror})") from exc
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    (out / "train.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    trainer = GANTrainer(cfg, out)
    bar = Progress(cfg.steps, "train dcgan", unit="step", enabled=progress)
    monitor = Monitor(trainer.held_real, trainer.held_z, cfg.thresholds, every=cfg.doctor_every,
                      total_steps=cfg.steps)
    doctor = Doctor(monitor, cfg.doctor, log=(lambda m: print("\n" + m, file=sys.stderr)) if progress else None)
    net = cfg.network
    t0 = time.perf_counter()
    last: dict = {}
    with open(out / "metrics.jsonl", "w") as metrics:
        for _ in range(cfg.steps):
            last = trainer.train_step()
            s = trainer.step
            if cfg.doctor != "off" and monitor.due(s):
                found = doctor.observe(s, trainer.D, trainer.G, trainer,
                                       {"ndf": net.ndf, "ngf": net.ngf, "z_dim": net.z_dim})
                log_step(metrics, last, t0, monitor, found)
            elif s % cfg.log_every == 0 or s == cfg.steps:
                log_step(metrics, last, t0)
            if s % cfg.sample_every == 0 or s == cfg.steps:
                save_grid(trainer.samples(), out / "samples" / f"step_{s:06d}.png", nrow=8)
            if s % cfg.checkpoint_every == 0 and s != cfg.steps:
                trainer.save()
            bar.update(1, status=f"loss_D {last['loss_D']:.3f} loss_G {last['loss_G']:.3f}")
    bar.close()
    ckpt = trainer.save()
    grid_path = save_grid(trainer.samples(), out / "samples.png", nrow=8)
    if cfg.doctor != "off":
        write_run_report(out, monitor, doctor, title=f"dcgan on {cfg.data}, {trainer.step} steps")
    return {"checkpoint": str(ckpt), "samples": str(grid_path), "steps": trainer.step,
            "seconds": round(time.perf_counter() - t0, 1), "loss_D": last.get("loss_D"),
            "loss_G": last.get("loss_G"), "diagnoses": [d.failure for d in monitor.diagnoses],
            "interventions": len(doctor.interventions)}
