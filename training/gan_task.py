"""What every adversarial trainer shares (DCGAN, ProGAN, the 2-D mixtures' MLP GAN, the
context encoder, pix2pix): the doctor's settings (`GANOptions`) and flag checks, the image <->
tensor conversions, the doctor's side of a task (`GANDoctor`: its held-out batch, its state in
checkpoints, its reports) and `GANTask`, the Task base that gives every GAN D's loss with the
label knobs, the doctor's knobs and restarts with changed networks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ganforge.errors import UsageError
from ganforge.training import data as tdata
from ganforge.training.doctor import DOCTOR_MODES, Doctor, Intervention, render_kept
from ganforge.training.engine import Engine
from ganforge.training.gan import load_checkpoint
from ganforge.training.monitor import Monitor, Thresholds
from ganforge.training.remedies import BestWeights, transplant
from ganforge.training.reports import write_run_report
from ganforge.training.task import RunConfig, Task, option


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
    # the knobs of D's side the doctor turns (set here to start a run with them)
    label_smoothing: float = option(0.0, "real label = 1 - this (Salimans et al., 2016)", min=0, below=0.5)
    label_flip: float = option(0.0, "share of D's real and fake labels flipped at random (noisy labels)",
                               min=0, below=0.5)
    instance_noise: float = option(0.0, "std of Gaussian noise on D's inputs (Sønderby et al., 2017)", min=0)
    d_steps_every: int = option(1, "D is updated on every N-th step only (1: every step)", min=1)


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


# latents and held-out reals behind the FD the doctor keeps the best weights by (ShippedFD)
JUDGED = 256


class ShippedFD:
    """The FD of the generator that ships (ProGAN's weight average G_ema, at the final
    resolution; the DCGAN's G in eval mode) on `len(z)` fixed latents against as many held-out
    reals: what the doctor keeps the best weights by when that generator is not the G it
    watches, or when the monitor's pooled pixels are blind to what matters (the shapes).

    The features: on the bundled shapes, the shapes classifier's (training/metrics.py, cached
    after its first use), which see a shape's outline; elsewhere the monitor's pooled pixels.
    On the shapes, a ProGAN's outlines can drain into circles while the watched G's pooled FD
    keeps improving (docs/doctor.md)."""

    def __init__(self, generate, reals: np.ndarray, z: torch.Tensor, data: str):
        self.generate, self.z, self.data = generate, z, data
        self.reals = reals
        self.classifier = None
        self.real_features: np.ndarray | None = None
        space = "shapes-classifier" if data == "shapes" else "pooled-pixel"
        self.name = f"FD of the shipped G, {space} features, {len(z)} samples"

    def _features(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        from ganforge.training import metrics, monitor

        if self.data != "shapes":
            return monitor.features(to_tensor(x) if isinstance(x, np.ndarray) else x)
        return metrics.features(self.classifier, x)

    def _load(self) -> None:
        """The classifier, trained on its first use (about a minute) with its own seed: the
        run's random streams and its no-grad measurement are left as they were."""
        from ganforge.training import metrics

        if self.data != "shapes" or self.classifier is not None:
            return
        with torch.random.fork_rng(), torch.enable_grad():
            self.classifier = metrics.load_classifier(s=metrics.settings_for(self.reals.shape[1]))[0]

    def __call__(self) -> float:
        from ganforge.training.metrics import frechet_distance

        self._load()
        with torch.no_grad():
            if self.real_features is None:
                self.real_features = self._features(self.reals)
            fake = torch.cat([self.generate(self.z[i:i + 128]).float().cpu() for i in range(0, len(self.z), 128)])
            return float(frechet_distance(self._features(fake.clamp(-1, 1)), self.real_features))


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
        # what the best weights are judged by when the network that ships is not the one the
        # monitor watches (set by the task: ProGAN's G_ema); None: the monitor's FD
        self.judge: ShippedFD | None = None
        # called with the kept weights' `aside` when they are put back (set by the task)
        self.on_keep = None
        # every observation and every rewind, in order: a resumed run replays them to the same
        # diagnoses, including those of steps a restart abandoned
        self.timeline: list[dict] = []

    def due(self, step: int) -> bool:
        return self.cfg.doctor != "off" and self.monitor.due(step)

    def observe(self, step: int, D, G_sample, trainer, network: dict, extra: dict | None = None,
                nets: dict | None = None, aside: dict | None = None) -> dict:
        """Measure, diagnose, remedy (auto). With `nets` (auto mode): keep the weights of the
        lowest `quality()` (with `aside`, the task's state that goes with them), and at the
        run's last step put them back when the last weights are measurably worse
        (remedies.KEEP_MARGIN)."""
        found = self.doctor.observe(step, D, G_sample, trainer, network, extra)
        self.timeline.append(self.monitor.last)
        row = {k: v for k, v in self.monitor.last.items() if k != "step"}
        if found:
            row["diagnoses"] = [d.failure for d in found]
            done = [i for i in self.doctor.interventions if i.step == step]
            if done:
                row["interventions"] = {i.knob: i.new for i in done if i.action == "set"}
        if self.cfg.doctor == "auto" and nets is not None:
            fd = self.quality()
            if self.judge is not None:
                row["shipped_fd"] = round(fd, 5)
            self.best.offer(step, fd, nets, aside)
            if step >= self.cfg.steps:
                kept = self.keep_best(step, nets, fd)
                if kept:
                    row["kept_step"] = kept["step"] if kept["kept"] else int(step)
        return row

    def quality(self) -> float | None:
        """The figure the best weights are kept by (lower is better): the judge's when the task
        set one (`ShippedFD`), else the FD of the latest observation."""
        return self.judge() if self.judge is not None else self.monitor.last.get("fd")

    def keep_best(self, step: int, nets: dict, fd: float | None = None) -> dict | None:
        """At the end of a run: the best weights put back into `nets` when the last ones,
        measured `fd` (default: `quality()` now), are measurably worse (remedies.KEEP_MARGIN);
        the decision, or None when there is nothing to decide (not auto mode, nothing kept)."""
        if self.cfg.doctor != "auto" or self.best.step is None:
            return None
        fd = self.quality() if fd is None else fd
        kept = self.best.better_than(fd)
        if kept:
            self.best.restore(nets)
            if self.on_keep is not None:
                self.on_keep(self.best.aside)
        self.doctor.kept = {"step": self.best.step, "fd": round(self.best.fd, 5),
                            "final_step": int(step), "final_fd": fd, "kept": kept,
                            **({"measure": self.judge.name} if self.judge is not None else {})}
        self.log(render_kept(self.doctor.kept))
        return self.doctor.kept

    def take_restart(self) -> dict | None:
        """A network change the doctor decided (auto mode), once; None otherwise."""
        return self.doctor.take_restart() if self.cfg.doctor == "auto" else None

    def restarted(self, decision: dict) -> None:
        """After a restart rewound to `decision["from_step"]`: the records of the abandoned steps
        dropped (metrics.jsonl keeps them), every detector re-armed (`Monitor.restarted`), the
        best weights forgotten (their networks had other shapes)."""
        back = decision["from_step"]
        self.monitor.rewind(back)
        self.timeline.append({"rewound_to": back})
        self.best.reset()
        self.doctor.restarted(decision, back)

    def state(self) -> dict:
        return {"records": self.monitor.records, "timeline": self.timeline,
                "interventions": [dataclasses.asdict(i) for i in self.doctor.interventions],
                "restarts": self.doctor.restarts, "best": self.best.to_state()}

    def load_state(self, state: dict, stages: list[dict] | None = None) -> None:
        """Take the records and interventions of `state()` back (a resumed run); `stages`
        (ProGAN): the records are diagnosed again stage by stage."""
        if state:
            self.timeline = list(state.get("timeline", state.get("records", [])))
            self.monitor.replay(self.timeline, stages)
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
    """What every adversarial task shares, so every one takes the doctor's remedies:

    - `self.watch`, a GANDoctor built in `setup`, and its state carried by checkpoints;
    - D's loss with the label knobs (`d_loss`: smoothing and random flips), instance noise on
      D's inputs (`_noisy`), D sitting out all but every `d_steps_every`-th step (`d_grad`,
      `update_d`), dropout in D (`remedies.dropout_control`: D's own, or inserted);
    - the knobs the doctor turns (`knobs` / `set_knob`), less those in `fixed_knobs`;
    - a restart with changed networks (`rebuild`): the task's `build` makes G, D, their
      wrappers and optimizers from `cfg.network`; `sizes` maps the doctor's names (ndf, ngf,
      z_dim, mbstd, pack) to its config fields; `rebuilt` refreshes what depends on them.

    A subclass sets `self.G`, `self.D`, `self.opt_G`, `self.opt_D`, `self.nets`, `self.opts`
    and `self.d_drop` in `build`, and calls `self.plan_rewind()` in `setup`."""

    can_restart = True
    sizes: dict[str, str] = {}              # the doctor's name -> the field of cfg.network
    fixed_knobs: frozenset[str] = frozenset()

    def __init__(self, cfg: GANOptions):
        # the doctor turns knobs and resizes networks in the task's own copy: the caller's
        # config (and train.json, written from it) keeps the settings the run was started with
        super().__init__(copy.deepcopy(cfg))

    # -- D's side --
    def _noisy(self, x: torch.Tensor, eng: Engine) -> torch.Tensor:
        """x plus the instance noise on D's inputs (--instance-noise)."""
        if not self.cfg.instance_noise:
            return x
        return x + self.cfg.instance_noise * eng.randn(x.shape[0], *x.shape[1:])

    def d_targets(self, logit_real: torch.Tensor, logit_fake: torch.Tensor,
                  eng: Engine) -> tuple[torch.Tensor, torch.Tensor]:
        """D's targets: reals 1 - label_smoothing, fakes 0; with --label-flip a share of each
        side's items (all of an item's patches) swapped, drawn so the ranks agree."""
        cfg = self.cfg
        real = torch.full_like(logit_real, 1.0 - cfg.label_smoothing)
        fake = torch.zeros_like(logit_fake)
        if cfg.label_flip:
            n = logit_real.shape[0]
            shape = (n,) + (1,) * (logit_real.dim() - 1)
            real = torch.where((eng.rand(n) < cfg.label_flip).view(shape), torch.zeros_like(real), real)
            fake = torch.where((eng.rand(n) < cfg.label_flip).view(shape),
                               torch.full_like(fake, 1.0 - cfg.label_smoothing), fake)
        return real, fake

    def d_loss(self, logit_real: torch.Tensor, logit_fake: torch.Tensor, eng: Engine) -> torch.Tensor:
        """D's logistic loss, BCE(real, target) + BCE(fake, target), with the label knobs."""
        real, fake = self.d_targets(logit_real, logit_fake, eng)
        return (F.binary_cross_entropy_with_logits(logit_real, real)
                + F.binary_cross_entropy_with_logits(logit_fake, fake))

    def d_turn(self, eng: Engine) -> bool:
        """Whether D is updated at this step (--d-steps-every)."""
        return eng.step % self.cfg.d_steps_every == 0

    def d_grad(self, eng: Engine):
        """The context D's loss is computed in: no graph on the steps D sits out."""
        return contextlib.nullcontext() if self.d_turn(eng) else torch.no_grad()

    def update_d(self, loss: torch.Tensor, eng: Engine, **kw) -> None:
        if self.d_turn(eng):
            eng.update(loss, self.opt_D, **kw)

    # -- the doctor --
    def doctor_due(self, step: int) -> bool:
        return self.watch.due(step)

    def network_sizes(self) -> dict:
        """The network's sizes in the doctor's names, for its restart decisions."""
        return {name: getattr(self.cfg.network, field) for name, field in self.sizes.items()}

    def knobs(self) -> dict:
        cfg = self.cfg
        k = {"label_smoothing": cfg.label_smoothing, "label_flip": cfg.label_flip,
             "instance_noise": cfg.instance_noise, "d_dropout": self.d_drop.dropout,
             "lr_g": self.opt_G.param_groups[0]["base_lr"], "lr_d": self.opt_D.param_groups[0]["base_lr"],
             "d_steps_every": cfg.d_steps_every}
        return {name: v for name, v in k.items() if name not in self.fixed_knobs}

    def set_knob(self, name: str, value: float) -> None:
        if name in self.fixed_knobs:
            raise KeyError(name)
        if name in ("label_smoothing", "label_flip", "instance_noise"):
            setattr(self.cfg, name, value)
        elif name == "d_steps_every":
            self.cfg.d_steps_every = int(value)
        elif name in ("lr_g", "lr_d"):
            for g in (self.opt_G if name == "lr_g" else self.opt_D).param_groups:
                g["lr"] = g["base_lr"] = value
        elif name == "d_dropout":
            self.d_drop.set_dropout(value)
        else:
            raise KeyError(name)

    def extra_state(self) -> dict:
        return {"knobs": self.knobs(), "doctor": self.watch.state()}

    def load_extra_state(self, state: dict) -> None:
        known = self.knobs()    # a checkpoint may hold knobs this task no longer turns
        for k, v in state.get("knobs", {}).items():
            if k in known:
                self.set_knob(k, v)
        self.watch.load_state(state.get("doctor", {}))

    # -- a restart with changed networks --
    def plan_rewind(self) -> None:
        """In auto mode, keep the checkpoints that cover a failure's streak and one before it."""
        cfg = self.cfg
        if cfg.doctor == "auto":
            th = cfg.thresholds
            self.rewind_keep = min(8, math.ceil((th.patience + 1) * cfg.doctor_every / cfg.checkpoint_every) + 1)

    def trained_network(self, eng: Engine):
        """On resume, the network config the checkpoint was trained with (a restart's changes
        included); else the configured one."""
        if eng.resume and eng.checkpoint_path().is_file():
            saved = load_checkpoint(eng.checkpoint_path(), (self.kind,))["config"]
            return type(self.cfg.network)(**saved)
        return self.cfg.network

    def build(self, eng: Engine, lr_g: float, lr_d: float) -> None:
        raise NotImplementedError

    def start(self, eng: Engine, lr_g: float, lr_d: float) -> None:
        """The first part of every GAN's setup: the networks the run had (a restart's, on
        resume), the checkpoints kept to rewind to, then the networks built from the run's seed."""
        self.cfg.network = self.trained_network(eng)
        self.plan_rewind()
        torch.manual_seed(self.cfg.seed)
        self.build(eng, lr_g, lr_d)

    def resized(self, changes: dict):
        """cfg.network with the doctor's `changes` (its names) applied."""
        return dataclasses.replace(self.cfg.network, **{self.sizes[k]: v for k, v in changes.items()})

    def rebuilt(self, eng: Engine, payload: dict) -> None:
        """After `rebuild`: refresh what depends on the networks' sizes (latents for a new z)."""

    def carried(self, name: str, state: dict, saved: dict) -> dict:
        """The checkpoint's tensors of network `name`, keyed as the rebuilt network's layers they
        go to (`saved`: the checkpoint's network config). Here unchanged: a task whose restarts
        change a network's depth renames them layer by layer."""
        return state

    def restart_decision(self) -> dict | None:
        return self.watch.take_restart()

    def rebuild(self, eng: Engine, payload: dict, decision: dict) -> None:
        """G and D with the decided changes, filled from the checkpoint `payload` where shapes
        allow (remedies.transplant); new optimizers at the current learning rates; the knobs kept."""
        lr_g, lr_d = self.opt_G.param_groups[0]["base_lr"], self.opt_D.param_groups[0]["base_lr"]
        dropout = self.d_drop.dropout
        self.cfg.network = self.resized(decision["changes"])
        # the fresh parts drawn from the run's seed and the step decided at, not from wherever the
        # global RNG stands: a run resumed from SIGTERM rebuilds the same networks
        torch.manual_seed(self.cfg.seed + 7 * int(decision["step"]) + 1)
        self.build(eng, lr_g, lr_d)
        for name, net in self.nets.items():
            transplant(net, self.carried(name, payload["state"][name], payload["config"]))
        self.d_drop.set_dropout(dropout)
        self.rebuilt(eng, payload)
        if eng.main:
            self.watch.restarted(decision)


def describe_doctor(s: dict) -> list[str]:
    if s.get("doctor_mode", "off") == "off":
        return []
    cfg_doctor = s.get("doctor_mode", "")
    return [f"doctor{f' ({cfg_doctor})' if cfg_doctor else ''}: diagnoses {', '.join(s['diagnoses']) or 'none'}; "
            f"{s['interventions']} interventions; report {Path(s['checkpoint']).parent / 'doctor.md'}"]
