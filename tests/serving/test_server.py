"""Against the real tritonserver (session fixture): parity, determinism, bad input, faults."""

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ganforge.errors import InvalidArgument, ModelNotFound, ServerUnavailable, UsageError
from ganforge.serving.client import Client
from ganforge.serving.sampler import sample_latents
from ganforge.serving.server import free_port
from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.slow
Z = TINY["z_dim"]


def raw_infer(url, model, inputs):
    """A request built with nothing but tritonclient, as docs/api.md describes."""
    c = grpcclient.InferenceServerClient(url)
    reqs = []
    for name, arr, dtype in inputs:
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        reqs.append(t)
    try:
        return c.infer(model, reqs)
    finally:
        c.close()


def assert_still_serving(client):
    assert client.generate("tiny", seed=1, count=2).shape == (2, 64, 64, 3)


def test_triton_answers_exactly_what_onnxruntime_computes(client, tiny_repo):
    repository, _ = tiny_repo
    z = np.random.default_rng(11).standard_normal((6, Z)).astype(np.float32)
    served = client.generate_from_latent("tiny_generator", z)
    local = ort.InferenceSession(str(repository / "tiny_generator/1/model.onnx")).run(None, {"latent": z})[0]
    assert served.dtype == np.uint8 and served.shape == (6, 64, 64, 3)
    assert np.abs(served.astype(int) - local.astype(int)).max() <= 1


def test_seeded_generation_is_byte_identical_and_seeds_differ(client, tiny_repo):
    a = client.generate("tiny", seed=42, count=4)
    b = client.generate("tiny", seed=42, count=4)
    c = client.generate("tiny", seed=43, count=4)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)
    # the served latents are the numpy sampler's: seed 42 == generator(sample_latents(42))
    direct = client.generate_from_latent("tiny_generator", sample_latents(42, 4, Z))
    assert np.array_equal(a, direct)
    # image i depends on (seed, i) only: a longer request starts with the shorter one
    assert np.array_equal(client.generate("tiny", seed=42, count=8)[:4], a)


def rows(seed, n, dtype="INT64"):
    return [("seed", np.full((n, 1), seed, np.int64), dtype), ("index", np.arange(n, dtype=np.int64).reshape(n, 1), dtype)]


def test_raw_tritonclient_request_by_seed(server, client):
    res = raw_infer(server.grpc_url, "tiny", rows(42, 3))
    assert res.as_numpy("image").shape == (3, 64, 64, 3)
    assert np.array_equal(res.as_numpy("image"), client.generate("tiny", seed=42, count=3))


@pytest.mark.parametrize("inputs, message", [
    (rows(1, 9), "batch-size must be <= 8"),
    (rows(1, 0), "input byte size mismatch for input"),
    (rows(1, 2)[:1] + [("index", np.zeros((3, 1), np.int64), "INT64")],
     "input 'seed' batch size does not match other inputs for 'tiny'"),
    ([("seed", np.array([1], np.int64), "INT64"), ("count", np.array([2], np.int32), "INT32")],
     "unexpected inference input 'count'"),
])
def test_bad_seed_rows_get_invalid_arg_and_the_server_keeps_serving(server, client, inputs, message):
    with pytest.raises(InferenceServerException) as err:
        raw_infer(server.grpc_url, "tiny", inputs)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in err.value.message()
    assert_still_serving(client)


@pytest.mark.parametrize("latent, dtype, message", [
    (np.zeros((2, Z + 1), np.float32), "FP32", "unexpected shape for input 'latent'"),
    (np.zeros((2, Z), np.float64), "FP64", "data-type is 'FP64', but model 'tiny_generator' expects 'FP32'"),
    (np.zeros((9, Z), np.float32), "FP32", "batch-size must be <= 8"),
])
def test_bad_latents_are_refused_by_triton_and_the_server_keeps_serving(server, client, latent, dtype, message):
    with pytest.raises(InferenceServerException) as err:
        raw_infer(server.grpc_url, "tiny_generator", [("latent", latent, dtype)])
    assert message in err.value.message()
    assert_still_serving(client)


def test_client_checks_seed_count_and_latent_before_sending(client):
    with pytest.raises(UsageError, match=r"count: 0 is not allowed; must be in \[1, 8\]"):
        client.generate("tiny", seed=0, count=0)
    with pytest.raises(UsageError, match="seed: -5 is not allowed"):
        client.generate("tiny", seed=-5, count=1)
    with pytest.raises(UsageError, match="seed: 1.5 is not allowed; must be an integer"):
        client.generate("tiny", seed=1.5, count=1)
    with pytest.raises(UsageError, match=rf"latent: shape \[2, 3\] is not allowed; expected \[batch, {Z}\]"):
        client.generate_from_latent("tiny_generator", np.zeros((2, 3), np.float32))
    with pytest.raises(UsageError, match="latent: dtype float64 is not allowed; send float32"):
        client.generate_from_latent("tiny_generator", np.zeros((2, Z)))


