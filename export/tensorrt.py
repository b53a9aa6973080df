"""`ganforge export RUN --format tensorrt [--fp16]`: TensorRT engines built from the exported
ONNX generator, on the GPU that will run them, checked against ONNX Runtime.

A plan runs only on the TensorRT version and the GPU model (compute capability) that built it,
so ONNX stays the portable artifact and plans are built where they run: here on a GPU machine,
or on the Kubernetes node by the `build-engines` init step (deploy/overlays/gpu). For a
generator NAME it writes, beside the ONNX models of `ganforge export`:

    NAME_generator_trt/       tensorrt_plan: latent -> image, profile batch 1..max_batch_size
        config.pbtxt  1/model.plan  manifest.json (TensorRT version, GPU, compute capability,
                                                    precision, build time, parity vs ONNX Runtime)
    NAME_trt/                 ensemble: (seed, index) -> image, NAME_sampler then the plan

Without an NVIDIA GPU the command says so in one line and exits 1.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from ganforge.errors import GanforgeError, UsageError
from ganforge.serving import repository as repo
from ganforge.serving import sampler
from ganforge.serving.repository import tensor

FP32_MAX_ABS_DIFF = 1     # grey levels: the plan rounds as the ONNX graph does
FP16_MAX_ABS_DIFF = 8     # grey levels: half precision moves values near a rounding edge
FP16_MEAN_ABS_DIFF = 0.5  # grey levels over all pixels
WORKSPACE_BYTES = 1 << 30


class NoGPU(GanforgeError):
    """TensorRT needs an NVIDIA GPU and its driver."""


def gpu_name() -> str | None:
    """The first GPU's name from `nvidia-smi -L`, or None when there is no usable GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    first = out.stdout.strip().splitlines()[0]        # "GPU 0: NVIDIA H100 80GB HBM3 (UUID: ...)"
    return first.split(":", 1)[1].split("(UUID")[0].strip() if ":" in first else first


def require_gpu(what: str) -> str:
    name = gpu_name()
    if name is None:
        raise NoGPU(f"{what}: no NVIDIA GPU on this machine (nvidia-smi -L fails); TensorRT builds "
                    f"engines on the GPU that runs them: run this on a GPU machine")
    return name


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise GanforgeError(f"TensorRT is not installed ({exc}); on a GPU machine: "
                            f"pip install 'ganforge[gpu]'") from None
    return trt


def build_engine(onnx_path: Path, max_batch_size: int, fp16: bool = False,
                 timing_cache: Path | None = None, workspace_bytes: int = WORKSPACE_BYTES,
                 log=print) -> bytes:
    """Build a serialized TensorRT engine (a plan) from an ONNX model with a dynamic batch.

    Args:
        onnx_path: the ONNX model; its first dimension is the batch on every input.
        max_batch_size: the profile covers batch 1..max_batch_size, tuned for the middle.
        fp16: allow half-precision kernels (the uint8 I/O stays uint8).
        timing_cache: a file of layer timings reused across builds on the same GPU and
            TensorRT version; read when present, written back after the build.
        workspace_bytes: the builder's scratch memory limit.

    Returns:
        The plan's bytes.

    Raises:
        GanforgeError: the parser rejects the model or the build fails.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)               # explicit batch (the only mode in 10.x)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise GanforgeError(f"{onnx_path}: TensorRT's ONNX parser rejected the model: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    opt = max(1, (max_batch_size + 1) // 2)
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        rest = tuple(inp.shape)[1:]                   # (batch=-1, *rest)
        if any(d < 0 for d in rest):
            raise GanforgeError(f"{onnx_path}: input {inp.name!r} has dynamic dims {tuple(inp.shape)} "
                                f"beyond the batch; only the batch may vary")
        profile.set_shape(inp.name, (1, *rest), (opt, *rest), (max_batch_size, *rest))
    config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise GanforgeError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    log(f"export: built a {'FP16' if fp16 else 'FP32'} engine in {time.perf_counter() - t0:.1f} s")
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


class Engine:
    """A deserialized plan with one execution context; runs numpy batches on the GPU through
    torch's CUDA tensors as I/O buffers."""

    def __init__(self, plan: bytes):
        import torch

        trt = import_tensorrt()
        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise GanforgeError("TensorRT could not deserialize the plan (built by another "
                                "TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._dtype = {n: torch.from_numpy(np.zeros(1, trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                       for n in names}

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        keep = {}
        for name in self.inputs:
            x = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
            keep[name] = x
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))   # resolved from the input shapes
            y = torch.empty(shape, dtype=self._dtype[name], device="cuda")
            self.context.set_tensor_address(name, y.data_ptr())
            keep[name] = y
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise GanforgeError("TensorRT execution failed")
        stream.synchronize()
        return {n: keep[n].cpu().numpy() for n in self.outputs}


def parity_vs_onnxruntime(plan: bytes, onnx_path: Path, feeds: dict[str, np.ndarray]) -> dict:
    """Run the plan and ONNX Runtime (CPU, the reference) on the same inputs; the difference
    of the first output in grey levels."""
    import onnxruntime as ort

    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = next(iter(Engine(plan)(feeds).values()))
    diff = np.abs(ref.astype(np.int16) - got.astype(np.int16))
    return {"batch": int(next(iter(feeds.values())).shape[0]), "max_abs_diff": int(diff.max()),
            "mean_abs_diff": round(float(diff.mean()), 4),
            "pixels_differing": float((diff > 0).mean())}


