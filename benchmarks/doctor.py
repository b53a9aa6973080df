"""The training doctor on failing GANs: diagnosis rates, and `--doctor auto` against `report`.

    ganforge bench doctor --json PATH [--quick] [--data shapes,ring,grid] [--seeds N]
                          [--presets healthy,d-dominates,g-dominates,mode-collapse]
                          [--steps N] [--samples N] [--cache-dir DIR] [--mixture-steps N]
                          [--classifier-seeds S1,S2,...]

Each failure preset (the three that fail on purpose, and healthy) is trained on each `--data`,
for every seed, twice with the same budget of steps: `--doctor report` (diagnoses only) and
`--doctor auto` (remedies, restarts, the best weights kept where the trainer keeps them).

shapes: the DCGAN presets of training/presets/dcgan on procedural shapes at 16 px.
Measured per run:

    diagnoses       each failure named, the step it was named and the step its streak began
    remedies        the knobs set, the restarts (changes, the step rewound to), the step whose
                    weights the final checkpoint holds
    cleared         (auto) for each failure treated: not diagnosed again after the remedy, and
                    its condition not holding at the last observation
    fd              the Fréchet distance of the shapes classifier's features (training/metrics.py;
                    the classifier trained on 16 px shapes, `metrics.settings_for(16)`) between
                    `--samples` images of the final G (eval mode, fixed latents) and as many
                    held-out real shapes; lower is better
    pooled_fd       the same distance in the doctor's feature space (images average-pooled to
                    8x8 per channel), on the same images

Criteria: each failure preset's failure named in >= 4 of 5 report runs; a diagnosis in <= 1 of 5
healthy report runs; auto's distance below report's in >= 4 of 5 seeds of each failure preset,
judged on each distance.
`--classifier-seeds`: every run's samples measured again with classifiers trained as the standard
one from these seeds (`by_classifier_seed` per preset; the criteria stay on the standard one). Far
from the data, where report's G draws flat tiles and auto's blobs, the distance depends on the
classifier's training run, and so can the verdict (docs/doctor.md).
Writes the JSON (per seed figures, settings, criteria), each run's samples as
`<json stem>_samples/<preset>_<mode>_seed<k>.npy` (uint8 NHWC) and the real images they are
compared with (`real.npy`), the run directories under `<json stem>_runs/`, and
`<json stem>_shapes.png`: 16 held-out shapes, then per preset 16 samples of seed 0's report run
and 16 of its auto run, a row each.

ring, grid: the MLP GAN presets of training/presets/mlpgan on the 2-D mixtures (ring of 8
Gaussians, grid of 25), trained by `train_mixture`, the trainer of `ganforge train mlpgan --data
ring|grid --preset NAME`, with its defaults (batch 256, width 128 unless the preset says
otherwise) and the default thresholds; observations and checkpoints every 50 steps. Measured per
run: diagnoses, remedies and cleared as above, and the outcome as `ganforge bench modes` measures
it (the VEEGAN / PacGAN protocol): 2,500 points of the final G (eval mode, latents seeded by
seed + 1); a point is high quality within 3 std of its nearest mode; `modes` = modes that are the
nearest mode of a high-quality point, `hq` = the high-quality share. "Auto better" on a seed:
auto covers more modes than report, or as many modes with a higher high-quality share.
Criteria per (mixture, preset) as for shapes, plus: the failure treated and cleared in >= 4 of 5
auto runs of each failure preset. Writes each run's 2,500 points as
`<json stem>_samples/<mixture>_<preset>_<mode>_seed<k>.npy` (float32 (2500, 2)), the run
directories under `<json stem>_runs/`, and a scatter of seed 0 per mixture,
`<json stem>_<mixture>.png`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from ganforge.errors import UsageError

PRESETS = {"healthy": None, "d-dominates": "d_dominates", "g-dominates": "g_dominates",
           "mode-collapse": "mode_collapse"}
MODES = ("report", "auto")
SHAPES = "shapes"
MIXTURES = ("ring", "grid")            # training/mixtures.py
DATA = (SHAPES, *MIXTURES)
RESOLUTION = 16
# On 16 px shapes a healthy DCGAN's samples stay alike in the pooled space for hundreds of steps
# (diversity 0.14-0.6); collapsed ones sit at 0.03-0.07 with near-duplicates: the diversity
# threshold is set between them.
THRESHOLDS = "collapse_diversity=0.1"
RUN = {"batch_size": 32, "n_images": 2048, "doctor_every": 10, "checkpoint_every": 10, "log_every": 10,
       "sample_every": 100_000, "threads": 1}
# the 2-D mixtures: the trainer's defaults and thresholds; restarts close to each streak's onset
MIX_RUN = {"doctor_every": 50, "checkpoint_every": 50, "log_every": 50, "threads": 1}
MIX_SAMPLES = 2500                     # the VEEGAN / PacGAN protocol (MixtureTask.finish)


def _names(flag: str, text: str, allowed, what: str) -> list[str]:
    """A comma-separated list of names, each one of `allowed`, in order, without repeats."""
    names = list(dict.fromkeys(x for x in text.split(",") if x))
    if not names:
        raise UsageError(f"{flag}: {text!r} names no {what}; allowed: {', '.join(allowed)}")
    for name in names:
        if name not in allowed:
            raise UsageError(f"{flag}: {name!r} is not one of {', '.join(allowed)}")
    return names


def _defaults(quick: bool) -> dict:
    return {"steps": 150, "seeds": 3, "samples": 256} if quick else {"steps": 400, "seeds": 5, "samples": 512}


def _mixture_steps(quick: bool) -> int:
    return 500 if quick else 2000


def run(argv: list[str]) -> int:
    import torch

    from ganforge.cli import Parser

    p = Parser(prog="ganforge bench doctor", description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--quick", action="store_true",
                   help="3 seeds; shapes: 150 steps, 256 samples; mixtures: 500 steps (a few minutes)")
    p.add_argument("--data", default=",".join(DATA), help=f"any of {', '.join(DATA)}")
    p.add_argument("--seeds", type=int, default=None, help="seeds per preset and mode (default 5; quick 3)")
    p.add_argument("--steps", type=int, default=None, help="shapes: steps per run (default 400; quick 150)")
    p.add_argument("--presets", default=",".join(PRESETS), help=f"any of {', '.join(PRESETS)}")
    p.add_argument("--samples", type=int, default=None, help="shapes: images per FD (default 512; quick 256)")
    p.add_argument("--cache-dir", help="shapes: where the shapes classifier is cached")
    p.add_argument("--classifier-seeds", default="",
                   help="shapes: also measure every run's samples with classifiers trained from these "
                        "seeds (comma-separated integers); the criteria stay on the standard classifier")
    p.add_argument("--mixture-steps", type=int, default=None,
                   help="ring, grid: G steps per run (default 2000; quick 500)")
    a = p.parse_args(argv)
    data = _names("--data", a.data, DATA, "data set")
    presets = _names("--presets", a.presets, PRESETS, "preset")
    for flag, value in (("--seeds", a.seeds), ("--steps", a.steps), ("--samples", a.samples),
                        ("--mixture-steps", a.mixture_steps)):
        if value is not None and value < 2:
            raise UsageError(f"{flag}: {value} is not allowed; must be >= 2")
    try:
        classifier_seeds = list(dict.fromkeys(int(x) for x in a.classifier_seeds.split(",") if x.strip()))
    except ValueError:
        raise UsageError(f"--classifier-seeds: {a.classifier_seeds!r} is not allowed; "
                         f"must be comma-separated integers, e.g. 1235,1236") from None
    d = _defaults(a.quick)
    settings = {"quick": a.quick, "steps": a.steps or d["steps"], "seeds": a.seeds or d["seeds"],
                "samples": a.samples or d["samples"], "resolution": RESOLUTION, "thresholds": THRESHOLDS,
                "classifier_seeds": classifier_seeds, **RUN}

    out = Path(a.json)
    sample_dir = out.parent / f"{out.stem}_samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results: dict = {"settings": {"data": data, "quick": a.quick, "seeds": settings["seeds"]}}
    criteria: dict = {}
    if SHAPES in data:
        shapes = _shapes(presets, settings, a.cache_dir, out, sample_dir)
        results["settings"].update(shapes["settings"])
        results["presets"] = shapes["presets"]
        criteria.update(_criteria(results["presets"], settings["seeds"]))
    mixtures = [m for m in data if m in MIXTURES]
    if mixtures:
        mix = {"quick": a.quick, "steps": a.mixture_steps or _mixture_steps(a.quick),
               "seeds": settings["seeds"], "samples": MIX_SAMPLES, "thresholds": "defaults", **MIX_RUN}
        results["mixture_settings"] = mix
        results["mixtures"] = {}
        for m in mixtures:
            results["mixtures"][m] = _mixture(m, presets, mix, out, sample_dir)
            criteria.update(_mix_criteria(m, results["mixtures"][m]["presets"], mix["seeds"]))
    results["criteria"] = criteria
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if SHAPES in data:
        _print(results)
    if mixtures:
        _print_mixtures(results)
    print()
    for goal, ok in criteria.items():
        print(f"{'met' if ok else 'NOT met':<8} {goal}")
    print(f"\nwall time {results['wall_seconds']:.0f} s. Results {out}, samples {sample_dir}/")
    return 0


def _shapes(presets: list[str], settings: dict, cache_dir: str | None, out: Path, sample_dir: Path) -> dict:
    """The DCGAN presets on 16 px shapes: {"settings": ..., "presets": {...}} of the results."""
    from ganforge.training import data as tdata
    from ganforge.training import metrics

    classifier, accuracy = metrics.load_classifier(cache_dir, metrics.settings_for(RESOLUTION))
    real = tdata.gan_images("shapes", settings["samples"], RESOLUTION, 99_991).images
    np.save(sample_dir / "real.npy", real)
    real_features = (metrics.features(classifier, real), _pooled(real))
    results: dict = {"settings": {**settings, "classifier_accuracy": accuracy}, "presets": {}}
    for name in presets:
        runs = {m: [_one(name, m, seed, settings, classifier, real_features, out, sample_dir)
                    for seed in range(settings["seeds"])] for m in MODES}
        results["presets"][name] = {"failure": PRESETS[name], "runs": runs, "summary": _summary(name, runs)}
    if settings["classifier_seeds"]:
        _by_classifier_seed(results["presets"], real, settings["classifier_seeds"], cache_dir)
    _sample_grid(real, results["presets"], out.parent / f"{out.stem}_shapes.png")
    return results


def _by_classifier_seed(presets: dict, real: np.ndarray, seeds: list[int], cache_dir: str | None) -> None:
    """Every run's samples measured with the classifier of each seed (the standard settings
    otherwise): per preset, summary["by_classifier_seed"][seed] = the FDs, auto better count and
    the classifier's held-out accuracy."""
    from ganforge.training import metrics

    for seed in seeds:
        s = dataclasses.replace(metrics.settings_for(RESOLUTION), seed=seed)
        classifier, accuracy = metrics.load_classifier(cache_dir, s)
        real_features = metrics.features(classifier, real)
        for p in presets.values():
            fd = {m: [round(metrics.frechet_distance(metrics.features(classifier, np.load(r["samples"])),
                                                     real_features), 3) for r in p["runs"][m]] for m in MODES}
            p["summary"].setdefault("by_classifier_seed", {})[str(seed)] = {
                "fd_report": fd["report"], "fd_auto": fd["auto"],
                "auto_better": sum(b < a for a, b in zip(fd["report"], fd["auto"])), "accuracy": accuracy}


