"""`ganforge`: one command, one verb per stage of the flow.

    ganforge train dcgan --data shapes --steps N --out runs/NAME
    ganforge export runs/NAME --repository model_repository/
    ganforge serve --model-repository model_repository/
    ganforge models [--url HOST:PORT]
    ganforge generate --model NAME --seed 42 --count 16 --out DIR
    ganforge batch-inpaint INPUT -o OUTPUT_DIR [--resume] [--shard-index I --num-shards N]
    ganforge tune MODEL --p99-ms MS [--json PATH] [--dry-run]
    ganforge demo

Verbs that only talk to a server import no torch. Errors print one `Error: …` line; exit code
2 for usage errors, 1 for runtime failures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from ganforge.errors import GanforgeError, UsageError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors, in our one-line form
        print(f"Error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _writable_dir(path: str, flag: str = "--out") -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot create {p} ({exc.strerror})") from exc
    if not os.access(p, os.W_OK):
        raise UsageError(f"{flag}: {p} is not writable")
    return p


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


def cmd_train(args) -> int:
    from ganforge.training import models

    from ganforge.training import options

    spec = models.get(args.model)
    ns = vars(train_parser(args.model).parse_args(args.args))
    run = {k: ns.pop(k) for k in ("out", "preset", "config", "resume", "nproc", "quiet")}
    cfg = options.config_from(spec.config, args.model, run["preset"], run["config"],
                              options.typed_values(spec.config, ns))
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


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    """`train MODEL ...` parsed with the model's own parser."""
    args = build_parser().parse_args(argv)
    ns = train_parser(args.model).parse_args(args.args)
    ns.model = args.model
    return ns


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
    if args.format != "onnx":
        if args.precision != "fp32":
            raise UsageError(f"--precision: {args.precision} is not allowed with --format {args.format}; "
                             f"use --fp16 for TensorRT")
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
                         calibration_seed=args.calibration_seed, max_loss=args.max_loss, warn=warn)
    print(f"exported {summary['model']} to {summary['repository']} "
          f"(parity max abs diff {summary['parity']['max_abs_diff']} grey levels)")
    return 0


# -- serve ------------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from ganforge.serving.server import LocalServer, ServerOptions

    opts = ServerOptions(model_repository=Path(args.model_repository), grpc_port=args.grpc_port,
                         http_port=args.http_port, metrics_port=args.metrics_port,
                         exit_timeout_s=args.exit_timeout, startup_timeout_s=args.startup_timeout,
                         log_verbose=args.log_verbose,
                         restricted_key=_key_value(args.restricted_key, "--restricted-key"),
                         tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca)
    server = LocalServer(opts, stream=sys.stderr if args.verbose else None)
    stop = {"sig": None}

    def on_signal(sig, _frame):  # the main thread drains and stops; a second signal forces it
        if stop["sig"] is not None:
            server.signal(signal.SIGKILL)
        stop["sig"] = sig

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        # Ready means every model of the repository is ready (LocalServer checks each one, over
        # HTTP when gRPC speaks TLS): nothing more is asked of the server here, so start-up
        # works the same in every TLS mode.
        server.start()
        names = server.models
        tls = ""
        if opts.tls_cert:
            tls = " (TLS" + (", client certificates required)" if opts.tls_ca else ")")
        print(f"serving {len(names)} models from {opts.model_repository}: {', '.join(names)}")
        print(f"  gRPC     {server.grpc_url}{tls}")
        print(f"  HTTP     {server.http_url}")
        print(f"  metrics  {server.metrics_url}")
        print("Ctrl-C to stop", flush=True)
        while server.proc.poll() is None and stop["sig"] is None:
            time.sleep(0.1)
    finally:
        # whatever happened: drain, stop, and kill the server's process group (backend stubs)
        code = server.stop()
    if stop["sig"] is None:
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               and -code in signal.Signals._value2member_map_ else f"exit code {code}")
        last = server.errors(since_ready=True)[-1:]  # Triton's own reason, when it gave one
        print(f"Error: tritonserver exited unexpectedly ({how}); ganforge serve stopped"
              + (f"; its last error: {last[0].strip()}" if last else ""), file=sys.stderr)
        return 1
    print(f"stopped (signal {signal.Signals(stop['sig']).name}); tritonserver exited with {code}")
    return 0


