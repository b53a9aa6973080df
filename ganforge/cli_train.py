"""The verbs of the first two stages: `ganforge train MODEL` (each model's own parser, torchrun
for several processes), `ganforge doctor RUN` and `ganforge export RUN`. torch is imported
inside the verbs, never at import time."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from ganforge.cli_args import Parser, _int_arg, _writable_dir
from ganforge.errors import UsageError


# -- train ------------------------------------------------------------------------------------

def train_parser(model: str) -> Parser:
    """`ganforge train MODEL`'s own options: the model's config fields (options.py), its presets,
    and how the run is placed and launched."""
    from ganforge.training import models, options

    spec = models.get(model)
    p = Parser(prog=f"ganforge train {model}",
               description=f"Train {model}: {models.REGISTRY[model][1]}. Values come from the defaults, "
               f"then --preset, then --config, then the flags typed. Under torchrun, each process is one rank.")
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.jsonl, samples/)")
    names = options.preset_names(model)
    run.add_argument("--preset", default=None, choices=names or None,
                     help=f"a named preset from training/presets/{model}/ ({', '.join(names)})")
    run.add_argument("--config", default=None, metavar="FILE", help="a TOML or JSON file of option values")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its checkpoint (a new run when it has none)")
    run.add_argument("--nproc", type=_int_arg(1), default=None,
                     help="start N processes on this machine through torchrun (DDP)")
    run.add_argument("--quiet", action="store_true", help="no progress line")
    options.add_options(p, spec.config, f"{model} options")
    return p


def train_config(model: str, argv: list[str]):
    """`ganforge train MODEL ARGV` parsed: (the model's config, the run's own options)."""
    from ganforge.training import models, options

    spec = models.get(model)
    ns = vars(train_parser(model).parse_args(argv))
    run = {k: ns.pop(k) for k in ("out", "preset", "config", "resume", "nproc", "quiet")}
    return options.config_from(spec.config, model, run["preset"], run["config"],
                               options.typed_values(spec.config, ns)), run


def cmd_train(args) -> int:
    from ganforge.training import models

    spec = models.get(args.model)
    cfg, run = train_config(args.model, args.args)
    if run["nproc"] and "RANK" not in os.environ:
        return _torchrun(run["nproc"], ["train", args.model, *_without_nproc(args.args)])
    _writable_dir(run["out"])
    summary = spec.train(cfg, run["out"], progress=not run["quiet"], resume=run["resume"])
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if "interrupted" in summary:
        print(f"stopped on {summary['interrupted']} at step {summary['steps']}; checkpoint {summary['checkpoint']}; "
              f"continue with: ganforge train {args.model} --resume ... --out {run['out']}")
        return 0
    ranks = f", {summary['world_size']} ranks" if summary["world_size"] > 1 else ""
    print(f"trained {summary['steps']} steps in {summary['seconds']} s on {summary['device']} "
          f"({summary['precision']}{ranks}); checkpoint {summary['checkpoint']}"
          + (f"; samples {summary['samples']}" if "samples" in summary else "")
          + f"; peak memory {summary['max_rss_mb']} MB")
    for line in spec.describe(summary):
        print(line)
    bad = summary.get("bad_files") or {}
    if bad:
        shown = "; ".join(f"{path}: {why}" for path, why in list(bad.items())[:3])
        print(f"skipped {len(bad)} unreadable files ({shown}{'; ...' if len(bad) > 3 else ''}); "
              f"all listed in {Path(run['out']) / 'bad_files.json'}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def _torchrun(nproc: int, argv: list[str]) -> int:
    """`ganforge ARGV` in `nproc` processes on this machine, through torchrun; its exit code."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ganforge", *argv]
    proc = subprocess.Popen(cmd, start_new_session=False)

    def forward(sig, _frame):   # preemption reaches every rank through torchrun
        proc.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if code:
        print(f"Error: torchrun exited with code {code} (see the ranks' output above)", file=sys.stderr)
        return 1
    return 0


def cmd_doctor(args) -> int:
    from ganforge.training.monitor import Thresholds
    from ganforge.training.reports import report_for_run

    th = Thresholds.parse(args.thresholds) if args.thresholds else None
    print(report_for_run(args.run, th), end="")
    return 0


# -- export -----------------------------------------------------------------------------------

def cmd_export(args) -> int:
    args.repository_given = args.repository is not None
    args.repository = args.repository or "model_repository"
    if args.any_size and args.format != "onnx":
        raise UsageError(f"--any-size: not allowed with --format {args.format}; it exports to ONNX "
                         f"(--format onnx)")
    if args.any_size and (Path(args.run) / "config.pbtxt").is_file():
        raise UsageError(f"--any-size: not allowed for a model directory ({args.run}); give the "
                         f"training run it was exported from")
    if args.format != "onnx":
        if args.fp16 and args.precision not in ("fp32", "fp16"):
            raise UsageError(f"--fp16: not allowed with --precision {args.precision}")
        args.precision = "fp16" if args.fp16 else args.precision
        if args.precision == "bf16":
            raise UsageError(f"--precision: bf16 is not allowed with --format {args.format}; "
                             f"allowed: fp32, fp16, int8")
        args.version = args.version or 1
        from ganforge.export.tensorrt import export_tensorrt  # GPU machines only

        return export_tensorrt(args)
    warn = lambda line: print(line, file=sys.stderr, flush=True)
    if (Path(args.run) / "config.pbtxt").is_file():   # a model directory: convert its FP32 graph
        from ganforge.export.quantize import export_from_directory

        summary = export_from_directory(args.run, args.repository if args.repository_given else None,
                                        args.name, args.version, args.precision, args.calibration,
                                        args.calibration_seed, args.max_loss, warn=warn)
        print(f"exported {summary['model']} version {summary['version']} ({summary['precision']}) to "
              f"{summary['repository']} (vs fp32: max abs diff {summary['parity']['max_abs_diff']} grey levels)")
        return 0
    from ganforge.export.triton import export_run

    summary = export_run(args.run, args.repository, name=args.name,
                         max_batch_size=args.max_batch_size, version=args.version or 1,
                         instances=args.instances, intra_op_threads=args.threads, tile=args.tile,
                         ort_trt=args.ort_trt, precision=args.precision, calibration=args.calibration,
                         calibration_seed=args.calibration_seed, max_loss=args.max_loss,
                         any_size=args.any_size, warn=warn)
    print(f"exported {summary['model']} to {summary['repository']} "
          f"(parity max abs diff {summary['parity']['max_abs_diff']} grey levels)")
    return 0
