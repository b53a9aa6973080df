"""`ganforge bench train`: training throughput of each model's default preset, 1 process against
2 processes through torchrun (DDP; gloo on a CPU, NCCL on GPUs), side by side in one run.

    ganforge bench train --json train.json [--models dcgan,denoiser] [--steps 60] [--quick]

Each arm is the command a user types, `ganforge train MODEL --preset default ...`, run in a
subprocess on the same cores: 1 process with every core, then `--nproc 2` (each rank pinned to
its half of the cores). Figures come from the run's own summary.json (rank 0): images/s over the
steps after the first (start-up and the first step's allocations excluded), and the step time split into data wait (blocked on the DataLoader),
compute, and the all-reduce of gradients (time from a gradient bucket being ready to its mean
being back; DDP overlaps it with the backward pass, so it is part of compute, not added to it).

    ddp_2proc_vs_1proc = images/s with 2 processes / images/s with 1 process

A last arm trains the DCGAN from a streamed folder of generated PNGs (decoded by DataLoader
workers) to measure the data wait. On a CUDA device, the denoiser in bf16 against fp32 too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ganforge.errors import UsageError

MODELS = ("dcgan", "denoiser")


def _train(model: str, out: Path, steps: int, nproc: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ganforge", "train", model, "--preset", "default", "--steps", str(steps),
           "--out", str(out), "--quiet", "--checkpoint-every", str(steps), "--sample-every", str(steps), *extra]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    busy = s["step_s"] + s["data_wait_s"]
    batch = json.loads((out / "train.json").read_text())["batch_size"]
    n = s["timed_steps"]
    return {"command": " ".join(cmd[2:]), "wall_s": round(time.perf_counter() - t0, 1), "timed_steps": n,
            "batch_size": batch, "images_per_s": round(n * batch / busy, 1),
            "step_ms": round(1000 * busy / n, 2),
            "data_wait_share": round(s["data_wait_s"] / busy, 4),
            "compute_share": round(s["step_s"] / busy, 4),
            "allreduce_share": round(s["allreduce_s"] / busy, 4),
            "device": s["device"], "precision": s["precision"], "world_size": s["world_size"]}


def _folder(root: Path, n: int, side: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / f"{i:05d}.png")
    return root


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ganforge bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="steps per arm")
    p.add_argument("--folder-images", type=int, default=2000, help="PNGs in the streamed folder arm")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank in the folder arm")
    p.add_argument("--quick", action="store_true", help="a few steps per arm (a smoke run, not a figure)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise UsageError(f"--models: {bad[0]!r} is not allowed; must be among {', '.join(MODELS)}")
    if args.steps < 2:
        raise UsageError(f"--steps: {args.steps} is not allowed; must be >= 2")
    steps = 3 if args.quick else args.steps
    import torch

    cuda = torch.cuda.is_available()
    result: dict = {"cores": len(os.sched_getaffinity(0)), "cuda": cuda, "steps": steps, "models": {}}
    with tempfile.TemporaryDirectory(prefix="ganforge-bench-train-") as tmp:
        tmp = Path(tmp)
        for model in models:
            device = ["--device", "cpu"] if not cuda else []
            one = _train(model, tmp / f"{model}_1", steps, 1, device)
            two = _train(model, tmp / f"{model}_2", steps, 2, device)
            row = {"1proc": one, "2proc": two,
                   "ddp_2proc_vs_1proc": round(two["images_per_s"] / one["images_per_s"], 3)}
            if cuda and model == "denoiser":
                fp32 = _train(model, tmp / f"{model}_fp32", steps, 1, ["--precision", "fp32"])
                bf16 = _train(model, tmp / f"{model}_bf16", steps, 1, ["--precision", "bf16"])
                row.update(fp32=fp32, bf16=bf16, bf16_vs_fp32=round(bf16["images_per_s"] / fp32["images_per_s"], 3))
            result["models"][model] = row
            print(f"{model:9s} 1 process {one['images_per_s']:8.1f} img/s | 2 processes "
                  f"{two['images_per_s']:8.1f} img/s | ddp_2proc_vs_1proc {row['ddp_2proc_vs_1proc']:.3f} | "
                  f"all-reduce {100 * two['allreduce_share']:.1f} % of a step", flush=True)
        if not cuda:
            result["bf16_vs_fp32"] = "skipped: no CUDA device on this machine"
        folder = _folder(tmp / "folder", 200 if args.quick else args.folder_images, 64)
        streamed = _train("dcgan", tmp / "streamed", steps, 1,
                          ["--data", str(folder), "--workers", str(args.workers), "--device", "cpu" if not cuda else "auto"])
        result["streamed_folder"] = {"images": len(list(folder.iterdir())), "workers": args.workers, **streamed}
        print(f"dcgan from a streamed folder of {result['streamed_folder']['images']} PNGs, {args.workers} workers: "
              f"{streamed['images_per_s']:.1f} img/s, data wait {100 * streamed['data_wait_share']:.1f} % of a step")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0
