"""The load generators of `ganforge bench serve`: `concurrency` requests of `batch` items kept in
flight against one served model for a while, by tritonclient's asyncio gRPC client (`served`) or
by Triton's C++ perf_analyzer (`served_perf_analyzer`). Each returns images/s, the request and
error counts (with the first messages) and latency percentiles. The sustained mixed load of
`ganforge bench load` is in load.py."""

from __future__ import annotations

import asyncio
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ganforge.benchmarks._workloads import Workload, percentiles
from ganforge.errors import UsageError


def served(url: str, model: str, w: Workload, batch: int, concurrency: int, seconds: float) -> dict:
    """`concurrency` requests kept in flight for `seconds` with tritonclient's asyncio gRPC
    client on one event loop: the cheapest Python client for a CPU the server shares
    (docs/performance.md, "The client")."""
    return asyncio.run(_served(url, model, w, batch, concurrency, seconds))


async def _served(url, model, w, batch, concurrency, seconds) -> dict:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    from tritonclient.utils import np_to_triton_dtype

    from ganforge.serving.client import MESSAGE_SIZE_ARGS

    client = aioclient.InferenceServerClient(url, channel_args=MESSAGE_SIZE_ARGS)
    rng = np.random.default_rng(batch * 1000 + concurrency)

    def make_inputs():
        out = []
        for name, array in w.request(batch, rng).items():
            t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            t.set_data_from_numpy(array)
            out.append(t)
        return out

    lat: list[float] = []
    errors: list[str] = []
    try:
        per_worker = [make_inputs() for _ in range(concurrency)]
        await client.infer(model, per_worker[0])  # warm the channel
        stop_at = time.perf_counter() + seconds

        async def worker(inputs):
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    result = await client.infer(model, inputs)
                    if result.as_numpy(w.output) is None:
                        raise RuntimeError(f"{model}: no output {w.output!r} in the response")
                    lat.append(time.perf_counter() - t)
                except Exception as exc:  # counted and reported, never hidden
                    errors.append(str(exc)[:200])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in per_worker))
        elapsed = time.perf_counter() - t0
    finally:
        await client.close()
    return {"images_per_s": round(batch * len(lat) / elapsed, 2), "requests": len(lat),
            "errors": len(errors), **({"error_messages": errors[:3]} if errors else {}), **percentiles(lat)}


# -- the C++ load generator ---------------------------------------------------------------------

def perf_analyzer_path() -> str | None:
    """Triton's perf_analyzer: $GANFORGE_PERF_ANALYZER, else the copy `make venv` puts in the
    venv (scripts/install_perf_analyzer.sh), else None."""
    env = os.environ.get("GANFORGE_PERF_ANALYZER")
    if env:
        if not os.access(env, os.X_OK):
            raise UsageError(f"GANFORGE_PERF_ANALYZER: {env} is not an executable file")
        return env
    found = Path(sys.prefix) / "perf_analyzer" / "bin" / "perf_analyzer"
    return str(found) if os.access(found, os.X_OK) else None


def served_perf_analyzer(pa: str, url: str, model: str, w: Workload, batch: int, concurrency: int,
                         seconds: float, expected_images_per_s: float | None = None) -> dict:
    """`concurrency` requests of `batch` items kept in flight for about `seconds` by perf_analyzer
    (C++, one thread per request in flight), on the same request as the Python client's: the
    batch-1 inputs of `w.request` written as raw files, repeated over the batch. Three
    measurement windows, reported together; its CSV gives the throughput and latency
    percentiles. A window must hold enough whole requests to count, however slow a batch of
    the model is: given `expected_images_per_s` (the Python client's figure at the same point,
    just before), each window holds at least 8 requests and about a third of `seconds` of them
    (perf_analyzer's count windows); without it, windows of a third of `seconds`, at least 1 s.
    A failed request makes perf_analyzer exit non-zero: the measurement then counts one error
    and keeps the message."""
    with tempfile.TemporaryDirectory(prefix="ganforge-pa-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for name, array in w.request(1, np.random.default_rng(batch * 1000 + concurrency)).items():
            (data / name).write_bytes(np.ascontiguousarray(array).tobytes())
        report = Path(tmp) / "report.csv"
        if expected_images_per_s:
            per_window = max(8, int(expected_images_per_s / batch * seconds / 3))
            windows = ["--measurement-mode", "count_windows", "--measurement-request-count", str(per_window)]
        else:
            windows = ["--measurement-interval", str(max(1000, int(seconds * 1000 / 3)))]
        cmd = [pa, "-m", model, "-u", url, "-i", "grpc", "-b", str(batch),
               "--concurrency-range", f"{concurrency}:{concurrency}", "--input-data", str(data),
               *windows, "--max-trials", "3", "--stability-percentage", "1000", "-f", str(report)]
        failed = lambda message: {"images_per_s": 0.0, "requests": 0, "errors": 1, "client": "perf_analyzer",
                                  "error_messages": [message], **percentiles([])}
        # room for perf_analyzer's three windows at twice the time the Python client's figure
        # gives them: a slow model's count windows take longer than `seconds`
        limit = 60 + 10 * seconds + (6 * per_window * batch / expected_images_per_s if expected_images_per_s else 0)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return failed(f"perf_analyzer: no answer within {limit:.0f} s")
        if r.returncode != 0 or not report.is_file():
            tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
            return failed(f"perf_analyzer exit {r.returncode}: {tail[:300]}")
        row = next(csv.DictReader(report.open()))
    count = re.search(r"Request count: (\d+)", r.stdout)
    ms = lambda key: round(float(row[key]) / 1000, 3)   # perf_analyzer reports microseconds
    return {"images_per_s": round(float(row["Inferences/Second"]), 2),
            "requests": int(count.group(1)) if count else None, "errors": 0, "client": "perf_analyzer",
            "p50_ms": ms("p50 latency"), "p95_ms": ms("p95 latency"), "p99_ms": ms("p99 latency")}