def _key_value(text: str | None, flag: str) -> tuple[str, str] | None:
    if text is None:
        return None
    key, sep, value = (part.strip() for part in text.partition("="))
    if not sep or not key or not value:
        raise UsageError(f"{flag}: {text!r} is not allowed; expected KEY=VALUE, e.g. x-ganforge-key=s3cret")
    return key.lower(), value


# -- client verbs -----------------------------------------------------------------------------

def _tls_files(args):
    """The client's TLS files from --tls-ca/--tls-cert/--tls-key; None: plaintext."""
    from ganforge.serving.client import TLSFiles

    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError(f"--tls-cert and --tls-key: both are needed for a client certificate "
                         f"(got cert={args.tls_cert}, key={args.tls_key})")
    for flag, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert),
                       ("--tls-key", args.tls_key)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag}: {path} is not a file")
    if not (args.tls_ca or args.tls_cert):
        return None
    return TLSFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def _client(args):
    from ganforge.serving.client import Client

    kv = _key_value(getattr(args, "key", None), "--key")
    tls = _tls_files(args)
    return Client(args.url, timeout=args.timeout, ssl=tls is not None,
                  root_certificates=tls and tls.ca, private_key=tls and tls.key,
                  certificate_chain=tls and tls.cert, key=kv)


def cmd_models(args) -> int:
    with _client(args) as c:
        rows = c.models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'MODEL':<36} {'VERSION':<8} STATE")
    for m in rows:
        print(f"{m['name']:<36} {m['version'] or '-':<8} {m['state'] or '-'}"
              + (f" ({m['reason']})" if m["reason"] else ""))
    return 0


def cmd_generate(args) -> int:
    from ganforge.images import save_grid, write_image

    out = _writable_dir(args.out)
    with _client(args) as c:
        images = c.generate(args.model, args.seed, args.count, model_version=args.model_version)
    paths = [write_image(out / f"seed{args.seed}_{i:03d}.png", img) for i, img in enumerate(images)]
    grid = save_grid(images, out / f"seed{args.seed}_grid.png")
    print(f"wrote {len(paths)} images and a grid to {out} ({grid.name})")
    return 0


def cmd_batch_inpaint(args) -> int:
    """`ganforge batch-inpaint INPUT -o OUT`: exit 0 all done, 3 some items failed, 1 stopped."""
    from ganforge.serving import jobs

    index, num_shards = jobs.shard_defaults(args.shard_index, args.num_shards)
    out = _writable_dir(args.output, "-o/--output")
    items, bad = jobs.discover(args.input, out, masks=args.masks)
    opts = jobs.JobOptions(url=args.url, model=args.model, model_version=args.model_version,
                           concurrency=args.concurrency,
                           batch_size=args.batch_size, workers=args.workers, retries=args.retries,
                           wait_for_server_s=args.wait_for_server, timeout_s=args.timeout,
                           dilate=args.dilate, resume=args.resume, shard_index=index,
                           num_shards=num_shards, progress=not args.quiet,
                           tls=_tls_files(args), key=_key_value(args.key, "--key"))
    # SIGTERM (a Kubernetes pod being stopped) stops the job as Ctrl-C does: cleanly. A shell
    # that starts the job in the background (`nohup ganforge batch-inpaint ... &`) hands it
    # SIGINT ignored, which would turn both into no-ops: Python's own SIGINT handler comes back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    summary = jobs.run_job(items, out, opts, failures=bad)
    for line in jobs.summary_lines(summary):
        print(line)
    return jobs.exit_code(summary)


MAX_PIXELS = 50_000_000  # per image read by denoise / inpaint (a 8000x6000 photo is 48 M)


def _output_path(path: str, flag: str = "-o") -> Path:
    out = Path(path)
    _writable_dir(str(out.parent), flag)
    return out


def _named(args) -> str:
    """The model a client verb used, with the version it named."""
    return args.model + (f" version {args.model_version}" if args.model_version else "")


def cmd_denoise(args) -> int:
    from ganforge.images import read_image, write_image

    image = read_image(args.input, max_pixels=args.max_pixels)
    out = _output_path(args.output)
    with _client(args) as c:
        result = c.denoise(args.model, image, model_version=args.model_version)
    write_image(out, result)
    print(f"denoised {args.input} ({image.shape[1]}x{image.shape[0]}) with {_named(args)} -> {out}")
    return 0


