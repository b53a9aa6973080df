"""DCGAN on images, as a Task of the training engine (engine.py); what every GAN trainer shares
is in gan_task.py. `GANTrainer` steps a GAN from its caller (benchmarks on a time budget).

A run directory holds:
    checkpoint.pt     the latest checkpoint (config dataclass + weights + step + resume state)
    train.json        the settings the run was started with
    metrics.jsonl     one JSON object per logged step
    samples/          PNG grids of G's output for a fixed set of latents
    samples.png       the last grid
    scores.png        s_G and s_D over steps, the doctor's diagnoses marked
    doctor.md         the doctor's report: diagnoses, evidence, remedies, interventions
    doctor.json       the same, as data
    rewind/           (--doctor auto) the last checkpoints, for a restart with changed networks
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ganforge.images import save_grid
from ganforge.training import data as tdata
from ganforge.training.engine import Engine
from ganforge.training.gan import DCGANConfig, Discriminator, Generator, init_weights
from ganforge.training.gan_task import (JUDGED, GANDoctor, GANOptions, GANTask, ShippedFD, check_flags,
                                        describe_doctor, fixed_latents, held_out_reals, to_tensor, to_uint8)
from ganforge.training.models import ModelSpec
from ganforge.training.remedies import dropout_control
from ganforge.training.task import option


@dataclass
class TrainConfig(GANOptions):
    """DCGAN training: the engine's settings, the doctor's, and these."""
    data: str = option("shapes", "shapes, stacked_digits, photos, a folder of images, or a .txt / "
                       ".jsonl list of image paths (streamed)")
    n_images: int = option(8192, "images made for a bundled set (shapes, stacked_digits, photos)", min=2)
    steps: int = option(1000, "optimizer steps of D and G each", min=1)
    batch_size: int = option(64, "global batch size, split evenly across the ranks", min=2)
    log_every: int = option(10, "steps between metrics.jsonl rows", min=1)
    sample_every: int = option(100, "steps between sample grids", min=1)
    lr_g: float = option(2e-4, "G's Adam learning rate", min=0)
    lr_d: float = option(2e-4, "D's Adam learning rate", min=0)
    beta1: float = option(0.5, "Adam beta1 (DCGAN's 0.5)", min=0, below=1)
    beta2: float = option(0.999, "Adam beta2", min=0, below=1)
    label_smoothing: float = option(0.1, "real label = 1 - this (Salimans et al., 2016)", min=0, below=0.5)
    instance_noise: float = option(0.1, "std of Gaussian noise on D's inputs (Sønderby et al., 2017)", min=0)
    network: DCGANConfig = option(default_factory=DCGANConfig)

    def validate(self) -> None:
        check_flags(self, {"--lr-g": (self.lr_g, self.lr_g > 0, "> 0"),
                           "--lr-d": (self.lr_d, self.lr_d > 0, "> 0")})


class DCGANTask(GANTask):
    """One D step (every `d_steps_every` steps) and one G step per iteration, non-saturating G
    loss, logits throughout. With `--doctor auto` the doctor's network changes restart the run
    from the last checkpoint before the failure began (`rebuild`; kept in rewind/)."""

    kind = "dcgan"
    sizes = {"ndf": "ndf", "ngf": "ngf", "z_dim": "z_dim", "mbstd": "mbstd"}

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        super().__init__(cfg)
        self.progress = progress

    def setup(self, eng: Engine) -> None:
        cfg, dev = self.cfg, eng.device
        self.start(eng, cfg.lr_g, cfg.lr_d)
        self.data = tdata.gan_images(cfg.data, cfg.n_images, cfg.network.resolution, cfg.seed)
        self.held_real = to_tensor(held_out_reals(cfg, self.data, cfg.network.resolution)).to(dev)
        self._latents(dev)
        self.watch = GANDoctor(cfg, self.held_real, self.held_z, log=self.progress and eng.main)
        if cfg.doctor == "auto" and cfg.data == "shapes":
            # the best weights judged as ProGAN's are on the shapes: by the shapes classifier's FD
            # of G in eval mode (what ships), which sees the outlines the pooled pixels miss
            self.watch.judge = ShippedFD(self._shipped, held_out_reals(cfg, self.data, cfg.network.resolution, n=JUDGED),
                                         fixed_latents(cfg.network.z_dim, cfg.seed + 3, n=JUDGED).to(dev), cfg.data)

    def _shipped(self, z: torch.Tensor) -> torch.Tensor:
        """G's images for `z` in eval mode (batch norm on its running statistics), as exported;
        G is left in its mode."""
        mode = self.G.training
        self.G.eval()
        try:
            return self.G(z)
        finally:
            self.G.train(mode)

    def build(self, eng: Engine, lr_g: float, lr_d: float) -> None:
        cfg, net = self.cfg, self.cfg.network
        self.G, self.D = Generator(net), Discriminator(net)
        self.G.apply(init_weights)
        self.D.apply(init_weights)
        self.G_train, self.D_train = eng.wrap(self.G), eng.wrap(self.D)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas)
        self.nets = {"G": self.G, "D": self.D}
        self.opts = {"G": self.opt_G, "D": self.opt_D}
        self.d_drop = dropout_control(self.D)

    def _latents(self, dev) -> None:
        z_dim, seed = self.cfg.network.z_dim, self.cfg.seed
        self.fixed_z = fixed_latents(z_dim, seed + 1).to(dev)
        self.held_z = fixed_latents(z_dim, seed + 2).to(dev)

    def rebuilt(self, eng: Engine, payload: dict) -> None:
        self._latents(eng.device)
        self.watch.monitor.z = self.held_z
        if self.watch.judge is not None:     # the restarted G's z_dim may differ
            self.watch.judge.z = fixed_latents(self.cfg.network.z_dim, self.cfg.seed + 3, n=JUDGED).to(eng.device)

    def dataset(self):
        return self.data

    def _d_loss(self, x: torch.Tensor, fake: torch.Tensor, eng: Engine):
        logit_real = self.D_train(self._noisy(x, eng)).float()
        logit_fake = self.D_train(self._noisy(fake, eng)).float()
        return self.d_loss(logit_real, logit_fake, eng), logit_real, logit_fake

    def step(self, batch: torch.Tensor, eng: Engine) -> dict:
        cfg = self.cfg
        x = to_tensor(batch)
        n = x.shape[0]
        z = eng.randn(n, cfg.network.z_dim)
        with eng.autocast():
            fake = self.G_train(z)
        # D: real -> 1 (smoothed), fake -> 0; on every d_steps_every-th step only
        with self.d_grad(eng), eng.autocast():
            loss_D, logit_real, logit_fake = self._d_loss(x, fake.detach(), eng)
        self.update_d(loss_D, eng)
        # G: non-saturating, maximise log D(G(z))
        with eng.autocast():
            logit_gen = self.D_train(self._noisy(fake, eng)).float()
            loss_G = F.binary_cross_entropy_with_logits(logit_gen, torch.ones_like(logit_gen))
        eng.update(loss_G, self.opt_G)
        return {"loss_D": loss_D.detach(), "loss_G": loss_G.detach(),
                "D_real": torch.sigmoid(logit_real.detach()).mean(),
                "D_fake": torch.sigmoid(logit_fake.detach()).mean()}

    def status(self, row: dict) -> str:
        return f"loss_D {row['loss_D']:.3f} loss_G {row['loss_G']:.3f}" if "loss_D" in row else ""

    # -- the doctor --
    def doctor_observe(self, step: int) -> dict:
        return self.watch.observe(step, self.D, self.G, self, self.network_sizes(), nets=self.nets)

    def set_knob(self, name: str, value: float) -> None:
        super().set_knob(name, value)
        if name == "d_dropout":     # the checkpoint's config says D's rate as it is
            self.cfg.network = dataclasses.replace(self.cfg.network, d_dropout=value)

    @torch.no_grad()
    def samples(self) -> np.ndarray:
        self.G.eval()
        try:
            return to_uint8(self.G(self.fixed_z))
        finally:
            self.G.train()

    def finish(self, out: Path, eng: Engine) -> dict:
        grid = save_grid(self.samples(), out / "samples.png", nrow=8)
        return {"samples": str(grid),
                **self.watch.report(out, f"dcgan on {self.cfg.data}, {eng.step} steps")}


def train_dcgan(cfg: TrainConfig, out: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Train a DCGAN into run directory `out`; return the engine's summary."""
    return Engine(cfg, out, progress=progress, resume=resume).fit(DCGANTask(cfg, progress))


