"""The GAN training doctor's measurements: the scores s_G and s_D, the evidence from the
samples, and the diagnosis of the three failure modes, with the remedies each one advises.

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
                     s_D <= g_dom_s_D: D rates fakes as more real than real images before it
                     has learnt anything (s_D < ½ means exactly E[D(x)] < E[D(G(z))]); the
                     defaults, 0.52 and 0.48, keep a margin from ½, where both sit at the
                     equilibrium (D(x) = ½ everywhere) or with a D that learns nothing
    mode_collapse    (after collapse_after x total steps) diversity <= collapse_diversity, or
                     duplicates >= collapse_duplicates, or (labelled data) modes covered <=
                     collapse_modes; after a restart (`monitor.restarted(step)`), also only
                     once the rebuilt networks have trained collapse_after of the steps left

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

A restart of the doctor's (networks rebuilt from the checkpoint of step `back`) calls
`monitor.restarted(back)`: every detector re-armed, and mode collapse judged on the rebuilt
networks only after they have trained `collapse_after` of the steps left, as a fresh run is
(a rebuilt G starts undiverse as a new one does).

Each observation also records `fd`, a cheap quality figure: the Fréchet distance between
Gaussians fitted to the pooled features of G's samples and of the held-out real batch (lower is
better).

The rest of the doctor: doctor.py treats what is diagnosed here (`Doctor`: remedies applied in
auto mode, restarts decided), reports.py writes a run's scores.png, doctor.md and doctor.json,
and remedies.py holds what a restart does to the networks and the best weights kept.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ganforge.errors import UsageError

FAILURES = ("d_dominates", "g_dominates", "mode_collapse")


@dataclass(frozen=True)
class Thresholds:
    d_dom_s_D: float = 0.9            # D dominates when s_D >= this ...
    d_dom_s_G: float = 0.1            # ... and s_G <= this
    g_dom_s_G: float = 0.52           # G dominates early when s_G >= this ...
    g_dom_s_D: float = 0.48           # ... and s_D <= this (E[D(x)] < E[D(G(z))] by a margin: at
                                      # equilibrium, D(x) = ½ everywhere, both sit at ½ ± noise)
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
        ("a lower D learning rate, G's within 4x of it, fewer D steps (two time-scale balance)", "course; Heusel et al. 2017, TTUR"),
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
          phase: tuple[int, int | None] | None = None, rebuilt: int | None = None) -> dict[str, str]:
    """Which failure conditions hold for one observation -> {failure: reason}. `phase`:
    (steps done before the phase, its length in steps), when "early" is judged per phase;
    `rebuilt`: the step a restart rebuilt the networks from (mode collapse judged after
    collapse_after of the steps left from there, as after a run's start)."""
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
    if (total_steps is not None and rebuilt is not None
            and record["step"] - rebuilt < th.collapse_after * (total_steps - rebuilt)):
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
        self.rebuilt: int | None = None       # the step a restart rebuilt the networks from
        self._streak = {f: 0 for f in FAILURES}
        self._active = {f: False for f in FAILURES}

    @classmethod
    def offline(cls, thresholds: Thresholds, total_steps: int | None) -> "Monitor":
        """A monitor that only diagnoses records already measured (no batch, no networks)."""
        mon = cls.__new__(cls)
        mon.th, mon.total_steps, mon.every = thresholds, total_steps, 1
        mon.records, mon.diagnoses, mon.last, mon.phase, mon.rebuilt = [], [], {}, None, None
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

    def restarted(self, step: int) -> None:
        """The networks were rebuilt from the checkpoint of `step` (a restart): every detector
        re-armed, mode collapse judged once the rebuilt networks have trained collapse_after of
        the steps left."""
        self.rebuilt = int(step)
        for f in FAILURES:
            self.rearm(f)

    def rewind(self, back: int) -> None:
        """A restart went back to the checkpoint of step `back`: the records of the abandoned
        steps dropped (the diagnoses made on them stay), then `restarted(back)`."""
        self.records = [r for r in self.records if r["step"] <= back]
        self.last = self.records[-1] if self.records else {}
        self.restarted(back)

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
        holds = check(rec, self.th, self.total_steps, self.phase, self.rebuilt)
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

    def replay(self, timeline: list[dict], stages: list[dict] | None = None) -> "Monitor":
        """Take in observations measured earlier (a resumed run's), as if observed now: the same
        diagnoses and detector state, stage by stage when `stages` is given. `timeline`: the
        records in the order observed, with `{"rewound_to": step}` where a restart rewound the
        run (`rewind`). Returns self."""
        for r in timeline:
            if "rewound_to" in r:
                self.rewind(r["rewound_to"])
                continue
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


def rediagnose(timeline: list[dict], th: Thresholds, total_steps: int | None,
               stages: list[dict] | None = None) -> "Monitor":
    """Diagnose recorded observations again (a timeline as `Monitor.replay` takes, restarts
    included), stage by stage when `stages` is given: the same diagnoses (and detector state)
    the live monitor reached on the same records."""
    return Monitor.offline(th, total_steps).replay(timeline, stages)
