"""`ganforge bench load`: a sustained mixed load against a server, from its own process.

    ganforge bench load --url localhost:8001 --repository model_repository --duration 60 \
        --concurrency 64 --json load.json [--server-pid PID]

Each of `--concurrency` threads holds its own gRPC client and sends requests round-robin over
the repository's kinds of model (generation by seed, raw generator, denoising, inpainting:
whichever the repository holds), batch sizes 1-4. Reports requests, errors (with the first
messages), images/s, latency percentiles, and with `--server-pid` the resident memory of the
server's process tree (tritonserver + its Python backend stubs) after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

from ganforge.benchmarks._workloads import discover, percentiles
from ganforge.errors import UsageError


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(int(status.parent.name))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return total


def run_load(url: str, repository: str, duration: float, concurrency: int,
             server_pid: int | None = None, warmup: float = 5.0) -> dict:
    from ganforge.serving.client import Client

    workloads = list(discover(repository).values())
    if not workloads:
        raise UsageError(f"--repository: no servable models in {repository}")
    stop = threading.Event()
    lock = threading.Lock()
    stats = {"requests": 0, "images": 0, "errors": 0, "messages": [], "latencies": [],
             "by_kind": {w.kind: 0 for w in workloads}}

    def worker(k: int):
        rng = np.random.default_rng(k)
        with Client(url, timeout=60) as c:
            i = k
            while not stop.is_set():
                w = workloads[i % len(workloads)]
                i += 1
                batch = int(rng.integers(1, min(4, max(w.max_batch, 1)) + 1)) if w.kind != "generate" else int(rng.integers(1, 5))
                req = w.request(batch, rng)
                t0 = time.perf_counter()
                try:
                    c.infer(w.model, req, [w.output])
                    ok = True
                except Exception as exc:  # every failure is counted and reported
                    ok = False
                    msg = f"{w.model}: {type(exc).__name__}: {exc}"
                dt = time.perf_counter() - t0
                with lock:
                    stats["requests"] += 1
                    if ok:
                        stats["images"] += batch
                        stats["latencies"].append(dt)
                        stats["by_kind"][w.kind] += 1
                    else:
                        stats["errors"] += 1
                        if len(stats["messages"]) < 5:
                            stats["messages"].append(msg)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(min(warmup, duration / 4))
    rss_start = tree_rss_bytes(server_pid) if server_pid else None
    time.sleep(max(duration - (time.perf_counter() - t_start), 0))
    rss_end = tree_rss_bytes(server_pid) if server_pid else None
    stop.set()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.perf_counter() - t_start
    result = {
        "url": url, "duration_s": round(elapsed, 2), "concurrency": concurrency,
        "models": {w.kind: w.model for w in workloads},
        "requests": stats["requests"], "errors": stats["errors"], "error_messages": stats["messages"],
        "requests_by_kind": stats["by_kind"],
        "images_per_s": round(stats["images"] / elapsed, 2),
        **percentiles(stats["latencies"]),
    }
    if server_pid:
        result["server_rss_mb_after_warmup"] = round(rss_start / 2**20, 1)
        result["server_rss_mb_end"] = round(rss_end / 2**20, 1)
        result["server_rss_growth"] = round(rss_end / rss_start - 1, 4) if rss_start else None
    return result


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ganforge bench load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="localhost:8001")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--server-pid", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    result = run_load(a.url, a.repository, a.duration, a.concurrency, a.server_pid)
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0 if result["errors"] == 0 else 1
