"""2-D Gaussian mixtures, their mode-coverage metrics, and the MLP GAN trained on them.

The published protocol (VEEGAN, Srivastava et al. 2017; PacGAN, Lin et al. 2018):
    ring  8 Gaussians evenly on the unit circle, std 0.01
    grid  25 Gaussians at {-4, -2, 0, 2, 4}^2, std 0.05
Draw 2,500 samples from G; a sample is high quality when it lies within 3 std of its nearest
mode; a mode is covered when it is the nearest mode of at least one high-quality sample.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ganforge.errors import UsageError
from ganforge.training.gan import MLPDiscriminator, MLPGANConfig, MLPGenerator, save_checkpoint
from ganforge.training.monitor import DOCTOR_MODES, Doctor, Monitor, Thresholds, write_run_report

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
# Training

@dataclass
class MixtureTrainConfig:
    data: str = "ring"              # 'ring' or 'grid'
    steps: int = 3000               # D and G steps each
    batch_size: int = 256
    lr_g: float = 1e-3              # Adam
    lr_d: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999
    d_steps: int = 1                # D steps per G step
    label_smoothing: float = 0.0    # real target 1 - s (Salimans et al. 2016)
    instance_noise: float = 0.0     # std of noise added to D's inputs (Sønderby et al. 2017)
    lr_decay: bool = True           # linear decay of both learning rates to lr_floor at the end
    lr_floor: float = 0.1           # fraction of the learning rates left at the last step
    seed: int = 0
    doctor: str = "report"
    doctor_every: int = 100
    thresholds: Thresholds = field(default_factory=Thresholds)
    network: MLPGANConfig = field(default_factory=MLPGANConfig)

    def validate(self) -> None:
        mixture(self.data)
        if self.doctor not in DOCTOR_MODES:
            raise UsageError(f"--doctor: {self.doctor!r} is not one of {', '.join(DOCTOR_MODES)}")
        if self.steps < 1 or self.batch_size < 2 or self.batch_size % self.network.pack:
            raise UsageError(f"steps {self.steps}, batch_size {self.batch_size}: need steps >= 1 "
                             f"and a batch size >= 2 divisible by pack {self.network.pack}")


# Presets that reproduce each failure on purpose, and a healthy one (2-D).
MIXTURE_PRESETS: dict[str, dict] = {
    "healthy": {},
    # a much stronger, faster D: s_D -> 1, s_G -> 0
    "d-dominates": {"lr_d": 1e-2, "lr_g": 1e-5, "d_steps": 3, "network": {"ndf": 128, "ngf": 16}},
    # a crippled D that barely learns, a fast G: D fooled from the start
    "g-dominates": {"lr_d": 1e-6, "lr_g": 1e-2, "network": {"ndf": 2, "d_layers": 1}},
    # a 1-D latent and a tiny G squeezed onto few modes
    "mode-collapse": {"network": {"z_dim": 1, "ngf": 8, "g_layers": 1}, "lr_d": 3e-3},
}


def preset_config(name: str, **overrides) -> MixtureTrainConfig:
    if name not in MIXTURE_PRESETS:
        raise UsageError(f"--preset: {name!r} is not one of {', '.join(MIXTURE_PRESETS)}")
    p = dict(MIXTURE_PRESETS[name])
    net = {**p.pop("network", {}), **overrides.pop("network", {})}
    return MixtureTrainConfig(**{**p, **overrides}, network=MLPGANConfig(**net))


class MixtureTrainer:
    """The non-saturating GAN of loop.GANTrainer on 2-D points; Tunable for the doctor."""

    def __init__(self, cfg: MixtureTrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.mix = mixture(cfg.data)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.build(cfg.network)
        held = np.random.default_rng(cfg.seed + 7919)
        self.held_real = torch.from_numpy(self.mix.sample(512, held))
        self.held_z = torch.from_numpy(held.standard_normal((512, cfg.network.z_dim)).astype(np.float32))
        self.step = 0

    def build(self, net: MLPGANConfig) -> None:
        self.net = net
        self.G, self.D = MLPGenerator(net), MLPDiscriminator(net)
        betas = (self.cfg.beta1, self.cfg.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=self.cfg.lr_g, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=self.cfg.lr_d, betas=betas)
        self.lr_base = {"lr_g": self.cfg.lr_g, "lr_d": self.cfg.lr_d}

    def knobs(self) -> dict:
        return {"label_smoothing": self.cfg.label_smoothing, "instance_noise": self.cfg.instance_noise,
                "d_dropout": next(m.p for m in self.D.modules() if isinstance(m, torch.nn.Dropout)),
                "lr_g": self.lr_base["lr_g"], "lr_d": self.lr_base["lr_d"]}

    def set_knob(self, name: str, value: float) -> None:
        if name in ("label_smoothing", "instance_noise"):
            setattr(self.cfg, name, value)
        elif name in ("lr_g", "lr_d"):
            self.lr_base[name] = value
        elif name == "d_dropout":
            self.D.set_dropout(value)
        else:
            raise KeyError(name)

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        s = self.cfg.instance_noise * (1.0 - self.step / self.cfg.steps)  # annealed to 0
        return x + s * torch.randn_like(x) if s else x

    def train_step(self) -> dict:
        cfg = self.cfg
        decay = 1.0 - (1.0 - cfg.lr_floor) * self.step / cfg.steps if cfg.lr_decay else 1.0
        for g in self.opt_G.param_groups:
            g["lr"] = self.lr_base["lr_g"] * decay
        for g in self.opt_D.param_groups:
            g["lr"] = self.lr_base["lr_d"] * decay
        for _ in range(cfg.d_steps):
            x = torch.from_numpy(self.mix.sample(cfg.batch_size, self.rng))
            with torch.no_grad():
                fake = self.G(torch.randn(cfg.batch_size, self.net.z_dim))
            self.opt_D.zero_grad(set_to_none=True)
            lr_, lf = self.D(self._noisy(x)), self.D(self._noisy(fake))
            loss_D = (F.binary_cross_entropy_with_logits(lr_, torch.full_like(lr_, 1 - cfg.label_smoothing))
                      + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf)))
            loss_D.backward()
            self.opt_D.step()
        self.opt_G.zero_grad(set_to_none=True)
        lg = self.D(self._noisy(self.G(torch.randn(cfg.batch_size, self.net.z_dim))))
        loss_G = F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg))
        loss_G.backward()
        self.opt_G.step()
        self.step += 1
        return {"step": self.step, "loss_D": float(loss_D.detach()), "loss_G": float(loss_G.detach())}

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> np.ndarray:
        self.G.eval()
        try:
            z = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, self.net.z_dim)).astype(np.float32))
            return self.G(z).numpy()
        finally:
            self.G.train()

    @torch.no_grad()
    def rejection_sample(self, n: int, seed: int, quantile: float = DRS_QUANTILE) -> tuple[np.ndarray, float]:
        """`n` samples of G kept by discriminator rejection sampling; returns them and the
        share of G's draws that was accepted. See `rejection_sample`."""
        self.G.eval()
        self.D.eval()
        try:
            return rejection_sample(self.G, self.D, self.net.z_dim, n, seed, quantile, pack=self.net.pack)
        finally:
            self.G.train()
            self.D.train()


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


