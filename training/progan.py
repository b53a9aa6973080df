"""Progressive GAN (Karras et al., 2018) training: the stage schedule, the Task and a trainer
stepped by its caller. G and D grow from 4x4 to the target resolution; the networks, their
fade-in and the config they are built from are in progan_nets.py.

Training is a Task of the engine (engine.py): the stage schedule sets (stage, alpha) from the
images shown before each step (`before_step`), G's weight average G_ema follows G after each
step (`after_step`). A run directory is laid out as training/loop.py's (checkpoint.pt,
train.json, metrics.jsonl, samples/, scores.png, doctor.md, doctor.json); the checkpoint also
records images shown, the stage and alpha the next step trains at, the doctor's records and
knobs and the stages, so `--resume` continues mid-stage (with a larger `--steps`, a longer run).

The training doctor (training/monitor.py) runs per stage: every `doctor_every` steps and at the
last step of each stage, s_G and s_D are measured on a fixed held-out batch (64 real images at
full resolution, brought to the current stage's side and blended at the current alpha exactly
as the training batches are, and 64 fixed latents through G at the current stage and alpha).
Each stage is a phase of the monitor: its detectors are re-armed when a stage begins and "G
dominates early" is judged from the stage's start; mode collapse is judged after
`collapse_after` of the whole run, as for every GAN (only the run's start is random). In auto
mode the on-the-fly remedies (label smoothing, instance noise, the learning rates; D has no
dropout) go through `knobs()` / `set_knob()`; a larger z_dim is a restart decision.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ganforge.errors import CheckpointError
from ganforge.images import save_grid
from ganforge.training import data as tdata
from ganforge.training.ema import averaged_copy, ema_beta, update_average
from ganforge.training.engine import Engine
from ganforge.training.gan import load_checkpoint
from ganforge.training.loop import GANTrainer
from ganforge.training.gan_task import (JUDGED, GANDoctor, GANOptions, GANTask, ShippedFD, check_flags,
                                        fixed_latents, held_out_reals, to_tensor, to_uint8)
from ganforge.training.models import ModelSpec
from ganforge.training.monitor import follow_stages
from ganforge.training.progan_nets import DBlock, Discriminator, Generator, ProGANConfig, Upsampled, lerp
from ganforge.training.remedies import dropout_control
from ganforge.training.task import option


@dataclass
class ProGANTrainConfig(GANOptions):
    """Progressive GAN training: the engine's settings, the doctor's, and these."""
    data: str = option("shapes", "shapes, stacked_digits, photos, a folder of images, or a .txt / "
                       ".jsonl list of image paths (streamed)")
    n_images: int = option(8192, "images made for a bundled set (shapes, stacked_digits, photos)", min=2)
    steps: int = option(1000, "optimizer steps of D and G each, over all stages", min=1)
    batch_size: int = option(32, "global batch size, the same at every stage, split evenly across the "
                             "ranks", min=2)
    log_every: int = option(10, "steps between metrics.jsonl rows", min=1)
    sample_every: int = option(100, "steps between sample grids", min=1)
    lr: float = option(1e-3, "Adam learning rate of G and D (the paper's; equalized LR makes it safe)", min=0)
    beta1: float = option(0.0, "Adam beta1 (the paper's 0)", min=0, below=1)
    beta2: float = option(0.99, "Adam beta2", min=0, below=1)
    stable_images: int = option(12800, "images shown per stable phase (the last stage: until --steps)", min=1)
    fade_images: int = option(12800, "images shown while a new stage fades in (alpha 0 -> 1)", min=1)
    r1_gamma: float = option(1.0, "R1 penalty on D's gradients at real images (0: off)", min=0)
    r1_every: int = option(8, "steps between R1 penalties (lazy regularisation)", min=1)
    ema_images: int = option(10_000, "half-life in images of G's weight average, which samples and "
                             "export use (0: none)", min=0)
    ema_rampup: float = option(0.05, "the half-life is at most this share of the images shown since "
                               "a block first trained", min=0)
    label_smoothing: float = option(0.0, "real target 1 - this (the doctor's knob; Salimans et al., "
                                    "2016)", min=0, below=0.5)
    instance_noise: float = option(0.0, "std of Gaussian noise on D's inputs (the doctor's knob)", min=0)
    network: ProGANConfig = option(default_factory=ProGANConfig)

    def validate(self) -> None:
        check_flags(self, {"--lr": (self.lr, self.lr > 0, "> 0"),
                           "--ema-rampup": (self.ema_rampup, self.ema_rampup > 0, "> 0")})


def schedule(shown: int, n_stages: int, stable_images: int, fade_images: int) -> tuple[int, float]:
    """(stage, alpha) after `shown` images: stage 0 stable, then per new stage a fade-in
    (alpha 0 -> 1) and a stable phase; the last stage stays until training ends."""
    t = shown - stable_images
    stage = 0
    while t >= 0 and stage < n_stages - 1:
        stage += 1
        if t < fade_images:
            return stage, t / fade_images
        t -= fade_images + stable_images
    return stage, 1.0


def stage_birth(stage: int, stable_images: int, fade_images: int) -> int:
    """The images shown when `stage`'s block first trains: the start of its fade-in (0 for
    stage 0)."""
    return 0 if stage == 0 else stable_images + (stage - 1) * (fade_images + stable_images)


def stage_spans(cfg: ProGANTrainConfig, steps: int | None = None, resumed: tuple[int, int] = (0, 0),
                past: list[dict] | None = None) -> list[dict]:
    """The stages a run of `steps` (default cfg.steps) trains, as the doctor reports them:
    {"stage", "side", "start", "end", "fade_end"}, the first and last step trained at the stage
    (steps count from 1; step s trains at the schedule of the images shown before it) and the
    last step of its fade-in (None for stage 0). `resumed`: (step, images shown) of the
    checkpoint a resumed run continues from, the steps after it showing `cfg.batch_size` images
    each; the steps up to it are `past`, the spans the checkpoint recorded, or without them are
    taken to have shown the same number of images each."""
    steps = cfg.steps if steps is None else steps
    net, B = cfg.network, cfg.batch_size
    step0, shown0 = resumed
    b0 = shown0 // step0 if step0 else B
    spans: list[dict] = []
    if past is not None:
        for span in past:
            if span["start"] <= step0:
                fade = span["fade_end"]
                spans.append({**span, "end": min(span["end"], step0),
                              "fade_end": None if fade is None else min(fade, step0)})
    for s in range(step0 + 1 if past is not None else 1, steps + 1):
        shown = (s - 1) * b0 if s <= step0 else shown0 + (s - 1 - step0) * B
        stage, alpha = schedule(shown, net.n_stages, cfg.stable_images, cfg.fade_images)
        if not spans or spans[-1]["stage"] != stage:
            spans.append({"stage": stage, "side": net.side(stage), "start": s, "end": s, "fade_end": None})
        spans[-1]["end"] = s
        if alpha < 1.0:
            spans[-1]["fade_end"] = s
    return spans


def to_stage(x: torch.Tensor, side: int, alpha: float) -> torch.Tensor:
    """Full-resolution reals (B, C, R, R) brought to the stage's side and, during a fade-in,
    blended like G's output: the lower-resolution version, upsampled, towards the sharp one."""
    if x.shape[-1] != side:
        x = F.adaptive_avg_pool2d(x, side)                           # (B, C, s, s)
    if alpha < 1.0:
        low = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
        x = lerp(low, x, alpha)
    return x


