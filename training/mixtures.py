"""2-D Gaussian mixtures, their mode-coverage metrics, and the MLP GAN trained on them.

The published protocol (VEEGAN, Srivastava et al. 2017; PacGAN, Lin et al. 2018):
    ring  8 Gaussians evenly on the unit circle, std 0.01
    grid  25 Gaussians at {-4, -2, 0, 2, 4}^2, std 0.05
Draw 2,500 samples from G; a sample is high quality when it lies within 3 std of its nearest
mode; a mode is covered when it is the nearest mode of at least one high-quality sample.

`ganforge train mlpgan` runs `MixtureTask` on the training engine (engine.py): its training set
is `--n-points` points drawn once from the mixture (`MixturePoints`), which the engine's sampler
permutes and cuts into per-rank slices like any image set; the presets that fail on purpose are
training/presets/mlpgan/*.toml. `rejection_sample_run` samples a run's G by discriminator
rejection sampling (`ganforge bench modes`, variant doctor-auto+drs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ganforge.errors import UsageError
from ganforge.training.engine import Engine
from ganforge.training.gan import (MLPDiscriminator, MLPGANConfig, MLPGenerator, dropout_masks,
                                  load_checkpoint)
from ganforge.training.gan_task import GANDoctor, GANOptions, GANTask
from ganforge.training.models import ModelSpec
from ganforge.training.remedies import dropout_control
from ganforge.training.task import lr_factor, option

MIXTURES = ("ring", "grid")
DRS_QUANTILE = 0.95   # gamma: this quantile of F over the burn-in draws (Azadi et al. 2019, sec. 3.3)
DRS_BURN_IN = 10_000  # draws that estimate D's largest logit and gamma before any sample is kept
DRS_EPS = 1e-6


@dataclass(frozen=True)
class Mixture:
    name: str
    centres: np.ndarray  # (K, 2)
    std: float

    @property
    def n_modes(self) -> int:
        return len(self.centres)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.integers(0, self.n_modes, n)
        return (self.centres[k] + self.std * rng.standard_normal((n, 2))).astype(np.float32)

    def mode_of(self, x: np.ndarray) -> np.ndarray:
        """Nearest mode per sample, -1 where that mode is more than 3 std away."""
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)[:, :2]
        d = np.linalg.norm(x[:, None, :] - self.centres[None, :, :], axis=2)
        k = d.argmin(1)
        return np.where(d[np.arange(len(x)), k] <= 3 * self.std, k, -1)

    def nearest_mode(self, x: np.ndarray) -> np.ndarray:
        """Nearest mode per sample, -1 beyond half the spacing between modes: the doctor's
        looser evidence of which modes G reaches at all (quality aside)."""
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)[:, :2]
        d = np.linalg.norm(x[:, None, :] - self.centres[None, :, :], axis=2)
        k = d.argmin(1)
        c = self.centres
        spacing = np.linalg.norm(c[:, None] - c[None], axis=2)[~np.eye(len(c), dtype=bool)].min()
        return np.where(d[np.arange(len(x)), k] <= spacing / 2, k, -1)

    def coverage(self, x: np.ndarray) -> dict:
        """{'modes': covered modes, 'hq': share of high-quality samples}."""
        k = self.mode_of(x)
        return {"modes": int(len(np.unique(k[k >= 0]))), "hq": float((k >= 0).mean())}


def mixture(name: str) -> Mixture:
    if name == "ring":
        a = 2 * np.pi * np.arange(8) / 8
        return Mixture("ring", np.stack([np.cos(a), np.sin(a)], 1), 0.01)
    if name == "grid":
        g = np.array([-4, -2, 0, 2, 4], dtype=np.float64)
        return Mixture("grid", np.array([(x, y) for x in g for y in g]), 0.05)
    raise UsageError(f"mixture: {name!r} is not one of {', '.join(MIXTURES)}")


# ---------------------------------------------------------------------------------------------
# Training: the MLP GAN as a Task of the training engine (engine.py)

class MixturePoints(Dataset):
    """`n` points drawn once from a mixture (seeded), the training set of the MLP GAN; each item
    holds `per_item` of them (one for each D step of a training step): float32 (per_item, 2)."""

    def __init__(self, mix: Mixture, n: int, seed: int, per_item: int = 1):
        self.points = mix.sample(n - n % per_item, np.random.default_rng(seed)).reshape(-1, per_item, 2)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, key) -> tuple[np.ndarray, list]:
        index = key[0] if isinstance(key, tuple) else key
        return self.points[index], []

    def __getitems__(self, keys: list) -> list[tuple[np.ndarray, list]]:
        return [(p, []) for p in self.points[[k[0] if isinstance(k, tuple) else k for k in keys]]]


@dataclass
class MixtureTrainConfig(GANOptions):
    """MLP GAN training on a 2-D mixture: the engine's settings, the doctor's, and these."""
    data: str = option("ring", "the 2-D mixture: ring (8 Gaussians) or grid (25)", choices=MIXTURES)
    n_points: int = option(65_536, "points drawn from the mixture once per run: the training set", min=2)
    steps: int = option(1000, "optimizer steps of G (each after --d-steps steps of D)", min=1)
    batch_size: int = option(256, "global batch size, split evenly across the ranks", min=2)
    log_every: int = option(50, "steps between metrics.jsonl rows", min=1)
    lr_g: float = option(1e-3, "G's Adam learning rate", min=0)
    lr_d: float = option(1e-3, "D's Adam learning rate", min=0)
    beta1: float = option(0.5, "Adam beta1", min=0, below=1)
    beta2: float = option(0.999, "Adam beta2", min=0, below=1)
    d_steps: int = option(1, "D steps per G step, each on its own real batch", min=1)
    label_smoothing: float = option(0.0, "real label = 1 - this (Salimans et al., 2016)", min=0, below=0.5)
    instance_noise: float = option(0.0, "std of Gaussian noise on D's inputs, annealed to 0 over the run "
                                   "(Sønderby et al., 2017)", min=0)
    lr_decay: bool = option(True, "decay both learning rates linearly to --lr-floor of them at the last step")
    lr_floor: float = option(0.1, "share of the learning rates left at the last step (--lr-decay)", min=0, max=1)
    network: MLPGANConfig = option(default_factory=MLPGANConfig)

    def validate(self) -> None:
        net = self.network
        checks = {
            "--dim": (net.dim, net.dim == 2, "2 (the mixtures are 2-D)"),
            "--batch-size": (self.batch_size, self.batch_size % net.pack == 0, f"divisible by --pack {net.pack}"),
            "--n-points": (self.n_points, self.n_points // self.d_steps >= self.batch_size,
                           f">= --batch-size x --d-steps ({self.batch_size * self.d_steps})"),
        }
        for name, (value, ok, allowed) in checks.items():
            if not ok:
                raise UsageError(f"{name}: {value!r} is not allowed; must be {allowed}")


class MixtureTask(GANTask):
    """The non-saturating GAN of DCGANTask on 2-D points: --d-steps D steps, then one G step.

    In doctor auto mode a network change (PacGAN packing, a larger z_dim, other widths, a
    deeper D) restarts the run from the last checkpoint before the failure began, as for every
    GAN (GANTask.rebuild); the checkpoint then holds the new networks and their config."""

    kind = "mlpgan"
    sizes = {"z_dim": "z_dim", "ngf": "ngf", "ndf": "ndf", "pack": "pack", "d_layers": "d_layers",
             "g_layers": "g_layers"}

    def __init__(self, cfg: MixtureTrainConfig, progress: bool = True):
        super().__init__(cfg)
        self.progress = progress
        self.mix = mixture(cfg.data)

    def setup(self, eng: Engine) -> None:
        cfg = self.cfg
        self.device, self.local_batch = eng.device, eng.local_batch
        self.start(eng, cfg.lr_g, cfg.lr_d)
        self.held_real = torch.from_numpy(self.mix.sample(512, np.random.default_rng(cfg.seed + 7919))).to(eng.device)
        self.watch = GANDoctor(cfg, self.held_real, self._held_z(), log=self.progress and eng.main,
                               mode_of=self.mix.nearest_mode, n_modes=self.mix.n_modes)

    def build(self, eng: Engine, lr_g: float, lr_d: float) -> None:
        cfg, net = self.cfg, self.cfg.network
        if eng.local_batch % net.pack:
            raise UsageError(f"--batch-size: {cfg.batch_size} is not allowed on {eng.rt.world} ranks with "
                             f"--pack {net.pack}; each rank's share must divide by --pack")
        self.G, self.D = MLPGenerator(net), MLPDiscriminator(net)
        self.G_train, self.D_train = eng.wrap(self.G), eng.wrap(self.D)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas)
        for o in (self.opt_G, self.opt_D):
            for g in o.param_groups:
                g["base_lr"] = g["lr"]
        self.nets = {"G": self.G, "D": self.D}
        self.opts = {"G": self.opt_G, "D": self.opt_D}
        self.d_drop = dropout_control(self.D)

    def restart_decision(self) -> dict | None:
        decision = super().restart_decision()
        if decision and self.local_batch % decision["changes"].get("pack", 1):   # each rank's batch fills its packs
            changes = {k: v for k, v in decision["changes"].items() if k != "pack"}
            decision = {**decision, "changes": changes} if changes else None
        return decision

    def _held_z(self) -> torch.Tensor:
        """The doctor's held-out latents, for G's z_dim as it is now."""
        z = np.random.default_rng(self.cfg.seed + 7919 + 1).standard_normal((512, self.cfg.network.z_dim))
        return torch.from_numpy(z.astype(np.float32)).to(self.device)

    def rebuilt(self, eng: Engine, payload: dict) -> None:
        self.watch.monitor.z = self._held_z()     # the restarted G's z_dim may differ

    def carried(self, name: str, state: dict, saved: dict) -> dict:
        """A restart may deepen G (`g_layers`) or D (`d_layers`): hidden layer i goes to hidden
        layer i and the output layer to the output layer, the new hidden layers stay fresh.
        Both MLPs are `main` = 3 modules per hidden layer, then the output Linear."""
        depth = {"G": "g_layers", "D": "d_layers"}[name]
        old, new = 3 * saved[depth], 3 * getattr(self.cfg.network, depth)
        moved = {}
        for key, value in state.items():
            index = int(key.split(".")[1])
            if index == old:
                moved[key.replace(f"main.{old}.", f"main.{new}.", 1)] = value
            elif index < new:
                moved[key] = value
        return moved

    def dataset(self) -> MixturePoints:
        return MixturePoints(self.mix, self.cfg.n_points, self.cfg.seed, self.cfg.d_steps)

    def before_step(self, step: int, eng: Engine) -> None:
        cfg = self.cfg
        decay = 1.0 - (1.0 - cfg.lr_floor) * step / cfg.steps if cfg.lr_decay else 1.0
        factor = lr_factor(cfg.lr_schedule, step, cfg.steps) * decay
        for o in self.opts.values():
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * factor

    def _noisy(self, x: torch.Tensor, eng: Engine) -> torch.Tensor:
        s = self.cfg.instance_noise * (1.0 - eng.step / self.cfg.steps)  # annealed to 0
        return x + s * eng.randn(x.shape[0], *x.shape[1:]) if s else x

    def _judge(self, x: torch.Tensor, eng: Engine) -> torch.Tensor:
        """D's logits for this rank's points, its dropout masks drawn for the global batch."""
        with dropout_masks(self.D.noise(), x.shape[0] // self.cfg.network.pack, eng.rand):
            return self.D_train(self._noisy(x, eng)).float()

    def step(self, batch: torch.Tensor, eng: Engine) -> dict:
        # batch: (B, d_steps, 2), one real batch per D step
        n, z_dim = batch.shape[0], self.cfg.network.z_dim
        for j in range(self.cfg.d_steps):
            x = batch[:, j]
            with torch.no_grad(), eng.autocast():
                fake = self.G_train(eng.randn(n, z_dim)).float()
            with self.d_grad(eng), eng.autocast():
                loss_D = self.d_loss(self._judge(x, eng), self._judge(fake, eng), eng)
            self.update_d(loss_D, eng)
        with eng.autocast():
            logit_gen = self._judge(self.G_train(eng.randn(n, z_dim)), eng)
            loss_G = F.binary_cross_entropy_with_logits(logit_gen, torch.ones_like(logit_gen))
        eng.update(loss_G, self.opt_G)
        return {"loss_D": loss_D.detach(), "loss_G": loss_G.detach()}

    def status(self, row: dict) -> str:
        return f"loss_D {row['loss_D']:.3f} loss_G {row['loss_G']:.3f}" if "loss_D" in row else ""

    # -- the doctor --
    def doctor_observe(self, step: int) -> dict:
        return self.watch.observe(step, self.D, self.G, self, self.network_sizes())

    # -- the end --
    @torch.no_grad()
    def sample(self, n: int, seed: int) -> np.ndarray:
        """`n` points of G (eval mode) for latents seeded by `seed`."""
        return sample(self.G, n, seed)

    def finish(self, out: Path, eng: Engine) -> dict:
        cfg = self.cfg
        points = self.sample(2500, cfg.seed + 1)
        np.save(out / "samples.npy", points)
        scatter({f"{cfg.data} seed {cfg.seed}": points}, self.mix, out / "samples.png")
        return {"samples": str(out / "samples.png"), "points": str(out / "samples.npy"),
                **self.mix.coverage(points), "n_modes": self.mix.n_modes,
                "restarted": bool(self.watch.doctor.restarts),
                "restart": {k: v for r in self.watch.doctor.restarts for k, v in r["changes"].items()},
                "network": dataclasses.asdict(self.cfg.network),
                **self.watch.report(out, f"mlpgan on {cfg.data}, {eng.step} steps")}


def train_mixture(cfg: MixtureTrainConfig, out: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Train the MLP GAN on a 2-D mixture into run directory `out` (checkpoint.pt, metrics.jsonl,
    samples.npy and samples.png: 2,500 points of G, scores.png, doctor.md); return the engine's
    summary with the points' coverage (`modes`, `hq`)."""
    return Engine(cfg, out, progress=progress, resume=resume).fit(MixtureTask(cfg, progress))


