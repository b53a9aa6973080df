"""A Python-based Triton backend named `onnxruntime`: serves `platform: "onnxruntime_onnx"`
models with ONNX Runtime, for the embedded tritonserver (whose wheel ships only the Python
backend). The official Triton container uses its native onnxruntime backend on the same
repository instead.

Per model instance: one InferenceSession built in `initialize`. Per `execute`: the requests'
inputs are checked one by one (a bad one gets its own INVALID_ARG answer), the good ones are
concatenated along the batch axis, run once, and the outputs split back in request order.

Config parameters read (string values): `intra_op_thread_count`, `inter_op_thread_count`,
`allow_spinning` ("0" or "1", ONNX Runtime's session.intra_op.allow_spinning),
`allowed_values` (`mask=0,255`: the only values an integer input may hold; inputs separated
by `;`). Without
`intra_op_thread_count`, one instance takes ONNX Runtime's default (a thread per core) and
each of several instances an equal share of the CPUs this process may use
(`available_cpus`), so instances run side by side instead of fighting over every core.
"""

import json
import os
import sys

extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
sys.path[:0] = [p for p in extra if p not in sys.path]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

NP_DTYPES = {"TYPE_FP32": np.float32, "TYPE_UINT8": np.uint8, "TYPE_INT64": np.int64,
             "TYPE_INT32": np.int32, "TYPE_FP16": np.float16}


def available_cpus(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a
    container's CPU limit, as Kubernetes sets it) where there is one."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(1, n)


def intra_op_threads(params: dict, config: dict, cpus: int) -> int:
    """ONNX Runtime's intra-op threads for one instance: the `intra_op_thread_count` parameter
    where set; else 0 (ORT's default) for a lone instance, and `cpus` shared equally (at least
    one each) among several."""
    threads = int(params.get("intra_op_thread_count") or 0)
    count = sum(int(g.get("count", 1)) for g in config.get("instance_group", []) if g.get("kind") != "KIND_GPU")
    if threads or count <= 1:
        return threads
    return max(1, cpus // count)


def parse_allowed_values(text: str) -> dict[str, np.ndarray]:
    """The `allowed_values` parameter, `mask=0,255;other=1,2`, as a 256-entry lookup table per
    input (True where a value is allowed). Only byte-sized integer values are supported."""
    tables = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, values = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"parameter allowed_values: {part!r} is not NAME=V1,V2,...")
        try:
            allowed = [int(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"parameter allowed_values: {part!r} holds a value that is not an integer") from None
        if not all(0 <= v <= 255 for v in allowed):
            raise ValueError(f"parameter allowed_values: {part!r} holds a value outside [0, 255]")
        table = np.zeros(256, bool)
        table[allowed] = True
        tables[name.strip()] = table
    return tables


def check_values(name: str, a: np.ndarray, table: np.ndarray) -> None:
    """Raise ValueError naming the first value of uint8 array `a` that `table` does not allow."""
    ok = table[a]
    if not ok.all():
        where = tuple(int(i) for i in np.argwhere(~ok)[0])
        allowed = ", ".join(str(v) for v in np.flatnonzero(table))
        raise ValueError(f"input '{name}': value {int(a[where])} at {list(where)} is not allowed; "
                         f"send only {allowed}")


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.max_batch_size = int(config.get("max_batch_size", 0))
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads(params, config, available_cpus())
        opts.inter_op_num_threads = int(params.get("inter_op_thread_count") or 0)
        # ORT's intra-op threads spin while waiting for work; beside Triton's own threads on a
        # small CPU that spinning steals the cores the gRPC frontend needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      params.get("allow_spinning", "1"))
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        self.inputs = [(i["name"], NP_DTYPES[i["data_type"]], [int(d) for d in i["dims"]])
                       for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.allowed = parse_allowed_values(params.get("allowed_values", ""))
        # a model exported with --any-size takes sides that are multiples of its stride
        self.stride = int(params.get("stride") or 1)
        for name in self.allowed:
            dtype = next((d for n, d, _ in self.inputs if n == name), None)
            if dtype is None or dtype != np.uint8:
                raise ValueError(f"parameter allowed_values: input '{name}' is not a UINT8 input of {self.name}")

    def _check(self, request):
        """The request's inputs as arrays, or raise ValueError naming the problem. Triton has
        already checked names, dtypes and shapes against config.pbtxt; this guards the rest."""
        arrays = {}
        batch = None
        for name, dtype, dims in self.inputs:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                raise ValueError(f"input '{name}' is missing")
            a = t.as_numpy()
            if a.dtype != dtype:
                raise ValueError(f"input '{name}': dtype {a.dtype} is not allowed; send {np.dtype(dtype).name}")
            shape = a.shape[1:] if self.max_batch_size > 0 else a.shape
            if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape)):
                expected = ", ".join(map(str, dims))
                raise ValueError(f"input '{name}': shape {list(a.shape)} is not allowed; expected "
                                 + (f"[batch, {expected}]" if self.max_batch_size > 0 else f"[{expected}]"))
            sides = [s for d, s in zip(dims, shape) if d == -1][:2]
            if self.stride > 1 and any(s % self.stride for s in sides):
                raise ValueError(f"input '{name}': shape {list(a.shape)} is not allowed; height and width "
                                 f"must be multiples of {self.stride} (the model's stride)")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"input '{name}': contains NaN or infinite values; send finite numbers")
            if name in self.allowed:
                check_values(name, a, self.allowed[name])
            if self.max_batch_size <= 0:
                batch = 0
            elif batch is None:
                batch = a.shape[0]
            elif a.shape[0] != batch:
                raise ValueError(f"input '{name}': batch {a.shape[0]} differs from the other inputs' {batch}")
            arrays[name] = a
        if self.max_batch_size > 0 and not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"batch: {batch} is not allowed; must be in [1, {self.max_batch_size}]")
        return arrays, batch

    def execute(self, requests):
        responses = [None] * len(requests)
        good, sizes, arrays = [], [], []
        for i, request in enumerate(requests):
            try:
                a, n = self._check(request)
                good.append(i)
                sizes.append(n)
                arrays.append(a)
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.name}: {exc}", pb_utils.TritonError.INVALID_ARG))
        if good:
            feed = {name: (arrays[0][name] if len(arrays) == 1
                           else np.concatenate([a[name] for a in arrays], axis=0))
                    for name, _, _ in self.inputs}
            try:
                results = self.session.run(self.outputs, feed)
            except Exception as exc:  # a model failure fails these requests, not the server
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"{self.name}: inference failed: {exc}"))
                return responses
            offsets = np.cumsum([0] + sizes)
            for k, i in enumerate(good):
                lo, hi = offsets[k], offsets[k + 1]
                responses[i] = pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, np.ascontiguousarray(r[lo:hi]))
                     for name, r in zip(self.outputs, results)])
        return responses

    def finalize(self):
        self.session = None