def _sample_grid(real: np.ndarray, presets: dict, path: Path, n: int = 16, zoom: int = 4) -> Path:
    """One PNG of what the distances measure: a row of `n` held-out shapes, then for each preset
    in the order run a row of seed 0's report samples and one of its auto samples, each image
    enlarged `zoom` times (nearest)."""
    from ganforge.images import save_grid

    rows = [real[:n]] + [np.load(p["runs"][m][0]["samples"])[:n] for p in presets.values() for m in MODES]
    images = np.concatenate(rows).repeat(zoom, axis=1).repeat(zoom, axis=2)
    return save_grid(images, path, nrow=n)


def _one(preset: str, mode: str, seed: int, settings: dict, classifier, real_features, out: Path,
         sample_dir: Path) -> dict:
    """Train one run, sample its final G, measure the FD; the run's figures."""
    import torch
    from ganforge.training import metrics, options
    from ganforge.training.gan import build_dcgan, load_checkpoint
    from ganforge.training.gan_task import to_uint8
    from ganforge.training.loop import TrainConfig, train_dcgan
    from ganforge.training.monitor import Thresholds

    cfg = options.config_from(TrainConfig, "dcgan", preset, overrides={
        **RUN, "steps": settings["steps"], "seed": seed, "doctor": mode,
        "thresholds": THRESHOLDS})
    cfg.network = dataclasses.replace(cfg.network, resolution=RESOLUTION)
    where = out.parent / f"{out.stem}_runs" / f"{preset}_{mode}_seed{seed}"
    s = train_dcgan(cfg, where, progress=False)
    payload = load_checkpoint(s["checkpoint"])
    G, _ = build_dcgan(payload)
    z = torch.from_numpy(np.random.default_rng(10_000 + seed).standard_normal(
        (settings["samples"], G.cfg.z_dim)).astype(np.float32))
    with torch.no_grad():
        images = to_uint8(G(z))                                       # (N, 16, 16, 3)
    path = sample_dir / f"{preset}_{mode}_seed{seed}.npy"
    np.save(path, images)
    fd = metrics.frechet_distance(metrics.features(classifier, images), real_features[0])
    pooled_fd = metrics.frechet_distance(_pooled(images), real_features[1])
    doc = json.loads((where / "doctor.json").read_text())
    rows = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines() if line.strip()]
    scored = [r for r in rows if "s_G" in r]
    row = {"seed": seed, "fd": round(fd, 3), "pooled_fd": round(pooled_fd, 3),
           "doctor_fd": scored[-1].get("fd") if scored else None,
           **_doctor_record(doc, rows, mode, Thresholds.parse(THRESHOLDS), settings["steps"]),
           "kept_step": s.get("kept_step"),
           "network": payload["config"], "seconds": s["seconds"], "samples": str(path), "run": str(where)}
    named = ",".join(sorted({x["failure"] for x in row["diagnoses"]})) or "-"
    print(f"{preset:<14} {mode:<6} seed {seed}: fd {fd:9.1f} pooled {pooled_fd:6.2f}  diagnoses {named:<26} "
          f"restarts {len(row['restarts'])}  kept step {row['kept_step']}  {s['seconds']:.0f} s", flush=True)
    return row


