"""The Triton model repository as typed objects: config.pbtxt through Triton's own protobuf
schema (`tritonclient.grpc.model_config_pb2.ModelConfig`), and the manifest that records
where every model came from and the sha256 of each of its files.

Layout written by `ganforge export` for a generator NAME:

    NAME/                     ONNX: (seed, index) -> image, the name clients use: the sampler's
        config.pbtxt            graph and the generator's merged, one row per image, batched
        1/model.onnx  manifest.json
    NAME_generator/           ONNX: latent -> image (UINT8 NHWC), dynamic batching
        config.pbtxt  1/model.onnx  manifest.json
    NAME_sampler/             ONNX: (seed, index) -> latent, counter-based, deterministic
        config.pbtxt  1/model.onnx  manifest.json   (serving/sampler.py)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ganforge.errors import RepositoryError

MANIFEST = "manifest.json"
DTYPES = {"FP32": mc.TYPE_FP32, "UINT8": mc.TYPE_UINT8, "INT64": mc.TYPE_INT64,
          "INT32": mc.TYPE_INT32}


def tensor(name: str, dtype: str, dims: list[int]) -> dict:
    return {"name": name, "dtype": dtype, "dims": list(dims)}


def _io(cls, spec: dict):
    return cls(name=spec["name"], data_type=DTYPES[spec["dtype"]], dims=spec["dims"])


def _warmup(max_batch_size: int, inputs: list[dict], side: int | None = None) -> list[mc.ModelWarmup]:
    """Warm up at batch 1 and at the largest batch, so neither the first request nor the first
    full batch pays for ONNX Runtime's lazy initialisation. A warm-up sample needs every
    dimension: a variable one (-1) is given as `side`."""
    sizes = sorted({1, max_batch_size})
    out = []
    for bs in sizes:
        w = mc.ModelWarmup(name=f"warmup_batch_{bs}", batch_size=bs, count=1)
        for spec in inputs:
            dims = [side if d == -1 and side else d for d in spec["dims"]]
            w.inputs[spec["name"]].CopyFrom(mc.ModelWarmup.Input(data_type=DTYPES[spec["dtype"]],
                                                          dims=dims, zero_data=True))
        out.append(w)
    return out


def onnx_model_config(name: str, inputs: list[dict], outputs: list[dict], max_batch_size: int,
                      max_queue_delay_us: int = 100, instances: int = 1,
                      intra_op_threads: int = 0,
                      allowed_values: dict[str, tuple[int, ...]] | None = None,
                      parameters: dict[str, str] | None = None,
                      warmup_side: int | None = None) -> mc.ModelConfig:
    """An ONNX model served by Triton's `onnxruntime` backend (or ganforge's stand-in for it).

    Batch is the first dimension (not listed in `dims`); the dynamic batcher merges requests up
    to `max_batch_size`, waiting at most `max_queue_delay_us` for more to arrive: 100 µs, short
    against a batch's run, so a lone client's requests are not held back waiting for company
    (docs/performance.md, "The dynamic batcher's delay"). The instance kind is left to Triton
    (GPU where there is one).

    `allowed_values` maps an integer input to the only values it may hold (the inpainter's
    mask: 0 and 255); ganforge's backend refuses a request holding any other value
    (`parameters` key `allowed_values`, written as `mask=0,255`, inputs separated by `;`).

    `parameters` are written as string parameters (an any-size image model's `stride` and
    `min_side`, which clients read); `warmup_side` stands for the -1 dims in the warm-up samples.
    """
    cfg = mc.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime",
                         max_batch_size=max_batch_size, default_model_filename="model.onnx")
    cfg.input.extend(_io(mc.ModelInput, s) for s in inputs)
    cfg.output.extend(_io(mc.ModelOutput, s) for s in outputs)
    cfg.instance_group.add(count=instances)
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    cfg.model_warmup.extend(_warmup(max_batch_size, inputs, warmup_side))
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    if intra_op_threads:
        cfg.parameters["intra_op_thread_count"].string_value = str(intra_op_threads)
    if allowed_values:
        cfg.parameters["allowed_values"].string_value = format_allowed_values(allowed_values)
    return cfg


def format_allowed_values(allowed: dict[str, tuple[int, ...]]) -> str:
    """`{"mask": (0, 255)}` as the config parameter's text, `mask=0,255`."""
    return ";".join(f"{name}={','.join(str(int(v)) for v in values)}" for name, values in allowed.items())


def tensorrt_model_config(name: str, inputs: list[dict], outputs: list[dict],
                          max_batch_size: int, max_queue_delay_us: int = 100,
                          instances: int = 1) -> mc.ModelConfig:
    """A TensorRT plan served by Triton's `tensorrt` backend, on the GPU.

    The plan's optimization profile covers batch 1..max_batch_size; the dynamic batcher merges
    requests up to that size. A plan runs only on the TensorRT version and GPU model that built
    it (see the model's manifest).
    """
    cfg = mc.ModelConfig(name=name, platform="tensorrt_plan", backend="tensorrt",
                         max_batch_size=max_batch_size, default_model_filename="model.plan")
    cfg.input.extend(_io(mc.ModelInput, s) for s in inputs)
    cfg.output.extend(_io(mc.ModelOutput, s) for s in outputs)
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    cfg.model_warmup.extend(_warmup(max_batch_size, inputs))
    return cfg


