"""Who answers a batch of tiles: a served inpainting model over asynchronous gRPC, or the same
ONNX model in this process (the peer `ganforge bench batch-inpaint` compares a served job with).
An engine has `tile` (an int, or serving.inpaint.AnySize for a model exported with --any-size),
`max_batch`, `model`, `url` and the coroutines `open`, `infer`, `ready`, `close`."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ganforge.errors import UsageError


def _channel_args() -> list:
    from ganforge.serving.client import MESSAGE_SIZE_ARGS

    # Reconnect within a second of a restarted server instead of gRPC's default back-off (2 min).
    return [*MESSAGE_SIZE_ARGS,
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000)]


class TritonEngine:
    """A served inpainting model over asynchronous gRPC (tritonclient.grpc.aio)."""

    def __init__(self, url: str, model: str, timeout_s: float | None = 60.0, tls=None,
                 key: tuple[str, str] | None = None, model_version: int | str | None = None):
        from ganforge.serving.client import check_version

        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.version = check_version(model_version)  # "": the server's choice, its highest
        self.tls = tls  # serving.client.TLSFiles, None: plaintext
        # a server started with --restricted-key wants it for the repository index (no --model)
        self.headers = {f"triton-grpc-protocol-{key[0]}": key[1]} if key else {}
        self._client = None
        self._abandoned: set[asyncio.Future] = set()  # timed-out requests still on the server
        self.tile = self.max_batch = 0

    async def open(self) -> None:
        import tritonclient.grpc.aio as aio

        t = self.tls
        self._client = aio.InferenceServerClient(
            self.url, ssl=t is not None, root_certificates=t and t.ca, private_key=t and t.key,
            certificate_chain=t and t.cert, channel_args=_channel_args())
        if self.model is None:
            self.model = await self._find_inpainter()
        if self.version:
            from ganforge.serving.client import check_served

            meta = await self._call(self._client.get_model_metadata, self.model, as_json=True,
                                    headers=self.headers)
            check_served(self.model, self.version, sorted(meta.get("versions", []), key=int), self.url)
        cfg = (await self._call(self._client.get_model_config, self.model, self.version,
                                as_json=True, headers=self.headers))["config"]
        image = next((i for i in cfg.get("input", []) if i["name"] == "image"), None)
        names = sorted(i["name"] for i in cfg.get("input", []))
        if image is None or names != ["image", "mask"]:
            raise UsageError(f"--model: {self.model!r} takes inputs {names}; an inpainting model "
                             f"takes ['image', 'mask']")
        from ganforge.serving.inpaint import any_size_spec

        dims = [int(d) for d in image["dims"]]
        spec = any_size_spec(cfg, self.model)   # windows at native size, the default cap
        if spec is None and (len(dims) != 3 or dims[0] != dims[1] or dims[0] <= 0):
            raise UsageError(f"--model: {self.model!r} takes images of shape {dims}; a fixed "
                             f"square tile [T, T, 3] or an --any-size export is needed")
        self.tile, self.max_batch = spec or dims[0], max(int(cfg.get("max_batch_size", 0)), 1)
        self.output = cfg["output"][0]["name"]  # `inpainted` for ganforge's inpainters

    async def _find_inpainter(self) -> str:
        """The one served model that takes `image` and `mask`: the default --model."""
        index = await self._call(self._client.get_model_repository_index, as_json=True,
                                 headers=self.headers)
        found = []
        for m in index.get("models", []):
            if m.get("state") != "READY":
                continue
            cfg = (await self._call(self._client.get_model_config, m["name"], as_json=True,
                                         headers=self.headers))["config"]
            if sorted(i["name"] for i in cfg.get("input", [])) == ["image", "mask"]:
                found.append(m["name"])
        return choose_inpainter(found, self.url)

    async def _call(self, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        from ganforge.serving.client import map_error

        try:
            return await fn(*args, **kwargs)
        except InferenceServerException as exc:
            raise map_error(exc, self.model, self.url, self.tls) from None

    async def infer(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        import tritonclient.grpc.aio as aio

        from ganforge.serving.client import grpc_deadline, timed_out

        inputs = []
        for name, a in (("image", x), ("mask", m)):
            t = aio.InferInput(name, list(a.shape), "UINT8")
            t.set_data_from_numpy(a)
            inputs.append(t)
        call = asyncio.ensure_future(self._call(
            self._client.infer, self.model, inputs, model_version=self.version,
            outputs=[aio.InferRequestedOutput(self.output)],
            client_timeout=grpc_deadline(self.timeout_s), headers=self.headers))
        if not self.timeout_s:
            return (await call).as_numpy(self.output)
        try:
            # timed out on the job's own clock and abandoned, not cancelled (client.py,
            # ABANDON_GRACE_S): the shield keeps the call running on the server
            result = await asyncio.wait_for(asyncio.shield(call), self.timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:  # timed out, or the job stops
            self._abandoned.add(call)
            call.add_done_callback(self._forget)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise timed_out(self.model, self.url, self.timeout_s) from None
        return result.as_numpy(self.output)

    def _forget(self, call: asyncio.Future) -> None:
        self._abandoned.discard(call)
        if not call.cancelled():
            call.exception()  # an abandoned call's error is nobody's: retrieve it, drop it

    async def ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=2)
                        and await self._client.is_model_ready(self.model, self.version, client_timeout=2))
        except Exception:
            return False

    async def close(self) -> None:
        from ganforge.serving.client import ABANDON_DRAIN_S

        if self._abandoned:  # closing the channel would cancel them: let them finish first
            await asyncio.wait(list(self._abandoned), timeout=ABANDON_DRAIN_S)
        if self._client is not None:
            await self._client.close()


class OnnxEngine:
    """The same ONNX model run in-process with ONNX Runtime: the peer the benchmark compares a
    served job with (same items, same pipeline, no server)."""

    def __init__(self, onnx_path: str | Path, max_batch: int = 32, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        shape = self.session.get_inputs()[0].shape
        if not isinstance(shape[1], int):   # the benchmark's in-process peer cuts one tile size
            raise UsageError(f"{onnx_path}: takes images of any size (exported with --any-size); the "
                             f"in-process engine takes a fixed-tile model (export with --tile N)")
        self.tile, self.max_batch = int(shape[1]), max_batch
        self.output = self.session.get_outputs()[0].name
        self.url, self.model = "in-process", Path(onnx_path).parent.parent.name
        self._pool = ThreadPoolExecutor(1)

    async def open(self) -> None:
        pass

    async def infer(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, lambda: self.session.run([self.output], {"image": x, "mask": m})[0])

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._pool.shutdown()


def choose_inpainter(found: list[str], url: str) -> str:
    """The default --model among the served inpainting models: the only one, or `ganforge
    inpaint`'s default when it is among several."""
    from ganforge.serving.inpaint import DEFAULT_MODEL

    if len(found) == 1:
        return found[0]
    if DEFAULT_MODEL in found:
        return DEFAULT_MODEL
    raise UsageError(f"--model: {'no' if not found else 'several'} inpainting models "
                     f"(inputs image and mask) are served at {url}"
                     + (f" ({', '.join(sorted(found))}); choose one" if found else ""))
