"""Requests for each kind of served model, built from the model's own config, and the timing
helpers: shared by the serving benchmark, the load test and the quantization benchmark. numpy
only (no torch)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ganforge.errors import UsageError
from ganforge.serving.repository import read_config


@dataclass
class Workload:
    """One model and how to build a request of `batch` items for it."""

    kind: str            # generate | generator | denoise | inpaint
    model: str
    inputs: dict         # name -> (dtype, dims without batch)
    max_batch: int
    output: str = "image"  # the first declared output: "image", "denoised", "inpainted"
    onnx_path: str | None = None

    def request(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.kind == "generate":
            return {"seed": np.full((batch, 1), rng.integers(0, 2**62), np.int64),
                    "index": np.arange(batch, dtype=np.int64).reshape(batch, 1)}
        out = {}
        for name, (dtype, dims) in self.inputs.items():
            shape = (batch, *dims)
            if name == "mask":
                m = np.zeros(shape, np.uint8)
                h, w = dims[0], dims[1]
                m[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
                out[name] = m
            elif dtype == np.uint8:
                out[name] = rng.integers(0, 256, shape, dtype=np.uint8)
            else:
                out[name] = rng.standard_normal(shape).astype(dtype)
        return out


DTYPES = {"TYPE_FP32": np.float32, "TYPE_UINT8": np.uint8, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32}


def discover(repository) -> dict[str, Workload]:
    """Workloads for every servable model of a repository, keyed by kind (first model of each)."""
    from pathlib import Path

    from google.protobuf.json_format import MessageToDict

    if not Path(repository).is_dir():
        raise UsageError(f"--repository: {repository} is not a folder")
    found: dict[str, Workload] = {}
    for d in sorted(Path(repository).iterdir()):
        if not (d / "config.pbtxt").is_file():
            continue
        cfg = MessageToDict(read_config(d / "config.pbtxt"), preserving_proto_field_name=True)
        inputs = {i["name"]: (DTYPES[i["data_type"]], [int(x) for x in i["dims"]]) for i in cfg.get("input", [])}
        if any(x < 0 for _, dims in inputs.values() for x in dims):
            continue   # an --any-size model: no one request shape stands for its load
        names = set(inputs)
        # the version Triton answers a request that names none with: the highest
        versions = sorted((int(v.name) for v in d.iterdir() if v.name.isdigit()), reverse=True)
        onnx = d / str(versions[0] if versions else 1) / "model.onnx"
        mb = int(cfg.get("max_batch_size", 0))
        outputs = [o["name"] for o in cfg.get("output", [])] or ["image"]
        if names == {"seed", "index"} and outputs == ["image"]:   # NAME_sampler answers latents
            kind = "generate"
        elif names == {"latent"}:
            kind = "generator"
        elif names == {"image", "mask"}:
            kind = "inpaint"
        elif names == {"image"}:
            kind = "denoise"
        else:
            continue
        found.setdefault(kind, Workload(kind, d.name, inputs, mb, outputs[0],
                                        str(onnx) if onnx.is_file() else None))
    return found


def percentiles(latencies_s: list[float]) -> dict:
    if not latencies_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    a = np.asarray(latencies_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 3) for q in (50, 95, 99)}


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def run_for(seconds: float, fn, min_iters: int = 3) -> list[float]:
    """The latencies of calls of `fn` for `seconds`, at least `min_iters` of them."""
    lat, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(lat) < min_iters:
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return lat
