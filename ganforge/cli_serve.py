"""The verbs that run or use a served model: `ganforge serve`, the client verbs (models,
generate, batch-inpaint, denoise, inpaint), and bench, tune and demo. Nothing here imports torch
when the module loads: the client verbs never need it, and demo imports it when it runs."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from ganforge.cli_args import _key_value, _writable_dir
from ganforge.errors import UsageError


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
# inpaint --max-side's default: serving.inpaint.MAX_SIDE, written out so the CLI loads without numpy
MAX_SIDE = 1024
# inpaint's and batch-inpaint's default model: serving.inpaint.DEFAULT_MODEL, written out likewise
DEFAULT_INPAINTER = "fill_thinplate"


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
        from ganforge.serving.inpaint import any_size_spec

        any_size_spec(c.config(args.model), args.model, args.max_side, flag="--max-side")
        result = c.inpaint(args.model, image, mask, model_version=args.model_version,
                           max_side=args.max_side)
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
