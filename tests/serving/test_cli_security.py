"""`ganforge serve`'s security flags and the client verbs' matching flags, run as a user types
them: one `ganforge serve` subprocess per mode (TLS, mutual TLS, --restricted-key), many client
commands against it. With the right certificate or key a client gets answers; without it, with a
certificate from another CA, or under a name the server certificate does not list, the command
exits 1 with one `Error:` line naming the cause. And a tritonserver killed under a running
`ganforge serve` ends the command with one line and leaves no backend stub behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ganforge.serving.server import free_port
from tests.conftest import ROOT, run_cli
from tests.serving.test_security import _pem_pair

pytestmark = pytest.mark.slow

MODELS = ["dcgan_shapes", "denoiser_photos", "fill_thinplate"]
KEY = ("x-ganforge-key", "s3cret")


def ganforge_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "ganforge"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ganforge"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """Three of the shipped models: a seeded generator, the denoiser and the inpainter."""
    out = tmp_path_factory.mktemp("repo") / "model_repository"
    for name in MODELS:
        shutil.copytree(ROOT / "model_repository" / name, out / name)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key, ca, _ = _pem_pair(tmp, "ganforge-test-ca", ca=True)
    rogue_cert, rogue_key, rogue_ca, _ = _pem_pair(tmp, "rogue-ca", ca=True)
    return {"ca": ca, "server": _pem_pair(tmp, "server", issuer=(ca_cert, ca_key))[2:],
            "client": _pem_pair(tmp, "client", issuer=(ca_cert, ca_key))[2:],
            "rogue_ca": rogue_ca, "rogue_client": _pem_pair(tmp, "rogue-client",
                                                            issuer=(rogue_cert, rogue_key))[2:]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """An image, a mask with a hole, and a folder of two image/mask pairs for batch-inpaint."""
    tmp = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 112, 3), dtype=np.uint8)
    mask = np.zeros((96, 112), np.uint8)
    mask[30:50, 40:60] = 255
    Image.fromarray(image).save(tmp / "photo.png")
    Image.fromarray(mask).save(tmp / "mask.png")
    folder = tmp / "folder"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.roll(image, 7 * i, axis=1)).save(folder / f"p{i}.png")
        Image.fromarray(mask).save(folder / f"p{i}_mask.png")
    return {"image": tmp / "photo.png", "mask": tmp / "mask.png", "folder": folder}


class Serve:
    """`ganforge serve ARGS` in a subprocess, up to its "Ctrl-C to stop" banner."""

    def __init__(self, repo: Path, *args: str):
        self.grpc, self.http, self.metrics = free_port(), free_port(), free_port()
        self.proc = subprocess.Popen(
            [*ganforge_cmd(), "serve", "--model-repository", str(repo), "--grpc-port", str(self.grpc),
             "--http-port", str(self.http), "--metrics-port", str(self.metrics), "--exit-timeout", "5",
             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.banner: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.banner.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C to stop"):
                return
        self.proc.kill()
        out, err = self.proc.communicate()
        pytest.fail(f"ganforge serve {' '.join(args)} did not start (exit {self.proc.returncode}):\n"
                    + "\n".join(self.banner) + out + err)

    @property
    def url(self) -> str:
        return f"localhost:{self.grpc}"

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=90)
        return self.proc.returncode, out, err


def stop_cleanly(server: Serve) -> None:
    code, out, err = server.stop()
    assert code == 0, err
    assert out.strip().startswith("stopped (signal SIGINT); tritonserver exited with 0"), out + err


def ok(*args: str) -> str:
    r = run_cli(*args, timeout=180)
    assert r.returncode == 0, f"ganforge {' '.join(args)}: exit {r.returncode}\n{r.stderr}"
    return r.stdout


def refused(*args: str) -> str:
    """The one `Error:` line of a command that must fail at run time (exit 1)."""
    r = run_cli(*args, timeout=180)
    lines = r.stderr.splitlines()
    assert r.returncode == 1, f"ganforge {' '.join(args)}: exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "server unavailable" not in lines[0], lines[0]
    return lines[0]


def tls_flags(ca=None, cert_key=None) -> list[str]:
    flags = ["--tls-ca", str(ca)] if ca else []
    if cert_key:
        flags += ["--tls-cert", str(cert_key[0]), "--tls-key", str(cert_key[1])]
    return flags


def every_verb_answers(url: str, flags: list[str], inputs: dict, out: Path) -> None:
    """models, generate, denoise, inpaint and batch-inpaint, each through `url` with `flags`."""
    listed = ok("models", "--url", url, "--json", *flags)
    assert list(dict.fromkeys(re.findall(r'"name": "([^"]+)"', listed))) == MODELS   # a row per version
    ok("generate", "--model", "dcgan_shapes", "--seed", "3", "--count", "2", "--out", str(out / "gen"),
       "--url", url, *flags)
    assert len(list((out / "gen").glob("seed3_0*.png"))) == 2
    ok("denoise", str(inputs["image"]), "-o", str(out / "denoised.png"), "--url", url, *flags)
    assert Image.open(out / "denoised.png").size == (112, 96)
    ok("inpaint", str(inputs["image"]), "--mask", str(inputs["mask"]), "-o", str(out / "inpainted.png"),
       "--url", url, *flags)
    assert Image.open(out / "inpainted.png").size == (112, 96)
    # no --model: the job finds the one inpainting model through the repository index
    done = ok("batch-inpaint", str(inputs["folder"]), "-o", str(out / "batch"), "--url", url, "-q",
              "--wait-for-server", "5", *flags)
    assert done.startswith("batch-inpaint: 2 done, 0 skipped, 0 failed of 2"), done
    assert sorted(p.name for p in (out / "batch").glob("*.png")) == ["p0.png", "p1.png"]


def every_verb_is_refused(url: str, flags: list[str], inputs: dict, out: Path) -> list[str]:
    """The one error line of each client verb through `url` with `flags`."""
    return [refused("models", "--url", url, *flags),
            refused("generate", "--model", "dcgan_shapes", "--count", "1", "--out", str(out / "gen"),
                    "--url", url, *flags),
            refused("denoise", str(inputs["image"]), "-o", str(out / "d.png"), "--url", url, *flags),
            refused("inpaint", str(inputs["image"]), "--mask", str(inputs["mask"]),
                    "-o", str(out / "i.png"), "--url", url, *flags),
            refused("batch-inpaint", str(inputs["folder"]), "-o", str(out / "batch"), "--url", url,
                    "-q", "--wait-for-server", "5", *flags)]


# -- TLS: the server presents a certificate, clients verify it ------------------------------------

@pytest.fixture(scope="class")
def tls_server(repo, pki):
    crt, key = pki["server"]
    s = Serve(repo, "--tls-cert", str(crt), "--tls-key", str(key))
    yield s
    stop_cleanly(s)


class TestTLS:
    @pytest.fixture
    def server(self, tls_server):
        return tls_server

    def test_serve_starts_and_says_grpc_speaks_tls(self, server, repo):
        assert server.banner == [f"serving 3 models from {repo}: {', '.join(MODELS)}",
                                 f"  gRPC     {server.url} (TLS)", f"  HTTP     localhost:{server.http}",
                                 f"  metrics  http://localhost:{server.metrics}/metrics", "Ctrl-C to stop"]

    def test_clients_trusting_the_ca_get_answers_from_every_verb(self, server, pki, inputs, tmp_path):
        every_verb_answers(server.url, tls_flags(pki["ca"]), inputs, tmp_path)

    def test_a_plaintext_client_is_told_the_server_speaks_tls(self, server, inputs, tmp_path):
        for line in every_verb_is_refused(server.url, [], inputs, tmp_path):
            assert line == (f"Error: {server.url} speaks TLS and closed the plaintext connection: "
                            f"pass --tls-ca with the CA that signed the server's certificate")

    def test_a_client_trusting_another_ca_is_told_the_certificate_is_not_trusted(
            self, server, pki, inputs, tmp_path):
        for line in every_verb_is_refused(server.url, tls_flags(pki["rogue_ca"]), inputs, tmp_path):
            assert line.startswith(f"Error: TLS handshake with {server.url} failed: the server's "
                                   f"certificate is not trusted by --tls-ca {pki['rogue_ca']} ("), line
            assert "certificate" in line.split("(", 1)[1]  # OpenSSL's own reason, e.g. self signed

    def test_a_name_the_certificate_does_not_list_is_a_name_mismatch(self, server, pki, tmp_path):
        # the certificate lists localhost and 127.0.0.1; 127.0.0.2 reaches the same server
        with socket.create_connection(("127.0.0.2", server.grpc), timeout=5):
            pass
        url = f"127.0.0.2:{server.grpc}"
        assert refused("models", "--url", url, *tls_flags(pki["ca"])) == (
            f"Error: TLS handshake with {url} failed: the server's certificate does not name "
            f"'127.0.0.2' (hostname verification failed); connect with a --url host that the "
            f"certificate lists in its subjectAltName")

    def test_a_tls_client_of_a_plaintext_port_is_told_so(self, server, pki):
        url = f"localhost:{server.http}"  # Triton's HTTP endpoint: no TLS there
        line = refused("models", "--url", url, *tls_flags(pki["ca"]))
        assert line.startswith(f"Error: TLS handshake with {url} failed: the server does not speak "
                               f"TLS on that port"), line


# -- mutual TLS: clients present a certificate signed by the server's --tls-ca ---------------------

@pytest.fixture(scope="class")
def mtls_server(repo, pki):
    crt, key = pki["server"]
    s = Serve(repo, "--tls-cert", str(crt), "--tls-key", str(key), "--tls-ca", str(pki["ca"]))
    yield s
    stop_cleanly(s)


class TestMutualTLS:
    @pytest.fixture
    def server(self, mtls_server):
        return mtls_server

    def test_serve_starts_and_says_client_certificates_are_required(self, server):
        assert server.banner[1] == f"  gRPC     {server.url} (TLS, client certificates required)"

    def test_clients_with_a_certificate_get_answers_from_every_verb(self, server, pki, inputs, tmp_path):
        every_verb_answers(server.url, tls_flags(pki["ca"], pki["client"]), inputs, tmp_path)

    def test_a_client_without_a_certificate_is_told_one_is_required(self, server, pki, inputs, tmp_path):
        for line in every_verb_is_refused(server.url, tls_flags(pki["ca"]), inputs, tmp_path):
            assert line == (f"Error: TLS handshake with {server.url} failed: the server requires a "
                            f"client certificate (mutual TLS) and closed the connection; pass "
                            f"--tls-cert and --tls-key signed by the CA the server trusts")

    def test_a_client_certificate_from_another_ca_is_refused(self, server, pki, inputs, tmp_path):
        crt = pki["rogue_client"][0]
        for line in every_verb_is_refused(server.url, tls_flags(pki["ca"], pki["rogue_client"]),
                                          inputs, tmp_path):
            assert line == (f"Error: TLS handshake with {server.url} failed: the server refused the "
                            f"client certificate --tls-cert {crt} and closed the connection; it must "
                            f"be signed by the CA the server trusts (ganforge serve --tls-ca) and be "
                            f"valid now")

    def test_a_client_trusting_another_ca_is_told_the_certificate_is_not_trusted(self, server, pki):
        line = refused("models", "--url", server.url, *tls_flags(pki["rogue_ca"], pki["client"]))
        assert "the server's certificate is not trusted by --tls-ca" in line, line

    def test_a_plaintext_client_is_told_the_server_speaks_tls_and_wants_a_certificate(self, server):
        assert refused("models", "--url", server.url) == (
            f"Error: {server.url} speaks TLS and closed the plaintext connection: pass --tls-ca with "
            f"the CA that signed the server's certificate (and --tls-cert/--tls-key: it also asks "
            f"for a client certificate)")

    def test_a_client_certificate_without_its_key_is_a_usage_error(self, server, pki):
        r = run_cli("models", "--url", server.url, "--tls-ca", str(pki["ca"]),
                    "--tls-cert", str(pki["client"][0]))
        assert r.returncode == 2
        assert r.stderr.strip() == (f"Error: --tls-cert and --tls-key: both are needed for a client "
                                    f"certificate (got cert={pki['client'][0]}, key=None)")


# -- --restricted-key: the model-repository protocol needs a header ------------------------------

@pytest.fixture(scope="class")
def restricted_server(repo):
    s = Serve(repo, "--restricted-key", "=".join(KEY))
    yield s
    stop_cleanly(s)


class TestRestrictedKey:
    @pytest.fixture
    def server(self, restricted_server):
        return restricted_server

    def test_clients_with_the_key_get_answers_from_every_verb(self, server, inputs, tmp_path):
        every_verb_answers(server.url, ["--key", "=".join(KEY)], inputs, tmp_path)

    def test_the_repository_index_without_the_key_or_with_a_wrong_one_is_denied(
            self, server, inputs, tmp_path):
        for flags in ([], ["--key", f"{KEY[0]}=wrong"]):
            line = refused("models", "--url", server.url, *flags)
            assert line.startswith(f"Error: permission denied by {server.url}: "), line
            assert line.endswith("(a server started with --restricted-key needs that key: "
                                 "--key KEY=VALUE)"), line
            # batch-inpaint without --model looks the inpainter up in the repository index
            line = refused("batch-inpaint", str(inputs["folder"]), "-o", str(tmp_path / "b"),
                           "--url", server.url, "-q", *flags)
            assert line.startswith(f"Error: permission denied by {server.url}: "), line

    def test_inference_stays_open_without_the_key(self, server, inputs, tmp_path):
        ok("generate", "--model", "dcgan_shapes", "--count", "1", "--out", str(tmp_path), "--url", server.url)
        done = ok("batch-inpaint", str(inputs["folder"]), "-o", str(tmp_path / "b"), "--url", server.url,
                  "--model", "fill_thinplate", "-q")
        assert done.startswith("batch-inpaint: 2 done"), done


# -- tritonserver killed under a running `ganforge serve` ------------------------------------------

def process_groups() -> dict[int, list[tuple[int, str, str]]]:
    """{process group: [(pid, state, comm)]} of every process on this machine."""
    groups: dict[int, list] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        groups.setdefault(int(fields[2]), []).append((int(d.name), fields[0], comm))
    return groups


def test_a_killed_tritonserver_ends_serve_with_one_line_and_no_stub_left(repo):
    s = Serve(repo)
    try:
        children = Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        triton = int(children[0])
        # tritonserver leads its own process group, and its backend stubs are in it
        stubs = [p for p in process_groups().get(triton, []) if p[0] != triton]
        assert stubs and all(comm.startswith("triton_python") for _, _, comm in stubs), stubs
        # A stub that cannot notice its server is gone (seen: one blocked on a futex, deaf to
        # SIGTERM) stands in as a stopped one; the others would exit on their own in a second.
        os.kill(stubs[0][0], signal.SIGSTOP)
        os.kill(triton, signal.SIGKILL)
        code, out, err = s.proc.wait(60), s.proc.stdout.read(), s.proc.stderr.read()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
        left = [p for p in process_groups().get(triton, []) if p[1] != "Z"] if "triton" in locals() else []
        for pid, _, _ in left:  # never leave them to the next test
            os.kill(pid, signal.SIGKILL)
    assert code == 1, out + err
    assert err.splitlines() == ["Error: tritonserver exited unexpectedly (killed by SIGKILL); "
                                "ganforge serve stopped"], err
    # the stubs are gone as soon as the command is: it kills the server's process group
    assert left == [], f"left alive after ganforge serve exited: {left}"
