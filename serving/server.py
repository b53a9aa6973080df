"""The local Triton launcher: the real `tritonserver` binary from the nvidia-pytriton wheel,
serving a ganforge model repository over gRPC / HTTP, with ganforge's Python-based
`onnxruntime` backend.

What the binary needs here (measured, see docs/serving.md):
- a backend directory holding `python/` (libtriton_python.so, triton_python_backend_utils.py
  and the stub built for this Python's major.minor) and `onnxruntime/model.py`;
- LD_LIBRARY_PATH starting with this interpreter's LIBDIR (the stub loads libpython) and the
  wheel's `nvidia_pytriton.libs/`;
- PYTHONPATH listing this environment's site-packages: every model.py puts it first on
  sys.path, because the stub's interpreter ignores PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ganforge.errors import ServerStartError, UsageError
from ganforge.serving import repository as repo

BACKEND_SOURCE = Path(__file__).parent / "backends" / "onnxruntime" / "model.py"


def _pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError("the local server needs the nvidia-pytriton wheel: "
                               "pip install 'ganforge[serve]'")
    return Path(list(spec.submodule_search_locations)[0])


def tritonserver_binary() -> Path:
    path = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not path.is_file():
        raise ServerStartError(f"tritonserver binary not found at {path}; nvidia-pytriton ships it "
                               f"for Linux x86-64 only")
    return path


def build_backend_dir(dest: Path) -> Path:
    """Assemble the backend directory Triton is pointed at with --backend-directory."""
    tree = _pytriton_dir() / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tree / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerStartError(f"nvidia-pytriton has no Python backend stub for Python {py} "
                               f"(looked in {stub.parent})")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(tree / "backends" / "python" / f, python_dir / f)
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    (dest / "onnxruntime").mkdir(exist_ok=True)
    shutil.copy2(BACKEND_SOURCE, dest / "onnxruntime" / "model.py")
    return dest


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or "",
            str(_pytriton_dir().parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs + [env.get("LD_LIBRARY_PATH", "")] if p)
    # The stub embeds Python without a program name, so Python finds "python3" on PATH and
    # takes sys.prefix from it: with this environment's bin/ first, a venv's site-packages
    # (pyvenv.cfg) come before the base interpreter's, before any module is imported.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    paths = sysconfig.get_paths()
    site = [paths["purelib"], paths["platlib"]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [*site, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]))
    return env


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM tritonserver when its launcher dies, so a
    killed `ganforge serve` never leaves a server holding the ports."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


class _HttpHealth:
    """Readiness through Triton's HTTP health endpoints (used when gRPC speaks TLS)."""

    def __init__(self, url: str):
        self.base = f"http://{url}"

    def _ok(self, path: str) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.base + path, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def is_server_ready(self) -> bool:
        return self._ok("/v2/health/ready")

    def is_model_ready(self, name: str) -> bool:
        return self._ok(f"/v2/models/{name}/ready")

    def close(self) -> None:
        pass


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerOptions:
    model_repository: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    exit_timeout_s: int = 30          # drain in-flight requests this long on SIGTERM
    startup_timeout_s: float = 180.0  # model loading + warmup
    log_verbose: int = 0
    # Security: a header `key: value` that clients must send to use the model-repository and
    # shared-memory protocols (gRPC) / APIs (HTTP); None leaves them open on a local machine.
    restricted_key: tuple[str, str] | None = None
    # TLS on gRPC: PEM files. With tls_ca too, clients must present a certificate signed by it.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    extra_args: list[str] = field(default_factory=list)

    def security_args(self) -> list[str]:
        args = []
        if self.restricted_key is not None:
            key, value = self.restricted_key
            args += [f"--grpc-restricted-protocol=model-repository,shared-memory:{key}={value}",
                     f"--http-restricted-api=model-repository,shared-memory:{key}={value}"]
        if self.tls_cert or self.tls_key or self.tls_ca:
            if not (self.tls_cert and self.tls_key):
                raise UsageError("--tls-cert and --tls-key: both are needed to serve TLS "
                                 f"(got cert={self.tls_cert}, key={self.tls_key})")
            for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                               ("--tls-ca", self.tls_ca)):
                if path is not None and not Path(path).is_file():
                    raise UsageError(f"{flag}: {path} is not a file")
            args += ["--grpc-use-ssl=true", f"--grpc-server-cert={Path(self.tls_cert).resolve()}",
                     f"--grpc-server-key={Path(self.tls_key).resolve()}"]
            if self.tls_ca:
                args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={Path(self.tls_ca).resolve()}"]
        return args


