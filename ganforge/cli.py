"""`ganforge`: one command, one verb per stage of the flow.

    ganforge train dcgan --data shapes --steps N --out runs/NAME
    ganforge export runs/NAME --repository model_repository/
    ganforge serve --model-repository model_repository/
    ganforge models [--url HOST:PORT]
    ganforge generate --model NAME --seed 42 --count 16 --out DIR
    ganforge batch-inpaint INPUT -o OUTPUT_DIR [--resume] [--shard-index I --num-shards N]
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

def cmd_train(args) -> int:
    from ganforge.training.monitor import Thresholds

    if args.model == "progan":
        from ganforge.training.progan import train_from_args
        return train_from_args(args)
    if args.resume:
        raise UsageError(f"--resume: not supported for {args.model}; only for progan")
    thresholds = Thresholds.parse(args.thresholds or "")
    if args.model == "mlpgan":
        return _train_mlpgan(args, thresholds)
    if args.model == "denoiser":
        return _train_denoiser(args)
    if args.model == "inpainter":
        return _train_inpainter(args)
    if args.model == "pix2pix":
        return _train_pix2pix(args)
    from ganforge.training.gan import DCGANConfig
    from ganforge.training.loop import TrainConfig, apply_preset, train_dcgan

    try:
        net = DCGANConfig(z_dim=args.z_dim, ngf=args.ngf or 32, ndf=args.ndf, resolution=args.resolution,
                          d_dropout=args.d_dropout)
    except ValueError as exc:
        raise UsageError(f"network: {exc}") from None
    cfg = TrainConfig(data=args.data or "shapes", n_images=args.n_images, steps=args.steps,
                      batch_size=args.batch_size or 64, lr_g=args.lr_g, lr_d=args.lr_d, seed=args.seed,
                      label_smoothing=args.label_smoothing, instance_noise=args.instance_noise,
                      sample_every=args.sample_every, network=net, doctor=args.doctor,
                      doctor_every=args.doctor_every, thresholds=thresholds, threads=args.threads)
    if args.preset:
        cfg = apply_preset(cfg, args.preset)
    _writable_dir(args.out)
    summary = train_dcgan(cfg, args.out, progress=not args.quiet)
    print(f"trained {summary['steps']} steps in {summary['seconds']} s; "
          f"checkpoint {summary['checkpoint']}; samples {summary['samples']}")
    if args.doctor != "off":
        print(f"doctor ({args.doctor}): diagnoses {', '.join(summary['diagnoses']) or 'none'}; "
              f"{summary['interventions']} interventions; report {Path(args.out) / 'doctor.md'}")
    return 0


def _train_mlpgan(args, thresholds) -> int:
    from ganforge.training.mixtures import preset_config, train_mixture

    args.data = args.data or "ring"
    if args.data not in ("ring", "grid"):
        raise UsageError(f"--data: {args.data!r} is not a 2-D mixture; mlpgan trains on ring or grid")
    cfg = preset_config(args.preset or "healthy", data=args.data, steps=args.steps, seed=args.seed,
                        doctor=args.doctor, doctor_every=args.doctor_every, thresholds=thresholds)
    _writable_dir(args.out)
    s = train_mixture(cfg, args.out, log=None if args.quiet else print)
    print(f"trained {s['steps']} steps in {s['seconds']} s: {s['modes']} modes covered, "
          f"{100 * s['hq']:.1f} % high-quality samples; run {args.out}")
    if args.doctor != "off":
        print(f"doctor ({args.doctor}): diagnoses {', '.join(s['diagnoses']) or 'none'}; "
              f"{s['interventions']} interventions; report {Path(args.out) / 'doctor.md'}")
    return 0


def cmd_doctor(args) -> int:
    from ganforge.training.monitor import Thresholds, report_for_run

    th = Thresholds.parse(args.thresholds) if args.thresholds else None
    print(report_for_run(args.run, th), end="")
    return 0


def _train_denoiser(args) -> int:
    from ganforge.training.autoencoders import DenoiserConfig, DenoiserTrainConfig, train_denoiser

    if not 0 <= args.sigma_min <= args.sigma_max:
        raise UsageError(f"--sigma-min/--sigma-max: {args.sigma_min}/{args.sigma_max} is not allowed; "
                         f"need 0 <= min <= max (0-255 scale)")
    cfg = DenoiserTrainConfig(data=args.data or "photos", steps=args.steps,
                              batch_size=args.batch_size or 32,
                              patch=args.patch, sigma=(args.sigma_min, args.sigma_max), lr=args.lr or 1e-3,
                              seed=args.seed, threads=args.threads,
                              crop_scale=(args.crop_scale_min, args.crop_scale_max), pool=args.pool,
                              init=args.init, network=DenoiserConfig(width=args.width or 48, depth=args.depth))
    _writable_dir(args.out)
    summary = train_denoiser(cfg, args.out, progress=not args.quiet)
    print(f"trained {summary['steps']} steps in {summary['seconds']} s; "
          f"checkpoint {summary['checkpoint']}; samples {summary['samples']}")
    return 0


def _train_inpainter(args) -> int:
    from ganforge.training.inpainting import ContextEncoderConfig, InpaintTrainConfig, train_inpainter

    cfg = InpaintTrainConfig(data=args.data or "photos", steps=args.steps, batch_size=args.batch_size or 16,
                             tile=args.tile, lambda_rec=args.lambda_rec, lambda_adv=args.lambda_adv,
                             lr=args.lr or 5e-4, seed=args.seed, threads=args.threads, pool=args.pool,
                             rec_reduce=args.rec_reduce, val_every=args.val_every,
                             balance_fills=args.balance_fills,
                             network=ContextEncoderConfig(width=args.width or 24, prefill=args.prefill,
                                                          fill=args.fill, diffuse=args.diffuse,
                                                          bilaplace=args.bilaplace, thinplate=args.thinplate,
                                                          head=args.head, blend_thinplate=args.blend_thinplate,
                                                          blend_validate=args.blend_validate))
    _writable_dir(args.out)
    summary = train_inpainter(cfg, args.out, progress=not args.quiet)
    if "fill_wins" in summary:
        print("best fill per training pair (thin plate, converged thin plate, cascade): "
              + ", ".join(str(n) for n in summary["fill_wins"]))
    if "selected_step" in summary:
        print(f"validation: kept step {summary['selected_step']} at {summary['val_psnr']:.3f} dB "
              f"mean hole PSNR (untrained {summary['val_psnr_untrained']:.3f} dB)")
    print(f"trained {summary['steps']} steps in {summary['seconds']} s; "
          f"checkpoint {summary['checkpoint']}; samples {summary['samples']}")
    return 0


def _train_pix2pix(args) -> int:
    from ganforge.training.pix2pix import Pix2PixConfig, Pix2PixTrainConfig, train_pix2pix

    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout: {args.dropout} is not allowed; must be in [0, 1)")
    cfg = Pix2PixTrainConfig(data=args.data or "photos", steps=args.steps, batch_size=args.batch_size or 16,
                             tile=args.tile, lambda_l1=args.lambda_l1, lr=args.lr or 2e-4, seed=args.seed,
                             threads=args.threads,
                             network=Pix2PixConfig(task=args.task, ngf=args.ngf or 16, ndf=args.ndf,
                                                   dropout=args.dropout))
    _writable_dir(args.out)
    summary = train_pix2pix(cfg, args.out, progress=not args.quiet)
    print(f"trained {summary['steps']} steps in {summary['seconds']} s; "
          f"checkpoint {summary['checkpoint']}; samples {summary['samples']}")
    return 0


# -- export -----------------------------------------------------------------------------------

def cmd_export(args) -> int:
    if args.format != "onnx":
        from ganforge.export.tensorrt import export_tensorrt  # GPU machines only

        return export_tensorrt(args)
    from ganforge.export.triton import export_run

    summary = export_run(args.run, args.repository, name=args.name,
                         max_batch_size=args.max_batch_size, version=args.version,
                         instances=args.instances, intra_op_threads=args.threads, tile=args.tile,
                         ort_trt=args.ort_trt)
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
        images = c.generate(args.model, args.seed, args.count)
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
    opts = jobs.JobOptions(url=args.url, model=args.model, concurrency=args.concurrency,
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


def cmd_denoise(args) -> int:
    from ganforge.images import read_image, write_image

    image = read_image(args.input, max_pixels=args.max_pixels)
    out = _output_path(args.output)
    with _client(args) as c:
        result = c.denoise(args.model, image)
    write_image(out, result)
    print(f"denoised {args.input} ({image.shape[1]}x{image.shape[0]}) with {args.model} -> {out}")
    return 0


def cmd_inpaint(args) -> int:
    from ganforge.images import read_image, write_image
    from ganforge.masks import dilate, to_binary

    image = read_image(args.input, max_pixels=args.max_pixels)
    mask = dilate(to_binary(_read_mask(args.mask), str(args.mask)), args.dilate)
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
        result = c.inpaint(args.model, image, mask)
    write_image(out, result)
    print(f"inpainted {100 * share:.1f}% of {args.input} ({image.shape[1]}x{image.shape[0]}) "
          f"with {args.model} -> {out}")
    return 0


def _read_mask(path: str):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from ganforge.errors import DataError

    try:
        with Image.open(path) as im:
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "L")
            return np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"--mask: {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"--mask: {path}: not a readable image ({exc})") from None


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

    t = sub.add_parser("train", help="train a model into a run directory")
    t.add_argument("model", choices=["dcgan", "progan", "mlpgan", "denoiser", "inpainter", "pix2pix"],
                   help="model family (inpainter: the context encoder; mlpgan: 2-D mixtures)")
    t.add_argument("--data", default=None,
                   help="'shapes', 'stacked_digits', 'photos' or a folder of images (default: shapes for GANs, "
                   "photos otherwise); "
                   "ring or grid for mlpgan")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--batch-size", type=int, default=None, help="default 64 (dcgan), 32 (denoiser), 16 (inpainter)")
    t.add_argument("--n-images", type=int, default=8192, help="training pool size")
    t.add_argument("--z-dim", type=int, default=64)
    t.add_argument("--ngf", type=int, default=None, help="generator filters (default 32 for dcgan, 16 for pix2pix)")
    t.add_argument("--ndf", type=int, default=32)
    t.add_argument("--resolution", type=int, default=64)
    t.add_argument("--lr-g", type=float, default=2e-4)
    t.add_argument("--lr-d", type=float, default=2e-4)
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--instance-noise", type=float, default=0.1)
    t.add_argument("--d-dropout", type=float, default=0.0)
    t.add_argument("--sample-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress line")
    t.add_argument("--doctor", choices=["auto", "report", "off"], default="report",
                   help="training doctor: auto (diagnose and remedy), report (diagnose), off")
    t.add_argument("--doctor-every", type=_int_arg(1), default=50, help="steps between s_G/s_D checks")
    t.add_argument("--thresholds", default=None, help="doctor thresholds, NAME=VALUE,... (docs/doctor.md)")
    t.add_argument("--preset", default=None,
                   help="healthy, d-dominates, g-dominates, mode-collapse (reproduce a failure)")
    t.add_argument("--patch", type=int, default=48, help="denoiser: training crop side")
    t.add_argument("--sigma-min", type=float, default=5.0, help="denoiser: noise sigma range, 0-255")
    t.add_argument("--sigma-max", type=float, default=55.0)
    t.add_argument("--crop-scale-min", type=float, default=0.05,
                   help="denoiser: crop side as a fraction of the photo's shorter side (a side at or under "
                   "--patch is a crop at the photo's own resolution)")
    t.add_argument("--crop-scale-max", type=float, default=0.5)
    t.add_argument("--pool", type=int, default=4096, help="denoiser / inpainter: training crops drawn once per run")
    t.add_argument("--init", default=None, help="denoiser: start from this run's (or checkpoint's) weights")
    t.add_argument("--lr", type=float, default=None, help="denoiser / inpainter / progan: Adam learning rate "
                   "(default 1e-3 / 5e-4 / 1e-3)")
    t.add_argument("--width", type=int, default=None, help="denoiser / inpainter: feature maps of the first "
                   "layer (default 48 / 24)")
    t.add_argument("--depth", type=int, default=8, help="denoiser: conv layers")
    t.add_argument("--tile", type=int, default=64, help="inpainter: training crop side")
    t.add_argument("--lambda-rec", type=float, default=0.999, help="inpainter: weight of the masked L2")
    t.add_argument("--lambda-adv", type=float, default=0.001, help="inpainter: weight of the adversarial loss")
    t.add_argument("--rec-reduce", choices=["pixels", "images", "log-images"], default="pixels",
                   help="inpainter: how the masked L2 weighs a batch's holes: pooled over pixels, "
                   "each image's hole MSE averaged, or each image's log hole MSE averaged (mean hole PSNR)")
    t.add_argument("--balance-fills", action="store_true",
                   help="inpainter --head blend: draw the training pairs so each candidate fill is the "
                   "best one (lowest hole MSE) in an equal share of them")
    t.add_argument("--val-every", type=int, default=0,
                   help="inpainter: score hole PSNR on the validation photos (docs/inpainting.md) every N "
                   "steps and keep the best-scoring weights (default 0: keep the last)")
    t.add_argument("--fill", choices=["harmonic", "cascade"], default="harmonic",
                   help="inpainter --prefill: pull-push then harmonic steps, or the cascade (every "
                   "pyramid level smoothed, harmonic then biharmonic; docs/inpainting.md)")
    t.add_argument("--diffuse", type=_int_arg(0), default=32, help="inpainter --prefill: harmonic steps (per level for the cascade)")
    t.add_argument("--bilaplace", type=_int_arg(0), default=0, help="inpainter --prefill cascade: biharmonic steps per level")
    t.add_argument("--thinplate", type=_int_arg(0), default=0,
                   help="inpainter --prefill: conjugate-gradient steps on the thin-plate energy after the fill")
    t.add_argument("--head", choices=["residual", "blend"], default="residual",
                   help="inpainter --prefill: learn a residual on the fill, or per-pixel weights over "
                   "three classical fills (needs --fill cascade --thinplate N; docs/inpainting.md)")
    t.add_argument("--blend-thinplate", type=_int_arg(0), default=350,
                   help="inpainter --head blend: further thin-plate steps of the converged fill")
    t.add_argument("--blend-validate", type=_int_arg(0), default=0,
                   help="inpainter --head blend: score each fill on a band of this many known pixels "
                   "around the hole, filled as if it were hole, and weigh the fills by it (0: off)")
    t.add_argument("--prefill", action="store_true",
                   help="inpainter: fill the hole by pull-push in the graph and learn a residual on top")
    t.add_argument("--resume", action="store_true", help="progan: continue the run in --out")
    t.add_argument("--stable-images", type=int, default=12800, help="progan: images per stable phase")
    t.add_argument("--fade-images", type=int, default=12800, help="progan: images per fade-in")
    t.add_argument("--ema-images", type=int, default=10_000,
                   help="progan: half-life in images of G's weight average, which samples and "
                   "export use (0: none)")
    t.add_argument("--fmap-base", type=int, default=1024,
                   help="progan: feature maps at side s are min(fmap-max, fmap-base / s) ...")
    t.add_argument("--fmap-max", type=int, default=64, help="progan: ... at most this many ...")
    t.add_argument("--fmap-min", type=int, default=16, help="progan: ... and at least this many")
    t.add_argument("--d-fmap-min", type=int, default=0,
                   help="progan: D's own minimum, for a D wider than G at the top sides (0: --fmap-min)")
    t.add_argument("--task", choices=["inpaint", "edges"], default="inpaint",
                   help="pix2pix: masked image -> image, or edge map -> image")
    t.add_argument("--lambda-l1", type=float, default=100.0, help="pix2pix: weight of the L1 loss")
    t.add_argument("--dropout", type=float, default=0.5, help="pix2pix: decoder dropout (the noise)")
    t.set_defaults(fn=cmd_train)

    dr = sub.add_parser("doctor", help="print the training doctor's report of a run")
    dr.add_argument("run", help="run directory (or its checkpoint.pt)")
    dr.add_argument("--thresholds", default=None, help="re-diagnose with NAME=VALUE,...")
    dr.set_defaults(fn=cmd_doctor)

    e = sub.add_parser("export", help="export a run to ONNX and a Triton model directory")
    e.add_argument("run", help="run directory or checkpoint file")
    e.add_argument("--repository", default="model_repository", help="Triton model repository")
    e.add_argument("--name", default=None, help="model name (default <kind>_<data>)")
    e.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    e.add_argument("--max-batch-size", type=int, default=None,
                   help="largest batch Triton forms (default 64 for generators, 16 for image models)")
    e.add_argument("--tile", type=int, default=128, help="image models: the tile side the model takes")
    e.add_argument("--version", type=int, default=1)
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
    dn.set_defaults(fn=cmd_denoise)

    ip = sub.add_parser("inpaint", help="inpaint an image of any size where a mask is white")
    client_args(ip)
    ip.add_argument("input", help="image file")
    ip.add_argument("--mask", required=True, help="mask image, same size: white (>= 50%%) = hole")
    ip.add_argument("-o", "--output", required=True, help="output image file")
    ip.add_argument("--model", default="inpainter_photos")
    ip.add_argument("--dilate", type=_int_arg(0), default=0, help="grow the hole by N pixels")
    ip.add_argument("--max-pixels", type=_int_arg(1), default=MAX_PIXELS)
    ip.set_defaults(fn=cmd_inpaint)

    b = sub.add_parser("bench", help="run a benchmark from benchmarks/ (ganforge bench NAME --help)")
    b.add_argument("name", help="benchmark name, e.g. serve, modes, denoise")
    b.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    b.set_defaults(fn=cmd_bench)

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