def _doctor_record(doc: dict, rows: list[dict], mode: str, th, steps: int) -> dict:
    """A run's diagnoses, remedies, restarts, optimizer steps and (auto) whether each treated
    failure cleared, from its doctor.json (`doc`) and metrics.jsonl rows."""
    from ganforge.training.monitor import check

    cleared = {}
    for i in doc["interventions"]:
        f = i["failure"]
        if mode != "auto" or f in cleared:
            continue
        restart = next((r for r in doc["restarts"] if r["failure"] == f), None)
        after = restart["step"] if restart else i["step"]
        # the rows trained after the remedy: past the restart's row, or past the diagnosis
        tail = rows[next((k for k, r in enumerate(rows) if "rewound_to" in r and r["step"] == after), -1) + 1:] \
            if restart else [r for r in rows if r["step"] > after]
        tail_scored = [r for r in tail if "s_G" in r]
        again = any(f in r.get("diagnoses", []) for r in tail)
        holds = bool(tail_scored) and f in check(tail_scored[-1], th, steps)
        cleared[f] = not again and not holds
    return {"diagnoses": [{"failure": x["failure"], "step": x["step"], "onset": x.get("onset")}
                          for x in doc["diagnoses"]],
            "interventions": [{k: i[k] for k in ("step", "failure", "action", "knob", "old", "new")}
                              for i in doc["interventions"]],
            "restarts": [{k: r[k] for k in ("failure", "step", "onset", "from_step", "changes")}
                         for r in doc["restarts"]],
            "cleared": cleared,
            "optimizer_steps": steps + sum(r["step"] - r["from_step"] for r in doc["restarts"])}


