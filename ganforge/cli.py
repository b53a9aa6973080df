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

The modules: cli.py (this one) builds the parser and runs a verb; cli_args.py holds the argument
types every verb shares; cli_train.py the train, doctor and export verbs; cli_serve.py serve,
the client verbs, bench, tune and demo.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ganforge.cli_args import Parser, _int_arg
from ganforge.cli_args import _key_value  # noqa: F401  (imported from ganforge.cli by tests)
from ganforge.cli_serve import (DEFAULT_INPAINTER, MAX_PIXELS, MAX_SIDE, cmd_batch_inpaint, cmd_bench, cmd_demo,
                                cmd_denoise, cmd_generate, cmd_inpaint, cmd_models, cmd_serve, cmd_tune)
from ganforge.cli_train import cmd_doctor, cmd_export, cmd_train, train_parser
from ganforge.errors import GanforgeError


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
    e.add_argument("--any-size", action="store_true",
                   help="context encoder, denoiser: take any height and width on the network's stride "
                   "(at least the training tile) instead of --tile")
    e.add_argument("--version", type=int, default=None,
                   help="version directory to write (default 1; for a model directory, the next free one)")
    e.add_argument("--precision", choices=["fp32", "int8", "fp16", "bf16"], default="fp32",
                   help="the float part's precision; int8: ONNX Runtime static quantization, or with "
                   "--format tensorrt an INT8 plan from the same calibration (docs/quantization.md)")
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
    e.add_argument("--fp16", action="store_true", help="tensorrt: the same as --precision fp16")
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
                    help="served inpainting model (default: the one served model taking image and "
                    f"mask, or {DEFAULT_INPAINTER} among several)")
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
    ip.add_argument("--model", default=DEFAULT_INPAINTER,
                    help=f"served inpainting model (default {DEFAULT_INPAINTER}, the best photo fill "
                    "measured; inpainter_photos and inpainter_shapes are context encoders: "
                    "docs/inpainting.md says when to pick which)")
    ip.add_argument("--dilate", type=_int_arg(0), default=0, help="grow the hole by N pixels")
    ip.add_argument("--max-side", type=int, default=MAX_SIDE,
                    help=f"--any-size models: a hole's window longer than this is resized down to it "
                    f"(default {MAX_SIDE})")
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


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    """`train MODEL ...` parsed with the model's own parser."""
    args = build_parser().parse_args(argv)
    ns = train_parser(args.model).parse_args(args.args)
    ns.model = args.model
    return ns


def main(argv: list[str] | None = None) -> int:
    # gRPC's C core logs a failed TLS handshake at INFO level on stderr, beside our one-line
    # error; GRPC_VERBOSITY set by the user still wins
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except GanforgeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        code = 130
    # a rank of a torchrun job ends here, before the interpreter's finalization (see
    # exit_after_group); looked up, not imported, so the serving verbs import no torch
    distributed = sys.modules.get("ganforge.training.distributed")
    if distributed is not None:
        distributed.exit_after_group(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
