"""`ganforge export RUN --format tensorrt [--precision fp32|fp16|int8]`: TensorRT engines built
from the exported ONNX generator, on the GPU that will run them, checked against ONNX Runtime.

INT8 is TensorRT's explicit quantization: the plan is built from a Q/DQ graph calibrated as
`--precision int8` calibrates the ONNX Runtime version (the same samples of the model's own
inputs, `--calibration N`, `--calibration-seed S`), with symmetric activations because TensorRT
takes only zero points of 0. Its quality cost (the generator's FD, as for the ONNX versions) is
measured on the GPU and warned about past the limit; FP16 plans get the same figure.

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
import sys
import time
from pathlib import Path

import numpy as np

from ganforge.errors import GanforgeError, UsageError
from ganforge.serving import repository as repo
from ganforge.serving import sampler
from ganforge.serving.repository import tensor

PLAN_PRECISIONS = ("fp32", "fp16", "int8")
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


def build_engine(onnx_path: Path, max_batch_size: int, precision: str = "fp32",
                 timing_cache: Path | None = None, workspace_bytes: int = WORKSPACE_BYTES,
                 log=print) -> bytes:
    """Build a serialized TensorRT engine (a plan) from an ONNX model with a dynamic batch.

    Args:
        onnx_path: the ONNX model; its first dimension is the batch on every input.
        max_batch_size: the profile covers batch 1..max_batch_size, tuned for the middle.
        precision: 'fp16' allows half-precision kernels; 'int8' builds the Q/DQ nodes of
            `onnx_path` as INT8 kernels (explicit quantization; the graph must hold them).
            The uint8 I/O stays uint8.
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
    if precision not in PLAN_PRECISIONS:
        raise UsageError(f"--precision: {precision!r} is not allowed for a TensorRT plan; "
                         f"allowed: {', '.join(PLAN_PRECISIONS)}")
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
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
    log(f"export: built a {precision.upper()} engine in {time.perf_counter() - t0:.1f} s")
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


def parity_ok(check: dict, precision: str) -> bool:
    """Whether a plan matches ONNX Runtime on its own graph. INT8 has no bound here: TensorRT's
    INT8 kernels and ONNX Runtime's Q/DQ emulation round differently, so what an INT8 plan
    must meet is the quality limit, measured as for the ONNX versions."""
    if precision == "fp16":
        return check["max_abs_diff"] <= FP16_MAX_ABS_DIFF and check["mean_abs_diff"] <= FP16_MEAN_ABS_DIFF
    if precision == "int8":
        return True
    return check["max_abs_diff"] <= FP32_MAX_ABS_DIFF