def _pooled(images: np.ndarray) -> np.ndarray:
    from ganforge.training.gan_task import to_tensor
    from ganforge.training.monitor import features

    return features(to_tensor(images))


def _diagnoses(preset: str, runs: dict) -> dict:
    """What the doctor named, on any data: report runs with any diagnosis, report runs naming the
    preset's failure, auto runs that treated it and those where it cleared."""
    failure = PRESETS[preset]
    named = lambda r: {x["failure"] for x in r["diagnoses"]}
    out = {"report_any_diagnosis": sum(bool(named(r)) for r in runs["report"])}
    if failure:
        out["report_named"] = sum(failure in named(r) for r in runs["report"])
        treated = [r["cleared"][failure] for r in runs["auto"] if failure in r["cleared"]]
        out["auto_treated"], out["auto_cleared"] = len(treated), sum(treated)
    return out


def _summary(preset: str, runs: dict) -> dict:
    rep, auto = runs["report"], runs["auto"]
    return {"fd_report": [r["fd"] for r in rep], "fd_auto": [r["fd"] for r in auto],
            "pooled_fd_report": [r["pooled_fd"] for r in rep], "pooled_fd_auto": [r["pooled_fd"] for r in auto],
            "auto_better": sum(b["fd"] < a["fd"] for a, b in zip(rep, auto)),
            "auto_better_pooled": sum(b["pooled_fd"] < a["pooled_fd"] for a, b in zip(rep, auto)),
            **_diagnoses(preset, runs)}


