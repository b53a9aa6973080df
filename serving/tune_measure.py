"""`ganforge tune`'s measurement: one configuration on its own `tritonserver` under the load of
benchmarks/serve.py's asyncio gRPC load generator, at each concurrency of the sweep.

`_prepare` copies the model's directory into a temporary repository with the candidate written
into the copy's config.pbtxt; `measure` starts the local server (serving/server.py) on that copy
and records the figures. serving/tune.py calls these once per configuration and round.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from ganforge.errors import ServerStartError
from ganforge.serving import repository as repo
from ganforge.serving.tune_config import Candidate, apply

WARMUP_S = 0.5           # load at the highest concurrency before each configuration's figures


def _prepare(model_dir: Path, cfg: mc.ModelConfig, cand: Candidate | None, dest: Path) -> Path:
    """`dest`/MODEL: a copy of the model directory; with `cand`, its config.pbtxt rewritten and
    the manifest dropped (the shipped copy keeps it, so the server still checks its files)."""
    target = dest / model_dir.name
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("__pycache__"))
    if cand is not None:
        repo.write_config(target, apply(cfg, cand))
        (target / repo.MANIFEST).unlink(missing_ok=True)
    return dest


def measure(repository: Path, model: str, workload, concurrencies: list[int], batch: int,
            seconds: float, log=print, prefix: str = "", settle=None):
    """Start the local server on `repository` (one model) and put the load on it at each
    concurrency. `settle` is called once the server is ready and before any load (the caller
    waits there for the previous configuration's server to exit, so its shutdown overlaps this
    start but never the figures).

    Returns:
        ({"start_s", "by_concurrency": {c: figures}}, the running server, for the caller to
        stop), or ({"error": why}, None) when the server did not start or the load failed.
    """
    from ganforge.benchmarks.serve import served
    from ganforge.serving.server import LocalServer, ServerOptions, free_port

    opts = ServerOptions(model_repository=repository, grpc_port=free_port(), http_port=free_port(),
                         metrics_port=free_port(), exit_timeout_s=10)
    t0 = time.perf_counter()
    try:
        server = LocalServer(opts).start()
    except ServerStartError as exc:
        log(f"{prefix}server did not start: {exc}")
        return {"error": f"server did not start: {exc}"}, None
    out: dict = {"start_s": round(time.perf_counter() - t0, 2), "by_concurrency": {}}
    try:
        if settle is not None:
            settle()
        served(server.grpc_url, model, workload, batch, max(concurrencies), min(WARMUP_S, seconds))
        for c in concurrencies:
            m = served(server.grpc_url, model, workload, batch, c, seconds)
            out["by_concurrency"][c] = m
            errors = f", {m['errors']} FAILED ({m['error_messages'][0]})" if m["errors"] else ""
            log(f"{prefix}concurrency {c:>3}: {m['images_per_s']:>9.1f} images/s  p50 {_ms(m['p50_ms'])}  "
                f"p99 {_ms(m['p99_ms'])}  ({m['requests']} requests{errors})")
    except Exception as exc:   # a configuration that serves no request is recorded, not fatal
        server.stop()
        log(f"{prefix}the load failed: {type(exc).__name__}: {exc}")
        return {"error": f"the load failed: {type(exc).__name__}: {exc}"}, None
    except BaseException:
        server.stop()
        raise
    return out, server


def _ms(v) -> str:
    return f"{v:8.1f} ms" if v is not None else "       - ms"