def train_mixture(cfg: MixtureTrainConfig, out: str | Path | None = None, log=None,
                  drs: bool = False) -> dict:
    """Train the MLP GAN on a 2-D mixture; with `out`, write a run directory (metrics.jsonl,
    scores.png, samples.png, doctor.md, checkpoint.pt). Returns the summary with 2,500 samples;
    with `drs`, also `summary["drs"]`: 2,500 samples of the same G kept by discriminator
    rejection sampling, their coverage and the accepted share.

    In doctor auto mode, a restart decision (PacGAN packing, a larger z_dim...) is acted on
    once: the networks are rebuilt with it and trained for the steps that remain."""
    cfg = dataclasses.replace(cfg)  # the doctor changes knobs on its own copy
    t = MixtureTrainer(cfg)
    mix = t.mix
    monitor = Monitor(t.held_real, t.held_z, cfg.thresholds, every=cfg.doctor_every,
                      total_steps=cfg.steps, mode_of=mix.nearest_mode, n_modes=mix.n_modes)
    doctor = Doctor(monitor, cfg.doctor, log=log)
    restarted = False
    rows = []
    t0 = time.perf_counter()
    while t.step < cfg.steps:
        row = t.train_step()
        if cfg.doctor != "off" and monitor.due(t.step):
            net = dataclasses.asdict(t.net)
            found = doctor.observe(t.step, t.D, t.G, t, {k: net[k] for k in ("z_dim", "ngf", "pack")})
            row.update({k: v for k, v in monitor.last.items() if k != "step"})
            if found:
                row["diagnoses"] = [d.failure for d in found]
            decided = doctor.restart_config()
            if cfg.doctor == "auto" and decided and not restarted:
                # act on the decision: new networks, the same held-out batch, the remaining steps
                restarted = True
                new = dataclasses.replace(t.net, **decided)
                t.build(new)
                for k, v in {"lr_g": cfg.lr_g, "lr_d": cfg.lr_d}.items():
                    t.lr_base[k] = v
                t.held_z = torch.from_numpy(np.random.default_rng(cfg.seed + 7919 + 1).standard_normal(
                    (512, new.z_dim)).astype(np.float32))
                monitor.z = t.held_z
                for f in ("mode_collapse", "d_dominates", "g_dominates"):
                    monitor.rearm(f)
                row["restart"] = decided
                if log:
                    log(f"step {t.step}: restarted with {decided}")
            rows.append(row)
    seconds = time.perf_counter() - t0
    samples = t.sample(2500, cfg.seed + 1)
    summary = {"data": cfg.data, "seed": cfg.seed, "steps": t.step, "seconds": round(seconds, 2),
               **mix.coverage(samples), "diagnoses": [d.failure for d in monitor.diagnoses],
               "interventions": len(doctor.interventions), "network": dataclasses.asdict(t.net),
               "restarted": restarted, "samples": samples}
    if drs:
        kept, accepted = t.rejection_sample(2500, cfg.seed + 1)
        summary["drs"] = {**mix.coverage(kept), "accepted": round(accepted, 4), "samples": kept}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        np.save(out / "samples.npy", samples)
        scatter({f"{cfg.data} seed {cfg.seed}": samples}, mix, out / "samples.png")
        save_checkpoint(out / "checkpoint.pt", "mlpgan", t.net, {"G": t.G, "D": t.D}, step=t.step,
                        data=cfg.data, seed=cfg.seed)
        if cfg.doctor != "off":
            write_run_report(out, monitor, doctor, title=f"mlpgan on {cfg.data}, {t.step} steps")
    return summary


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