def _goals(presets: dict, seeds: int, outcomes: dict[str, str], prefix: str = "") -> dict:
    """The goals, scaled to the seeds run (4 of 5, 1 of 5): each failure preset named in report
    runs and each `outcomes` count (label: summary key) reached; healthy runs left undiagnosed."""
    need, allow = -(-4 * seeds // 5), seeds // 5
    out = {}
    for name, p in presets.items():
        s = p["summary"]
        if p["failure"]:
            out[f"{prefix}{name}: named in report runs >= {need}/{seeds}"] = s["report_named"] >= need
            for label, key in outcomes.items():
                out[f"{prefix}{name}: {label} >= {need}/{seeds}"] = s[key] >= need
        else:
            out[f"{prefix}{name}: diagnosed in report runs <= {allow}/{seeds}"] = s["report_any_diagnosis"] <= allow
    return out


def _criteria(presets: dict, seeds: int) -> dict:
    return _goals(presets, seeds, {"auto better classifier fd": "auto_better",
                                   "auto better pooled fd": "auto_better_pooled"})


def _print(results: dict) -> None:
    n = results["settings"]["seeds"]
    print(f"\n{'preset':<14} {'named':>9} {'fd report':>19} {'fd auto':>19} {'better':>7} "
          f"{'pooled report':>15} {'pooled auto':>15} {'better':>7} {'cleared':>8}")
    for name, p in results["presets"].items():
        s = p["summary"]
        named = f"{s['report_named']}/{n}" if p["failure"] else f"{s['report_any_diagnosis']}/{n} any"
        cleared = f"{s['auto_cleared']}/{s['auto_treated']}" if p["failure"] else "-"
        ms = lambda v: f"{np.mean(v):.1f} ± {np.std(v):.1f}"
        print(f"{name:<14} {named:>9} {ms(s['fd_report']):>19} {ms(s['fd_auto']):>19} {s['auto_better']:>5}/{n} "
              f"{ms(s['pooled_fd_report']):>15} {ms(s['pooled_fd_auto']):>15} {s['auto_better_pooled']:>5}/{n} "
              f"{cleared:>8}")
    seeds = results["settings"].get("classifier_seeds") or []
    if seeds:
        print(f"\nclassifier fd by the classifier's seed (standard {_standard_seed()}): report mean, auto mean, "
              f"auto better")
        for name, p in results["presets"].items():
            cells = [f"{sd}: {np.mean(v['fd_report']):.0f}, {np.mean(v['fd_auto']):.0f}, {v['auto_better']}/{n}"
                     for sd, v in p["summary"]["by_classifier_seed"].items()]
            print(f"{name:<14} " + " | ".join(cells))


def _standard_seed() -> int:
    from ganforge.training import metrics

    return metrics.settings_for(RESOLUTION).seed



# ---------------------------------------------------------------------------------------------
# The 2-D mixtures: the MLP GAN presets, outcome = modes covered and high-quality share

def _mixture(m: str, presets: list[str], settings: dict, out: Path, sample_dir: Path) -> dict:
    """Every preset, mode and seed of the MLP GAN on mixture `m`; a scatter of seed 0."""
    from ganforge.training.mixtures import mixture, scatter

    mix = mixture(m)
    got: dict = {"n_modes": mix.n_modes, "presets": {}}
    panels = {}
    for name in presets:
        runs = {mode: [_one_mixture(m, name, mode, seed, settings, out, sample_dir)
                       for seed in range(settings["seeds"])] for mode in MODES}
        got["presets"][name] = {"failure": PRESETS[name], "runs": runs, "summary": _mix_summary(name, runs)}
        for mode in MODES:
            r = runs[mode][0]
            panels[f"{name} {mode} seed 0: {r['modes']} modes, {100 * r['hq']:.0f} % hq"] = np.load(r["samples"])
    scatter(panels, mix, out.parent / f"{out.stem}_{m}.png", cols=2)
    return got


def _one_mixture(m: str, preset: str, mode: str, seed: int, settings: dict, out: Path,
                 sample_dir: Path) -> dict:
    """Train one MLP GAN run as `ganforge train mlpgan --data m --preset preset` does; its
    figures, its 2,500 points saved next to the JSON."""
    from ganforge.training import options
    from ganforge.training.mixtures import MixtureTrainConfig, train_mixture
    from ganforge.training.monitor import Thresholds

    cfg = options.config_from(MixtureTrainConfig, "mlpgan", preset, overrides={
        **MIX_RUN, "data": m, "steps": settings["steps"], "seed": seed, "doctor": mode})
    where = out.parent / f"{out.stem}_runs" / f"{m}_{preset}_{mode}_seed{seed}"
    s = train_mixture(cfg, where, progress=False)
    points = np.load(s["points"])                     # (2500, 2): G's points, latents seeded by seed + 1
    path = sample_dir / f"{m}_{preset}_{mode}_seed{seed}.npy"
    np.save(path, points)
    doc = json.loads((where / "doctor.json").read_text())
    rows = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines() if line.strip()]
    scored = [r for r in rows if "s_G" in r]
    row = {"seed": seed, "modes": s["modes"], "hq": round(s["hq"], 4), "n_modes": s["n_modes"],
           "doctor_modes": scored[-1].get("modes") if scored else None,
           **_doctor_record(doc, rows, mode, Thresholds(), settings["steps"]),
           "network": s["network"], "seconds": s["seconds"], "samples": str(path), "run": str(where)}
    named = ",".join(sorted({x["failure"] for x in row["diagnoses"]})) or "-"
    print(f"{m:<5} {preset:<14} {mode:<6} seed {seed}: modes {row['modes']:>2}/{row['n_modes']}  "
          f"hq {100 * row['hq']:5.1f} %  diagnoses {named:<26} restarts {len(row['restarts'])}  "
          f"{s['seconds']:.0f} s", flush=True)
    return row


