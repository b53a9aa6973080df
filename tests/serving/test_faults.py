"""Faults and load against a real tritonserver on the committed model repository: a killed
server is reported unavailable (never a hang), SIGTERM drains in-flight requests, and 60 s of
mixed load at concurrency 64 from another process runs without errors or memory growth."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ganforge.errors import ServerUnavailable
from ganforge.serving.client import Client
from ganforge.serving.server import LocalServer, ServerOptions, free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
REPO = ROOT / "model_repository"


def live_in_group(pgid: int) -> list[str]:
    """Processes of a process group that are still running (zombies awaiting their reaper are
    dead already)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1: text.rindex(")")], text[text.rindex(")") + 2:].split()
        state, group = rest[0], int(rest[2])
        if group == pgid and state != "Z":
            found.append(f"{stat.parent.name} {name} {state}")
    return found


def start(exit_timeout_s=30):
    return LocalServer(ServerOptions(model_repository=REPO, grpc_port=free_port(), http_port=free_port(),
                                     metrics_port=free_port(), exit_timeout_s=exit_timeout_s)).start()


def test_a_killed_server_is_reported_unavailable_not_a_hang():
    server = start()
    errors, done = [], threading.Event()

    def stream():
        with Client(server.grpc_url, timeout=20) as c:
            try:
                while True:
                    c.generate("dcgan_shapes", seed=1, count=16)
            except Exception as exc:
                errors.append((time.monotonic(), exc))
            finally:
                done.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    server.proc.send_signal(signal.SIGKILL)
    assert done.wait(15), "the client hung after the server died"
    group = server.proc.pid
    server.stop()
    assert live_in_group(group) == [], "backend stubs outlived the killed server"
    (when, exc), = errors
    assert isinstance(exc, ServerUnavailable), repr(exc)
    assert str(exc).startswith(f"server unavailable at {server.grpc_url}")
    assert when - killed_at < 15


def test_sigterm_to_ganforge_serve_drains_in_flight_requests_before_exit():
    g, h, m = free_port(), free_port(), free_port()
    exe = Path(sys.executable).parent / "ganforge"
    proc = subprocess.Popen([str(exe), "serve", "--model-repository", str(REPO), "--grpc-port", str(g),
                             "--http-port", str(h), "--metrics-port", str(m), "--exit-timeout", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not proc.stdout.readline().startswith("Ctrl-C to stop"):
            assert proc.poll() is None, proc.stderr.read()
    except BaseException:
        proc.kill()
        raise
    url = f"localhost:{g}"
    results, first_done = [], threading.Event()
    lock = threading.Lock()
    barrier = threading.Barrier(24)

    def one(seed):
        with Client(url, timeout=60) as c:
            barrier.wait()
            try:
                out = c.generate("dcgan_shapes", seed=seed, count=64)
                res = ("ok", time.monotonic(), out.shape)
            except Exception as exc:
                res = ("error", time.monotonic(), repr(exc))
            with lock:
                results.append(res)
            first_done.set()

    threads = [threading.Thread(target=one, args=(s,)) for s in range(24)]
    for t in threads:
        t.start()
    assert first_done.wait(60)
    term_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(90)
    out, err = proc.communicate(timeout=90)
    assert [r for r in results if r[0] != "ok"] == []
    assert all(r[2] == (64, 64, 64, 3) for r in results)
    # the drain is real: requests were still completing after SIGTERM was sent
    assert sum(r[1] > term_at for r in results) >= 1
    assert proc.returncode == 0, err
    assert out.strip().endswith("stopped (signal SIGTERM); tritonserver exited with 0")
    # and the server is gone: new requests are refused as unavailable
    with Client(url, timeout=5) as c:
        with pytest.raises(ServerUnavailable):
            c.generate("dcgan_shapes", seed=1, count=1)


def test_sixty_seconds_of_mixed_load_at_concurrency_64_from_another_process(tmp_path):
    server = start()
    try:
        out = tmp_path / "load.json"
        r = subprocess.run([sys.executable, "-m", "ganforge", "bench", "load", "--url", server.grpc_url,
                            "--repository", str(REPO), "--duration", "60", "--concurrency", "64",
                            "--server-pid", str(server.proc.pid), "--json", str(out)],
                           capture_output=True, text=True, timeout=300)
        result = json.loads(out.read_text())
        assert r.returncode == 0, r.stdout + r.stderr
        assert result["errors"] == 0, result["error_messages"]
        assert result["requests"] > 100
        assert all(n > 0 for n in result["requests_by_kind"].values()), result["requests_by_kind"]
        assert result["server_rss_growth"] < 0.10, result
        # still serving afterwards
        with Client(server.grpc_url) as c:
            assert c.generate("dcgan_shapes", seed=0, count=1).shape == (1, 64, 64, 3)
    finally:
        server.stop()
