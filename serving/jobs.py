"""Batch inpainting jobs: folders and manifests of photos with masks, sent through a Triton
inpainting model as fast as the server allows, resumable, and nothing lost when a server dies.

    >>> from ganforge.serving.jobs import JobOptions, discover, run_job
    >>> items, bad = discover("photos/", "out/")
    >>> summary = run_job(items, "out/", JobOptions(url="localhost:8001", model="fill_inpainter"),
    ...                   failures=bad)

The pipeline: each item in flight has a thread (at most 2 x batch x concurrency of them) that

    reads image + mask, sha256 both, validates, dilates,
    runs serving.inpaint.inpaint_image (the path of Client.inpaint: windows around the holes,
    resized to the model's tile, pasted back into the holes only) with a `run` that hands the
    tiles to the event loop and waits,                                                    ─┐
    encodes PNG, writes it to a temporary name and renames it into place.                  │
    event loop: packs the tiles of many items into batches, keeps up to `concurrency`  ◄───┘
    asynchronous gRPC requests in flight, retries, waits for a restarted server, records
    each written output in the journal.

Files in OUTPUT_DIR (with `.shard-I-of-N` before the suffix when the job is sharded):
`journal.jsonl` (one line per written output: sha256 of image, mask and output, model, tile,
dilation), `failures.jsonl` (this run's failed items with the reason), `summary.json`.

Resume: an item is skipped when its journal line (in any `journal*.jsonl` of OUTPUT_DIR, so a
job sharded differently resumes too) exists, its output file's sha256 equals the
recorded one, and the image's and mask's sha256, the model, the tile size and the dilation are
the same as now. Anything else is done again. Outputs are renamed into place before their
journal line is written, so a crash between the two only costs redoing that item.

Exit codes (`exit_code(summary)`): 0 every item done or skipped, 3 some items failed (see
failures.jsonl), 1 the job stopped (server gone longer than `wait_for_server_s`), 130 Ctrl-C.

Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ganforge.errors import (DataError, GanforgeError, InvalidArgument, ModelNotFound, ServerError,
                             ServerUnavailable, Timeout, TLSError, UsageError)
from ganforge.images import IMAGE_SUFFIXES, read_image

DEFAULT_MODEL = None  # the one served model with inputs `image` and `mask`
MASK_SUFFIX = "_mask"
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class JobAborted(GanforgeError):
    """The job stopped before every item was tried (the server did not come back in time)."""


class ItemFailed(Exception):
    """One item's tiles could not be inpainted (a server error after retries, a refusal)."""


class JobStopped(Exception):
    """Raised in an item thread when the job is stopping (Ctrl-C, SIGTERM, aborted)."""


# -- items --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    key: str            # output path relative to OUTPUT_DIR (posix): the item's identity
    image: Path
    mask: Path | None   # None: no mask was found (the item fails with that reason)
    output: Path


def _failure(key: str, image, reason: str, mask=None) -> dict:
    return {"key": key, "image": str(image) if image else None,
            "mask": str(mask) if mask else None, "reason": reason}


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}{MASK_SUFFIX}", stem):
        for suffix in (".png", *IMAGE_SUFFIXES):
            p = folder / f"{name}{suffix}"
            if p.is_file():
                return p
    return None


