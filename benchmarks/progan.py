"""`ganforge bench progan`: Progressive GAN vs DCGAN, quality (shapes-classifier FD) against
training wall time, side by side in one run on the same data.

The two arms alternate in short slices (`--slice` seconds of training each, in turn) so both
see the same load on a shared machine; each arm's clock counts only its own training time.
Every `--eval-every` seconds of an arm's training, its G (eval mode; the weight average G_ema,
kept the same way for both arms, unless `--ema-images 0`) draws `--n-fd` images from fixed
latents and the Fréchet distance to held-out real shapes is measured (not timed). The EMA update
is part of each arm's timed step. Both arms train on the same budgeted schedule: their Adam
learning rates hold until `--decay-from` of `--seconds` of their own training, then fall
linearly to 0 at `--seconds`, so each arm's final FD is that of a run planned for the budget.

Beside the first time an arm's FD is at or below the DCGAN's final FD, the JSON reports the same
comparison made on 3-evaluation medians ("median_of_3"), which one lucky or unlucky evaluation
cannot move.

`--doctor auto` lets the training doctor watch the ProGAN arm as `ganforge train progan --doctor
auto` does (the DCGAN arm is never doctored): remedies on diagnoses, and at the end of the budget
the best weights of the final resolution (by the doctor's FD on its own held-out batch) put back
when the last are measurably worse; the ProGAN's final FD is then measured again, and the JSON
keeps both ("progan.final_fd_before_keep"), with the run's best FD to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ganforge.errors import UsageError
from ganforge.training import datasets, metrics
from ganforge.training.ema import averaged_copy, ema_beta, update_average
from ganforge.training.gan import DCGANConfig
from ganforge.training.loop import GANTrainer, TrainConfig
from ganforge.training.progan import ProGANConfig, ProGANTrainConfig, ProGANTrainer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ganforge bench progan", description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    p.add_argument("--quick", action="store_true",
                   help="32 px, 150 s per arm, 500 FD samples: a few minutes in all")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seconds", type=float, default=900, help="training seconds per arm")
    p.add_argument("--eval-every", type=float, default=60, help="training seconds between FDs")
    p.add_argument("--slice", type=float, default=5, help="seconds per turn before switching arm")
    p.add_argument("--n-fd", type=int, default=1000, help="samples per FD (generated and real)")
    p.add_argument("--n-images", type=int, default=4096, help="training pool (shapes, seed 0)")
    p.add_argument("--batch-size", type=int, default=32)
    # the ProGAN arm's defaults are the settings measured best for it on this data at 64 px on
    # 2 cores, by the FD that sees outlines (docs/progan.md): 16 feature maps in G and 32 in D at
    # 32 and 64 px, long phases, a learning rate of 3e-3; both arms' rates decay over the
    # budget's second half
    p.add_argument("--phase-images", type=int, default=6400,
                   help="ProGAN images per fade-in and per stable phase")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="ProGAN: Adam learning rate of G and D (equalized LR; `train progan` defaults to the paper's 1e-3)")
    p.add_argument("--dcgan-lr", type=float, default=TrainConfig.lr_g,
                   help="DCGAN: Adam learning rate of G and D")
    p.add_argument("--decay-from", type=float, default=0.5,
                   help="both arms: after this fraction of --seconds of an arm's training, its Adam "
                        "learning rates fall linearly to 0 at --seconds (1: constant)")
    p.add_argument("--ema-images", type=int, default=10_000,
                   help="both arms: half-life in images of G's weight average, which is evaluated (0: G itself)")
    widths = ProGANConfig()
    p.add_argument("--fmap-base", type=int, default=512,
                   help="ProGAN: feature maps at side s are min(fmap-max, fmap-base / s) ...")
    p.add_argument("--fmap-max", type=int, default=widths.fmap_max, help="ProGAN: ... at most this many ...")
    p.add_argument("--fmap-min", type=int, default=16, help="ProGAN: ... and at least this many")
    p.add_argument("--d-fmap-min", type=int, default=32,
                   help="ProGAN: D's own minimum, for a D wider than G at the top sides (0: --fmap-min)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--doctor", choices=("off", "report", "auto"), default="off",
                   help="the training doctor on the ProGAN arm (auto: remedies and the best weights kept)")
    p.add_argument("--doctor-every", type=int, default=50, help="steps between the doctor's observations")
    p.add_argument("--cache-dir", help="where the FD classifier is cached")
    return p


def lr_factor(clock: float, budget: float, decay_from: float) -> float:
    """The budgeted linear schedule: 1 until `decay_from` of the budget, then linearly to 0 at
    the budget (pix2pix's second half when `decay_from` is 0.5)."""
    start = decay_from * budget
    if decay_from >= 1 or clock <= start:
        return 1.0
    return max(0.0, (budget - clock) / (budget - start))


class Arm:
    """One side of the race: `step` trains one step; its clock counts its own training time. The
    budgeted schedule scales the learning rates of `engine` (the training engine's `lr_scale`,
    so the doctor's rate changes and a restart's new optimizers follow it) or, for optimizers
    stepped outside the engine, each of `optimizers`' param groups from its rate at the start."""

    def __init__(self, name: str, step, generate, z: torch.Tensor, optimizers=(),
                 budget: float = 0.0, decay_from: float = 1.0, engine=None):
        self.name, self.step, self.generate, self.z = name, step, generate, z
        self.clock, self.steps = 0.0, 0
        self.seconds: list[float] = []
        self.fd: list[float] = []
        self.budget, self.decay_from, self.engine = budget, decay_from, engine
        self.groups = [(g, g["lr"]) for opt in optimizers for g in opt.param_groups]

    def train_for(self, seconds: float) -> None:
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            if self.decay_from < 1:
                f = lr_factor(self.clock + elapsed, self.budget, self.decay_from)
                if self.engine is not None:
                    self.engine.lr_scale = f
                for g, base in self.groups:
                    g["lr"] = base * f
            self.step()
            self.steps += 1
        self.clock += time.perf_counter() - t0


def first_time_at_or_below(seconds: list[float], fd: list[float], target: float,
                           window: int = 1) -> float | None:
    """The first evaluation time whose FD, as the median of the last `window` evaluations, is at
    or below `target`; None if none is."""
    for i in range(window - 1, len(fd)):
        if statistics.median(fd[i - window + 1:i + 1]) <= target:
            return seconds[i]
    return None


def speedup(t_dcgan: float | None, t_progan: float | None) -> float | None:
    return round(t_dcgan / t_progan, 3) if t_dcgan and t_progan else None


def run(argv: list[str]) -> int:
    parser = _parser()
    if "--quick" in argv:  # the quick size's defaults; flags given explicitly still win
        parser.set_defaults(resolution=32, seconds=150, eval_every=15, n_fd=500, n_images=2048,
                            phase_images=1600)
    args = parser.parse_args(argv)
    widths = {"resolution": args.resolution, "fmap_base": args.fmap_base, "fmap_max": args.fmap_max,
              "fmap_min": args.fmap_min, "d_fmap_min": args.d_fmap_min}
    try:
        pg_net = ProGANConfig(z_dim=64, **widths)
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        if field in widths:  # the config names its field; the user typed the flag
            raise UsageError(f"--{field.replace('_', '-')}: {rest}") from None
        raise UsageError(f"ProGAN network: {exc}") from None
    for flag, value in (("--lr", args.lr), ("--dcgan-lr", args.dcgan_lr)):
        if not value > 0:
            raise UsageError(f"{flag}: {value} is not allowed; must be > 0")
    if not 0 <= args.decay_from <= 1:
        raise UsageError(f"--decay-from: {args.decay_from} is not allowed; must be in [0, 1]")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    classifier, accuracy = metrics.load_classifier(args.cache_dir, metrics.settings_for(args.resolution))
    real = datasets.shapes(args.n_fd, args.resolution, seed=10_000).images  # held out
    real_f = metrics.features(classifier, real)
    z = torch.from_numpy(np.random.default_rng(99).standard_normal((args.n_fd, 64)).astype(np.float32))

    # each arm is the model `ganforge train` builds, stepped by this loop; its run directory
    # (sample grids, checkpoints) is not kept
    runs = tempfile.TemporaryDirectory(prefix="bench-progan-")
    dc = GANTrainer(TrainConfig(n_images=args.n_images, batch_size=args.batch_size, seed=0, threads=args.threads,
                                label_smoothing=0.1, instance_noise=0.1, doctor="off",
                                lr_g=args.dcgan_lr, lr_d=args.dcgan_lr,
                                network=DCGANConfig(z_dim=64, resolution=args.resolution)), Path(runs.name) / "dcgan")
    pg = ProGANTrainer(ProGANTrainConfig(n_images=args.n_images, batch_size=args.batch_size, seed=0,
                                         threads=args.threads, lr=args.lr, stable_images=args.phase_images,
                                         fade_images=args.phase_images, ema_images=args.ema_images,
                                         doctor=args.doctor, doctor_every=args.doctor_every,
                                         # steps: the doctor's horizon ("early" in a stage);
                                         # the budget in seconds ends the run
                                         steps=1_000_000, checkpoint_every=10 * args.doctor_every,
                                         network=pg_net), Path(runs.name) / "progan")

    # the DCGAN's weight average, kept as the ProGAN keeps its own (training/ema.py)
    dc_ema = averaged_copy(dc.G) if args.ema_images else None

    def dc_step():
        dc.train_step()
        if dc_ema is not None:
            update_average(dc_ema, dc.G, ema_beta(args.batch_size, dc.step * args.batch_size,
                                                  args.ema_images, pg.cfg.ema_rampup))

    def dc_generate(zz):
        G = dc_ema if dc_ema is not None else dc.G
        G.eval()
        with torch.no_grad():
            out = torch.cat([G(zz[i:i + 256].to(dc.engine.device)).cpu() for i in range(0, len(zz), 256)])
        dc.G.train()
        return out

    def pg_generate(zz):
        return torch.cat([pg.generate(zz[i:i + 256]) for i in range(0, len(zz), 256)])

    schedule = {"budget": args.seconds, "decay_from": args.decay_from}
    arms = [Arm("dcgan", dc_step, dc_generate, z, engine=dc.engine, **schedule),
            Arm("progan", pg.train_step, pg_generate, z, engine=pg.engine, **schedule)]

    def evaluate(arm: Arm) -> None:
        fake = arm.generate(arm.z).clamp(-1, 1)
        arm.seconds.append(round(arm.clock, 2))
        arm.fd.append(round(metrics.frechet_distance(metrics.features(classifier, fake), real_f), 3))
        extra = f" stage side {pg.cfg.network.side(pg.stage)} a={pg.alpha:.2f}" if arm.name == "progan" else ""
        print(f"{arm.name:6s} {arm.clock:7.1f} s  step {arm.steps:5d}  FD {arm.fd[-1]:8.2f}{extra}", flush=True)

    for arm in arms:
        evaluate(arm)
    next_eval = {a.name: args.eval_every for a in arms}
    while any(a.clock < args.seconds for a in arms):
        for arm in arms:  # alternate turns: both arms see the same machine load
            if arm.clock >= args.seconds:
                continue
            arm.train_for(min(args.slice, next_eval[arm.name] - arm.clock, args.seconds - arm.clock))
            if arm.clock >= next_eval[arm.name] or arm.clock >= args.seconds:
                evaluate(arm)
                next_eval[arm.name] = arm.clock + args.eval_every

    dcg, prg = arms
    kept = pg.keep_best() if args.doctor == "auto" else None
    before_keep = prg.fd[-1]
    if kept and kept["kept"]:     # the best weights put back: the final FD is theirs
        prg.fd.pop()
        prg.seconds.pop()
        evaluate(prg)
    target = dcg.fd[-1]

    def adam_lr(trainer: GANTrainer) -> dict[str, float]:  # the base rates the optimizers trained with
        return {k: trainer.task.opts[k].param_groups[0]["base_lr"] for k in ("G", "D")}

    t_dc, t_pg = (first_time_at_or_below(a.seconds, a.fd, target) for a in arms)
    target3 = statistics.median(dcg.fd[-3:])
    t3_dc, t3_pg = (first_time_at_or_below(a.seconds, a.fd, target3, window=3) for a in arms)
    evaluated = f"G_ema (half-life {args.ema_images} images)" if args.ema_images else "G"
    result = {
        "dcgan": {"seconds": dcg.seconds, "fd": dcg.fd, "steps": dcg.steps, "adam_lr": adam_lr(dc),
                  "evaluated": evaluated},
        "progan": {"seconds": prg.seconds, "fd": prg.fd, "steps": prg.steps, "adam_lr": adam_lr(pg),
                   "evaluated": evaluated,
                   "final_stage_side": pg.cfg.network.side(pg.stage), "final_alpha": pg.alpha,
                   "doctor": args.doctor, "kept": kept, "final_fd_before_keep": before_keep,
                   "best_fd": min(prg.fd), "final_over_best": round(prg.fd[-1] / min(prg.fd), 4),
                   "diagnoses": [d.failure for d in pg.task.watch.monitor.diagnoses],
                   "interventions": len(pg.task.watch.doctor.interventions)},
        "dcgan_final_fd": target,
        "seconds_to_dcgan_final": {"dcgan": t_dc, "progan": t_pg},
        "speedup_to_dcgan_final": speedup(t_dc, t_pg),
        "median_of_3": {"dcgan_final_fd": target3, "seconds_to_dcgan_final": {"dcgan": t3_dc, "progan": t3_pg},
                        "speedup_to_dcgan_final": speedup(t3_dc, t3_pg)},
        "final_fd_at_equal_time": {"seconds": args.seconds, "dcgan": dcg.fd[-1], "progan": prg.fd[-1]},
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
        "classifier_accuracy": accuracy,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    plot = Path(args.plot or Path(args.json).with_suffix(".png"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        ax.plot(arm.seconds, arm.fd, marker="o", label=arm.name)
    ax.axhline(target, color="grey", ls="--", lw=1, label="DCGAN final FD")
    ax.set_xlabel("training wall time per arm (s)")
    ax.set_ylabel("FD (shapes classifier features)")
    ax.set_yscale("log")
    ax.set_title(f"{args.resolution} px shapes, {args.threads} threads, arms interleaved")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
    print(f"DCGAN final FD {target}; seconds to reach it: DCGAN {t_dc}, ProGAN {t_pg}; "
          f"speedup {result['speedup_to_dcgan_final']}; final FDs at {args.seconds} s: "
          f"DCGAN {dcg.fd[-1]}, ProGAN {prg.fd[-1]}")
    if args.doctor == "auto":
        print(f"ProGAN with the doctor: best FD {min(prg.fd)}, final {prg.fd[-1]} (x{result['progan']['final_over_best']}"
              f" of the best); before the best weights were put back: {before_keep}")
    print(f"on 3-evaluation medians: DCGAN final FD {target3}; seconds to reach it: DCGAN {t3_dc}, "
          f"ProGAN {t3_pg}; speedup {result['median_of_3']['speedup_to_dcgan_final']}")
    print(f"wrote {args.json} and {plot}")
    runs.cleanup()
    return 0