def _mix_better(report: dict, auto: dict) -> bool:
    """Auto ends better: more modes covered, or as many with a higher high-quality share."""
    return auto["modes"] > report["modes"] or (auto["modes"] == report["modes"] and auto["hq"] > report["hq"])


def _mix_summary(preset: str, runs: dict) -> dict:
    rep, auto = runs["report"], runs["auto"]
    return {"modes_report": [r["modes"] for r in rep], "modes_auto": [r["modes"] for r in auto],
            "hq_report": [r["hq"] for r in rep], "hq_auto": [r["hq"] for r in auto],
            "auto_better": sum(_mix_better(a, b) for a, b in zip(rep, auto)),
            **_diagnoses(preset, runs)}


def _mix_criteria(m: str, presets: dict, seeds: int) -> dict:
    """The goals on mixture `m`."""
    return _goals(presets, seeds, {"auto better (modes, then high quality)": "auto_better",
                                   "treated and cleared in auto runs": "auto_cleared"}, prefix=f"{m} ")


def _print_mixtures(results: dict) -> None:
    st = results["mixture_settings"]
    n = st["seeds"]
    print(f"\n{'data':<5} {'preset':<14} {'named':>9} {'modes report':>14} {'modes auto':>14} "
          f"{'hq % report':>13} {'hq % auto':>13} {'better':>7} {'cleared':>8}")
    for m, got in results["mixtures"].items():
        for name, p in got["presets"].items():
            s = p["summary"]
            named = f"{s['report_named']}/{n}" if p["failure"] else f"{s['report_any_diagnosis']}/{n} any"
            cleared = f"{s['auto_cleared']}/{s['auto_treated']}" if p["failure"] else "-"
            ms = lambda v, k=1: f"{k * np.mean(v):.1f} ± {k * np.std(v):.1f}"
            print(f"{m:<5} {name:<14} {named:>9} {ms(s['modes_report']):>14} {ms(s['modes_auto']):>14} "
                  f"{ms(s['hq_report'], 100):>13} {ms(s['hq_auto'], 100):>13} {s['auto_better']:>5}/{n} "
                  f"{cleared:>8}")
    print(f"{st['steps']} steps per run, {n} seeds, {st['samples']:,} points per run; ring 8 modes, grid 25")
