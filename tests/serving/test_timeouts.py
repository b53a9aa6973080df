"""Requests that time out are abandoned, not cancelled, so they cannot crash the server.

The nvidia-pytriton wheel's tritonserver (2.51) has races in its gRPC frontend between a
request's cancellation and its answer (fixed upstream in 2.53, 2.57 and 2.59): thousands of
requests cancelled by short client deadlines made it die of SIGSEGV within a minute here
(docs/performance.md, "Timeouts"). ganforge's clients give up on their own clock and let the call
run out, so a client with a short --timeout leaves the server serving. Real server, real gRPC.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from ganforge.errors import Timeout
from ganforge.serving import jobs
from ganforge.serving.client import Client
from ganforge.serving.server import LocalServer, ServerOptions, free_port

pytestmark = pytest.mark.slow
MODEL, TILE, BATCH = "fill_inpainter", 32, 4
SECONDS = 12.0
# Every fourth request waits as long as it needs. It proves the server still answers under the
# storm, and it bounds the abandoned requests queued on the server, so a slow machine, where no
# answer comes within 20 ms, still gets answers.
PATIENT_EVERY, PATIENT_S = 4, 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ganforge.export.fill_inpainter import export_fill_inpainter

    repo = tmp_path_factory.mktemp("timeouts-repo") / "model_repository"
    export_fill_inpainter(repo, MODEL, tile=TILE, max_batch_size=8, intra_op_threads=1)
    srv = LocalServer(ServerOptions(model_repository=repo, grpc_port=free_port(),
                                    http_port=free_port(), metrics_port=free_port(),
                                    exit_timeout_s=2)).start()
    yield srv
    srv.stop()


def tiles(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (BATCH, TILE, TILE, 3), dtype=np.uint8)
    m = np.zeros((BATCH, TILE, TILE, 1), np.uint8)
    m[:, 8:20, 10:24] = 255
    return x, m


def assert_serving(server: LocalServer) -> None:
    assert server.proc.poll() is None, ("tritonserver died:\n"
                                        + "\n".join(list(server.log_tail)[-20:]))
    x, m = tiles(0)
    with Client(server.grpc_url, timeout=30) as c:
        y = c.infer(MODEL, {"image": x, "mask": m}, ["inpainted"])["inpainted"]
    assert y.shape == x.shape and np.array_equal(y[m[..., 0] == 0], x[m[..., 0] == 0])


def test_client_requests_that_time_out_leave_the_server_serving(server):
    """Eight threads send requests with timeouts of 0.1-20 ms, around the time an answer takes,
    for 12 s, and every fourth one with time enough: many time out, none is cancelled, the
    patient ones and the next good request are answered."""
    counts = {"answered": 0, "timed out": 0}
    errors: list[BaseException] = []
    lock = threading.Lock()
    end = time.monotonic() + SECONDS

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        x, m = tiles(seed)
        try:
            while time.monotonic() < end:
                with Client(server.grpc_url, timeout=rng.uniform(0.0001, 0.02)) as c, \
                        Client(server.grpc_url, timeout=PATIENT_S) as patient:
                    for i in range(20):
                        try:
                            (patient if i % PATIENT_EVERY == PATIENT_EVERY - 1 else c).infer(
                                MODEL, {"image": x, "mask": m}, ["inpainted"])
                            key = "answered"
                        except Timeout:
                            key = "timed out"
                        with lock:
                            counts[key] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 120)
    assert not errors, errors[:3]
    assert counts["answered"] > 0 and counts["timed out"] > 0, counts
    assert_serving(server)


def test_batch_job_engine_requests_that_time_out_leave_the_server_serving(server):
    """The batch job's asynchronous engine, 32 requests in flight, timeouts of 0.1-20 ms and
    every fourth one patient."""
    counts = {"answered": 0, "timed out": 0}

    async def main() -> None:
        engine = jobs.TritonEngine(server.grpc_url, MODEL, timeout_s=0.02)
        await engine.open()
        end = time.monotonic() + SECONDS

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            x, m = tiles(seed)
            i = 0
            while time.monotonic() < end:
                i += 1
                engine.timeout_s = (PATIENT_S if i % PATIENT_EVERY == 0
                                    else rng.uniform(0.0001, 0.02))
                try:
                    await engine.infer(x, m)
                    counts["answered"] += 1
                except Timeout:
                    counts["timed out"] += 1

        try:
            await asyncio.gather(*(worker(i) for i in range(32)))
        finally:
            await engine.close()

    asyncio.run(main())
    assert counts["answered"] > 0 and counts["timed out"] > 0, counts
    assert_serving(server)
