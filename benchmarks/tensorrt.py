"""`ganforge bench tensorrt RUN`: generator throughput on one GPU, side by side in one process:
TensorRT FP32, FP16 and INT8 plans (INT8 calibrated as the export calibrates it), ONNX Runtime's
CUDA provider, and torch eager (CUDA), at batch 1, 16 and 64 (images per second, and each
peer's ratio to torch eager).

    ganforge bench tensorrt runs/NAME --out bench-out/tensorrt.json [--quick]

Needs an NVIDIA GPU, TensorRT (`pip install 'ganforge[gpu]'`), a CUDA build of torch and
onnxruntime-gpu. Without a GPU it says so in one line, measures nothing and exits 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _time(fn, iters: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ganforge bench tensorrt", description=__doc__.split("\n")[0])
    p.add_argument("run", help="training run directory or checkpoint")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="10 iterations per point")
    p.add_argument("--out", default="bench-out/tensorrt.json")
    args = p.parse_args(argv)

    from ganforge.errors import GanforgeError
    from ganforge.export import tensorrt as trtx

    gpu = trtx.gpu_name()
    if gpu is None:
        print("bench tensorrt: no NVIDIA GPU on this machine (nvidia-smi -L fails); nothing "
              "measured", file=sys.stderr)
        return 1
    try:
        trt = trtx.import_tensorrt()
    except GanforgeError as exc:
        print(f"bench tensorrt: {exc}", file=sys.stderr)
        return 1
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        print("bench tensorrt: this torch build has no CUDA; install a CUDA build of "
              "torch==2.13.0 to compare with torch eager on the GPU", file=sys.stderr)
        return 1
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("bench tensorrt: onnxruntime has no CUDAExecutionProvider (pip install "
              "onnxruntime-gpu)", file=sys.stderr)
        return 1

    from ganforge.export.onnx import UInt8Images, export_onnx
    from ganforge.serving import sampler
    from ganforge.training.gan import build_dcgan, load_checkpoint

    batches = [int(b) for b in args.batches.split(",")]
    iters = 10 if args.quick else args.iters
    G, _ = build_dcgan(load_checkpoint(args.run, kinds=("dcgan",)))
    module = UInt8Images(G).eval()
    z_dim = G.cfg.z_dim
    work = Path(tempfile.mkdtemp(prefix="ganforge-bench-trt-"))
    onnx_path = export_onnx(module, (torch.randn(2, z_dim),), ["latent"], ["image"],
                            work / "model.onnx", max(batches))

    peers = {}
    cuda_module = module.cuda()
    peers["torch eager"] = lambda z: cuda_module(torch.from_numpy(z).cuda()).cpu().numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
    peers["onnxruntime cuda"] = lambda z: sess.run(None, {"latent": z})[0]
    build_s = {}
    int8_graph = Path(tempfile.mkdtemp()) / "model.int8.onnx"   # the export's calibration
    trtx.quantized_for_tensorrt(onnx_path, int8_graph, calibration=256, seed=0)
    for precision in trtx.PLAN_PRECISIONS:
        t0 = time.perf_counter()
        plan = trtx.build_engine(int8_graph if precision == "int8" else onnx_path, max(batches),
                                 precision=precision, log=lambda m: None)
        build_s[precision] = round(time.perf_counter() - t0, 2)
        engine = trtx.Engine(plan)
        peers[f"tensorrt {precision}"] = lambda z, e=engine: e({"latent": z})["image"]

    rows = []
    for bs in batches:
        z = sampler.sample_latents(0, bs, z_dim)
        with torch.no_grad():
            secs = {name: _time(lambda f=f: f(z), iters, warmup=3) for name, f in peers.items()}
        base = secs["torch eager"]
        for name, s in secs.items():
            rows.append({"batch": bs, "peer": name, "images_per_s": round(bs / s, 1),
                         "vs_torch_eager": round(base / s, 2)})
    print(f"{'batch':>5}  {'peer':<18} {'images/s':>10}  {'x torch eager':>13}")
    for r in rows:
        print(f"{r['batch']:>5}  {r['peer']:<18} {r['images_per_s']:>10}  {r['vs_torch_eager']:>13}")
    result = {"device": gpu, "tensorrt": trt.__version__, "torch": torch.__version__,
              "onnxruntime": ort.__version__, "python": platform.python_version(),
              "iters": iters, "build_s": build_s, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
