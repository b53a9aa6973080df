"""The GAN training doctor: the scores s_G and s_D, the evidence from the samples, and the
diagnosis of the three failure modes, with remedies.

Scores (D's outputs taken as probabilities, over a fixed held-out batch of real images x and
latents z, measured every `every` steps):

    s_G = E[D(G(z))]                                   how well G fools D
    s_D = ½ E[D(x_real)] + ½ E[1 − D(G(z))]            how well D tells real from fake

Evidence from the samples, in a fixed feature space (the points themselves for 2-D data; images
average-pooled to 8x8 per channel, in [-1, 1], for image data):

    diversity        mean pairwise distance of G's samples / the same for the real batch
    duplicates       share of G's samples whose nearest other sample lies closer than
                     `dup_radius` x the median nearest-neighbour distance of the real batch
    modes            (labelled / toy data) share of the data's modes that G's samples cover

Failure modes (each needs its condition on `patience` consecutive observations):

    d_dominates      s_D >= d_dom_s_D and s_G <= d_dom_s_G: D is sure of everything, G gets
                     no gradient
    g_dominates      early (step <= early_fraction x total steps; in a run of phases, such as
                     ProGAN's stages, within early_fraction of the phase), s_G >= g_dom_s_G and
                     s_D <= g_dom_s_D: D rates fakes at least as real as real images before it
                     has learnt anything (s_D <= ½ means exactly E[D(x)] <= E[D(G(z))])
    mode_collapse    (after collapse_after x total steps) diversity <= collapse_diversity, or duplicates >= collapse_duplicates,
                     or (labelled data) modes covered <= collapse_modes

Interface, for any GAN loop (DCGAN, the MLP GAN, Progressive GAN, the context encoder, pix2pix):

    monitor = Monitor(real, z, Thresholds(), every=50, total_steps=cfg.steps,
                      mode_of=None)          # mode_of: samples (N, ...) ndarray -> mode index
                                             # per sample (-1 = off every mode), for toy data
    for step in ...:
        ...train...
        if monitor.due(step):
            diagnoses = monitor.observe(step, D, G_sample)   # -> list[Diagnosis] (new ones)
            record = monitor.last                            # s_G, s_D, diversity, ... dict

`D` maps a batch to logits (B,) or (B, 1); `G_sample` maps the held-out latents z to samples
(any callable: a Generator, or `lambda z: G(z, alpha)` for a progressive G). For a context
encoder, pass the masked inputs as `z` and the inpainting network as `G_sample`.

A loop that trains in phases (Progressive GAN's stages) calls `monitor.new_phase(start, steps)`
when a phase begins: every detector is re-armed (a streak from the previous phase does not
count, and a failure still present is reported again, in the new phase) and "early" is judged
from the phase's start over its length instead of the run's; `monitor.set_real(x)` replaces the
held-out real batch (the same images brought to the stage's resolution and fade-in), and
`observe(..., extra={"stage": ...})` adds fields to the record that the diagnoses carry.

`Doctor(monitor, mode)` adds the remedies: mode "report" only diagnoses; "auto" also applies
the remedies that can change on the fly to a `Tunable` trainer (see `Tunable`) and decides the
ones that need a new network (filters, z_dim, a minibatch-std layer): `doctor.pending` holds the
restart a trainer that can rebuild its networks takes (training/remedies.py, Engine.rebuild).
Every intervention is kept with its step and reason in `doctor.interventions`, every restart in
`doctor.restarts`.

Each observation also records `fd`, a cheap quality figure: the Fréchet distance between
Gaussians fitted to the pooled features of G's samples and of the held-out real batch (lower is
better); the doctor in auto mode keeps the weights where it was lowest (remedies.BestWeights).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from ganforge.errors import UsageError

FAILURES = ("d_dominates", "g_dominates", "mode_collapse")
DOCTOR_MODES = ("auto", "report", "off")


@dataclass(frozen=True)
class Thresholds:
    d_dom_s_D: float = 0.9            # D dominates when s_D >= this ...
    d_dom_s_G: float = 0.1            # ... and s_G <= this
    g_dom_s_G: float = 0.5            # G dominates early when s_G >= this ...
    g_dom_s_D: float = 0.5            # ... and s_D <= this (E[D(x)] <= E[D(G(z))])
    early_fraction: float = 0.3       # "early": the first 30 % of the run's steps
    collapse_diversity: float = 0.5   # mode collapse when diversity ratio <= this, or ...
    collapse_duplicates: float = 0.5  # ... this share of samples are near-duplicates, or ...
    collapse_modes: float = 0.75      # ... at most this share of the modes is covered
    collapse_after: float = 0.25      # judged after this share of the run (G starts undiverse)
    dup_radius: float = 0.1           # near-duplicate radius, x median real nearest-neighbour distance
    patience: int = 3                 # consecutive observations a condition must hold

    def __post_init__(self):
        for name in ("d_dom_s_D", "d_dom_s_G", "g_dom_s_G", "g_dom_s_D", "early_fraction",
                     "collapse_after", "collapse_duplicates", "collapse_modes"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise UsageError(f"threshold {name}: {v!r} is not allowed; must be in [0, 1]")
        for name in ("collapse_diversity", "dup_radius"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v and math.isfinite(v)):
                raise UsageError(f"threshold {name}: {v!r} is not allowed; must be >= 0")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise UsageError(f"threshold patience: {self.patience!r} is not allowed; must be an integer >= 1")
        if self.d_dom_s_D <= 0.5:
            raise UsageError(f"threshold d_dom_s_D: {self.d_dom_s_D!r} is not allowed; must be > 0.5 "
                             "(s_D = 0.5 is a D that guesses)")

    @classmethod
    def parse(cls, text: str) -> "Thresholds":
        """'name=value,name=value' (the CLI's --thresholds) -> Thresholds."""
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in names:
                raise UsageError(f"--thresholds: {item!r} is not NAME=VALUE with NAME one of "
                                 f"{', '.join(names)}")
            try:
                values[key] = int(raw) if key == "patience" else float(raw)
            except ValueError:
                raise UsageError(f"--thresholds: {key}={raw!r} is not a number") from None
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# Scores and evidence

def scores(p_real: torch.Tensor | np.ndarray, p_fake: torch.Tensor | np.ndarray) -> dict:
    """s_G and s_D from D's probabilities on the real batch and on G(z)."""
    p_real = np.asarray(p_real, dtype=np.float64).ravel()
    p_fake = np.asarray(p_fake, dtype=np.float64).ravel()
    s_G = float(p_fake.mean())
    s_D = float(0.5 * p_real.mean() + 0.5 * (1.0 - p_fake).mean())
    return {"s_G": s_G, "s_D": s_D, "D_real": float(p_real.mean()), "D_fake": s_G}


def features(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """The fixed feature space: 2-D points as they are; images (N, C, H, W) average-pooled
    to (N, C*8*8)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if t.dim() == 4:
        # (N, C, H, W) -> (N, C, 8, 8), on the samples' device
        t = nn.functional.adaptive_avg_pool2d(t, 8)
    return t.reshape(t.shape[0], -1).double().cpu().numpy()


def _pairwise(f: np.ndarray) -> np.ndarray:
    sq = (f * f).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
    return np.sqrt(d2)


def diversity(fake: np.ndarray, real: np.ndarray, dup_radius: float = 0.1) -> dict:
    """Mean pairwise distance of fake features relative to real ones, and the near-duplicate
    share of the fakes (nearest other fake closer than dup_radius x the real median NN distance)."""
    df, dr = _pairwise(fake), _pairwise(real)
    n, m = len(fake), len(real)
    mean_f = df.sum() / (n * (n - 1))
    mean_r = dr.sum() / (m * (m - 1))
    np.fill_diagonal(df, np.inf)
    np.fill_diagonal(dr, np.inf)
    radius = dup_radius * float(np.median(dr.min(1)))
    dup = float((df.min(1) <= radius).mean())
    return {"diversity": float(mean_f / mean_r) if mean_r > 0 else float("nan"),
            "duplicates": dup}


def pooled_fd(fake: np.ndarray, real: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the doctor's pooled
    features): the doctor's cheap quality figure, comparable within one run."""
    from ganforge.training.metrics import frechet_distance

    return float(frechet_distance(fake, real))


# ---------------------------------------------------------------------------------------------
# Diagnoses and remedies

# Remedies, per failure: (what to do, source). "course" = the course ganforge is built on.
REMEDIES: dict[str, list[tuple[str, str]]] = {
    "d_dominates": [
        ("dropout in D", "course"),
        ("noisy labels (a share of real and fake labels flipped), one-sided smoothed real labels "
         "(real target 0.9)", "course; Salimans et al. 2016, Improved Techniques for Training GANs"),
        ("fewer D filters (--ndf), or more G filters (--ngf)", "course"),
        ("instance noise on D's inputs, annealed", "Sønderby et al. 2017, Amortised MAP Inference; "
         "Arjovsky & Bottou 2017"),
        ("a lower D learning rate, fewer D steps (two time-scale balance)", "course; Heusel et al. 2017, TTUR"),
    ],
    "g_dominates": [
        ("the reverse: more D filters (--ndf) or fewer G filters, no dropout in D", "course"),
        ("remove label smoothing / label noise and instance noise", "course"),
        ("a lower G learning rate; a higher D learning rate than G's (TTUR)", "course; Heusel et al. 2017, TTUR"),
    ],
    "mode_collapse": [
        ("a stronger G (more filters), a weaker D", "course"),
        ("a larger latent dimension (--z-dim)", "course"),
        ("minibatch standard deviation layer in D", "Karras et al. 2018, Progressive GAN"),
        ("packing: D judges m samples at once (PacGAN2/4)", "Lin et al. 2018, PacGAN"),
        ("instance noise on D's inputs", "Sønderby et al. 2017"),
    ],
}

TITLES = {
    "d_dominates": "the discriminator dominates (G gets no gradient)",
    "g_dominates": "the generator dominates early (D fooled before learning anything)",
    "mode_collapse": "mode collapse (too little variety)",
}


@dataclass
class Diagnosis:
    failure: str        # one of FAILURES
    step: int
    evidence: dict      # the numbers behind it
    reason: str         # one line: the numbers against the thresholds
    onset: int | None = None   # the step of the first observation of the streak

    @property
    def remedies(self) -> list[tuple[str, str]]:
        return REMEDIES[self.failure]

    @property
    def where(self) -> str:
        """'step N', with the stage when the record has one: 'step N (stage 1, 8 px, alpha 0.50)'."""
        e = self.evidence
        if "stage" not in e:
            return f"step {self.step}"
        side = f", {e['side']} px" if "side" in e else ""
        alpha = f", alpha {e['alpha']:.2f}" if "alpha" in e else ""
        return f"step {self.step} (stage {e['stage']}{side}{alpha})"

    def render(self) -> str:
        lines = [f"{self.where}: {TITLES[self.failure]}", f"  evidence: {self.reason}",
                 "  remedies:"]
        lines += [f"    - {what} [{src}]" for what, src in self.remedies]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"failure": self.failure, "step": self.step, "reason": self.reason,
                "evidence": self.evidence, "onset": self.onset}


def check(record: dict, th: Thresholds, total_steps: int | None,
          phase: tuple[int, int | None] | None = None) -> dict[str, str]:
    """Which failure conditions hold for one observation -> {failure: reason}. `phase`:
    (steps done before the phase, its length in steps), when "early" is judged per phase."""
    out: dict[str, str] = {}
    s_G, s_D = record["s_G"], record["s_D"]
    if s_D >= th.d_dom_s_D and s_G <= th.d_dom_s_G:
        out["d_dominates"] = (f"s_D {s_D:.3f} >= {th.d_dom_s_D} and s_G {s_G:.3f} <= {th.d_dom_s_G}")
    if phase is not None:
        start, length = phase
        early = length is None or record["step"] - start <= th.early_fraction * length
        when = f", {record['step'] - start} steps into its stage (early)"
    else:
        early = total_steps is None or record["step"] <= th.early_fraction * total_steps
        when = " (early)"
    if early and s_G >= th.g_dom_s_G and s_D <= th.g_dom_s_D:
        out["g_dominates"] = (f"s_G {s_G:.3f} >= {th.g_dom_s_G} and s_D {s_D:.3f} <= {th.g_dom_s_D} "
                              f"at step {record['step']}{when}; diversity "
                              f"{record.get('diversity', float('nan')):.2f}")
    why = []
    if total_steps is not None and record["step"] < th.collapse_after * total_steps:
        return out
    if record.get("diversity") is not None and record["diversity"] <= th.collapse_diversity:
        why.append(f"diversity {record['diversity']:.3f} <= {th.collapse_diversity}")
    if record.get("duplicates") is not None and record["duplicates"] >= th.collapse_duplicates:
        why.append(f"near-duplicates {record['duplicates']:.2f} >= {th.collapse_duplicates}")
    if record.get("modes_share") is not None and record["modes_share"] <= th.collapse_modes:
        why.append(f"modes covered {record['modes']}/{record['n_modes']} "
                   f"({record['modes_share']:.2f} <= {th.collapse_modes})")
    if why:
        out["mode_collapse"] = "; ".join(why)
    return out


class Monitor:
    """Scores and diagnoses for any GAN loop; see the module docstring for the interface."""

    def __init__(self, real: torch.Tensor, z: torch.Tensor, thresholds: Thresholds | None = None,
                 every: int = 50, total_steps: int | None = None,
                 mode_of: Callable[[np.ndarray], np.ndarray] | None = None, n_modes: int | None = None):
        if every < 1:
            raise UsageError(f"monitor every: {every!r} is not allowed; must be >= 1")
        if (mode_of is None) != (n_modes is None):
            raise ValueError("mode_of and n_modes go together")
        self.z = z.detach()
        self.th = thresholds or Thresholds()
        self.every, self.total_steps = every, total_steps
        self.mode_of, self.n_modes = mode_of, n_modes
        self.set_real(real)
        self.records: list[dict] = []
        self.diagnoses: list[Diagnosis] = []
        self.last: dict = {}
        self.phase: tuple[int, int | None] | None = None
        self._streak = {f: 0 for f in FAILURES}
        self._active = {f: False for f in FAILURES}

    @classmethod
    def offline(cls, thresholds: Thresholds, total_steps: int | None) -> "Monitor":
        """A monitor that only diagnoses records already measured (no batch, no networks)."""
        mon = cls.__new__(cls)
        mon.th, mon.total_steps, mon.every = thresholds, total_steps, 1
        mon.records, mon.diagnoses, mon.last, mon.phase = [], [], {}, None
        mon._streak = {f: 0 for f in FAILURES}
        mon._active = {f: False for f in FAILURES}
        return mon

    def set_real(self, real: torch.Tensor) -> None:
        """Replace the held-out real batch (e.g. the same images at a new stage's resolution)."""
        self.real = real.detach()
        self.real_features = features(self.real)

    def new_phase(self, start: int, steps: int | None) -> None:
        """A phase of training begins after `start` steps and lasts `steps` (a ProGAN stage):
        every detector re-armed, "early" judged from the phase's start over its length."""
        self.phase = (int(start), None if steps is None else int(steps))
        for f in FAILURES:
            self.rearm(f)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    @torch.no_grad()
    def measure(self, step: int, D: Callable, G_sample: Callable) -> dict:
        """The scores and evidence at `step`, D and G left as they were (modes, BN statistics)."""
        nets = [m for m in (D, G_sample) if isinstance(m, nn.Module)]
        saved = [(m, m.training, {k: v.clone() for k, v in m.state_dict().items()
                                  if "running" in k or "num_batches" in k}) for m in nets]
        for m in nets:  # dropout off; batch norm keeps batch statistics as in training
            for sub in m.modules():
                if isinstance(sub, nn.modules.dropout._DropoutNd):
                    sub.eval()
        try:
            fake = G_sample(self.z)
            p_real = torch.sigmoid(D(self.real).reshape(-1))
            p_fake = torch.sigmoid(D(fake).reshape(-1))
        finally:
            for m, mode, buffers in saved:
                m.train(mode)
                if buffers:
                    m.load_state_dict(buffers, strict=False)
        # reductions on the networks' device; only the scores and the pooled features leave it
        s_G, d_real = p_fake.float().mean(), p_real.float().mean()
        s_D = 0.5 * d_real + 0.5 * (1.0 - p_fake.float()).mean()
        s_G, s_D, d_real = torch.stack([s_G, s_D, d_real]).double().cpu().tolist()
        rec = {"step": int(step), "s_G": s_G, "s_D": s_D, "D_real": d_real, "D_fake": s_G}
        fake_np = fake.detach().float().cpu().numpy() if self.mode_of is not None else None
        fake_features = features(fake.detach())
        rec.update(diversity(fake_features, self.real_features, self.th.dup_radius))
        rec["fd"] = pooled_fd(fake_features, self.real_features)
        if self.mode_of is not None:
            modes = np.asarray(self.mode_of(fake_np))
            covered = np.unique(modes[modes >= 0])
            rec.update(modes=int(len(covered)), n_modes=int(self.n_modes),
                       modes_share=len(covered) / self.n_modes)
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in rec.items()}

    def observe(self, step: int, D: Callable, G_sample: Callable,
                extra: dict | None = None) -> list[Diagnosis]:
        """Measure, record and return the diagnoses that start at this step (a failure is
        reported once when its condition has held `patience` times, again only after it cleared).
        `extra`: fields added to the record (e.g. stage and alpha), carried by its diagnoses."""
        rec = self.measure(step, D, G_sample)
        if extra:
            rec.update(extra)
        self.records.append(rec)
        self.last = rec
        return self.diagnose(rec)

    def diagnose(self, rec: dict) -> list[Diagnosis]:
        holds = check(rec, self.th, self.total_steps, self.phase)
        new = []
        for f in FAILURES:
            if f in holds:
                self._streak[f] += 1
                if self._streak[f] >= self.th.patience and not self._active[f]:
                    self._active[f] = True
                    onset = self.records[-self._streak[f]]["step"] if len(self.records) >= self._streak[f] else None
                    d = Diagnosis(f, rec["step"], {k: v for k, v in rec.items()}, holds[f], onset)
                    new.append(d)
            else:
                self._streak[f] = 0
                self._active[f] = False
        self.diagnoses += new
        return new

    def replay(self, records: list[dict], stages: list[dict] | None = None) -> "Monitor":
        """Take in observations measured earlier (a resumed run's), as if observed now: the same
        diagnoses and detector state, stage by stage when `stages` is given. Returns self."""
        for r in records:
            follow_stages(self, stages, r["step"])
            self.records.append(r)
            self.last = r
            self.diagnose(r)
        return self

    def rearm(self, failure: str) -> None:
        """Let a failure be reported again (after a remedy, to see whether it held)."""
        self._streak[failure] = 0
        self._active[failure] = False


