"""deploy/components/tls and tls-mutual (gRPC over TLS for the rollout) and the batch-inpaint
Job's tls component: rendered with `kubectl kustomize` on top of every overlay, validated
strictly against the Kubernetes schemas, passed through deploy/checks.py; the TLS check fails on
manifests broken on purpose."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy._render import (DEPLOY, KUBECTL_MISSING, checks, find, kustomize, render,
                                  triton_pod, validate)

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason=KUBECTL_MISSING)

TLS = ["components/tls"]
MTLS = ["components/tls", "components/tls-mutual"]
# (base kustomization, components) -> rendered on top, as a user's kustomization would
CASES = {f"{o}+{'+'.join(Path(c).name for c in comps)}": (f"overlays/{o}", comps)
         for o in ("gpu", "cpu", "gpu-cpu-hpa") for comps in (TLS, MTLS)}
CASES["jobs/batch-inpaint+tls"] = ("jobs/batch-inpaint", ["jobs/batch-inpaint/tls"])
CERT_DIR = "/etc/ganforge/tls"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, str]:
    return {name: render(tmp_path_factory.mktemp("kz"), base, comps)
            for name, (base, comps) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_tls_renders_validates_strictly_and_passes_the_checks(rendered, case, tmp_path):
    out = validate(rendered[case], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert checks.run_checks(rendered[case]) == []


@pytest.mark.parametrize("path", ["overlays/gpu", "overlays/cpu", "overlays/gpu-cpu-hpa"])
def test_tls_sets_tritons_grpc_flags_on_a_read_only_secret_mount(rendered, path):
    overlay = path.split("/")[1]
    for comps, mutual in ((TLS, False), (MTLS, True)):
        docs = checks.load(rendered[f"{overlay}+{'+'.join(Path(c).name for c in comps)}"])
        pod, c = triton_pod(docs)
        flags = [a for a in c["args"] if a.startswith("--grpc-")]
        want = ["--grpc-port=8001", "--grpc-use-ssl=true", f"--grpc-server-cert={CERT_DIR}/tls.crt",
                f"--grpc-server-key={CERT_DIR}/tls.key"]
        if mutual:
            want += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={CERT_DIR}/ca.crt"]
        assert flags == want
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == CERT_DIR)
        assert mount["readOnly"] is True
        vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert vol["secret"]["secretName"] == "ganforge-triton-tls"
        assert vol["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 1000
        # probes stay on the plaintext HTTP port: they work whatever gRPC speaks
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["port"] == "http"
        # and clients reach only gRPC over TLS: Triton's HTTP endpoint (no TLS) is closed to them
        policy = find(docs, "NetworkPolicy", "ganforge-triton")
        clients = next(r for r in policy["spec"]["ingress"]
                       if r["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                       == "ganforge-clients")
        assert clients["ports"] == [{"protocol": "TCP", "port": 8001}]


def test_the_tls_flags_are_tritonservers_own(tmp_path):
    """Every flag the components add is one `tritonserver --help` of the wheel's binary lists."""
    pytest.importorskip("pytriton")
    from ganforge.serving.server import server_env, tritonserver_binary

    help_text = subprocess.run([str(tritonserver_binary()), "--help"], capture_output=True, text=True,
                               env=server_env(), timeout=60)
    text = help_text.stdout + help_text.stderr
    for comp in ("tls", "tls-mutual"):
        patch = yaml.safe_load((DEPLOY / "components" / comp / "kustomization.yaml").read_text())
        ops = yaml.safe_load(patch["patches"][0]["patch"])
        for op in ops:
            if op["path"].endswith("/args/-"):
                flag = op["value"].split("=", 1)[0]
                assert f"  {flag} " in text, flag


def test_the_certificate_examples_make_the_secrets_the_manifests_mount(rendered):
    server = yaml.safe_load((DEPLOY / "components" / "tls" / "certificate.yaml").read_text())
    client = yaml.safe_load((DEPLOY / "jobs" / "batch-inpaint" / "tls" / "client-certificate.yaml").read_text())
    for cert in (server, client):
        assert cert["apiVersion"] == "cert-manager.io/v1" and cert["kind"] == "Certificate"
    docs = checks.load(rendered["cpu+tls"])
    pod, _ = triton_pod(docs)
    assert server["metadata"]["namespace"] == "ganforge"
    assert server["spec"]["secretName"] in {v.get("secret", {}).get("secretName") for v in pod["volumes"]}
    assert "server auth" in server["spec"]["usages"]
    # the name the Job's --url uses is one the certificate lists (no name mismatch)
    job = find(checks.load(rendered["jobs/batch-inpaint+tls"]), "Job")
    jpod = job["spec"]["template"]["spec"]
    host = " ".join(jpod["containers"][0]["args"]).split("--url ", 1)[1].split()[0].rsplit(":", 1)[0]
    assert host in server["spec"]["dnsNames"]
    assert job["metadata"]["namespace"] == client["metadata"]["namespace"] == "ganforge-clients"
    assert "client auth" in client["spec"]["usages"]
    assert client["spec"]["issuerRef"] == server["spec"]["issuerRef"]
    assert client["spec"]["secretName"] in {v.get("secret", {}).get("secretName") for v in jpod["volumes"]}