def cmd_inpaint(args) -> int:
    from ganforge.images import read_image, write_image
    from ganforge.masks import dilate, read_mask

    image = read_image(args.input, max_pixels=args.max_pixels)
    mask = dilate(read_mask(args.mask, "--mask"), args.dilate)
    if mask.shape != image.shape[:2]:
        raise UsageError(f"--mask: size {mask.shape[1]}x{mask.shape[0]} differs from the image's "
                         f"{image.shape[1]}x{image.shape[0]}")
    out = _output_path(args.output)
    share = float((mask > 0).mean())
    if share == 0:
        write_image(out, image)
        print(f"mask {args.mask} has no hole: {args.input} written unchanged to {out}")
        return 0
    if share == 1:
        raise UsageError(f"--mask: every pixel of {args.mask} is a hole; there is nothing to inpaint from")
    with _client(args) as c:
        result = c.inpaint(args.model, image, mask, model_version=args.model_version)
    write_image(out, result)
    print(f"inpainted {100 * share:.1f}% of {args.input} ({image.shape[1]}x{image.shape[0]}) "
          f"with {_named(args)} -> {out}")
    return 0


def cmd_bench(args) -> int:
    """`ganforge bench NAME [ARGS]`: run benchmarks/NAME.py's `run(argv) -> int`."""
    import importlib
    import pkgutil

    import ganforge.benchmarks as pkg

    names = sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(pkg.__path__)
                   if not m.name.startswith("_"))
    if args.name not in names:
        raise UsageError(f"bench: {args.name!r} is not a benchmark; choose from {', '.join(names) or 'none'}")
    module = importlib.import_module(f"ganforge.benchmarks.{args.name.replace('-', '_')}")
    return module.run(args.args)


def cmd_tune(args) -> int:
    """`ganforge tune MODEL --p99-ms MS`: serving/tune.py's search on the local server."""
    from ganforge.serving import tune

    return tune.run_cli(args)


def cmd_demo(args) -> int:
    from ganforge.demo import run_demo

    return run_demo(Path(args.out), steps=args.steps)


# -- parser -----------------------------------------------------------------------------------

def _int_arg(lo: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"{v} is below the minimum {lo}")
        return v
    return parse


