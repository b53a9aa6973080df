"""The job: its options, the event loop that packs tiles of many items into batches and keeps
requests in flight, waiting out a restarted server, the journal and failures files, the summary
and the exit code."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ganforge.errors import (GanforgeError, InvalidArgument, ModelNotFound, ServerError,
                             ServerUnavailable, Timeout, TLSError)
from ganforge.serving.jobs.discovery import Item, failure, shard, shard_of
from ganforge.serving.jobs.engines import TritonEngine
from ganforge.serving.jobs.items import Failed, Prepared, Skipped, finish, prepare, write_atomic

DEFAULT_MODEL = None  # the one served model with inputs `image` and `mask`
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class JobAborted(GanforgeError):
    """The job stopped before every item was tried (the server did not come back in time)."""


class ItemFailed(Exception):
    """One item's tiles could not be inpainted (a server error after retries, a refusal)."""


class JobStopped(Exception):
    """Raised in an item thread when the job is stopping (Ctrl-C, SIGTERM, aborted)."""


@dataclass
class JobOptions:
    url: str = "localhost:8001"
    model: str | None = DEFAULT_MODEL
    model_version: int | None = None  # None: the server's choice, the highest version it serves
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
    model_version: str = ""         # "": the server's choice, the highest version it serves
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
                                             opts.key, opts.model_version)
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
        self._record_failure(failure(item.key, item.image, reason, item.mask))

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
        self.summary.model_version = getattr(self.engine, "version", "")
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
                    # a request holds one shape: an any-size model's windows differ in shape
                    if tiles + len(nxt[0]) > batch_size or nxt[0].shape[1:] != batch[0][0].shape[1:]:
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