# Stages (Progressive GAN): each a dict {"stage", "side", "start", "end", "fade_end"}, the first
# and last step trained at that stage (inclusive) and the last step of its fade-in (None: none).

def log_step(stream, row: dict, t0: float, monitor: "Monitor | None" = None,
             found: list["Diagnosis"] | None = None) -> None:
    """Write one `metrics.jsonl` row: the step's losses, then (when the doctor just observed)
    its held-out scores and the diagnoses that fired, then the seconds since `t0`."""
    import json
    import time

    if monitor is not None:
        row.update({k: v for k, v in monitor.last.items() if k != "step"})
        if found:
            row["diagnoses"] = [d.failure for d in found]
    row["seconds"] = round(time.perf_counter() - t0, 3)
    stream.write(json.dumps(row) + "\n")
    stream.flush()


def stage_at(stages: list[dict] | None, step: int) -> dict | None:
    """The stage that trained step `step`, or None."""
    return next((s for s in stages or () if s["start"] <= step <= s["end"]), None)


def stage_phase(span: dict) -> tuple[int, int]:
    """A stage as a monitor phase: (steps done before it, its length in steps)."""
    return span["start"] - 1, span["end"] - span["start"] + 1


def follow_stages(monitor: "Monitor", stages: list[dict] | None, step: int) -> dict | None:
    """Before observing `step`: start a new phase on `monitor` when `step` lies in a stage it has
    not entered yet (the detectors re-armed, "early" judged from the stage's start). Returns
    the stage."""
    span = stage_at(stages, step)
    if span is not None and monitor.phase != stage_phase(span):
        monitor.new_phase(*stage_phase(span))
    return span