def test_the_batch_inpaint_job_passes_its_client_certificate(rendered):
    job = find(checks.load(rendered["jobs/batch-inpaint+tls"]), "Job")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"][0].rstrip().endswith("$TLS_ARGS")
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["TLS_ARGS"].split() == ["--tls-ca", f"{CERT_DIR}/ca.crt", "--tls-cert", f"{CERT_DIR}/tls.crt",
                                       "--tls-key", f"{CERT_DIR}/tls.key"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == CERT_DIR)
    assert mount["readOnly"] is True
    # the flags are the CLI's own: argparse accepts them (a file check would need the Secret)
    from ganforge.cli import build_parser

    args = build_parser().parse_args(["batch-inpaint", "/data/in", "-o", "/data/out", *env["TLS_ARGS"].split()])
    assert (args.tls_ca, args.tls_cert, args.tls_key) == (f"{CERT_DIR}/ca.crt", f"{CERT_DIR}/tls.crt",
                                                         f"{CERT_DIR}/tls.key")


def test_without_the_component_the_job_passes_no_tls_flags():
    c = find(checks.load(kustomize("jobs/batch-inpaint")), "Job")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in c["env"]}["TLS_ARGS"] == ""


# -- the TLS check fails on manifests broken on purpose -------------------------------------------

@pytest.fixture
def mtls_docs(rendered) -> list[dict]:
    return [d for d in checks.load(rendered["cpu+tls+tls-mutual"]) if d["kind"] == "Deployment"]


def tls_problems(docs) -> list[str]:
    return checks.check_grpc_tls(docs)


def test_tls_check_passes_the_rendered_component(mtls_docs):
    assert tls_problems(mtls_docs) == []


def test_tls_check_fails_on_a_missing_root_cert_under_mutual_tls(mtls_docs):
    _, c = triton_pod(mtls_docs)
    c["args"] = [a for a in c["args"] if not a.startswith("--grpc-root-cert")]
    assert tls_problems(mtls_docs) == ["Deployment/ganforge-triton container triton: gRPC TLS is on "
                                       "but --grpc-root-cert is not set"]


def test_tls_check_fails_on_a_writable_or_non_secret_mount(mtls_docs):
    broken = copy.deepcopy(mtls_docs)
    pod, c = triton_pod(broken)
    next(m for m in c["volumeMounts"] if m["mountPath"] == CERT_DIR)["readOnly"] = False
    assert len(tls_problems(broken)) == 3  # cert, key and root cert
    pod, c = triton_pod(mtls_docs)
    vol = next(v for v in pod["volumes"] if v["name"] == "grpc-tls")
    vol.pop("secret")
    vol["emptyDir"] = {}
    assert all("is not on a read-only Secret volume (volume 'grpc-tls')" in p
               for p in tls_problems(mtls_docs))


def test_tls_check_fails_on_a_cert_on_no_volume(mtls_docs):
    _, c = triton_pod(mtls_docs)
    c["args"] = [a.replace(CERT_DIR, "/secrets") if a.startswith("--grpc-server-key") else a
                 for a in c["args"]]
    assert tls_problems(mtls_docs) == ["Deployment/ganforge-triton container triton: "
                                       "--grpc-server-key /secrets/tls.key is on no mounted volume"]


def test_tls_check_fails_on_a_plain_grpc_probe_of_the_tls_port(mtls_docs):
    _, c = triton_pod(mtls_docs)
    c["startupProbe"] = {"grpc": {"port": 8001}, "periodSeconds": 10, "failureThreshold": 60}
    assert tls_problems(mtls_docs) == ["Deployment/ganforge-triton container triton: startupProbe is a "
                                       "gRPC probe of the TLS port 8001; the kubelet's gRPC probe has "
                                       "no TLS: probe /v2/health/* over HTTP"]