ORT_TRT_PRECISIONS = ("FP32", "FP16")


def add_ort_tensorrt(cfg: mc.ModelConfig, precision: str = "FP16",
                     engine_cache_path: str = "/tmp/ganforge-trt-cache",
                     max_workspace_size_bytes: int = 1 << 30) -> mc.ModelConfig:
    """Ask Triton's native `onnxruntime` backend to run the model through ONNX Runtime's
    TensorRT execution provider (CUDA for what TensorRT cannot run), caching the engines it
    builds under `engine_cache_path` so a restart does not rebuild them. The keys are those
    of the onnxruntime_backend's `gpu_execution_accelerator` "tensorrt". Ignored on a CPU.
    """
    precision = precision.upper()
    if precision not in ORT_TRT_PRECISIONS:
        raise ValueError(f"precision {precision!r}; allowed: {', '.join(ORT_TRT_PRECISIONS)}")
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    acc.parameters["precision_mode"] = precision
    acc.parameters["max_workspace_size_bytes"] = str(max_workspace_size_bytes)
    acc.parameters["trt_engine_cache_enable"] = "1"
    acc.parameters["trt_engine_cache_path"] = engine_cache_path
    acc.parameters["trt_timing_cache_enable"] = "1"
    acc.parameters["trt_timing_cache_path"] = engine_cache_path
    return cfg


def ensemble_config(name: str, inputs: list[dict], outputs: list[dict],
                    steps: list[tuple[str, dict[str, str], dict[str, str]]],
                    max_batch_size: int = 0) -> mc.ModelConfig:
    """An ensemble; each step is (model_name, input_map, output_map), model version latest."""
    cfg = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    cfg.input.extend(_io(mc.ModelInput, s) for s in inputs)
    cfg.output.extend(_io(mc.ModelOutput, s) for s in outputs)
    for model_name, input_map, output_map in steps:
        step = cfg.ensemble_scheduling.step.add(model_name=model_name, model_version=-1)
        step.input_map.update(input_map)
        step.output_map.update(output_map)
    return cfg


def render(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def write_config(model_dir: Path, cfg: mc.ModelConfig) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(render(cfg))
    # Round-trip through Triton's schema: what we write must be what Triton reads.
    read_config(path)
    return path


def read_config(path: str | Path) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's schema; RepositoryError names the file and the line."""
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except FileNotFoundError as exc:
        raise RepositoryError(f"{path}: missing (every model directory needs a config.pbtxt)") from exc
    except text_format.ParseError as exc:
        raise RepositoryError(f"{path}: malformed config.pbtxt: {exc}") from exc


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(model_dir: Path, info: dict) -> Path:
    """Write MANIFEST with `info` plus the sha256 of every file in the model directory."""
    files = {}
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts:
            files[p.relative_to(model_dir).as_posix()] = sha256(p)
    path = model_dir / MANIFEST
    path.write_text(json.dumps({**info, "files": files}, indent=2, sort_keys=True) + "\n")
    return path


def verify_manifest(model_dir: Path) -> None:
    """Raise RepositoryError when a file listed in the manifest is missing or changed."""
    path = model_dir / MANIFEST
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RepositoryError(f"{path}: not a ganforge manifest ({exc})") from exc
    for rel, expected in files.items():
        f = model_dir / rel
        if not f.is_file():
            raise RepositoryError(f"{f}: listed in {path} but missing; re-export the model")
        actual = sha256(f)
        if actual != expected:
            raise RepositoryError(f"{f}: changed since export (sha256 {actual[:12]}… but the "
                                  f"manifest records {expected[:12]}…); re-export the model or "
                                  f"restore the file")


def model_dirs(repository: str | Path) -> list[Path]:
    """The model directories of a repository (each holds a config.pbtxt)."""
    repo = Path(repository)
    if not repo.is_dir():
        raise RepositoryError(f"--model-repository: {repo} is not a directory")
    return sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_repository(repository: str | Path) -> dict[str, mc.ModelConfig]:
    """Parse every config.pbtxt and verify every manifest; return {model name: config}."""
    configs = {}
    dirs = model_dirs(repository)
    if not dirs:
        raise RepositoryError(f"--model-repository: {repository} holds no model directories")
    for d in dirs:
        cfg = read_config(d / "config.pbtxt")
        if cfg.name and cfg.name != d.name:
            raise RepositoryError(f"{d / 'config.pbtxt'}: name {cfg.name!r} differs from its "
                                  f"directory {d.name!r}; Triton requires them to match")
        verify_manifest(d)
        configs[d.name] = cfg
    return configs