class GANTrainer:
    """A DCGAN stepped by its caller (benchmarks that interleave arms on a time budget): the same
    task and engine as `train_dcgan`, one step per `train_step()`. `task_class`: another GAN's
    task (progan.ProGANTrainer); `resume`: continue the run in `out` from its checkpoint."""

    task_class = DCGANTask

    def __init__(self, cfg: TrainConfig, out: str | Path, resume: bool = False):
        self.cfg = cfg
        self.engine = Engine(cfg, out, progress=False, resume=resume)
        self.task = self.task_class(cfg, progress=False)
        self.engine.start(self.task, resume)

    # the task's current networks and optimizers (a doctor's restart replaces them)
    G = property(lambda self: self.task.G)
    D = property(lambda self: self.task.D)
    opt_G = property(lambda self: self.task.opt_G)
    opt_D = property(lambda self: self.task.opt_D)

    @property
    def step(self) -> int:
        return self.engine.step

    def train_step(self) -> dict:
        """One step, then the doctor when it is due (its fields in the returned row)."""
        row = {k: float(v) for k, v in self.engine.one_step(self.task).items()}
        if self.task.doctor_due(self.step):
            row.update(self.engine.consult(self.task, self.step))
        return row

    def keep_best(self) -> dict | None:
        """End a run stopped on another clock than its steps (a benchmark's budget): put back
        the doctor's best weights when the last are measurably worse (auto mode)."""
        return self.task.watch.keep_best(self.step, self.task.nets)

    def samples(self) -> np.ndarray:
        return self.task.samples()


MODEL = ModelSpec("dcgan", TrainConfig, train_dcgan, describe_doctor)