def discover(input: str | Path, output_dir: str | Path, masks: str | Path | None = None
             ) -> tuple[list[Item], list[dict]]:
    """The items of a job and the entries that cannot become items (with reasons).

    Args:
        input: a folder of images (masks `photo_mask.png` beside `photo.jpg`, or in `masks`
            at the same relative path, named `photo_mask.*` or `photo.*`), or a `.jsonl`
            manifest of {"image", "mask", "output"} lines (paths relative to the manifest's
            folder; `output` relative to `output_dir`, default the image's name as .png).
        output_dir: where outputs go, mirroring the inputs' relative paths, always as PNG so the
            pixels outside the holes stay byte-identical.
        masks: a separate folder of masks (folder input only).
    """
    input, output_dir = Path(input), Path(output_dir)
    if input.is_file() and input.suffix == ".jsonl":
        if masks is not None:
            raise UsageError("--masks: not used with a .jsonl manifest (each line names its mask)")
        return _from_manifest(input, output_dir)
    if not input.is_dir():
        raise UsageError(f"INPUT: {input} is neither a folder nor a .jsonl manifest")
    if masks is not None and not Path(masks).is_dir():
        raise UsageError(f"--masks: {masks} is not a folder")
    out_abs = output_dir.resolve()
    items, bad, seen = [], [], {}
    for path in sorted(input.rglob("*")):
        rel = path.relative_to(input)
        if (not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES
                or any(part.startswith(".") for part in rel.parts)
                or out_abs == path.resolve().parent or out_abs in path.resolve().parents):
            continue
        if masks is None and path.stem.endswith(MASK_SUFFIX):
            continue
        key = rel.with_suffix(".png").as_posix()
        mask = _find_mask(Path(masks) / rel.parent if masks is not None else path.parent, path.stem)
        if masks is None and mask == path:
            mask = None
        if key in seen:
            bad.append(_failure(key, path, f"output {key} is also the output of {seen[key]}; "
                                           f"rename one of them", mask))
            continue
        seen[key] = path
        items.append(Item(key, path, mask, output_dir / key))
    return items, bad


def _from_manifest(manifest: Path, output_dir: Path) -> tuple[list[Item], list[dict]]:
    base = manifest.parent
    items, bad, seen = [], [], {}
    try:
        lines = manifest.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"INPUT: cannot read {manifest} ({exc.strerror})") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{manifest.name}:{n}"
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise ValueError('needs an object with a string "image"')
        except ValueError as exc:
            bad.append(_failure(where, None, f"{where}: not a manifest line ({exc})"))
            continue
        image = base / entry["image"]
        mask = base / entry["mask"] if isinstance(entry.get("mask"), str) else None
        out = entry.get("output") or Path(entry["image"]).with_suffix(".png").as_posix()
        rel = Path(out)
        if rel.is_absolute() or ".." in rel.parts:
            bad.append(_failure(where, image, f"{where}: output {out!r} must be a relative path "
                                              f"inside OUTPUT_DIR", mask))
            continue
        key = rel.as_posix()
        if key in seen:
            bad.append(_failure(key, image, f"{where}: output {key} is also the output of line "
                                            f"{seen[key]}", mask))
            continue
        seen[key] = n
        items.append(Item(key, image, mask, output_dir / rel))
    return items, bad


# -- sharding -----------------------------------------------------------------------------------