def build_parser() -> Parser:
    p = Parser(prog="ganforge", description="Train, export and serve generative image models.")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=Parser)

    from ganforge.training import models

    t = sub.add_parser("train", help="train a model into a run directory (ganforge train MODEL --help)",
                       description="Train a model into a run directory. Each model has its own options: "
                       "ganforge train MODEL --help.")
    t.add_argument("model", choices=models.names(), help="; ".join(
        f"{n}: {d}" for n, (_, d) in sorted(models.REGISTRY.items())))
    t.add_argument("args", nargs=argparse.REMAINDER, help="the model's options (ganforge train MODEL --help)")
    t.set_defaults(fn=cmd_train)

    dr = sub.add_parser("doctor", help="print the training doctor's report of a run")
    dr.add_argument("run", help="run directory (or its checkpoint.pt)")
    dr.add_argument("--thresholds", default=None, help="re-diagnose with NAME=VALUE,...")
    dr.set_defaults(fn=cmd_doctor)

    e = sub.add_parser("export", help="export a run to ONNX and a Triton model directory")
    e.add_argument("run", help="run directory or checkpoint file; or a model directory of a repository "
                   "(with --precision: a reduced-precision version of its FP32 graph)")
    e.add_argument("--repository", default=None, help="Triton model repository (default model_repository; "
                   "for a model directory, the one holding it)")
    e.add_argument("--name", default=None, help="model name (default <kind>_<data>)")
    e.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    e.add_argument("--max-batch-size", type=int, default=None,
                   help="largest batch Triton forms (default 64 for generators, 16 for image models)")
    e.add_argument("--tile", type=int, default=128, help="image models: the tile side the model takes")
    e.add_argument("--version", type=int, default=None,
                   help="version directory to write (default 1; for a model directory, the next free one)")
    e.add_argument("--precision", choices=["fp32", "int8", "fp16", "bf16"], default="fp32",
                   help="the float part's precision; int8: ONNX Runtime static quantization (docs/quantization.md)")
    e.add_argument("--calibration", type=_int_arg(1), default=256,
                   help="int8: samples of the model's own inputs that calibrate its activations")
    e.add_argument("--calibration-seed", type=int, default=0, help="int8: seed of the calibration samples")
    e.add_argument("--max-loss", type=float, default=None,
                   help="quality cost allowed before a warning (default 0.2 dB PSNR for the denoiser "
                   "and the inpainter, 5 (%%) FD for generators)")
    e.add_argument("--instances", type=int, default=None,
                   help="model instances per device (default 2 for generators, 1 for image models)")
    e.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads per instance (default: the CPUs shared among the instances)")
    e.add_argument("--fp16", action="store_true", help="tensorrt: allow FP16 kernels")
    e.add_argument("--ort-trt", choices=["fp32", "fp16"], default=None,
                   help="onnx: run through ONNX Runtime's TensorRT execution provider on GPUs")
    e.set_defaults(fn=cmd_export)

    s = sub.add_parser("serve", help="run the local Triton server on a model repository")
    s.add_argument("--model-repository", default="model_repository")
    s.add_argument("--grpc-port", type=_int_arg(1), default=8001)
    s.add_argument("--http-port", type=_int_arg(1), default=8000)
    s.add_argument("--metrics-port", type=_int_arg(1), default=8002)
    s.add_argument("--exit-timeout", type=int, default=30, help="seconds to drain on SIGTERM")
    s.add_argument("--startup-timeout", type=float, default=180.0)
    s.add_argument("--log-verbose", type=int, default=0)
    s.add_argument("--verbose", action="store_true", help="echo Triton's log")
    s.add_argument("--restricted-key", metavar="KEY=VALUE", default=None,
                   help="require this header for the model-repository and shared-memory protocols")
    s.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM): gRPC over TLS")
    s.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    s.add_argument("--tls-ca", type=Path, default=None,
                   help="CA (PEM) that client certificates must chain to: mutual TLS")
    s.set_defaults(fn=cmd_serve)

    def security_args(q):
        q.add_argument("--key", metavar="KEY=VALUE", default=None,
                       help="header for a server started with --restricted-key")
        q.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify the server: TLS")
        q.add_argument("--tls-cert", default=None, help="client certificate (PEM) for mutual TLS")
        q.add_argument("--tls-key", default=None, help="client private key (PEM) for mutual TLS")

    def client_args(q):
        q.add_argument("--url", default="localhost:8001", help="Triton gRPC host:port")
        q.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
        security_args(q)

    def version_arg(q):
        q.add_argument("--model-version", type=_int_arg(1), default=None, metavar="N",
                       help="the model version to ask for (default: the server's choice, the highest it "
                       "serves; `ganforge models` lists them)")

    m = sub.add_parser("models", help="list the models a server serves")
    client_args(m)
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_models)

    g = sub.add_parser("generate", help="generate images by seed from a served generator")
    client_args(g)
    g.add_argument("--model", required=True)
    g.add_argument("--seed", type=_int_arg(0), default=0)
    g.add_argument("--count", type=_int_arg(1), default=16)
    g.add_argument("--out", required=True, help="folder for the PNGs")
    version_arg(g)
    g.set_defaults(fn=cmd_generate)

    bi = sub.add_parser("batch-inpaint", help="inpaint a folder or .jsonl manifest of images with "
                        "masks through a served model (exit 3: some items failed)")
    bi.add_argument("input", help="folder (masks photo_mask.png beside photo.jpg) or .jsonl manifest "
                    'of {"image", "mask", "output"} lines')
    bi.add_argument("-o", "--output", required=True, help="output folder (mirrors relative paths, PNG)")
    bi.add_argument("--masks", default=None, help="folder of masks at the images' relative paths")
    bi.add_argument("--url", default="localhost:8001", help="Triton gRPC host:port")
    bi.add_argument("--model", default=None,
                    help="served inpainting model (default: the one served model taking image and mask)")
    version_arg(bi)
    bi.add_argument("--concurrency", type=_int_arg(1), default=4, help="requests in flight")
    bi.add_argument("--batch-size", type=_int_arg(1), default=None,
                    help="items per request (default: the model's max_batch_size)")
    bi.add_argument("--workers", type=_int_arg(1), default=None,
                    help="items in flight, one thread each (default: 2 x batch x concurrency)")
    bi.add_argument("--resume", action="store_true",
                    help="skip items whose output is complete and verified against the journal")
    bi.add_argument("--shard-index", type=_int_arg(0), default=None,
                    help="this shard (default: $JOB_COMPLETION_INDEX, else 0)")
    bi.add_argument("--num-shards", type=_int_arg(1), default=None, help="number of shards")
    bi.add_argument("--dilate", type=_int_arg(0), default=0, help="grow holes by N pixels")
    bi.add_argument("--retries", type=_int_arg(0), default=3,
                    help="retries per request on timeouts and server errors")
    bi.add_argument("--wait-for-server", type=float, default=300.0, metavar="SECONDS",
                    help="how long to wait for an unavailable server before stopping")
    bi.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    bi.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    security_args(bi)
    bi.set_defaults(fn=cmd_batch_inpaint)

    dn = sub.add_parser("denoise", help="denoise an image of any size with a served denoiser")
    client_args(dn)
    dn.add_argument("input", help="image file")
    dn.add_argument("-o", "--output", required=True, help="output image file")
    dn.add_argument("--model", default="denoiser_photos")
    dn.add_argument("--max-pixels", type=_int_arg(1), default=MAX_PIXELS)
    version_arg(dn)
    dn.set_defaults(fn=cmd_denoise)

    ip = sub.add_parser("inpaint", help="inpaint an image of any size where a mask is white")
    client_args(ip)
    ip.add_argument("input", help="image file")
    ip.add_argument("--mask", required=True, help="mask image, same size: white (>= 50%%) = hole")
    ip.add_argument("-o", "--output", required=True, help="output image file")
    ip.add_argument("--model", default="inpainter_photos")
    ip.add_argument("--dilate", type=_int_arg(0), default=0, help="grow the hole by N pixels")
    ip.add_argument("--max-pixels", type=_int_arg(1), default=MAX_PIXELS)
    version_arg(ip)
    ip.set_defaults(fn=cmd_inpaint)

    b = sub.add_parser("bench", help="run a benchmark from benchmarks/ (ganforge bench NAME --help)")
    b.add_argument("name", help="benchmark name, e.g. serve, modes, denoise")
    b.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    b.set_defaults(fn=cmd_bench)

    tu = sub.add_parser("tune", help="search instance count x max batch size x queue delay for one "
                        "model on the local Triton server; write the best within --p99-ms into its config.pbtxt",
                        description="Measure the shipped configuration and every candidate on the real "
                        "tritonserver (one server per configuration, on a temporary copy of the model's "
                        "directory) under a concurrency sweep; write the highest-throughput configuration "
                        "whose p99 is within --p99-ms into the model's config.pbtxt (docs/performance.md).")
    tu.add_argument("model", help="a model directory of --repo, e.g. denoiser_photos")
    tu.add_argument("--repo", default="model_repository", help="the model repository (default model_repository)")
    tu.add_argument("--p99-ms", type=float, required=True, help="latency limit: p99 in milliseconds")
    tu.add_argument("--instances", default="1,2", help="instance counts to try (default 1,2)")
    tu.add_argument("--max-batch", default=None,
                    help="max_batch_size values to try (default: the shipped one and its half)")
    tu.add_argument("--queue-delay-us", default="0,500",
                    help="dynamic batching max_queue_delay_microseconds values to try (default 0,500)")
    tu.add_argument("--concurrency", default="1,4,16", help="requests in flight, one figure each (default 1,4,16)")
    tu.add_argument("--seconds", type=float, default=2.0, help="seconds of load per figure (default 2)")
    tu.add_argument("--batch", type=_int_arg(1), default=1, help="items per request (default 1)")
    tu.add_argument("--rounds", type=_int_arg(1), default=1,
                    help="measure every configuration N times, order reversed each round; medians (default 1)")
    tu.add_argument("--json", default=None, metavar="PATH", help="write every row, the choice and the ratios here")
    tu.add_argument("--dry-run", action="store_true", help="print the change; leave config.pbtxt unchanged")
    tu.set_defaults(fn=cmd_tune)

    d = sub.add_parser("demo", help="train, export, serve and generate, end to end")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--steps", type=int, default=1000)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    # gRPC's C core logs a failed TLS handshake at INFO level on stderr, beside our one-line
    # error; GRPC_VERBOSITY set by the user still wins
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except GanforgeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