def rediagnose(records: list[dict], th: Thresholds, total_steps: int | None,
               stages: list[dict] | None = None) -> "Monitor":
    """Diagnose recorded observations again, stage by stage when `stages` is given: the same
    diagnoses (and detector state) the live monitor reached on the same records."""
    return Monitor.offline(th, total_steps).replay(records, stages)


# ---------------------------------------------------------------------------------------------
# The doctor: remedies applied (auto) or only reported

class Tunable(Protocol):
    """What a trainer exposes to `Doctor` in auto mode.

    knobs() -> dict with the current `label_smoothing`, `label_flip`, `instance_noise`,
    `d_dropout`, `lr_g`, `lr_d`, `d_steps_every` (a trainer leaves out the ones it cannot change);
    set_knob(name, value) changes one on the fly. A trainer with `can_restart = True` also takes
    the doctor's network changes (`Doctor.pending`; training/remedies.py)."""

    def knobs(self) -> dict: ...

    def set_knob(self, name: str, value: float) -> None: ...


@dataclass
class Intervention:
    step: int
    failure: str
    action: str          # "set" (applied on the fly) or "restart" (needs a new network)
    knob: str
    old: float | int | None
    new: float | int | None
    reason: str
    source: str

    def render(self) -> str:
        verb = "set" if self.action == "set" else "restart decision:"
        return (f"step {self.step}: {verb} {self.knob} {self.old} -> {self.new} "
                f"({self.failure}: {self.reason}) [{self.source}]")


