"""`ganforge serve` failing fast and clearly: taken port, missing repository, a model that does
not load, a changed model file."""

import shutil
import socket

import pytest

from ganforge.errors import RepositoryError, ServerStartError
from ganforge.serving.server import LocalServer, ServerOptions, free_port
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_serve_refuses_a_port_in_use(tiny_repo):
    repo, _ = tiny_repo
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("serve", "--model-repository", str(repo), "--grpc-port", str(port),
                    "--http-port", str(free_port()), "--metrics-port", str(free_port()))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"Error: --grpc-port: port {port} is already in use; stop what "
                                f"listens there or choose another port")


def test_serve_refuses_a_missing_repository(tmp_path):
    r = run_cli("serve", "--model-repository", str(tmp_path / "nowhere"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: --model-repository: {tmp_path / 'nowhere'} is not a directory"


def test_a_model_that_fails_to_load_stops_the_start_with_tritons_reason(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo[0], repo)
    (repo / "tiny_generator/manifest.json").unlink()  # so the start reaches Triton itself
    (repo / "tiny_generator/1/model.onnx").write_bytes(b"not an onnx model")
    opts = ServerOptions(model_repository=repo, grpc_port=free_port(), http_port=free_port(),
                         metrics_port=free_port(), startup_timeout_s=120)
    with pytest.raises(ServerStartError) as err:
        LocalServer(opts).start()
    msg = str(err.value)
    assert "tritonserver exited with code" in msg and "tiny_generator" in msg


def test_a_model_file_changed_after_export_is_refused_at_start(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo[0], repo)
    with open(repo / "tiny_sampler/1/model.onnx", "ab") as f:
        f.write(b"\0")
    opts = ServerOptions(model_repository=repo, grpc_port=free_port(), http_port=free_port(),
                         metrics_port=free_port())
    with pytest.raises(RepositoryError, match="tiny_sampler/1/model.onnx: changed since export"):
        LocalServer(opts).start()


def test_cli_serve_prints_endpoints_and_stops_cleanly_on_ctrl_c(tiny_repo):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo, _ = tiny_repo
    g, h, m = free_port(), free_port(), free_port()
    exe = Path(sys.executable).parent / "ganforge"
    proc = subprocess.Popen([str(exe), "serve", "--model-repository", str(repo), "--grpc-port", str(g),
                             "--http-port", str(h), "--metrics-port", str(m), "--exit-timeout", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C to stop"):
                break
    finally:
        if not lines or not lines[-1].startswith("Ctrl-C"):
            proc.kill()
    assert lines == [f"serving 3 models from {repo}: tiny, tiny_generator, tiny_sampler",
                     f"  gRPC     localhost:{g}", f"  HTTP     localhost:{h}",
                     f"  metrics  http://localhost:{m}/metrics", "Ctrl-C to stop"]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "stopped (signal SIGINT); tritonserver exited with 0"


def test_killing_the_launcher_takes_tritonserver_down_with_it(tiny_repo):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo, _ = tiny_repo
    g = free_port()
    exe = Path(sys.executable).parent / "ganforge"
    proc = subprocess.Popen([str(exe), "serve", "--model-repository", str(repo), "--grpc-port", str(g),
                             "--http-port", str(free_port()), "--metrics-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not proc.stdout.readline().startswith("Ctrl-C to stop"):
            assert proc.poll() is None, proc.stderr.read()
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert children, "no tritonserver child found"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(Path(f"/proc/{c}").exists() and
                                                 "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]
                                                 for c in children):
            time.sleep(0.2)
        alive = [c for c in children if Path(f"/proc/{c}").exists()
                 and Path(f"/proc/{c}/stat").read_text().split()[2] != "Z"]
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