class LocalServer:
    """A tritonserver child process. Use as a context manager or call start() / stop().

    start() returns once every model is ready, or raises ServerStartError with Triton's own
    reason (its last error lines).
    """

    def __init__(self, options: ServerOptions, stream=None):
        self.options = options
        self.stream = stream  # where Triton's log is echoed (None: kept in memory only)
        self.proc: subprocess.Popen | None = None
        self.log_tail: deque[str] = deque(maxlen=400)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._reader: threading.Thread | None = None
        self.models: list[str] = []  # the repository's models, every one ready once start() returns
        self._lines = 0        # log lines read so far
        self._ready_line = 0   # ... when start() returned

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"localhost:{self.options.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.options.metrics_port}/metrics"

    def command(self, backend_dir: Path) -> list[str]:
        o = self.options
        return [str(tritonserver_binary()),
                f"--model-repository={Path(o.model_repository).resolve()}",
                f"--backend-directory={backend_dir}",
                f"--grpc-port={o.grpc_port}", f"--http-port={o.http_port}",
                f"--metrics-port={o.metrics_port}",
                "--model-control-mode=none",     # clients cannot load, unload or replace models
                "--strict-readiness=true",
                "--exit-on-error=true",
                f"--exit-timeout-secs={o.exit_timeout_s}",
                f"--log-verbose={o.log_verbose}",
                *o.security_args(),
                *o.extra_args]

    def preflight(self) -> dict:
        """Checks that fail fast with a clear message, before starting the binary."""
        o = self.options
        configs = repo.check_repository(o.model_repository)
        for flag, port in (("--grpc-port", o.grpc_port), ("--http-port", o.http_port),
                           ("--metrics-port", o.metrics_port)):
            if not 1 <= port <= 65535:
                raise UsageError(f"{flag}: {port} is not a port number (1-65535)")
            if not port_free(port):
                raise ServerStartError(f"{flag}: port {port} is already in use; stop what listens "
                                       f"there or choose another port")
        return configs

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.log_tail.append(line)
            self._lines += 1
            if self.stream is not None:
                print(line, file=self.stream, flush=True)

    def errors(self, since_ready: bool = False) -> list[str]:
        """Triton's error lines (log lines starting with 'E'), the reasons a start failed; with
        since_ready, only those logged after start() returned (not the start-up notes of a
        machine without a GPU)."""
        tail = list(self.log_tail)
        first = self._lines - len(tail)  # the number of the oldest line kept
        return [ln for i, ln in enumerate(tail)
                if (ln.startswith("E") or "error:" in ln.lower())
                and (not since_ready or first + i >= self._ready_line)]

    def start(self) -> "LocalServer":
        configs = self.preflight()
        self._tmp = tempfile.TemporaryDirectory(prefix="ganforge-backends-")
        backend_dir = build_backend_dir(Path(self._tmp.name))
        self.proc = subprocess.Popen(self.command(backend_dir), env=server_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self._wait_ready(set(configs))
        self.models = sorted(configs)
        self._ready_line = self._lines
        return self

    def _wait_ready(self, models: set[str]) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + self.options.startup_timeout_s
        o = self.options
        if o.tls_cert:
            # Readiness over plain HTTP: gRPC with mutual TLS would need a client certificate.
            client = _HttpHealth(self.http_url)
        else:
            client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self._reader.join(timeout=5)
                    reasons = self.errors() or list(self.log_tail)[-5:]
                    raise ServerStartError(
                        f"tritonserver exited with code {self.proc.returncode} while starting:\n  "
                        + "\n  ".join(reasons[-8:]))
                try:
                    # Triton opens gRPC before HTTP and metrics: ready means all three listen, so a
                    # client (or a Kubernetes probe) may use any of them as soon as start() returns
                    if (client.is_server_ready() and all(client.is_model_ready(m) for m in models)
                            and all(_listening(port) for port in (o.http_port, o.metrics_port))):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        self.stop()
        raise ServerStartError(f"tritonserver was not ready after {self.options.startup_timeout_s:.0f} s; "
                               f"last log lines:\n  " + "\n  ".join(list(self.log_tail)[-8:]))

    def pending_requests(self) -> int | None:
        """Requests accepted but not answered yet, over all models (Triton's
        nv_inference_pending_request_count); None when the metrics endpoint does not answer."""
        import urllib.request

        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("nv_inference_pending_request_count{")))

    def drain(self, timeout: float) -> bool:
        """Wait until no request is pending (three quiet polls in a row) or `timeout` passes.

        Triton's own SIGTERM handling stops every model's scheduler at once, which also refuses
        the later steps of ensemble requests already in flight ("scheduler for model has stopped
        accepting new inference requests"): draining first lets those finish.
        """
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline and self.proc is not None and self.proc.poll() is None:
            pending = self.pending_requests()
            quiet = quiet + 1 if pending == 0 else 0
            if quiet >= 3 or pending is None:
                return pending == 0
            time.sleep(0.05)
        return False

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float | None = None, drain: bool = True) -> int | None:
        """Drain pending requests, then SIGTERM (Triton finishes what is executing, up to
        exit_timeout_s), then SIGKILL if it is still there."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if drain:
                self.drain(self.options.exit_timeout_s)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout if timeout is not None else self.options.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Backend stubs live in the server's process group (start_new_session): when the server
        # died without shutting them down (SIGKILL, a crash), they would outlive it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return self.proc.returncode

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
