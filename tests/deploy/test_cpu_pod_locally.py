"""The CPU overlay's Triton container, run here with the embedded tritonserver on the committed
model_repository/: same flags, and the manifest's probe paths answer 200 on its HTTP port."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import pytest

from tests.deploy._render import KUBECTL_MISSING, ROOT, checks, kustomize, triton_pod

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("kubectl") is None, reason=KUBECTL_MISSING)]


def cpu_triton_container() -> dict:
    return triton_pod(checks.load(kustomize("overlays/cpu")))[1]


def flags(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if a.startswith("--"))


def test_cpu_overlay_pod_spec_starts_and_answers_its_probes_with_the_embedded_server():
    from ganforge.serving.server import LocalServer, ServerOptions, free_port, port_free

    c = cpu_triton_container()
    f = flags(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(f["--http-port"]) == ports["http"] and int(f["--grpc-port"]) == ports["grpc"]
    assert int(f["--metrics-port"]) == ports["metrics"]
    # the manifest's ports where they are free on this shared machine, else free ones
    pick = {k: int(v) if port_free(int(v)) else free_port() for k, v in
            (("grpc", f["--grpc-port"]), ("http", f["--http-port"]), ("metrics", f["--metrics-port"]))}
    opts = ServerOptions(model_repository=ROOT / "model_repository", grpc_port=pick["grpc"],
                         http_port=pick["http"], metrics_port=pick["metrics"],
                         exit_timeout_s=int(f["--exit-timeout-secs"]),
                         log_verbose=int(f["--log-verbose"]), startup_timeout_s=240)
    srv = LocalServer(opts)
    local = flags(srv.command(Path("/backends")))
    # every flag of the pod's command line is passed the same way here, but the repository path
    for flag, value in f.items():
        if flag in ("--model-repository", "--grpc-port", "--http-port", "--metrics-port"):
            continue
        assert local.get(flag) == value, flag
    with srv:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c[probe]["httpGet"]
            port = pick[get["port"]] if isinstance(get["port"], str) else get["port"]
            with urllib.request.urlopen(f"http://localhost:{port}{get['path']}", timeout=10) as r:
                assert r.status == 200, probe
        # and it serves: the shipped ensemble answers over gRPC
        from ganforge.serving.client import Client

        with Client(srv.grpc_url, timeout=60) as client:
            names = {m["name"] for m in client.models()}
            assert names, "no models served"