@torch.no_grad()
def sample(G: MLPGenerator, n: int, seed: int) -> np.ndarray:
    """`n` points of G in eval mode, for latents seeded by `seed`; G is left in its mode."""
    mode = G.training
    G.eval()
    try:
        z = np.random.default_rng(seed).standard_normal((n, G.cfg.z_dim)).astype(np.float32)
        dev = next(G.parameters()).device
        return G(torch.from_numpy(z).to(dev)).float().cpu().numpy()
    finally:
        G.train(mode)


def load_gan(run: str | Path) -> tuple[MLPGenerator, MLPDiscriminator]:
    """G and D of an mlpgan run (or checkpoint), in eval mode, on the CPU."""
    payload = load_checkpoint(run, ("mlpgan",))
    net = MLPGANConfig(**payload["config"])
    G, D = MLPGenerator(net), MLPDiscriminator(net)
    G.load_state_dict(payload["state"]["G"])
    D.load_state_dict(payload["state"]["D"])
    return G.eval(), D.eval()


@torch.no_grad()
def rejection_sample_run(run: str | Path, n: int, seed: int,
                         quantile: float = DRS_QUANTILE) -> tuple[np.ndarray, float]:
    """`n` points of a run's G kept by discriminator rejection sampling with its D, and the
    share of G's draws that was accepted. See `rejection_sample`."""
    G, D = load_gan(run)
    return rejection_sample(G, D, G.cfg.z_dim, n, seed, quantile, pack=D.cfg.pack)