def parity_ok(check: dict, fp16: bool) -> bool:
    if fp16:
        return check["max_abs_diff"] <= FP16_MAX_ABS_DIFF and check["mean_abs_diff"] <= FP16_MEAN_ABS_DIFF
    return check["max_abs_diff"] <= FP32_MAX_ABS_DIFF


def compute_capability() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def write_plan_model(repository: Path, onnx_model: str, fp16: bool, version: int = 1,
                     timing_cache: Path | None = None, log=print) -> dict:
    """Build a plan for the ONNX model `onnx_model` of `repository` and write it as the model
    `<onnx_model>_trt` (tensorrt_plan), with the same tensors and batch limit."""
    trt = import_tensorrt()
    gpu = require_gpu("export --format tensorrt")
    src_dir = repository / onnx_model
    cfg = repo.read_config(src_dir / "config.pbtxt")
    onnx_path = src_dir / str(version) / "model.onnx"
    if not onnx_path.is_file():
        raise UsageError(f"--version: {onnx_path} does not exist; export the ONNX model first")
    name = f"{onnx_model}_trt"
    out_dir = repository / name
    t0 = time.perf_counter()
    plan = build_engine(onnx_path, cfg.max_batch_size, fp16=fp16, timing_cache=timing_cache, log=log)
    build_s = round(time.perf_counter() - t0, 2)

    specs = {io.name: io for io in cfg.input}
    feeds = {}
    for io_name, io in specs.items():  # the generator takes latents: the sampler's own draw
        feeds[io_name] = sampler.sample_latents(0, cfg.max_batch_size, int(io.dims[0]))
    check = parity_vs_onnxruntime(plan, onnx_path, feeds)
    tol = (f"max {FP16_MAX_ABS_DIFF}, mean {FP16_MEAN_ABS_DIFF}" if fp16 else f"max {FP32_MAX_ABS_DIFF}")
    log(f"export: parity TensorRT vs ONNX Runtime on {check['batch']} latents: max abs diff "
        f"{check['max_abs_diff']}, mean {check['mean_abs_diff']} grey levels (allowed {tol})")
    if not parity_ok(check, fp16):
        raise GanforgeError(f"export: the TensorRT engine differs from ONNX Runtime by "
                            f"{check['max_abs_diff']} grey levels (allowed {tol})")

    plan_path = out_dir / str(version) / "model.plan"
    if plan_path.parent.exists():
        shutil.rmtree(plan_path.parent)
    plan_path.parent.mkdir(parents=True)
    plan_path.write_bytes(plan)
    types = {v: k for k, v in repo.DTYPES.items()}
    inputs = [tensor(i.name, types[i.data_type], list(i.dims)) for i in cfg.input]
    outputs = [tensor(o.name, types[o.data_type], list(o.dims)) for o in cfg.output]
    repo.write_config(out_dir, repo.tensorrt_model_config(name, inputs, outputs, cfg.max_batch_size))
    info = {"model": name, "version": version, "format": "tensorrt_plan",
            "source_onnx": f"{onnx_model}/{version}/model.onnx",
            "source_onnx_sha256": repo.sha256(onnx_path),
            "precision": "FP16" if fp16 else "FP32", "tensorrt_version": trt.__version__,
            "gpu": gpu, "compute_capability": compute_capability(),
            "profile_batch": [1, max(1, (cfg.max_batch_size + 1) // 2), cfg.max_batch_size],
            "build_s": build_s, "parity_vs_onnxruntime": check,
            "note": "runs only with this TensorRT version on GPUs of this compute capability"}
    repo.write_manifest(out_dir, info)
    return info


def export_tensorrt(args) -> int:
    """The CLI verb: export the run to ONNX (as `--format onnx` does), then build the plan of
    its generator and an ensemble NAME_trt that serves through it."""
    require_gpu("export --format tensorrt")  # first: one line and exit 1 on a CPU machine
    import_tensorrt()
    from ganforge.export.triton import GENERATOR_INSTANCES, export_generator

    repository = Path(args.repository)
    summary = export_generator(args.run, repository, name=args.name,
                               max_batch_size=args.max_batch_size or 64, version=args.version,
                               instances=GENERATOR_INSTANCES if args.instances is None else args.instances,
                               intra_op_threads=args.threads)
    cache = Path.home() / ".cache" / "ganforge" / f"trt-timing-{compute_capability()}.cache"
    info = write_plan_model(repository, summary["generator"], fp16=args.fp16,
                            version=args.version, timing_cache=cache)
    name = f"{summary['model']}_trt"
    gen = repo.read_config(repository / info["model"] / "config.pbtxt")
    ens = repo.ensemble_config(
        name, [tensor("seed", "INT64", [1]), tensor("index", "INT64", [1])],
        [tensor("image", "UINT8", list(gen.output[0].dims))],
        [(summary["sampler"], {"seed": "seed", "index": "index"}, {"latent": "latent"}),
         (info["model"], {"latent": "latent"}, {"image": "image"})],
        max_batch_size=gen.max_batch_size)
    (repository / name / str(args.version)).mkdir(parents=True, exist_ok=True)
    (repository / name / str(args.version) / ".keep").touch()
    repo.write_config(repository / name, ens)
    repo.write_manifest(repository / name, {"model": name, "version": args.version,
                                            "steps": [summary["sampler"], info["model"]]})
    print(f"exported {name} -> {info['model']} ({info['precision']}, TensorRT "
          f"{info['tensorrt_version']}, {info['gpu']}, compute capability "
          f"{info['compute_capability']}; built in {info['build_s']} s; parity vs ONNX Runtime "
          f"max abs diff {info['parity_vs_onnxruntime']['max_abs_diff']} grey levels)")
    return 0