class PlanSession:
    """An Engine behind the slice of ONNX Runtime's session API that the quality figures use
    (`get_inputs`, `run`), in batches the plan's profile takes."""

    def __init__(self, plan: bytes, input_shape: list[int], max_batch_size: int):
        from types import SimpleNamespace

        self.engine, self.max_batch = Engine(plan), max_batch_size
        self._inputs = [SimpleNamespace(name=self.engine.inputs[0], shape=[-1, *input_shape])]

    def get_inputs(self):
        return self._inputs

    def run(self, _outputs, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        parts = [self.engine({k: v[i:i + self.max_batch] for k, v in feeds.items()})
                 for i in range(0, n, self.max_batch)]
        return [np.concatenate([p[name] for p in parts]) for name in self.engine.outputs]


def quantized_for_tensorrt(onnx_path: Path, dst: Path, calibration: int, seed: int) -> dict:
    """The symmetric Q/DQ graph of `onnx_path` (calibrated on `calibration` samples of its own
    inputs drawn with `seed`) that an INT8 plan is built from; what calibrated it."""
    import onnx

    from ganforge.export import quantize

    feeds, described = quantize.sample_inputs(onnx.load(str(onnx_path)), calibration, seed)
    quantize.quantize_int8(onnx_path, dst, feeds, symmetric=True)
    return {"samples": calibration, "seed": seed, "data": described,
            "activations": "int8, symmetric (zero point 0)", "weights": "int8, per channel"}


def compute_capability() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def write_plan_model(repository: Path, onnx_model: str, precision: str = "fp32", version: int = 1,
                     timing_cache: Path | None = None, calibration: int = 256, calibration_seed: int = 0,
                     max_loss: float | None = None, fd_samples: int = 1000, log=print, warn=print) -> dict:
    """Build a plan for the ONNX model `onnx_model` of `repository` and write it as the model
    `<onnx_model>_trt` (tensorrt_plan), with the same tensors and batch limit. An INT8 plan is
    built from the graph's symmetric Q/DQ version (`calibration` samples, `calibration_seed`);
    FP16 and INT8 plans get their quality cost against the FP32 ONNX graph (the generator's FD
    on `fd_samples` images), and a warning when it is past `max_loss` (default: the ONNX
    versions' limit)."""
    import tempfile

    from ganforge.export import quantize

    trt = import_tensorrt()
    gpu = require_gpu("export --format tensorrt")
    if precision not in PLAN_PRECISIONS:
        raise UsageError(f"--precision: {precision!r} is not allowed for a TensorRT plan; "
                         f"allowed: {', '.join(PLAN_PRECISIONS)}")
    src_dir = repository / onnx_model
    cfg = repo.read_config(src_dir / "config.pbtxt")
    onnx_path = src_dir / str(version) / "model.onnx"
    if not onnx_path.is_file():
        raise UsageError(f"--version: {onnx_path} does not exist; export the ONNX model first")
    name = f"{onnx_model}_trt"
    out_dir = repository / name
    with tempfile.TemporaryDirectory() as tmp:
        graph, calibrated = onnx_path, None
        if precision == "int8":
            graph = Path(tmp) / "model.int8.onnx"
            calibrated = quantized_for_tensorrt(onnx_path, graph, calibration, calibration_seed)
        t0 = time.perf_counter()
        plan = build_engine(graph, cfg.max_batch_size, precision=precision, timing_cache=timing_cache, log=log)
        build_s = round(time.perf_counter() - t0, 2)

        specs = {io.name: io for io in cfg.input}
        feeds = {}
        for io_name, io in specs.items():  # the generator takes latents: the sampler's own draw
            feeds[io_name] = sampler.sample_latents(0, cfg.max_batch_size, int(io.dims[0]))
        check = parity_vs_onnxruntime(plan, graph, feeds)
    tol = {"fp16": f"max {FP16_MAX_ABS_DIFF}, mean {FP16_MEAN_ABS_DIFF}", "fp32": f"max {FP32_MAX_ABS_DIFF}",
           "int8": "no bound: the quality limit decides"}[precision]
    log(f"export: parity TensorRT vs ONNX Runtime on {check['batch']} latents"
        + (" (the same Q/DQ graph)" if precision == "int8" else "")
        + f": max abs diff {check['max_abs_diff']}, mean {check['mean_abs_diff']} grey levels (allowed {tol})")
    if not parity_ok(check, precision):
        raise GanforgeError(f"export: the TensorRT engine differs from ONNX Runtime by "
                            f"{check['max_abs_diff']} grey levels (allowed {tol})")
    figure = None
    if precision != "fp32":
        task = "generator"
        test = PlanSession(plan, [int(d) for d in cfg.input[0].dims], cfg.max_batch_size)
        figure = quantize.quality(task, quantize.session(onnx_path), test, precision, fd_samples=fd_samples)
        limit = figure["limit"] if max_loss is None else max_loss
        figure.update(limit=limit, within_limit=bool(figure["loss"] <= limit))
        log(f"export: {figure['metric']}: fp32 {figure['fp32']}, {precision} plan {figure[precision]} "
            f"({figure['loss']:+} {figure['unit']}, limit {limit})")
        if not figure["within_limit"]:
            warn(f"warning: the {precision.upper()} plan's quality cost is {figure['loss']} {figure['unit']}, "
                 f"{round(figure['loss'] - limit, 3)} past the limit of {limit}")

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
            "precision": precision.upper(), "tensorrt_version": trt.__version__,
            "calibration": calibrated, "quality": figure,
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
    info = write_plan_model(repository, summary["generator"], precision=args.precision,
                            version=args.version, timing_cache=cache, calibration=args.calibration,
                            calibration_seed=args.calibration_seed, max_loss=args.max_loss,
                            warn=lambda line: print(line, file=sys.stderr, flush=True))
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