class ProGANTask(GANTask):
    """Non-saturating logistic loss with lazy R1 on D, one D and one G step per iteration; the
    schedule sets (stage, alpha) from the images shown before each step."""

    kind = "progan"
    # restarts: a larger z; D's (ndf) or G's (ngf) width at the top sides, where the maps are fewest
    sizes = {"z_dim": "z_dim", "ndf": "d_fmap_min", "ngf": "fmap_min"}

    def __init__(self, cfg: ProGANTrainConfig, progress: bool = True):
        super().__init__(cfg)
        self.progress = progress
        self.shown = 0                                # images shown, over all ranks
        self.spans = stage_spans(cfg)
        self.resumed_from: int | None = None

    def setup(self, eng: Engine) -> None:
        cfg, dev = self.cfg, eng.device
        if eng.resume and eng.checkpoint_path().is_file():
            saved = load_checkpoint(eng.checkpoint_path(), ("progan",))
            trained, restarts = saved["config"], saved.get("resume", {}).get("task", {}).get("doctor", {})
            if trained != dataclasses.asdict(cfg.network) and not restarts.get("restarts"):
                raise CheckpointError(f"--resume: {eng.checkpoint_path()} was trained with network {trained}, "
                                      f"not {dataclasses.asdict(cfg.network)}")
            cfg.network = ProGANConfig(**trained)      # a restart's networks, when the doctor made one
        net = cfg.network
        self.eng = eng
        self.plan_rewind()
        torch.manual_seed(cfg.seed)
        self.build(eng, cfg.lr, cfg.lr)
        self.data = tdata.gan_images(cfg.data, cfg.n_images, net.resolution, cfg.seed)
        self._latents(dev)
        # the doctor's fixed held-out batch at full resolution (`held_at_stage` brings it to the
        # stage)
        self.held_real = to_tensor(held_out_reals(cfg, self.data, net.resolution)).to(dev)   # (64, C, R, R)
        self.step_index = 0
        self.set_stage()
        self.watch = GANDoctor(cfg, self.held_at_stage(), self.held_z, log=self.progress and eng.main)
        if cfg.doctor == "auto" and self.G_ema is not None:
            # the best weights are those whose G_ema, what samples and export use, is best
            self.watch.judge = ShippedFD(self.generate, held_out_reals(cfg, self.data, net.resolution, n=JUDGED),
                                         fixed_latents(net.z_dim, cfg.seed + 3, n=JUDGED).to(dev),
                                         cfg.data if not tdata.is_streamed(cfg.data) else "folder")
        self.watch.on_keep = self._kept

    def build(self, eng: Engine, lr_g: float, lr_d: float) -> None:
        cfg, net = self.cfg, self.cfg.network
        self.G, self.D = Generator(net), Discriminator(net)
        # G's exponential moving average (Karras et al. 2018, sec. A.1; half-life and ramp-up as
        # in StyleGAN2): what samples, the benchmark and export use; the doctor watches G itself
        self.G_ema = averaged_copy(self.G).to(eng.device) if cfg.ema_images else None
        # the blocks of stages not yet grown take no part in a step
        self.G_train, self.D_train = eng.wrap(self.G, find_unused=True), eng.wrap(self.D, find_unused=True)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas)
        self.nets = {"G": self.G, "D": self.D, **({"G_ema": self.G_ema} if self.G_ema is not None else {})}
        self.opts = {"G": self.opt_G, "D": self.opt_D}
        # D's activations are functional: dropout goes after each of its blocks, and after the
        # final block's conv and dense layer (before their leaky ReLU, which commutes with it)
        final = self.D.blocks[0]
        self.d_drop = dropout_control(self.D, [*(m for m in self.D.modules() if isinstance(m, DBlock)),
                                               final.conv, final.dense])

    def _latents(self, dev) -> None:
        z_dim, seed = self.cfg.network.z_dim, self.cfg.seed
        self.fixed_z = fixed_latents(z_dim, seed + 1).to(dev)
        self.held_z = fixed_latents(z_dim, seed + 2).to(dev)

    def network_sizes(self) -> dict:
        net = self.cfg.network
        return {"z_dim": net.z_dim, "ndf": net.d_fmap_min or net.fmap_min, "ngf": net.fmap_min}

    def resized(self, changes: dict) -> ProGANConfig:
        net = self.cfg.network
        if "ngf" in changes and "ndf" not in changes:   # G's minimum width grows; D keeps its own
            changes = {**changes, "ndf": net.d_fmap_min or net.fmap_min}
        return super().resized(changes)

    def rebuilt(self, eng: Engine, payload: dict) -> None:
        """Back to the images shown at the checkpoint rewound to; new latents for a new z."""
        self.shown = int(payload["shown"])
        self.set_stage()
        self._latents(eng.device)
        self.watch.monitor.z = self.held_z
        self.watch.monitor.set_real(self.held_at_stage())
        if self.watch.judge is not None:
            self.watch.judge.z = fixed_latents(self.cfg.network.z_dim, self.cfg.seed + 3, n=JUDGED).to(eng.device)

    def dataset(self):
        return self.data

    # -- the schedule and the weight average --

    def set_stage(self) -> None:
        """G, D and G_ema to the (stage, alpha) of the images shown so far."""
        cfg = self.cfg
        stage, alpha = schedule(self.shown, cfg.network.n_stages, cfg.stable_images, cfg.fade_images)
        for net in (self.G, self.D, self.G_ema):
            if net is not None:
                net.stage, net.alpha = stage, alpha

    @property
    def stage(self) -> int:
        return self.G.stage

    @property
    def alpha(self) -> float:
        return self.G.alpha

    def before_step(self, step: int, eng: Engine) -> None:
        self.step_index = step
        self.set_stage()

    def after_step(self, step: int, eng: Engine) -> None:
        self.shown += self.cfg.batch_size
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """G_ema <- beta G_ema + (1 - beta) G, stage by stage: beta = 0.5 ** (batch / half-life),
        the half-life capped at `ema_rampup` of the images shown since the stage's block first
        trained. A block born at a fade-in is in its first, fastest-moving steps, as the whole
        net is at step 0; averaged over the run's images instead, its copy in G_ema would lag
        the block being faded in by a half-life as long as the fade itself. Blocks not yet
        trained are copied (they equal G's initial ones)."""
        if self.G_ema is None:
            return
        cfg = self.cfg
        for k in range(cfg.network.n_stages):
            since = max(self.shown - stage_birth(k, cfg.stable_images, cfg.fade_images), 0)
            beta = ema_beta(cfg.batch_size, since, cfg.ema_images, cfg.ema_rampup)
            update_average(self.G_ema.blocks[k], self.G.blocks[k], beta)
            update_average(self.G_ema.to_rgb[k], self.G.to_rgb[k], beta)

    # -- the step --

    def held_at_stage(self) -> torch.Tensor:
        """The doctor's held-out reals at the current stage and alpha, as a training batch is."""
        return to_stage(self.held_real, self.cfg.network.side(self.stage), self.alpha)

    def step(self, batch: torch.Tensor, eng: Engine) -> dict:
        cfg = self.cfg
        x = to_stage(to_tensor(batch), cfg.network.side(self.stage), self.alpha)   # (B, C, s, s)
        z = eng.randn(x.shape[0], cfg.network.z_dim)
        r1 = cfg.r1_gamma > 0 and self.step_index % cfg.r1_every == 0
        if r1:
            x.requires_grad_(True)
        r1 = r1 and self.d_turn(eng)
        with eng.autocast():
            fake = self.G_train(z)
        with self.d_grad(eng), eng.autocast():
            logit_real = self.D_train(self._noisy(x, eng)).float()
            logit_fake = self.D_train(self._noisy(fake.detach(), eng)).float()
            # the logistic loss, softplus(-real) + softplus(fake), with the label knobs
            loss_D = self.d_loss(logit_real, logit_fake, eng)
            if r1:
                (grad,) = torch.autograd.grad(logit_real.sum(), x, create_graph=True)
                penalty = grad.float().pow(2).sum(dim=(1, 2, 3)).mean()
                loss_D = loss_D + 0.5 * cfg.r1_gamma * cfg.r1_every * penalty
        self.update_d(loss_D, eng)
        with eng.autocast():
            loss_G = F.softplus(-self.D_train(self._noisy(fake, eng)).float()).mean()
        eng.update(loss_G, self.opt_G)
        return {"loss_D": loss_D.detach(), "loss_G": loss_G.detach(),
                "D_real": torch.sigmoid(logit_real.detach()).mean(),
                "D_fake": torch.sigmoid(logit_fake.detach()).mean(),
                "shown": self.shown + cfg.batch_size, "stage": self.stage,
                "side": cfg.network.side(self.stage), "alpha": round(self.alpha, 4)}

    def status(self, row: dict) -> str:
        losses = f" loss_D {row['loss_D']:.3f} loss_G {row['loss_G']:.3f}" if "loss_D" in row else ""
        return f"{self.cfg.network.side(self.stage)}px a={self.alpha:.2f}{losses}"

    # -- the doctor --

    @property
    def stage_ends(self) -> set[int]:
        return {span["end"] for span in self.spans}

    def doctor_due(self, step: int) -> bool:
        return self.watch.due(step) or (self.cfg.doctor != "off" and step in self.stage_ends)

    def doctor_observe(self, step: int) -> dict:
        # D and G at the stage and alpha step `step` trained at; the held reals likewise
        follow_stages(self.watch.monitor, self.spans, step)
        self.watch.monitor.set_real(self.held_at_stage())
        extra = {"stage": self.stage, "side": self.cfg.network.side(self.stage), "alpha": round(self.alpha, 4)}
        # the best weights are those of the final stage, its fade-in included, kept with the
        # images shown (hence the alpha that G_ema blends at): the judge measures G_ema at the
        # final resolution at any alpha. Without a judge the monitor's FD is measured at the
        # stage's side and blend, so only the faded-in final stage compares.
        final = self.stage == self.cfg.network.n_stages - 1 and (self.watch.judge is not None or self.alpha >= 1.0)
        return self.watch.observe(step, self.D, self.G, self, self.network_sizes(), extra,
                                  nets=self.nets if final else None, aside={"shown": self.shown})

    def _kept(self, aside: dict) -> None:
        """The best weights put back: back to the images shown with them, so that G_ema (and
        the exported G) blends at their alpha."""
        if "shown" in aside:
            self.shown = int(aside["shown"])
            self.set_stage()

    # -- checkpoints --

    def checkpoint_fields(self) -> dict:
        """Images shown and the (stage, alpha) the next step trains at: export builds G there."""
        cfg = self.cfg
        stage, alpha = schedule(self.shown, cfg.network.n_stages, cfg.stable_images, cfg.fade_images)
        return {"shown": self.shown, "stage": stage, "alpha": float(alpha)}

    def extra_state(self) -> dict:
        return {"shown": self.shown, "stages": self.spans, "knobs": self.knobs(), "doctor": self.watch.state()}

    def load_extra_state(self, state: dict) -> None:
        """Continue mid-stage: images shown, the stages trained so far (with the steps still to
        come at this run's batch size), the knobs and the doctor's observations, diagnosed again
        stage by stage (the same detector state as if the run had not stopped)."""
        step = self.eng.step
        self.shown, self.resumed_from = int(state["shown"]), step
        self.spans = stage_spans(self.cfg, max(self.cfg.steps, step), resumed=(step, self.shown),
                                 past=state.get("stages"))
        for k, v in state.get("knobs", {}).items():
            self.set_knob(k, v)
        self.watch.load_state(state.get("doctor", {}), self.spans)
        self.set_stage()

    # -- pictures and the end of the run --

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """The output of G_ema (G without one) upsampled to the final resolution, float NCHW."""
        if self.G_ema is not None:
            return Upsampled(self.G_ema)(z)
        self.G.eval()
        try:
            return Upsampled(self.G)(z)
        finally:
            self.G.train()

    def samples(self) -> np.ndarray:
        return to_uint8(self.generate(self.fixed_z))

    def finish(self, out: Path, eng: Engine) -> dict:
        self.set_stage()     # the stage and alpha the checkpoint records
        cfg = self.cfg
        grid = save_grid(self.samples(), out / "samples.png", nrow=8)
        title = f"progan on {cfg.data}, {eng.step} steps, {cfg.network.resolution} px"
        report = self.watch.report(out, title, stages=self.spans)
        return {"samples": str(grid), "stage": self.stage, "side": cfg.network.side(self.stage),
                "alpha": self.alpha, "shown": self.shown, "resumed_from": self.resumed_from, **report,
                "diagnoses": [(d.failure, d.evidence.get("stage")) for d in self.watch.monitor.diagnoses]}


