"""Mode coverage on 2-D mixtures (ring of 8, grid of 25): vanilla GAN vs the doctor vs PacGAN2.

    ganforge bench modes --json PATH [--quick] [--seeds N] [--steps N] [--mixtures ring,grid]

Published protocol (VEEGAN / PacGAN): 2,500 samples per run; high quality = within 3 std of the
nearest mode; a mode is covered when it is the nearest mode of at least one high-quality sample.
All variants run the same steps, the same seeds, side by side in this one process. Writes the
JSON (`{"ring"|"grid": {"<variant>": {"modes": [per seed], "hq": [per seed]}}}`), each run's
samples as `<json stem>_samples/<mixture>_<variant>_seed<k>.npy`, and one scatter PNG per mixture.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ganforge.errors import UsageError

PUBLISHED = {  # modes / high-quality share (PacGAN, Lin et al. 2018, Table 2)
    "ring": {"GAN": (6.3, 0.982), "PacGAN4": (7.8, 0.959)},
    "grid": {"GAN": (17.3, 0.948), "PacGAN4": (24.8, 0.936)},
}
VARIANTS = {  # name -> overrides of the healthy preset
    "vanilla": {"doctor": "report"},
    "doctor-auto": {"doctor": "auto"},
    "pacgan2": {"doctor": "report", "network": {"pack": 2}},
}


def run(argv: list[str]) -> int:
    import torch

    from ganforge.cli import Parser
    from ganforge.training.mixtures import MIXTURES, mixture, preset_config, scatter, train_mixture

    p = Parser(prog="ganforge bench modes", description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--quick", action="store_true", help="fewer steps, narrower nets (< 5 min on 2 cores)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--width", type=int, default=None, help="hidden units of G and D")
    p.add_argument("--mixtures", default="ring,grid")
    p.add_argument("--variants", default=",".join(VARIANTS))
    a = p.parse_args(argv)
    mixtures = [m for m in a.mixtures.split(",") if m]
    variants = [v for v in a.variants.split(",") if v]
    for m in mixtures:
        if m not in MIXTURES:
            raise UsageError(f"--mixtures: {m!r} is not one of {', '.join(MIXTURES)}")
    for v in variants:
        if v not in VARIANTS:
            raise UsageError(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    if a.seeds < 1:
        raise UsageError(f"--seeds: {a.seeds} is not allowed; must be >= 1")
    steps = a.steps or (300 if a.quick else 3000)
    width = a.width or (64 if a.quick else 128)
    out = Path(a.json)
    sample_dir = out.parent / f"{out.stem}_samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results: dict = {"settings": {"steps": steps, "width": width, "seeds": a.seeds, "quick": a.quick}}
    for m in mixtures:
        results[m] = {}
        panels = {}
        for v in variants:
            over = json.loads(json.dumps(VARIANTS[v]))
            net = {"ngf": width, "ndf": width, **over.pop("network", {})}
            row = {"modes": [], "hq": [], "seconds": [], "diagnoses": [], "restarted": []}
            for seed in range(a.seeds):
                cfg = preset_config("healthy", data=m, steps=steps, seed=seed, network=net, **over)
                s = train_mixture(cfg)
                np.save(sample_dir / f"{m}_{v}_seed{seed}.npy", s["samples"])
                row["modes"].append(s["modes"])
                row["hq"].append(round(s["hq"], 4))
                row["seconds"].append(s["seconds"])
                row["diagnoses"].append(s["diagnoses"])
                row["restarted"].append(s["restarted"])
                print(f"{m:<5} {v:<12} seed {seed}: modes {s['modes']:>2}  hq {100 * s['hq']:5.1f} %  "
                      f"{s['seconds']:.1f} s  diagnoses {s['diagnoses'] or '-'}", flush=True)
                if seed == 0:
                    panels[f"{v} seed 0: {s['modes']} modes, {100 * s['hq']:.0f} % hq"] = s["samples"]
            results[m][v] = row
        scatter(panels, mixture(m), out.parent / f"{out.stem}_{m}.png")
    wall = time.perf_counter() - t0
    results["wall_seconds"] = round(wall, 1)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'mixture':<8} {'variant':<15} {'modes (mean ± std)':>20} {'high quality %':>18}")
    for m in mixtures:
        for v in variants:
            r = results[m][v]
            print(f"{m:<8} {v:<15} {np.mean(r['modes']):>11.1f} ± {np.std(r['modes']):<6.1f} "
                  f"{100 * np.mean(r['hq']):>9.1f} ± {100 * np.std(r['hq']):<5.1f}")
        for name, (modes, hq) in PUBLISHED[m].items():
            print(f"{m:<8} {name + ' (pub.)':<15} {modes:>11.1f}{'':9} {100 * hq:>9.1f}")
    print(f"\n{steps} steps per run, width {width}, {a.seeds} seeds; wall time {wall:.0f} s. "
          f"Results {out}, samples {sample_dir}/, plots {out.stem}_<mixture>.png")
    return 0