def test_server_side_invalid_argument_maps_to_invalid_argument(server):
    with Client(server.grpc_url) as c:
        with pytest.raises(InvalidArgument, match="batch-size must be <= 8"):
            c.infer("tiny", {"seed": np.ones((9, 1), np.int64), "index": np.ones((9, 1), np.int64)}, ["image"])


def test_unknown_model_is_model_not_found(client):
    with pytest.raises(ModelNotFound, match="'no_such_model' is not served"):
        client.generate("no_such_model", seed=1, count=1)
    assert_still_serving(client)


def test_a_server_that_is_down_is_reported_unavailable_not_as_a_timeout():
    with Client(f"localhost:{free_port()}", timeout=5) as c:
        with pytest.raises(ServerUnavailable, match="server unavailable"):
            c.generate("tiny", seed=1, count=1)


def test_concurrent_requests_are_batched_and_each_gets_its_own_images(server):
    from concurrent.futures import ThreadPoolExecutor

    def one(seed):
        with Client(server.grpc_url) as c:
            return seed, c.generate("tiny", seed=seed, count=1)

    with ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(one, range(16)))
    with Client(server.grpc_url) as c:
        for seed in (0, 7, 15):
            assert np.array_equal(results[seed], c.generate("tiny", seed=seed, count=1))


# -- the CLI against the server --------------------------------------------------------------

def test_cli_generate_writes_pngs_and_a_grid(server, tmp_path):
    out = tmp_path / "gen"
    r = run_cli("generate", "--url", server.grpc_url, "--model", "tiny", "--seed", "42",
                "--count", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote 3 images and a grid to {out} (seed42_grid.png)"
    assert sorted(p.name for p in out.iterdir()) == ["seed42_000.png", "seed42_001.png",
                                                     "seed42_002.png", "seed42_grid.png"]


@pytest.mark.parametrize("args, code, line", [
    (["--count", "0"], 2, "Error: argument --count: 0 is below the minimum 1"),
    (["--count", "9"], 2, "Error: count: 9 is not allowed; must be in [1, 8]"),
    (["--seed", "-1"], 2, "Error: argument --seed: -1 is below the minimum 0"),
    (["--seed", "abc"], 2, "Error: argument --seed: 'abc' is not an integer"),
])
def test_cli_generate_usage_errors(server, tmp_path, args, code, line):
    r = run_cli("generate", "--url", server.grpc_url, "--model", "tiny", "--out", str(tmp_path), *args)
    assert r.returncode == code
    assert r.stderr.strip() == line


def test_cli_generate_unknown_model_and_server_down(server, tmp_path):
    r = run_cli("generate", "--url", server.grpc_url, "--model", "nope", "--out", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: model 'nope' is not served at {server.grpc_url}")
    port = free_port()
    r = run_cli("generate", "--url", f"localhost:{port}", "--model", "tiny", "--out", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: server unavailable at localhost:{port}")


def test_cli_generate_out_not_writable(server, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("generate", "--url", server.grpc_url, "--model", "tiny", "--out", str(blocker / "sub"))
    assert r.returncode == 2
    assert r.stderr.startswith(f"Error: --out: cannot create {blocker / 'sub'}")


def test_cli_models_lists_every_model_ready(server):
    r = run_cli("models", "--url", server.grpc_url)
    assert r.returncode == 0
    rows = r.stdout.strip().splitlines()
    assert rows[0].split() == ["MODEL", "VERSION", "STATE"]
    assert sorted(row.split()[0] for row in rows[1:]) == ["tiny", "tiny_generator", "tiny_sampler"]
    assert all(row.split()[2] == "READY" for row in rows[1:])


def test_client_verbs_run_without_torch(server, tmp_path):
    """The inference path never imports torch: generate and models work with torch unimportable."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from ganforge.cli import main\n"
            f"rc = main(['generate', '--url', '{server.grpc_url}', '--model', 'tiny', '--seed', '1',"
            f" '--count', '2', '--out', r'{tmp_path}'])\n"
            f"rc |= main(['models', '--url', '{server.grpc_url}'])\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "seed1_grid.png").is_file()