def rejection_sample(G, D, z_dim: int, n: int, seed: int, quantile: float = DRS_QUANTILE,
                     pack: int = 1, chunk: int = 5000, max_draws: int = 2_000_000) -> tuple[np.ndarray, float]:
    """Discriminator rejection sampling (Azadi et al. 2019, "Discriminator Rejection Sampling").

    At D's optimum, p_data / p_G = exp(logit D); a draw x of G is kept with probability
    sigmoid(F(x) - gamma), where F(x) = l - l_max - log(1 - exp(l - l_max - eps)) is the log
    of that ratio divided by its largest value (l_max the largest logit seen so far), and
    gamma, the `quantile` of F over the burn-in draws, shifts the acceptance up or down.
    Draws D rejects (G's samples between the modes) become rare without retraining anything;
    near D's largest logit F grows faster than the log-ratio, so the kept samples are drawn in
    somewhat tighter than the data (quality over diversity, as the paper notes). gamma is
    relative, so roughly the top (1 - quantile) of draws is always kept at least half the time.
    With a packed D (PacGAN), D judges `pack` consecutive draws at once: a pack is kept or
    dropped as a whole. Returns `n` kept samples, in draw order, and the accepted share.
    """
    if not 0.0 < quantile < 1.0:
        raise UsageError(f"quantile: {quantile} is not allowed; must be in (0, 1)")
    rng = np.random.default_rng(seed)
    chunk -= chunk % pack

    def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
        z = torch.from_numpy(rng.standard_normal((k, z_dim)).astype(np.float32))
        x = G(z)
        return x.numpy(), D(x).numpy().astype(np.float64)[::pack]  # one logit per pack

    _, burn = draw(DRS_BURN_IN - DRS_BURN_IN % pack)
    if not np.isfinite(burn).all():
        raise RuntimeError(f"rejection sampling: D gave {int((~np.isfinite(burn)).sum())} non-finite "
                           f"logits on {len(burn)} burn-in draws; it cannot rank G's samples")
    l_max = float(burn.max())

    def F(logit: np.ndarray) -> np.ndarray:
        d = logit - l_max
        return d - np.log1p(-np.exp(np.minimum(d - DRS_EPS, -DRS_EPS)))

    gamma = float(np.quantile(F(burn), quantile))
    kept, drawn, accepted = [], 0, 0
    while accepted < n:
        if drawn >= max_draws:
            raise RuntimeError(f"rejection sampling kept {accepted} of {drawn} draws, fewer than the "
                               f"{n} asked for; D rejects nearly all of G's samples")
        x, logit = draw(chunk)
        l_max = max(l_max, float(logit.max()))
        keep = rng.random(len(logit)) < 1.0 / (1.0 + np.exp(-(F(logit) - gamma)))
        keep = np.repeat(keep, pack)
        kept.append(x[keep])
        drawn += len(x)
        accepted += int(keep.sum())
    return np.concatenate(kept)[:n], accepted / drawn


def scatter(panels: dict[str, np.ndarray], mix: Mixture, path, cols: int | None = None) -> None:
    """One scatter panel per entry, the mixture's modes marked (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = cols or min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), dpi=90, squeeze=False)
    lim = 1.5 if mix.name == "ring" else 5.5
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, (title, x) in zip(axes.ravel(), panels.items()):
        ax.set_axis_on()
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.scatter(mix.centres[:, 0], mix.centres[:, 1], s=12, c="red", marker="x")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _describe(s: dict) -> list[str]:
    """The mode coverage of the run's 2,500 points, then the doctor's line."""
    from ganforge.training import loop

    lines = [f"{s['modes']} of {s['n_modes']} modes covered, {100 * s['hq']:.1f} % high-quality samples "
             f"(2,500 points of G: {s['points']})"]
    if s.get("restarted"):
        lines.append(f"the doctor restarted G and D with {', '.join(f'{k}={v}' for k, v in s['restart'].items())}")
    return lines + loop.MODEL.describe(s)


MODEL = ModelSpec("mlpgan", MixtureTrainConfig, train_mixture, _describe)
