"""Mode coverage: vanilla GAN vs the doctor (vs PacGAN2) on 2-D mixtures and stacked digits.

    ganforge bench modes --json PATH [--quick] [--seeds N] [--steps N] [--width N]
                         [--mixtures ring,grid,stacked]
                         [--variants vanilla,doctor-auto,doctor-auto+drs,pacgan2]
                         [--samples N] [--cache-dir DIR]

2-D mixtures, ring of 8 and grid of 25 (VEEGAN / PacGAN): 2,500 samples per run; high quality =
within 3 std of the nearest mode; a mode is covered when it is the nearest mode of at least one
high-quality sample. The MLP GAN of training/mixtures.py; variants vanilla, doctor-auto, pacgan2,
and doctor-auto+drs: doctor-auto's trained G sampled with discriminator rejection sampling
(Azadi et al. 2019), no training of its own.

Stacked digits (PacGAN's stacked MNIST, on scikit-learn's 8x8 digits): three random digits of
the training split as the R, G and B channels, each pixel replicated 2x2 to 16x16 px; 1,000
modes (digit triples). The DCGAN of training/loop.py on `--data stacked_digits`; variants
vanilla and doctor-auto (the DCGAN has no packing). After training, 26,000 samples of G (eval
mode) are classified channel by channel by the digit classifier of training/metrics.py (trained
on the split's training side, its held-out accuracy printed); the triples give the modes
covered and KL(q || uniform over 1,000).

All variants run the same steps, the same seeds, side by side in this one process. Writes the
JSON (`{"<mixture>": {"<variant>": {"modes": [per seed], "hq" | "kl": [per seed], ...}},
"settings": {...}, "wall_seconds": s}`); per run, `<json stem>_samples/<mixture>_<variant>_seed<k>.npy`
(2-D: the samples; stacked: each sample's mode index); the run directories under
`<json stem>_runs/`; a scatter PNG per 2-D mixture; for stacked, a PNG grid of seed 0's samples
per variant, `<json stem>_stacked_<variant>.png`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ganforge.errors import UsageError

PUBLISHED = {  # modes / high-quality share (PacGAN, Lin et al. 2018, Table 2)
    "ring": {"GAN": (6.3, 0.982), "PacGAN4": (7.8, 0.959)},
    "grid": {"GAN": (17.3, 0.948), "PacGAN4": (24.8, 0.936)},
}
PUBLISHED_STACKED = {  # modes / KL over 26,000 samples (PacGAN, Lin et al. 2018, stacked MNIST)
    "DCGAN": (99.0, 3.40), "PacDCGAN": (1000.0, 0.07),
}
VARIANTS = {  # name -> overrides of the healthy preset
    "vanilla": {"doctor": "report"},
    "doctor-auto": {"doctor": "auto"},
    "doctor-auto+drs": {"doctor": "auto"},
    "pacgan2": {"doctor": "report", "network": {"pack": 2}},
}
# variant -> the variant whose trained G it samples with discriminator rejection sampling
DRS_OF = {"doctor-auto+drs": "doctor-auto"}
MIXTURE_DOCTOR_EVERY = 100   # steps between the doctor's observations on the 2-D mixtures
STACKED = "stacked"
STACKED_VARIANTS = ("vanilla", "doctor-auto")
NOT_STACKED = {"pacgan2": "the DCGAN has no packing",  # the DCGAN's D judges one image at a time
               "doctor-auto+drs": "rejection sampling is run on the 2-D mixtures only"}
STACKED_RESOLUTION = 16   # 8x8 digits, pixels replicated 2x2; G: 4x4 -> 8x8 -> 16x16
STACKED_SAMPLES = 26_000  # PacGAN's protocol
STACKED_POOL = 32_768     # training images drawn (about 33 per mode)


def _defaults(mixture: str, quick: bool) -> dict:
    """Steps, width and seeds of a mixture when the flags leave them out."""
    if mixture == STACKED:
        return {"steps": 1000 if quick else 5000, "width": 32, "seeds": 3}
    return {"steps": 300 if quick else 20_000, "width": 64 if quick else 128, "seeds": 5}


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag}: {value} is not allowed; must be >= 1")


def run(argv: list[str]) -> int:
    import torch

    from ganforge.cli import Parser
    from ganforge.training.mixtures import MIXTURES

    p = Parser(prog="ganforge bench modes", description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps; 2-D: narrower nets (stacked: about 2 min on 2 cores)")
    p.add_argument("--seeds", type=int, default=None, help="runs per variant (default 5; stacked 3)")
    p.add_argument("--steps", type=int, default=None,
                   help="D and G steps per run (default 20000, quick 300; stacked 5000, quick 1000)")
    p.add_argument("--width", type=int, default=None,
                   help="2-D: hidden units of G and D (128, quick 64); stacked: DCGAN's ngf = ndf (32)")
    p.add_argument("--mixtures", default="ring,grid", help=f"any of {', '.join((*MIXTURES, STACKED))}")
    p.add_argument("--variants", default=None,
                   help=f"any of {', '.join(VARIANTS)} (default: every one a mixture has)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"stacked: samples counted per run (default {STACKED_SAMPLES:,})")
    p.add_argument("--cache-dir", help="where the digit classifier is cached")
    a = p.parse_args(argv)
    mixtures = list(dict.fromkeys(m for m in a.mixtures.split(",") if m))
    allowed = (*MIXTURES, STACKED)
    if not mixtures:
        raise UsageError(f"--mixtures: {a.mixtures!r} names no mixture; allowed: {', '.join(allowed)}")
    for m in mixtures:
        if m not in allowed:
            raise UsageError(f"--mixtures: {m!r} is not one of {', '.join(allowed)}")
    asked = None if a.variants is None else [v for v in a.variants.split(",") if v]
    for v in asked or ():
        if v not in VARIANTS:
            raise UsageError(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
        if STACKED in mixtures and v not in STACKED_VARIANTS:
            raise UsageError(f"--variants: {v!r} is not available for {STACKED} ({NOT_STACKED[v]}); "
                             f"allowed there: {', '.join(STACKED_VARIANTS)}")
    if asked == []:
        raise UsageError(f"--variants: {a.variants!r} names no variant; allowed: {', '.join(VARIANTS)}")
    for flag, value in (("--seeds", a.seeds), ("--steps", a.steps), ("--width", a.width),
                        ("--samples", a.samples)):
        _positive(flag, value)

    out = Path(a.json)
    sample_dir = out.parent / f"{out.stem}_samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results: dict = {"settings": {"quick": a.quick}}
    for m in mixtures:  # each once: the list has no repeats
        d = _defaults(m, a.quick)
        settings = {"steps": a.steps or d["steps"], "width": a.width or d["width"],
                    "seeds": a.seeds or d["seeds"]}
        variants = asked or list(STACKED_VARIANTS if m == STACKED else VARIANTS)
        if m == STACKED:
            from ganforge.training import metrics

            classifier, accuracy = metrics.load_digit_classifier(a.cache_dir)
            print(f"digit classifier: {100 * accuracy['digit']:.1f} % held-out accuracy on "
                  f"{accuracy['n_test']} load_digits test images (trained on the other "
                  f"{accuracy['n_train']})", flush=True)
            settings.update(samples=a.samples or STACKED_SAMPLES, resolution=STACKED_RESOLUTION,
                            n_images=STACKED_POOL, classifier_accuracy=round(accuracy["digit"], 4),
                            classifier_test_images=accuracy["n_test"])
            results[m] = _stacked(settings, variants, classifier, out, sample_dir)
        else:
            results[m] = _mixture(m, settings, variants, out, sample_dir)
        results["settings"][m] = settings
    wall = time.perf_counter() - t0
    results["wall_seconds"] = round(wall, 1)
    out.write_text(json.dumps(results, indent=2) + "\n")
    _print_tables(results, mixtures)
    print(f"\nwall time {wall:.0f} s. Results {out}, per-run files {sample_dir}/, "
          f"plots {out.stem}_<mixture>[_<variant>].png")
    return 0


def _mixture(m: str, settings: dict, variants: list[str], out: Path, sample_dir: Path) -> dict:
    """The MLP GAN on 2-D mixture `m`, every variant and seed; run directories under
    `<json stem>_runs/`."""
    from ganforge.training import options
    from ganforge.training.mixtures import MixtureTrainConfig, mixture, rejection_sample_run, scatter, train_mixture

    run_dir = out.parent / f"{out.stem}_runs"
    rows, panels, trained = {}, {}, {}
    for v in variants:
        base = DRS_OF.get(v, v)
        over = json.loads(json.dumps(VARIANTS[base]))
        net = {"ngf": settings["width"], "ndf": settings["width"], **over.pop("network", {})}
        row = {"modes": [], "hq": [], "seconds": [], "diagnoses": [], "restarted": []}
        if v in DRS_OF:
            row["accepted"] = []
        for seed in range(settings["seeds"]):
            where = run_dir / f"{m}_{base}_seed{seed}"
            if (base, seed) not in trained:
                cfg = options.config_from(MixtureTrainConfig, "mlpgan", "healthy", overrides={
                    "data": m, "steps": settings["steps"], "seed": seed, "threads": 1,
                    "doctor_every": MIXTURE_DOCTOR_EVERY, "checkpoint_every": settings["steps"],
                    "network": net, **over})
                trained[base, seed] = train_mixture(cfg, where, progress=False)
            s = trained[base, seed]
            if v in DRS_OF:   # the same G, sampled by discriminator rejection sampling
                kept, accepted = rejection_sample_run(where, 2500, seed + 1)
                got = {**mixture(m).coverage(kept), "samples": kept, "accepted": round(accepted, 4)}
            else:
                got = {"modes": s["modes"], "hq": s["hq"], "samples": np.load(s["points"])}
            np.save(sample_dir / f"{m}_{v}_seed{seed}.npy", got["samples"])
            row["modes"].append(got["modes"])
            row["hq"].append(round(got["hq"], 4))
            row["seconds"].append(s["seconds"])
            row["diagnoses"].append(s["diagnoses"])
            row["restarted"].append(s["restarted"])
            extra = ""
            if v in DRS_OF:
                row["accepted"].append(got["accepted"])
                extra = f"  accepted {100 * got['accepted']:.1f} % of G's draws ({base}'s G)"
            print(f"{m:<5} {v:<16} seed {seed}: modes {got['modes']:>2}  hq {100 * got['hq']:5.1f} %  "
                  f"{s['seconds']:.1f} s  diagnoses {s['diagnoses'] or '-'}{extra}", flush=True)
            if seed == 0:
                panels[f"{v} seed 0: {got['modes']} modes, {100 * got['hq']:.0f} % hq"] = got["samples"]
        rows[v] = row
    scatter(panels, mixture(m), out.parent / f"{out.stem}_{m}.png")
    return rows


def _stacked(settings: dict, variants: list[str], classifier, out: Path, sample_dir: Path) -> dict:
    """The DCGAN on stacked digits, every variant and seed; modes counted over the samples."""
    import torch

    from ganforge.images import save_grid
    from ganforge.training import metrics
    from ganforge.training import options
    from ganforge.training.gan import build_dcgan, load_checkpoint
    from ganforge.training.loop import TrainConfig, train_dcgan
    from ganforge.training.gan_task import to_uint8

    run_dir = out.parent / f"{out.stem}_runs"
    rows = {}
    for v in variants:
        row = {"modes": [], "kl": [], "seconds": [], "diagnoses": [], "interventions": [], "runs": []}
        for seed in range(settings["seeds"]):
            cfg = options.config_from(TrainConfig, "dcgan", "stacked-digits", overrides={
                "n_images": settings["n_images"], "steps": settings["steps"], "seed": seed, "threads": 1,
                "doctor": VARIANTS[v]["doctor"], "checkpoint_every": settings["steps"],
                "network": {"ngf": settings["width"], "ndf": settings["width"], "resolution": settings["resolution"]}})
            where = run_dir / f"{STACKED}_{v}_seed{seed}"
            s = train_dcgan(cfg, where, progress=False)
            G, _ = build_dcgan(load_checkpoint(s["checkpoint"]))
            c = metrics.stacked_mode_coverage(G, classifier, settings["samples"], seed=10_000 + seed)
            np.save(sample_dir / f"{STACKED}_{v}_seed{seed}.npy", c["sample_modes"])
            row["modes"].append(c["modes"])
            row["kl"].append(round(c["kl"], 4))
            row["seconds"].append(s["seconds"])
            row["diagnoses"].append(s["diagnoses"])
            row["interventions"].append(s["interventions"])
            row["runs"].append(str(where))
            print(f"{STACKED} {v:<12} seed {seed}: modes {c['modes']:>4}  KL {c['kl']:.3f}  "
                  f"{s['seconds']:.1f} s  diagnoses {s['diagnoses'] or '-'}, "
                  f"{s['interventions']} interventions", flush=True)
            if seed == 0:
                z = torch.from_numpy(np.random.default_rng(10_000).standard_normal(
                    (64, cfg.network.z_dim)).astype(np.float32))
                with torch.no_grad():
                    images = to_uint8(G(z))                                 # (64, 16, 16, 3)
                images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)  # (64, 64, 64, 3)
                save_grid(images, out.parent / f"{out.stem}_{STACKED}_{v}.png", nrow=8)
        rows[v] = row
    return rows


def _print_tables(results: dict, mixtures: list[str]) -> None:
    flat = [m for m in mixtures if m != STACKED]
    if flat:
        print(f"\n{'mixture':<8} {'variant':<17} {'modes (mean ± std)':>20} {'high quality %':>18}")
        for m in flat:
            for v, r in results[m].items():
                acc = f"   ({100 * np.mean(r['accepted']):.1f} % of draws accepted)" if "accepted" in r else ""
                print(f"{m:<8} {v:<17} {np.mean(r['modes']):>11.1f} ± {np.std(r['modes']):<6.1f} "
                      f"{100 * np.mean(r['hq']):>9.1f} ± {100 * np.std(r['hq']):<5.1f}{acc}")
            for name, (modes, hq) in PUBLISHED[m].items():
                print(f"{m:<8} {name + ' (pub.)':<17} {modes:>11.1f}{'':9} {100 * hq:>9.1f}")
        for m in flat:
            s = results["settings"][m]
            print(f"{m}: {s['steps']} steps per run, width {s['width']}, {s['seeds']} seeds, 2,500 samples")
    if STACKED in mixtures:
        s = results["settings"][STACKED]
        print(f"\n{'mixture':<8} {'variant':<17} {'modes of 1000':>20} {'KL(q || uniform)':>20}")
        for v, r in results[STACKED].items():
            print(f"{STACKED:<8} {v:<17} {np.mean(r['modes']):>11.1f} ± {np.std(r['modes']):<6.1f} "
                  f"{np.mean(r['kl']):>11.3f} ± {np.std(r['kl']):<6.3f}")
        for name, (modes, kl) in PUBLISHED_STACKED.items():
            print(f"{STACKED:<8} {name + ' (pub.)':<17} {modes:>11.1f}{'':9} {kl:>11.3f}")
        fewer = "" if s["samples"] == STACKED_SAMPLES else f" (the published protocol: {STACKED_SAMPLES:,})"
        print(f"{STACKED}: {s['steps']} steps per run, ngf = ndf = {s['width']}, {s['resolution']} px, "
              f"{s['seeds']} seeds, {s['samples']:,} samples counted per run{fewer}; "
              f"digit classifier {100 * s['classifier_accuracy']:.1f} % on "
              f"{s['classifier_test_images']} held-out digits")