def train_progan(cfg: ProGANTrainConfig, out: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Train (or with `resume`, continue) a Progressive GAN in run directory `out`; return the
    engine's summary."""
    return Engine(cfg, out, progress=progress, resume=resume).fit(ProGANTask(cfg, progress))


class ProGANTrainer(GANTrainer):
    """A ProGAN stepped by its caller (`ganforge bench progan` interleaves it with a DCGAN on a
    time budget): the same task and engine as `train_progan`, one step per `train_step()`."""

    task_class = ProGANTask

    @property
    def stage(self) -> int:
        return self.task.stage

    @property
    def alpha(self) -> float:
        return self.task.alpha

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """G_ema's images (G's without one) at the final resolution for latents `z`, on the CPU."""
        return self.task.generate(z.to(self.engine.device)).cpu()


def _describe(s: dict) -> list[str]:
    lines = [f"grown to stage {s['stage']}, {s['side']} px, alpha {s['alpha']:.2f}"
             + (f"; resumed from step {s['resumed_from']}" if s.get("resumed_from") is not None else "")]
    if s.get("doctor_mode", "off") != "off":
        found = ", ".join(f"{f} (stage {st})" for f, st in s["diagnoses"]) or "none"
        lines.append(f"doctor ({s['doctor_mode']}): diagnoses {found}; {s['interventions']} interventions; "
                     f"report {Path(s['checkpoint']).parent / 'doctor.md'}")
    return lines


MODEL = ModelSpec("progan", ProGANTrainConfig, train_progan, _describe)