# On-the-fly steps per failure: (knob, function (old, all knobs before the step) -> new, source).
# Applied once per diagnosis, all of them, each bounded so repeated diagnoses cannot run away.
AUTO_REMEDIES: dict[str, list[tuple[str, Callable[[float, dict], float], str]]] = {
    "d_dominates": [
        ("label_smoothing", lambda v, k: min(0.3, max(v, 0.1) + 0.1), "Salimans et al. 2016"),
        ("label_flip", lambda v, k: min(0.2, max(v * 2, 0.05)), "course"),
        ("instance_noise", lambda v, k: min(0.5, max(v * 2, 0.1)), "Sønderby et al. 2017"),
        ("d_dropout", lambda v, k: min(0.5, v + 0.2), "course"),
        ("lr_d", lambda v, k: v * 0.5, "Heusel et al. 2017"),
        ("d_steps_every", lambda v, k: min(4, int(v) * 2), "course"),
    ],
    "g_dominates": [
        ("label_smoothing", lambda v, k: 0.0, "course"),
        ("label_flip", lambda v, k: 0.0, "course"),
        ("instance_noise", lambda v, k: 0.0, "course"),
        ("d_dropout", lambda v, k: 0.0, "course"),
        ("lr_g", lambda v, k: v * 0.5, "course"),
        ("lr_d", lambda v, k: max(v * 2.0, k.get("lr_g", 0.0)), "Heusel et al. 2017"),
        ("d_steps_every", lambda v, k: 1, "course"),
    ],
    "mode_collapse": [
        ("instance_noise", lambda v, k: min(0.5, max(v * 2, 0.1)), "Sønderby et al. 2017"),
        ("d_dropout", lambda v, k: min(0.5, v + 0.1), "course"),
        ("lr_d", lambda v, k: v * 0.5, "Heusel et al. 2017"),
    ],
}
# Network changes: recorded as restart decisions (new config values, relative to the current).
RESTART_REMEDIES: dict[str, list[tuple[str, Callable[[int], int], str]]] = {
    "d_dominates": [("ndf", lambda v: max(1, v // 2), "course"), ("ngf", lambda v: v * 2, "course")],
    "g_dominates": [("ndf", lambda v: v * 2, "course")],
    "mode_collapse": [("z_dim", lambda v: v * 2, "course"), ("ngf", lambda v: v * 2, "course"),
                      ("mbstd", lambda v: True, "Karras et al. 2018, Progressive GAN"),
                      ("pack", lambda v: max(2, v * 2), "Lin et al. 2018, PacGAN")],
}
MAX_RESTARTS = 2   # network changes acted on per run, at most one per failure


class Doctor:
    """Diagnoses through a Monitor; in auto mode remedies through a Tunable trainer."""

    def __init__(self, monitor: Monitor, mode: str = "report", log: Callable[[str], None] | None = None):
        if mode not in DOCTOR_MODES:
            raise UsageError(f"--doctor: {mode!r} is not one of {', '.join(DOCTOR_MODES)}")
        self.monitor, self.mode = monitor, mode
        self.log = log or (lambda msg: None)
        self.interventions: list[Intervention] = []
        self.pending: dict | None = None     # a restart decided, not yet taken by the trainer
        self.restarts: list[dict] = []       # restarts applied: decision + the step rewound to
        self.kept: dict | None = None        # the best weights' step, when they were kept

    def observe(self, step: int, D: Callable, G_sample: Callable, trainer: Tunable | None = None,
                network: dict | None = None, extra: dict | None = None) -> list[Diagnosis]:
        """Monitor.observe, then (auto) remedies. `network`: the current config values of the
        network (ndf, ngf, z_dim, pack...) for the restart decisions; `extra`: see Monitor.observe."""
        found = self.monitor.observe(step, D, G_sample, extra)
        for d in found:
            self.log(d.render())
            if self.mode == "auto" and trainer is not None:
                self.remedy(d, trainer, network or {})
        return found

    def remedy(self, d: Diagnosis, trainer: Tunable, network: dict) -> list[Intervention]:
        knobs = trainer.knobs()
        done = []
        for knob, fn, src in AUTO_REMEDIES[d.failure]:
            if knob not in knobs:
                continue
            old = knobs[knob]
            new = round(float(fn(old, knobs)), 8)
            new = int(new) if isinstance(old, int) and not isinstance(old, bool) else new
            if new == old:
                continue
            trainer.set_knob(knob, new)
            done.append(Intervention(d.step, d.failure, "set", knob, old, new, d.reason, src))
        changes = {}
        for key, fn, src in RESTART_REMEDIES[d.failure]:
            if key in network and fn(network[key]) != network[key]:
                changes[key] = fn(network[key])
                done.append(Intervention(d.step, d.failure, "restart", key, network[key],
                                         changes[key], d.reason, src))
        for i in done:
            self.log(i.render())
        self.interventions += done
        tried = {r["failure"] for r in self.restarts} | ({self.pending["failure"]} if self.pending else set())
        if (changes and getattr(trainer, "can_restart", False) and d.failure not in tried
                and len(self.restarts) + (self.pending is not None) < MAX_RESTARTS):
            self.pending = {"failure": d.failure, "step": d.step, "onset": d.onset if d.onset is not None else d.step,
                            "changes": changes, "reason": d.reason}
        return done

    def take_restart(self) -> dict | None:
        """The restart decided and not yet applied (then forgotten here), or None."""
        decision, self.pending = self.pending, None
        return decision

    def restarted(self, decision: dict, from_step: int) -> None:
        """Record a restart applied: the networks rebuilt from the checkpoint of `from_step`."""
        r = {**decision, "from_step": int(from_step)}
        self.restarts.append(r)
        self.log(render_restart(r))

    def restart_config(self) -> dict:
        """The network changes decided so far (latest value per key), for the next run."""
        return {i.knob: i.new for i in self.interventions if i.action == "restart"}


def render_restart(r: dict) -> str:
    changes = ", ".join(f"{k}={v}" for k, v in r["changes"].items())
    return (f"step {r['step']}: restarted from the checkpoint of step {r['from_step']} with {changes} "
            f"({r['failure']} since step {r['onset']}: {r['reason']})")


def render_kept(k: dict) -> str:
    if k.get("kept"):
        return (f"The final checkpoint holds the best weights, of step {k['step']} (fd {k['fd']:.4g}); "
                f"the last ones measured fd {k['final_fd']:.4g}.")
    return (f"The final weights are kept (fd {k['final_fd']:.4g}; best fd {k['fd']:.4g} at step {k['step']}, "
            f"within the margin).")


# ---------------------------------------------------------------------------------------------
# Run reports: scores.png, doctor.md, doctor.json

def plot_scores(records: list[dict], diagnoses: list[Diagnosis], path, title: str = "",
                interventions: list[Intervention] = (), stages: list[dict] | None = None) -> None:
    """s_G and s_D over steps, each diagnosis a labelled vertical line (matplotlib, Agg); with
    `stages`, each stage's start a dotted line labelled with its side, fade-ins shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.plot(steps, [r["s_D"] for r in records], label="s_D", color="tab:blue")
    ax.plot(steps, [r["s_G"] for r in records], label="s_G", color="tab:orange")
    if records and "diversity" in records[0]:
        ax.plot(steps, [min(r["diversity"], 1.5) / 1.5 for r in records], label="diversity / 1.5",
                color="tab:green", alpha=0.5, lw=1)
    colours = {"d_dominates": "red", "g_dominates": "purple", "mode_collapse": "black"}
    for d in diagnoses:
        ax.axvline(d.step, color=colours[d.failure], ls="--", lw=1)
        ax.text(d.step, 1.02, d.failure, rotation=90, va="bottom", ha="right", fontsize=7,
                color=colours[d.failure])
    if stages:
        ax.set_xlim(stages[0]["start"] - 1, max(stages[-1]["end"], steps[-1] if steps else 0))
    for span in stages or ():
        if span["start"] > 1:
            ax.axvline(span["start"], color="grey", ls=":", lw=1)
        if span.get("fade_end"):
            ax.axvspan(span["start"], span["fade_end"], color="grey", alpha=0.12, lw=0)
        ax.text(span["start"], 0.04, f" {span['side']} px", fontsize=7, color="dimgrey",
                va="bottom", ha="left")
    for i in {(i.step, i.action) for i in interventions}:
        ax.plot([i[0]], [0.02], marker="^", color="tab:red" if i[1] == "set" else "grey", ms=6)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.set_title(title or "GAN scores", fontsize=9, pad=40 if diagnoses else 6)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _stage_table(stages: list[dict], records: list[dict], diagnoses: list[dict]) -> list[str]:
    lines = ["## Stages", "",
             "Scores are measured at the stage and alpha being trained (the held-out real images "
             "brought to the stage's side and blended as in training); each stage re-arms the "
             "detectors and \"early\" is judged from the stage's start.", "",
             "| stage | side | steps | fade-in | observations | last s_G | last s_D | diagnoses |",
             "|---|---|---|---|---|---|---|---|"]
    for span in stages:
        inside = lambda step: span["start"] <= step <= span["end"]
        obs = [r for r in records if inside(r["step"])]
        found = [f"{d['failure']} (step {d['step']})" for d in diagnoses if inside(d["step"])]
        fade = f"{span['start']}–{span['fade_end']}" if span.get("fade_end") else "-"
        last = (f"{obs[-1]['s_G']:.3f} | {obs[-1]['s_D']:.3f}") if obs else "- | -"
        lines.append(f"| {span['stage']} | {span['side']} px | {span['start']}–{span['end']} | {fade} | "
                     f"{len(obs)} | {last} | {', '.join(found) or 'none'} |")
    return lines + [""]


def render_report(title: str, records: list[dict], diagnoses: list[dict],
                  interventions: list[dict], mode: str, stages: list[dict] | None = None,
                  restarts: list[dict] = (), kept: dict | None = None) -> str:
    lines = [f"# Training doctor report: {title}", "", f"Doctor mode: {mode}. "
             f"{len(records)} observations on a fixed held-out batch.", ""]
    if stages:
        lines += _stage_table(stages, records, diagnoses)
    if records:
        first, last = records[0], records[-1]
        staged = "stage" in first
        head = "| step | stage | alpha | s_G | s_D | diversity | duplicates | modes |" if staged else \
            "| step | s_G | s_D | diversity | duplicates | modes |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        picks = records if len(records) <= 12 else [records[i * (len(records) - 1) // 11] for i in range(12)]
        for r in picks:
            modes = f"{r['modes']}/{r['n_modes']}" if "modes" in r else "-"
            where = f" {r.get('stage', '-')} | {r.get('alpha', float('nan')):.2f} |" if staged else ""
            lines.append(f"| {r['step']} |{where} {r['s_G']:.3f} | {r['s_D']:.3f} | "
                         f"{r.get('diversity', float('nan')):.3f} | {r.get('duplicates', float('nan')):.2f} | {modes} |")
        lines += ["", f"Final: s_G {last['s_G']:.3f}, s_D {last['s_D']:.3f} (first: s_G "
                  f"{first['s_G']:.3f}, s_D {first['s_D']:.3f}).", ""]
    lines += ["## Diagnoses", ""]
    if not diagnoses:
        lines += ["None: no failure condition held for long enough.", ""]
    for d in diagnoses:
        dd = Diagnosis(d["failure"], d["step"], d.get("evidence", {}), d["reason"], d.get("onset"))
        lines += ["```", dd.render(), "```", ""]
    lines += ["## Interventions", ""]
    if not interventions:
        lines += ["None." if mode == "auto" else f"None (mode {mode}: remedies are only advised).", ""]
    for i in interventions:
        lines.append("- " + Intervention(**i).render())
    restart = {i["knob"]: i["new"] for i in interventions if i["action"] == "restart"}
    if restarts:
        lines += ["", "## Restarts", "",
                  "Each rebuilt the networks with the changes, kept the weights whose shapes allow "
                  "(overlapping slices of resized layers), rebuilt the optimizers and went back to "
                  "the last checkpoint before the failure began.", ""]
        lines += ["- " + render_restart(r) for r in restarts]
    elif restart:
        lines += ["", "Restart decision (network changes for the next run): "
                  + ", ".join(f"{k}={v}" for k, v in restart.items())]
    if kept:
        lines += ["", "## Weights kept", "", render_kept(kept)]
    return "\n".join(lines).rstrip() + "\n"


def write_run_report(out, monitor: Monitor, doctor: Doctor, title: str = "",
                     stages: list[dict] | None = None) -> str:
    """Write scores.png, doctor.json and doctor.md into run directory `out`; return the report.
    `stages` (Progressive GAN): the stages trained, shown in the report and on the plot."""
    import json
    from pathlib import Path

    out = Path(out)
    diagnoses = [d.to_json() for d in monitor.diagnoses]
    interventions = [dataclasses.asdict(i) for i in doctor.interventions]
    plot_scores(monitor.records, monitor.diagnoses, out / "scores.png", title, doctor.interventions,
                stages)
    data = {"title": title, "mode": doctor.mode, "thresholds": dataclasses.asdict(monitor.th),
            "diagnoses": diagnoses, "interventions": interventions,
            "restart": doctor.restart_config(), "restarts": doctor.restarts, "kept": doctor.kept}
    if stages:
        data["stages"] = stages
    (out / "doctor.json").write_text(json.dumps(data, indent=2) + "\n")
    text = render_report(title, monitor.records, diagnoses, interventions, doctor.mode, stages,
                         doctor.restarts, doctor.kept)
    (out / "doctor.md").write_text(text)
    return text


def report_for_run(run, thresholds: Thresholds | None = None) -> str:
    """The report of a past run directory: from its metrics.jsonl (re-diagnosed with
    `thresholds` when given) and doctor.json. Raises UsageError on anything that is not one."""
    import json
    from pathlib import Path

    from ganforge.errors import CheckpointError

    run = Path(run)
    if run.is_file():
        if run.suffix == ".pt":
            from ganforge.training.gan import load_checkpoint

            payload = load_checkpoint(run)
            if payload.get("kind") not in GAN_KINDS:
                raise CheckpointError(f"doctor: {run} holds a {payload.get('kind')!r} model, not a GAN; "
                                      f"the doctor reads runs of {', '.join(GAN_KINDS)}")
            run = run.parent
        else:
            raise UsageError(f"doctor: {run} is a file; expected a run directory (runs/NAME)")
    if not run.is_dir():
        raise UsageError(f"doctor: {run} does not exist; expected a run directory (runs/NAME)")
    ckpt = run / "checkpoint.pt"
    if ckpt.is_file():
        from ganforge.training.gan import load_checkpoint

        kind = load_checkpoint(ckpt).get("kind")
        if kind not in GAN_KINDS:
            raise CheckpointError(f"doctor: {ckpt} holds a {kind!r} model, not a GAN; "
                                  f"the doctor reads runs of {', '.join(GAN_KINDS)}")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"doctor: {run} has no metrics.jsonl; is it a ganforge training run?")
    records = []
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"doctor: {metrics} line {n} is not JSON") from None
        if isinstance(row, dict) and "s_G" in row and "s_D" in row:
            records.append({k: v for k, v in row.items() if k not in ("diagnoses", "rewound_to")})
        if isinstance(row, dict) and "rewound_to" in row:   # a restart: the abandoned steps go
            records = [r for r in records if r["step"] <= row["rewound_to"]]
    if not records:
        raise UsageError(f"doctor: {metrics} holds no s_G / s_D scores (trained with --doctor off?)")
    saved = json.loads((run / "doctor.json").read_text()) if (run / "doctor.json").is_file() else {}
    mode = saved.get("mode", "report")
    title = saved.get("title") or run.name
    if thresholds is None:
        th = Thresholds(**saved["thresholds"]) if "thresholds" in saved else Thresholds()
        diagnoses = saved.get("diagnoses")
    else:
        th, diagnoses = thresholds, None
    stages = saved.get("stages")
    if diagnoses is None:  # re-diagnose from the recorded scores (stage by stage for ProGAN)
        total = stages[-1]["end"] if stages else records[-1]["step"]
        diagnoses = [d.to_json() for d in rediagnose(records, th, total, stages).diagnoses]
    return render_report(title, records, diagnoses, saved.get("interventions", []), mode, stages,
                         saved.get("restarts", []), saved.get("kept"))


GAN_KINDS = ("dcgan", "mlpgan", "progan", "inpainter", "pix2pix")
