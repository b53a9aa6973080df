"""The GAN training doctor's treatment of the diagnoses monitor.py makes.

`Doctor(monitor, mode)` adds the remedies: mode "report" only diagnoses; "auto" also applies
the remedies that can change on the fly to a `Tunable` trainer (see `Tunable`) and decides the
ones that need a new network (filters, z_dim, a minibatch-std layer): `doctor.pending` holds the
restart a trainer that can rebuild its networks takes (training/remedies.py, Engine.rebuild).
Every intervention is kept with its step and reason in `doctor.interventions`, every restart in
`doctor.restarts`; in auto mode the trainer keeps the weights where the monitor's `fd` was
lowest (remedies.BestWeights) and records them in `doctor.kept`.

reports.py renders all of it into the run's doctor.md and doctor.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from ganforge.errors import UsageError
from ganforge.training.monitor import Diagnosis, Monitor

DOCTOR_MODES = ("auto", "report", "off")


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


# A dominating D's learning rate is cut by this factor ...
D_RATE_CUT = 0.5
# ... and G's raised, where it is lower, to within this factor of D's new rate: TTUR's setting
# (D 4e-4, G 1e-4; Heusel et al. 2017). A G that learns 100x slower than D (the d-dominates
# presets) stays near its initialisation however much D is weakened: with D's rate cut alone,
# the 2-D mixtures' auto runs ended at 2 % of their points within 3 std of a mode.
TTUR_RATIO = 4.0
# On-the-fly steps per failure: (knob, function (old, all knobs before the step) -> new, source).
# Applied once per diagnosis, all of them, each bounded so repeated diagnoses cannot run away.
AUTO_REMEDIES: dict[str, list[tuple[str, Callable[[float, dict], float], str]]] = {
    "d_dominates": [
        ("label_smoothing", lambda v, k: min(0.3, max(v, 0.1) + 0.1), "Salimans et al. 2016"),
        ("label_flip", lambda v, k: min(0.2, max(v * 2, 0.05)), "course"),
        ("instance_noise", lambda v, k: min(0.5, max(v * 2, 0.1)), "Sønderby et al. 2017"),
        ("d_dropout", lambda v, k: min(0.5, v + 0.2), "course"),
        ("lr_d", lambda v, k: v * D_RATE_CUT, "Heusel et al. 2017"),
        ("lr_g", lambda v, k: max(v, k.get("lr_d", 0.0) * D_RATE_CUT / TTUR_RATIO), "Heusel et al. 2017"),
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
# A collapsed G's larger latent is at least this wide: doubling a 1- or 2-d latent leaves G
# mapping a line or a plane onto the images, still too thin to spread over the data's modes.
MIN_RESTART_Z = 16
# A D that G dominates gets at least this many filters (units) in its restart: doubling a D
# built with 2 or 4 leaves one too small to tell the data's modes apart (the MLP GAN's
# g-dominates preset: a 4-unit, one-layer D rates every point about ½).
MIN_RESTART_NDF = 16
# ... and at least this many hidden layers where its depth is a setting (the MLP GAN's `d_layers`,
# its default: PacGAN's 2-D D); the other GANs' depth follows the resolution and is not changed.
MIN_RESTART_D_LAYERS = 3
# A collapsed G is rebuilt stronger: at least this many filters (units), and at least this many
# hidden layers where its depth is a setting (the MLP GAN's `g_layers`, its default: PacGAN's
# 2-D G). Doubling the 8-unit, one-layer G of the MLP GAN's mode-collapse preset leaves one that
# cannot place its points on 8 modes 0.01 wide. The G a dominating D's restart grows gets the
# same floor: on 16 px shapes after 400 steps the DCGAN's 4-filter G doubled to 8 drew dark
# smudges on light grey tiles (classifier FD 742; healthy runs 294), grown to 16 coloured blobs
# on dark tiles (579), nearer the data under each of five classifiers (docs/doctor.md).
MIN_RESTART_NGF = 16
MIN_RESTART_G_LAYERS = 4
# Network changes: recorded as restart decisions (new config values, relative to the current).
RESTART_REMEDIES: dict[str, list[tuple[str, Callable[[int], int], str]]] = {
    "d_dominates": [("ndf", lambda v: max(1, v // 2), "course"),
                    ("ngf", lambda v: max(v * 2, MIN_RESTART_NGF), "course")],
    "g_dominates": [("ndf", lambda v: max(v * 2, MIN_RESTART_NDF), "course"),
                    ("d_layers", lambda v: max(v, MIN_RESTART_D_LAYERS), "course")],
    "mode_collapse": [("z_dim", lambda v: max(v * 2, MIN_RESTART_Z), "course"),
                      ("ngf", lambda v: max(v * 2, MIN_RESTART_NGF), "course"),
                      ("g_layers", lambda v: max(v, MIN_RESTART_G_LAYERS), "course"),
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
