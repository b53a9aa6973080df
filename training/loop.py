"""DCGAN on images, as a Task of the training engine (engine.py), and what every GAN trainer
shares: the image <-> tensor conversions, the flag checks, the reproduction command.

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
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ganforge.errors import UsageError
from ganforge.images import save_grid
from ganforge.training import data as tdata
from ganforge.training.engine import Engine, RunConfig, Task, option
from ganforge.training.gan import DCGANConfig, Discriminator, Generator, init_weights, load_checkpoint
from ganforge.training.models import ModelSpec
from ganforge.training.monitor import (DOCTOR_MODES, FAILURES, Doctor, Intervention, Monitor, Thresholds,
                                       render_kept, write_run_report)
from ganforge.training.remedies import BestWeights, transplant


def _thresholds_text(th: dict | Thresholds) -> str | None:
    """Thresholds that differ from the defaults, as --thresholds text (None: all default)."""
    th = th if isinstance(th, dict) else dataclasses.asdict(th)
    base = dataclasses.asdict(Thresholds())
    diff = [f"{k}={v}" for k, v in th.items() if base.get(k) != v]
    return ",".join(diff) or None


@dataclass
class GANOptions(RunConfig):
    """What every adversarial trainer adds to the engine's settings: the doctor."""
    doctor: str = option("report", "auto (diagnose and remedy), report (diagnose), off", choices=DOCTOR_MODES)
    doctor_every: int = option(50, "steps between s_G / s_D measurements on the held-out batch", min=1)
    thresholds: Thresholds = option(default_factory=Thresholds, help="doctor thresholds, NAME=VALUE,... "
                                    "(docs/doctor.md)", parse=Thresholds.parse, format=_thresholds_text,
                                    metavar="NAME=VALUE,...", show="docs/doctor.md")


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
    label_flip: float = option(0.0, "share of D's real and fake labels flipped at random (noisy labels)",
                               min=0, below=0.5)
    instance_noise: float = option(0.1, "std of Gaussian noise on D's inputs (Sønderby et al., 2017)", min=0)
    d_steps_every: int = option(1, "D is updated on every N-th step only (1: every step)", min=1)
    network: DCGANConfig = option(default_factory=DCGANConfig)

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


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (on the images' device)."""
    t = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC, the same arithmetic as the exported graph."""
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def fixed_latents(z_dim: int, seed: int, n: int = 64) -> torch.Tensor:
    """`n` latents fixed by `seed` (the sample grids', the doctor's)."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, z_dim)).astype(np.float32))


def held_out_reals(cfg: GANOptions, data_set, resolution: int, n: int = 64) -> np.ndarray:
    """The doctor's fixed held-out real images (uint8 NHWC): for a bundled set, `n` images drawn
    outside the training pool; for a streamed one, `n` fixed items of it."""
    if tdata.is_streamed(cfg.data):
        return tdata.held_out(data_set, n, cfg.seed + 7919)
    return tdata.gan_images(cfg.data, n, resolution, cfg.seed + 7919).images


class GANDoctor:
    """The doctor's side of a GAN task: a Monitor on a fixed held-out batch, the Doctor, its
    state for checkpoints, and the report at the end. Used by every adversarial task."""

    def __init__(self, cfg: GANOptions, held_real: torch.Tensor, held_z: torch.Tensor, log: bool = True, **kw):
        self.cfg = cfg
        self.monitor = Monitor(held_real, held_z, cfg.thresholds, every=cfg.doctor_every,
                               total_steps=cfg.steps, **kw)
        self.log = (lambda m: print("\n" + m, file=sys.stderr)) if log else (lambda m: None)
        self.doctor = Doctor(self.monitor, cfg.doctor, log=self.log)
        self.best = BestWeights()

    def due(self, step: int) -> bool:
        return self.cfg.doctor != "off" and self.monitor.due(step)

    def observe(self, step: int, D, G_sample, trainer, network: dict, extra: dict | None = None,
                nets: dict | None = None) -> dict:
        """Measure, diagnose, remedy (auto). With `nets` (auto mode): keep the weights of the
        lowest `fd`, and at the run's last step put them back when the last weights are
        measurably worse (remedies.KEEP_MARGIN)."""
        found = self.doctor.observe(step, D, G_sample, trainer, network, extra)
        row = {k: v for k, v in self.monitor.last.items() if k != "step"}
        if found:
            row["diagnoses"] = [d.failure for d in found]
            done = [i for i in self.doctor.interventions if i.step == step]
            if done:
                row["interventions"] = {i.knob: i.new for i in done if i.action == "set"}
        if self.cfg.doctor == "auto" and nets is not None:
            fd = self.monitor.last.get("fd")
            self.best.offer(step, fd, nets)
            if step >= self.cfg.steps and self.best.step is not None:
                kept = self.best.better_than(fd)
                if kept:
                    self.best.restore(nets)
                self.doctor.kept = {"step": self.best.step, "fd": round(self.best.fd, 5),
                                    "final_step": int(step), "final_fd": fd, "kept": kept}
                row["kept_step"] = self.best.step if kept else int(step)
                self.log(render_kept(self.doctor.kept))
        return row

    def take_restart(self) -> dict | None:
        """A network change the doctor decided (auto mode), once; None otherwise."""
        return self.doctor.take_restart() if self.cfg.doctor == "auto" else None

    def restarted(self, decision: dict) -> None:
        """After a restart rewound to `decision["from_step"]`: the records of the abandoned steps
        dropped (metrics.jsonl keeps them), every detector re-armed, the best weights forgotten
        (their networks had other shapes)."""
        back = decision["from_step"]
        self.monitor.records = [r for r in self.monitor.records if r["step"] <= back]
        self.monitor.last = self.monitor.records[-1] if self.monitor.records else {}
        for f in FAILURES:
            self.monitor.rearm(f)
        self.best.reset()
        self.doctor.restarted(decision, back)

    def state(self) -> dict:
        return {"records": self.monitor.records,
                "interventions": [dataclasses.asdict(i) for i in self.doctor.interventions],
                "restarts": self.doctor.restarts, "best": self.best.to_state()}

    def load_state(self, state: dict, stages: list[dict] | None = None) -> None:
        """Take the records and interventions of `state()` back (a resumed run); `stages`
        (ProGAN): the records are diagnosed again stage by stage."""
        if state:
            self.monitor.replay(state.get("records", []), stages)
            self.doctor.interventions = [Intervention(**i) for i in state.get("interventions", [])]
            self.doctor.restarts = list(state.get("restarts", []))
            self.best.load(state.get("best", {}))

    def report(self, out: Path, title: str, stages: list[dict] | None = None) -> dict:
        if self.cfg.doctor != "off":
            write_run_report(out, self.monitor, self.doctor, title=title, stages=stages)
        kept = self.doctor.kept
        return {"doctor_mode": self.cfg.doctor, "diagnoses": [d.failure for d in self.monitor.diagnoses],
                "interventions": len(self.doctor.interventions),
                "restarts": [{k: r[k] for k in ("failure", "step", "from_step", "changes")} for r in self.doctor.restarts],
                "kept_step": (kept["step"] if kept["kept"] else kept["final_step"]) if kept else None}


class GANTask(Task):
    """What every adversarial task shares: `self.watch` (a GANDoctor built in `setup`), instance
    noise on D's inputs drawn so the ranks agree, and the doctor's state carried by checkpoints
    (the knobs as they are now, the observations, the remedies)."""

    def _noisy(self, x: torch.Tensor, eng: Engine) -> torch.Tensor:
        """x plus the instance noise on D's inputs (--instance-noise)."""
        if not self.cfg.instance_noise:
            return x
        return x + self.cfg.instance_noise * eng.randn(x.shape[0], *x.shape[1:])

    def doctor_due(self, step: int) -> bool:
        return self.watch.due(step)

    def extra_state(self) -> dict:
        return {"knobs": self.knobs(), "doctor": self.watch.state()}

    def load_extra_state(self, state: dict) -> None:
        for k, v in state.get("knobs", {}).items():
            self.set_knob(k, v)
        self.watch.load_state(state.get("doctor", {}))


class DCGANTask(GANTask):
    """One D step (every `d_steps_every` steps) and one G step per iteration, non-saturating G
    loss, logits throughout. With `--doctor auto` the doctor's network changes restart the run
    from the last checkpoint before the failure began (`rebuild`; kept in rewind/)."""

    kind = "dcgan"
    can_restart = True

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        super().__init__(cfg)
        self.progress = progress

    def setup(self, eng: Engine) -> None:
        cfg, dev = self.cfg, eng.device
        if eng.resume and eng.checkpoint_path().is_file():   # the networks the run had (a restart's)
            cfg.network = DCGANConfig(**load_checkpoint(eng.checkpoint_path(), ("dcgan",))["config"])
        net = cfg.network
        if cfg.doctor == "auto":     # the checkpoints that cover a failure's streak, and one before
            th = cfg.thresholds
            self.rewind_keep = min(8, math.ceil((th.patience + 1) * cfg.doctor_every / cfg.checkpoint_every) + 1)
        torch.manual_seed(cfg.seed)
        self._build(net, eng, cfg.lr_g, cfg.lr_d)
        self.data = tdata.gan_images(cfg.data, cfg.n_images, net.resolution, cfg.seed)
        self.held_real = to_tensor(held_out_reals(cfg, self.data, net.resolution)).to(dev)
        self._latents(dev)
        self.watch = GANDoctor(cfg, self.held_real, self.held_z, log=self.progress and eng.main)

    def _build(self, net: DCGANConfig, eng: Engine, lr_g: float, lr_d: float) -> None:
        cfg = self.cfg
        self.G, self.D = Generator(net), Discriminator(net)
        self.G.apply(init_weights)
        self.D.apply(init_weights)
        self.G_train, self.D_train = eng.wrap(self.G), eng.wrap(self.D)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas)
        self.nets = {"G": self.G, "D": self.D}
        self.opts = {"G": self.opt_G, "D": self.opt_D}

    def _latents(self, dev) -> None:
        z_dim, seed = self.cfg.network.z_dim, self.cfg.seed
        self.fixed_z = fixed_latents(z_dim, seed + 1).to(dev)
        self.held_z = fixed_latents(z_dim, seed + 2).to(dev)

    def rebuild(self, eng: Engine, payload: dict, decision: dict) -> None:
        """G and D with the decided changes, filled from the checkpoint `payload` where shapes
        allow (remedies.transplant); new optimizers at the current learning rates; the knobs kept."""
        lr_g, lr_d = self.opt_G.param_groups[0]["base_lr"], self.opt_D.param_groups[0]["base_lr"]
        dropout = self.D.dropout
        self.cfg.network = dataclasses.replace(self.cfg.network, **decision["changes"])
        self._build(self.cfg.network, eng, lr_g, lr_d)
        for name, net in self.nets.items():
            transplant(net, payload["state"][name])
        self.D.set_dropout(dropout)
        self._latents(eng.device)
        self.watch.monitor.z = self.held_z
        if eng.main:
            self.watch.restarted(decision)

    def restart_decision(self) -> dict | None:
        return self.watch.take_restart()

    def dataset(self):
        return self.data

    def _d_loss(self, x: torch.Tensor, fake: torch.Tensor, eng: Engine):
        cfg = self.cfg
        logit_real = self.D_train(self._noisy(x, eng)).float()
        logit_fake = self.D_train(self._noisy(fake, eng)).float()
        real_target = torch.full_like(logit_real, 1.0 - cfg.label_smoothing)
        fake_target = torch.zeros_like(logit_fake)
        if cfg.label_flip:   # noisy labels: a share of each side's labels swapped
            n = x.shape[0]
            real_target = torch.where(eng.rand(n) < cfg.label_flip, fake_target, real_target)
            fake_target = torch.where(eng.rand(n) < cfg.label_flip, 1.0 - cfg.label_smoothing, fake_target)
        loss_D = (F.binary_cross_entropy_with_logits(logit_real, real_target)
                  + F.binary_cross_entropy_with_logits(logit_fake, fake_target))
        return loss_D, logit_real, logit_fake

    def step(self, batch: torch.Tensor, eng: Engine) -> dict:
        cfg = self.cfg
        x = to_tensor(batch)
        n = x.shape[0]
        z = eng.randn(n, cfg.network.z_dim)
        with eng.autocast():
            fake = self.G_train(z)
        # D: real -> 1 (smoothed), fake -> 0; on every d_steps_every-th step only
        if eng.step % cfg.d_steps_every == 0:
            with eng.autocast():
                loss_D, logit_real, logit_fake = self._d_loss(x, fake.detach(), eng)
            eng.update(loss_D, self.opt_D)
        else:
            with torch.no_grad(), eng.autocast():
                loss_D, logit_real, logit_fake = self._d_loss(x, fake.detach(), eng)
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
        net = self.cfg.network
        return self.watch.observe(step, self.D, self.G, self,
                                  {"ndf": net.ndf, "ngf": net.ngf, "z_dim": net.z_dim, "mbstd": net.mbstd},
                                  nets=self.nets)

    def knobs(self) -> dict:
        return {"label_smoothing": self.cfg.label_smoothing, "label_flip": self.cfg.label_flip,
                "instance_noise": self.cfg.instance_noise, "d_dropout": self.D.dropout,
                "lr_g": self.opt_G.param_groups[0]["base_lr"], "lr_d": self.opt_D.param_groups[0]["base_lr"],
                "d_steps_every": self.cfg.d_steps_every}

    def set_knob(self, name: str, value: float) -> None:
        if name in ("label_smoothing", "label_flip", "instance_noise"):
            setattr(self.cfg, name, value)
        elif name == "d_steps_every":
            self.cfg.d_steps_every = int(value)
        elif name in ("lr_g", "lr_d"):
            for g in (self.opt_G if name == "lr_g" else self.opt_D).param_groups:
                g["lr"] = g["base_lr"] = value
        elif name == "d_dropout":     # the checkpoint's config says D's rate as it is
            self.D.set_dropout(value)
            self.cfg.network = dataclasses.replace(self.cfg.network, d_dropout=value)
        else:
            raise KeyError(name)

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
        self.G, self.D, self.opt_G, self.opt_D = self.task.G, self.task.D, self.task.opt_G, self.task.opt_D

    @property
    def step(self) -> int:
        return self.engine.step

    def train_step(self) -> dict:
        return {k: float(v) for k, v in self.engine.one_step(self.task).items()}

    def samples(self) -> np.ndarray:
        return self.task.samples()


def train_command(kind: str, train: dict, out: str | Path) -> str:
    """The full `ganforge train` command line that reproduces a run from its recorded settings:
    every flag explicit, so later changes of defaults do not change what it means."""
    from ganforge.training import models, options

    if kind in models.REGISTRY:
        return options.command_line(kind, models.get(kind).config, train, out)
    raise ValueError(f"no train command for kind {kind!r}")




def _describe(s: dict) -> list[str]:
    if s.get("doctor_mode", "off") == "off":
        return []
    cfg_doctor = s.get("doctor_mode", "")
    return [f"doctor{f' ({cfg_doctor})' if cfg_doctor else ''}: diagnoses {', '.join(s['diagnoses']) or 'none'}; "
            f"{s['interventions']} interventions; report {Path(s['checkpoint']).parent / 'doctor.md'}"]


MODEL = ModelSpec("dcgan", TrainConfig, train_dcgan, _describe)
