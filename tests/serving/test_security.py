"""`ganforge serve` security: model control none, restricted model-repository protocol, TLS
and mutual TLS on gRPC, with certificates made here."""

import datetime as dt
import ipaddress

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ganforge.errors import PermissionDenied, ServerUnavailable
from ganforge.serving.client import Client
from ganforge.serving.server import LocalServer, ServerOptions, free_port

pytestmark = pytest.mark.slow


def _pem_pair(tmp, name, issuer=None, ca=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key, cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key, ca_path, _ = _pem_pair(tmp, "ganforge-test-ca", ca=True)
    _, _, server_crt, server_key = _pem_pair(tmp, "server", issuer=(ca_cert, ca_key))
    _, _, client_crt, client_key = _pem_pair(tmp, "client", issuer=(ca_cert, ca_key))
    _, _, rogue_ca, _ = _pem_pair(tmp, "rogue-ca", ca=True)
    return {"ca": ca_path, "server": (server_crt, server_key), "client": (client_crt, client_key),
            "rogue_ca": rogue_ca}


def _opts(repo, **kw):
    return ServerOptions(model_repository=repo, grpc_port=free_port(), http_port=free_port(),
                         metrics_port=free_port(), exit_timeout_s=5, **kw)


@pytest.fixture(scope="module")
def mtls_server(tiny_repo, pki):
    crt, key = pki["server"]
    srv = LocalServer(_opts(tiny_repo[0], tls_cert=crt, tls_key=key, tls_ca=pki["ca"],
                            restricted_key=("x-ganforge-key", "s3cret"))).start()
    yield srv
    srv.stop()


def test_mutual_tls_client_with_a_certificate_gets_images(mtls_server, pki):
    crt, key = pki["client"]
    with Client(mtls_server.grpc_url, ssl=True, root_certificates=str(pki["ca"]),
                private_key=str(key), certificate_chain=str(crt)) as c:
        assert c.generate("tiny", seed=3, count=2).shape == (2, 64, 64, 3)


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server, pki):
    with Client(mtls_server.grpc_url, ssl=True, root_certificates=str(pki["ca"]), timeout=10) as c:
        with pytest.raises(ServerUnavailable):
            c.generate("tiny", seed=3, count=1)


def test_plaintext_client_cannot_talk_to_a_tls_server(mtls_server):
    with Client(mtls_server.grpc_url, timeout=10) as c:
        with pytest.raises(ServerUnavailable):
            c.generate("tiny", seed=3, count=1)


def test_a_server_certificate_from_an_unknown_ca_is_refused(mtls_server, pki):
    crt, key = pki["client"]
    with Client(mtls_server.grpc_url, ssl=True, root_certificates=str(pki["rogue_ca"]),
                private_key=str(key), certificate_chain=str(crt), timeout=10) as c:
        with pytest.raises(ServerUnavailable):
            c.generate("tiny", seed=3, count=1)


@pytest.fixture(scope="module")
def restricted_server(tiny_repo):
    srv = LocalServer(_opts(tiny_repo[0], restricted_key=("x-ganforge-key", "s3cret"))).start()
    yield srv
    srv.stop()


def test_the_model_repository_protocol_needs_the_key(restricted_server):
    with Client(restricted_server.grpc_url) as c:
        with pytest.raises(PermissionDenied):
            c.models()
        # inference stays open: only repository and shared-memory protocols are restricted
        assert c.generate_from_latent("tiny_generator", np.zeros((1, 16), np.float32)).shape[0] == 1
    with Client(restricted_server.grpc_url, key=("x-ganforge-key", "s3cret")) as c:
        assert {m["name"] for m in c.models()} == {"tiny", "tiny_generator", "tiny_sampler"}
    with Client(restricted_server.grpc_url, key=("x-ganforge-key", "wrong")) as c:
        with pytest.raises(PermissionDenied):
            c.models()


def test_clients_cannot_load_or_unload_models_even_with_the_key(restricted_server):
    raw = grpcclient.InferenceServerClient(restricted_server.grpc_url)
    try:
        for call in (raw.unload_model, raw.load_model):
            with pytest.raises(InferenceServerException) as err:
                call("tiny_generator", headers={"triton-grpc-protocol-x-ganforge-key": "s3cret"})
            assert "explicit model load / unload is not allowed" in err.value.message()
        assert raw.is_model_ready("tiny_generator")
    finally:
        raw.close()


def test_tls_needs_both_certificate_and_key(tiny_repo, pki):
    from ganforge.errors import UsageError

    with pytest.raises(UsageError, match="--tls-cert and --tls-key: both are needed"):
        LocalServer(_opts(tiny_repo[0], tls_cert=pki["server"][0])).start()