def shard_of(key: str, num_shards: int) -> int:
    """The shard an item belongs to: a stable hash of its output path, the same on every
    machine, Python version and run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % num_shards


def shard(items: list, index: int, num_shards: int, key=lambda it: it.key) -> list:
    if not 0 <= index < num_shards:
        raise UsageError(f"--shard-index: {index} is not allowed; must be in [0, {num_shards - 1}]")
    return [it for it in items if shard_of(key(it), num_shards) == index]


def shard_defaults(index: int | None, num_shards: int | None, env=os.environ) -> tuple[int, int]:
    """--shard-index defaults from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)."""
    if index is None and env.get("JOB_COMPLETION_INDEX", "") != "":
        try:
            index = int(env["JOB_COMPLETION_INDEX"])
        except ValueError:
            raise UsageError(f"JOB_COMPLETION_INDEX: {env['JOB_COMPLETION_INDEX']!r} is not an "
                             f"integer") from None
    if num_shards is None:
        num_shards = 1 if index is None else None
    if num_shards is None:
        raise UsageError("--num-shards: needed with --shard-index / JOB_COMPLETION_INDEX "
                         "(set it to the Job's completions)")
    if num_shards < 1:
        raise UsageError(f"--num-shards: {num_shards} is not allowed; must be >= 1")
    index = 0 if index is None else index
    if not 0 <= index < num_shards:
        raise UsageError(f"--shard-index: {index} is not allowed; must be in [0, {num_shards - 1}]")
    return index, num_shards


# -- the per-item work, in the item threads -----------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Prepared:
    item: Item
    image: np.ndarray       # (H, W, 3) uint8, the whole input
    mask: np.ndarray        # (H, W) uint8 255 = hole, after dilation
    record: dict            # the journal line without the output's hash


@dataclass(frozen=True)
class Skipped:
    item: Item


@dataclass(frozen=True)
class Failed:
    item: Item
    reason: str


def _settings(opts: "JobOptions", tile: int) -> dict:
    return {"model": opts.model, "tile": tile, "dilate": opts.dilate}


def prepare(item: Item, tile: int, opts: "JobOptions", previous: dict | None):
    """Read and check one item; Skipped when `previous` (its journal line) still holds."""
    from ganforge.masks import dilate, read_mask

    try:
        if item.mask is None:
            raise DataError(f"{item.image}: no mask found (looked for {item.image.stem}{MASK_SUFFIX}.png)")
        image_sha, mask_sha = _sha256_file(item.image), _sha256_file(item.mask)
        record = {"key": item.key, "image": str(item.image), "mask": str(item.mask),
                  "image_sha256": image_sha, "mask_sha256": mask_sha, **_settings(opts, tile)}
        if previous is not None and all(previous.get(k) == record[k] for k in
                                        ("image_sha256", "mask_sha256", "model", "tile", "dilate")):
            if item.output.is_file() and _sha256_file(item.output) == previous.get("output_sha256"):
                return Skipped(item)
        image = read_image(item.image, max_pixels=opts.max_pixels)
        mask = read_mask(item.mask)
        if mask.shape != image.shape[:2]:
            raise DataError(f"{item.mask}: mask size mismatch: mask is {mask.shape[1]}x{mask.shape[0]}, "
                            f"image is {image.shape[1]}x{image.shape[0]}")
        mask = dilate(mask, opts.dilate)
        if not mask.any():
            raise DataError(f"{item.mask}: empty mask: no hole pixel (grey value >= half scale)")
        if mask.all():
            raise DataError(f"{item.mask}: every pixel is a hole; there is nothing to inpaint from")
        return Prepared(item, image, mask, record)
    except DataError as exc:
        return Failed(item, str(exc))
    except OSError as exc:
        return Failed(item, f"{item.image}: cannot read ({exc.strerror or exc})")
    except Exception as exc:  # a decoder's own error (e.g. Pillow's decompression-bomb check)
        return Failed(item, f"{item.image}: cannot be used ({type(exc).__name__}: {exc})")


def write_atomic(path: Path, data: bytes) -> None:
    """`data` under a temporary name in the same folder, flushed, then renamed into place: a
    reader (or a resumed job) never sees a partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def finish(p: Prepared, result: np.ndarray) -> dict:
    """Write the inpainted image as PNG; return the journal line."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(result).save(buf, format="PNG")
    data = buf.getvalue()
    write_atomic(p.item.output, data)
    return {**p.record, "output": str(p.item.output),
            "output_sha256": hashlib.sha256(data).hexdigest()}


# -- engines: who answers a batch ----------------------------------------------------------------

def _channel_args() -> list:
    from ganforge.serving.client import MAX_MESSAGE_BYTES

    # Reconnect within a second of a restarted server instead of gRPC's default back-off (2 min).
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000)]


class TritonEngine:
    """A served inpainting model over asynchronous gRPC (tritonclient.grpc.aio)."""

    def __init__(self, url: str, model: str, timeout_s: float | None = 60.0, tls=None,
                 key: tuple[str, str] | None = None):
        self.url, self.model, self.timeout_s = url, model, timeout_s
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
        cfg = (await self._call(self._client.get_model_config, self.model, as_json=True,
                                     headers=self.headers))["config"]
        image = next((i for i in cfg.get("input", []) if i["name"] == "image"), None)
        names = sorted(i["name"] for i in cfg.get("input", []))
        if image is None or names != ["image", "mask"]:
            raise UsageError(f"--model: {self.model!r} takes inputs {names}; an inpainting model "
                             f"takes ['image', 'mask']")
        dims = [int(d) for d in image["dims"]]
        if len(dims) != 3 or dims[0] != dims[1] or dims[0] <= 0:
            raise UsageError(f"--model: {self.model!r} takes images of shape {dims}; a fixed "
                             f"square tile [T, T, 3] is needed")
        self.tile, self.max_batch = dims[0], max(int(cfg.get("max_batch_size", 0)), 1)
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
        if len(found) != 1:
            raise UsageError(f"--model: {'no' if not found else 'several'} inpainting models "
                             f"(inputs image and mask) are served at {self.url}"
                             + (f" ({', '.join(sorted(found))}); choose one" if found else ""))
        return found[0]

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
            self._client.infer, self.model, inputs,
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
                        and await self._client.is_model_ready(self.model, client_timeout=2))
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


# -- the job ------------------------------------------------------------------------------------

@dataclass
class JobOptions:
    url: str = "localhost:8001"
    model: str | None = DEFAULT_MODEL
    concurrency: int = 4            # asynchronous requests in flight
    batch_size: int | None = None   # items per request (None: the model's max_batch_size)
    workers: int | None = None      # items in flight, one thread each (None: 2 x batch x concurrency)
    retries: int = 3                # per request, on timeouts and server errors
    backoff_s: float = 0.5          # first retry delay, doubled each time (at most 10 s)
    wait_for_server_s: float = 300.0  # how long an unavailable server is waited for
    timeout_s: float | None = 60.0  # per request
    tls: object = None              # serving.client.TLSFiles: TLS to the server; None: plaintext
    key: tuple[str, str] | None = None  # --key of a server started with --restricted-key
    dilate: int = 0                 # grow holes by this many pixels
    max_pixels: int | None = 64_000_000
    memory_bytes: int = 1 << 30     # decoded pixels held between reading and writing
    resume: bool = False
    shard_index: int = 0
    num_shards: int = 1
    progress: bool = True


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    total: int = 0
    time_s: float = 0.0
    items_per_s: float = 0.0
    status: str = "complete"        # complete | interrupted | aborted
    reason: str = ""
    model: str = ""
    url: str = ""
    shard_index: int = 0
    num_shards: int = 1
    output_dir: str = ""
    failures_file: str = ""
    journal_file: str = ""
    batches: int = 0
    retries: int = 0
    server_waits: int = 0
    files: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("files")
        return d


def exit_code(summary: Summary) -> int:
    if summary.status == "interrupted":
        return EXIT_INTERRUPTED
    if summary.status == "aborted":
        return EXIT_RUNTIME
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK


def job_file(output_dir: Path, name: str, opts: JobOptions) -> Path:
    if opts.num_shards > 1:
        stem, suffix = name.rsplit(".", 1)
        name = f"{stem}.shard-{opts.shard_index}-of-{opts.num_shards}.{suffix}"
    return Path(output_dir) / name


def read_journal(path: Path) -> dict[str, dict]:
    """The last journal line of every key (a torn last line from a crash is ignored)."""
    entries = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
                entries[e["key"]] = e
            except (ValueError, KeyError, TypeError):
                continue
    return entries


class Job:
    """One run over a list of items (already sharded), writing into `output_dir`."""

    def __init__(self, items: list[Item], output_dir: str | Path, opts: JobOptions,
                 engine=None, failures: list[dict] | None = None, stream=None):
        self.items, self.opts = items, dataclasses.replace(opts)  # the job fills in opts.model
        self.output_dir = Path(output_dir)
        self.engine = engine or TritonEngine(opts.url, opts.model, opts.timeout_s, opts.tls,
                                             opts.key)
        self.pre_failures = failures or []
        self.stream = stream
        self.summary = Summary(model=opts.model, url=opts.url, shard_index=opts.shard_index,
                               num_shards=opts.num_shards, output_dir=str(self.output_dir),
                               total=len(items) + len(self.pre_failures))
        self._journal = self._failures = None
        self._progress = None
        self._healthy_at = 0.0
        self._wait_lock: asyncio.Lock | None = None

    # -- records --------------------------------------------------------------------------

    def _record_failure(self, entry: dict) -> None:
        self._failures.write(json.dumps(entry) + "\n")
        self._failures.flush()
        self.summary.failed += 1
        self._tick()

    def _fail(self, item: Item, reason: str) -> None:
        self._record_failure(_failure(item.key, item.image, reason, item.mask))

    def _tick(self) -> None:
        s = self.summary
        if self._progress is not None:
            self._progress.update(1, status=f"done {s.done} skipped {s.skipped} failed {s.failed}")

    # -- server faults --------------------------------------------------------------------

    async def _wait_for_server(self, failed_at: float) -> None:
        async with self._wait_lock:
            if self._healthy_at > failed_at:  # another request already waited it out
                return
            self.summary.server_waits += 1
            deadline = time.monotonic() + self.opts.wait_for_server_s
            if self._progress is not None:
                self._progress.update(0, status=f"waiting for the server at {self.opts.url}")
            while time.monotonic() < deadline:
                if await self.engine.ready():
                    self._healthy_at = time.monotonic()
                    return
                await asyncio.sleep(0.5)
            raise JobAborted(f"server at {self.opts.url} unavailable for more than "
                             f"{self.opts.wait_for_server_s:g} s (--wait-for-server); "
                             f"rerun with --resume to continue")

    async def _infer(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        attempt = 0
        while True:
            try:
                return await self.engine.infer(x, m)
            except (ServerUnavailable, ModelNotFound):
                # Down, restarting, or up but still loading the model: wait, then retry; this
                # does not use up a retry.
                await self._wait_for_server(time.monotonic())
            except InvalidArgument:
                raise
            except (Timeout, ServerError):
                failed_at = time.monotonic()
                if not await self.engine.ready():  # the connection broke: the server is going away
                    await self._wait_for_server(failed_at)
                    continue
                attempt += 1
                if attempt > self.opts.retries:
                    raise
                self.summary.retries += 1
                await asyncio.sleep(min(self.opts.backoff_s * 2 ** (attempt - 1), 10.0))

    # -- tiles: from the item threads to the server and back ----------------------------------

    def _run_tiles(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        """The `run` that serving.inpaint.inpaint_image calls from an item thread: hand the
        tiles to the event loop's batcher and wait for their answer."""
        fut = asyncio.run_coroutine_threadsafe(self._submit(x, m), self._loop)
        while True:
            try:
                return fut.result(timeout=0.5)
            except FutureTimeout:
                if self._stopping.is_set():  # the loop is gone: never wait on it
                    fut.cancel()
                    raise JobStopped("the job is stopping") from None

    async def _submit(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        answer = asyncio.get_running_loop().create_future()
        await self._ready.put((x, m, answer))
        return await answer

    async def _send(self, batch: list[tuple]) -> None:
        """One request for the tiles of several items; each item's future gets its answer."""
        x = np.concatenate([b[0] for b in batch])      # (B, T, T, 3)
        m = np.concatenate([b[1] for b in batch])      # (B, T, T, 1)
        self.summary.batches += 1
        try:
            y = await self._infer(x, m)
        except ServerError as exc:
            if len(batch) > 1 and isinstance(exc, InvalidArgument):
                for b in batch:  # find the item the server refused; the others go through
                    await self._send([b])
                return
            why = ("the server refused it" if isinstance(exc, InvalidArgument)
                   else f"server error after {self.opts.retries} retries")
            for b in batch:
                if not b[2].done():
                    b[2].set_exception(ItemFailed(f"{why}: {exc}"))
            return
        at = 0
        for b in batch:
            n = len(b[0])
            if not b[2].done():
                b[2].set_result(y[at:at + n])
            at += n

    def _reserve(self, p: Prepared) -> None:
        """Hold an item's decoded pixels against the memory budget (one item always fits), so
        a folder of large photos does not fill the memory ahead of the server."""
        n = p.image.nbytes + p.mask.nbytes
        with self._budget:
            self._budget.wait_for(lambda: self._in_memory == 0 or self._stopping.is_set()
                                  or self._in_memory + n <= self.opts.memory_bytes)
            self._in_memory += n
        return n

    def _release(self, n: int) -> None:
        with self._budget:
            self._in_memory -= n
            self._budget.notify_all()

    def _process(self, item: Item, tile: int, max_batch: int, previous: dict | None):
        """One item, start to end, in an item thread: read and check, inpaint through the
        server (serving.inpaint.inpaint_image: windows around the holes, pasted back), write."""
        from ganforge.serving.inpaint import inpaint_image

        p = prepare(item, tile, self.opts, previous)
        if not isinstance(p, Prepared):
            return p
        n = self._reserve(p)
        try:
            try:
                result = inpaint_image(p.image, p.mask, tile, self._run_tiles, max_batch)
            except ItemFailed as exc:
                return Failed(item, str(exc))
            except (JobStopped, asyncio.CancelledError):
                raise
            except Exception as exc:  # one item's bad luck never stops the job
                return Failed(item, f"{item.image}: inpainting failed ({type(exc).__name__}: {exc})")
            if self._stopping.is_set():
                raise JobStopped("the job is stopping")
            try:
                return finish(p, result)
            except OSError as exc:
                return Failed(item, f"cannot write {item.output}: {exc.strerror or exc}")
        finally:
            self._release(n)

    async def _main(self, journal: dict[str, dict]) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._wait_lock = asyncio.Lock()
        while True:
            try:
                await self.engine.open()
                break
            except TLSError:  # certificates do not change by waiting
                raise
            except ServerUnavailable:  # not up yet: wait (bounded) as for a restart
                await self._wait_for_server(time.monotonic())
        self.opts.model = self.summary.model = self.engine.model
        if not await self.engine.ready():
            await self._wait_for_server(time.monotonic())
        tile = self.engine.tile
        batch_size = min(self.opts.batch_size or self.engine.max_batch, self.engine.max_batch)
        in_flight = self.opts.workers or max(2 * batch_size * self.opts.concurrency, 8)
        self._items_pool = ThreadPoolExecutor(in_flight, thread_name_prefix="batch-inpaint")
        self._ready = asyncio.Queue()
        slots = asyncio.Semaphore(in_flight)
        doing: set[asyncio.Task] = set()

        async def one(item: Item) -> None:
            try:
                r = await loop.run_in_executor(self._items_pool, self._process, item, tile,
                                               batch_size,
                                               journal.get(item.key) if self.opts.resume else None)
                if isinstance(r, Skipped):
                    self.summary.skipped += 1
                    self._tick()
                elif isinstance(r, Failed):
                    self._fail(r.item, r.reason)
                else:
                    self._journal.write(json.dumps(r) + "\n")
                    self._journal.flush()
                    self.summary.done += 1
                    self._tick()
            finally:
                slots.release()

        async def feed() -> None:
            for item in self.items:
                await slots.acquire()
                t = asyncio.create_task(one(item))
                doing.add(t)
                t.add_done_callback(doing.discard)
            while doing:
                await asyncio.gather(*list(doing))
            for _ in range(self.opts.concurrency):
                await self._ready.put(None)

        async def sender() -> None:
            while True:
                first = await self._ready.get()
                if first is None:
                    return
                batch, tiles = [first], len(first[0])
                while tiles < batch_size:
                    try:
                        nxt = self._ready.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if nxt is None:
                        await self._ready.put(None)  # keep the stop signal for another sender
                        break
                    if tiles + len(nxt[0]) > batch_size:
                        await self._send(batch)
                        batch, tiles = [], 0
                    batch.append(nxt)
                    tiles += len(nxt[0])
                await self._send(batch)

        try:
            tasks = [asyncio.create_task(feed())] + [asyncio.create_task(sender())
                                                     for _ in range(self.opts.concurrency)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                self._stopping.set()
                for t in [*tasks, *doing]:
                    t.cancel()
                await asyncio.gather(*tasks, *doing, return_exceptions=True)
                raise
        finally:
            await self.engine.close()

    def run(self) -> Summary:
        """Run the job; the summary is also written to summary.json. KeyboardInterrupt stops it
        cleanly (outputs already renamed stay, nothing partial under a final name) and returns
        the summary with status "interrupted"."""
        from ganforge.progress import Progress

        opts = self.opts
        self.output_dir.mkdir(parents=True, exist_ok=True)
        journal_path = job_file(self.output_dir, "journal.jsonl", opts)
        failures_path = job_file(self.output_dir, "failures.jsonl", opts)
        summary_path = job_file(self.output_dir, "summary.json", opts)
        s = self.summary
        s.journal_file, s.failures_file = str(journal_path), str(failures_path)
        journal = {}
        if opts.resume:  # every journal in the folder: a job re-sharded differently resumes too
            for path in sorted(self.output_dir.glob("journal*.jsonl")):
                journal.update(read_journal(path))
        self._journal = open(journal_path, "a" if opts.resume else "w")
        self._failures = open(failures_path, "w")
        self._items_pool = None
        self._stopping = threading.Event()
        self._budget, self._in_memory = threading.Condition(), 0
        self._progress = Progress(s.total, "batch-inpaint", unit="img", enabled=opts.progress,
                                  stream=self.stream)
        start = time.perf_counter()
        error = None  # raised after the summary is written: the model is not served, ...
        try:
            for entry in self.pre_failures:
                self._record_failure(entry)
            if self.items:
                asyncio.run(self._main(journal))
        except KeyboardInterrupt:
            s.status, s.reason = "interrupted", "interrupted (Ctrl-C or SIGTERM); rerun with --resume"
        except JobAborted as exc:
            s.status, s.reason = "aborted", str(exc)
        except GanforgeError as exc:
            s.status, s.reason = "aborted", str(exc)
            error = exc
        finally:
            # Let writes in progress finish (each renames a complete file), start no new ones.
            self._stopping.set()
            with self._budget:
                self._budget.notify_all()
            if self._items_pool is not None:
                self._items_pool.shutdown(wait=True, cancel_futures=True)
            self._progress.close()
            for f in (self._journal, self._failures):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            s.time_s = round(time.perf_counter() - start, 3)
            s.items_per_s = round(s.done / s.time_s, 3) if s.time_s > 0 else 0.0
            write_atomic(summary_path, (json.dumps(s.as_dict(), indent=2) + "\n").encode())
        if error is not None:
            raise error
        return s


def run_job(items: list[Item], output_dir: str | Path, opts: JobOptions, failures=None,
            engine=None, stream=None) -> Summary:
    """Shard `items` by `opts`, run them, return the summary (see `exit_code`)."""
    mine = shard(items, opts.shard_index, opts.num_shards)
    mine_bad = [f for f in (failures or []) if shard_of(f["key"], opts.num_shards) == opts.shard_index]
    return Job(mine, output_dir, opts, engine=engine, failures=mine_bad, stream=stream).run()


def summary_lines(s: Summary) -> list[str]:
    lines = [f"batch-inpaint: {s.done} done, {s.skipped} skipped, {s.failed} failed of {s.total} "
             f"in {s.time_s:.1f} s ({s.items_per_s:.2f} img/s)"
             + (f", shard {s.shard_index} of {s.num_shards}" if s.num_shards > 1 else "")]
    if s.failed:
        lines.append(f"failures: {s.failures_file}")
    if s.status != "complete":
        lines.append(f"stopped: {s.reason}")
    return lines
