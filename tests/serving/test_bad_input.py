"""Malformed requests sent with nothing but tritonclient: each is refused with the right gRPC
code and a message naming the problem, and the server answers a good request right after."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

pytestmark = pytest.mark.slow
Z = 16  # tests/conftest.py TINY z_dim; max_batch_size 8


def inp(name, array=None, dtype=None, shape=None, raw=None):
    dtype = dtype or np_to_triton_dtype(array.dtype)
    t = grpcclient.InferInput(name, list(shape if shape is not None else array.shape), dtype)
    if raw is not None:
        t._raw_content = raw  # bytes that disagree with the declared shape: a truncated request
    else:
        t.set_data_from_numpy(array)
    return t


def seed(v, dtype=np.int64, rows=1):
    return inp("seed", np.full((rows, 1), v, dtype))


def index(rows=1, dtype=np.int64):
    return inp("index", np.arange(rows, dtype=dtype).reshape(rows, 1))


def latent(a):
    return inp("latent", a)


INVALID, NOT_FOUND = "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"

CASES = {
    # the seeded generator: seed INT64 [rows, 1], index INT64 [rows, 1], rows <= 8
    "count over the limit": ("tiny", lambda: [seed(1, rows=9), index(9)], INVALID, "batch-size must be <= 8"),
    "oversized count": ("tiny", lambda: [seed(1, rows=100000), index(100000)], INVALID, "batch-size must be <= 8"),
    "zero rows": ("tiny", lambda: [seed(1, rows=0), index(0)], INVALID, "input byte size mismatch for input"),
    "seed and index rows differ": ("tiny", lambda: [seed(1, rows=2), index(3)], INVALID, "input 'seed' batch size does not match other inputs for 'tiny'"),
    "seed as int32": ("tiny", lambda: [seed(1, np.int32), index()], INVALID, "input 'seed' data-type is 'INT32', but model 'tiny' expects 'INT64'"),
    "seed as bytes": ("tiny", lambda: [inp("seed", np.array([[b"1"]], np.object_), "BYTES"), index()], INVALID, "data-type is 'BYTES'"),
    "index as float": ("tiny", lambda: [seed(1), index(1, np.float32)], INVALID, "input 'index' data-type is 'FP32', but model 'tiny' expects 'INT64'"),
    "seed of two values a row": ("tiny", lambda: [inp("seed", np.array([[1, 2]], np.int64)), index()], INVALID, "unexpected shape for input 'seed' for model 'tiny'. Expected [-1,1], got [1,2]"),
    "seed of rank three": ("tiny", lambda: [inp("seed", np.array([[[1]]], np.int64)), index()], INVALID, "Expected [-1,1], got [1,1,1]"),
    "index missing": ("tiny", lambda: [seed(1)], INVALID, "missing required input(s) ['index']"),
    "seed missing": ("tiny", lambda: [index()], INVALID, "missing required input(s) ['seed']"),
    "extra input": ("tiny", lambda: [seed(1), index(), inp("bogus", np.array([[1]], np.int32))], INVALID, "expected 2 inputs but got 3 inputs"),
    "count instead of index": ("tiny", lambda: [seed(1), inp("count", np.array([[1]], np.int32))], INVALID, "unexpected inference input 'count'"),
    "sampler over the limit": ("tiny_sampler", lambda: [seed(1, rows=9), index(9)], INVALID, "batch-size must be <= 8"),
    # the raw generator: latent FP32 [batch, 16], batch <= 8
    "latent too wide": ("tiny_generator", lambda: [latent(np.zeros((2, Z + 1), np.float32))], INVALID, "Expected [-1,16], got [2,17]"),
    "latent float64": ("tiny_generator", lambda: [latent(np.zeros((2, Z)))], INVALID, "data-type is 'FP64', but model 'tiny_generator' expects 'FP32'"),
    "latent int32": ("tiny_generator", lambda: [latent(np.zeros((2, Z), np.int32))], INVALID, "data-type is 'INT32'"),
    "latent of rank three": ("tiny_generator", lambda: [latent(np.zeros((2, Z, 1), np.float32))], INVALID, "got [2,16,1]"),
    "latent of rank one": ("tiny_generator", lambda: [latent(np.zeros((Z,), np.float32))], INVALID, "batch-size must be <= 8"),
    "zero batch": ("tiny_generator", lambda: [latent(np.zeros((0, Z), np.float32))], INVALID, "input byte size mismatch for input 'latent'"),
    "batch over the limit": ("tiny_generator", lambda: [latent(np.zeros((9, Z), np.float32))], INVALID, "batch-size must be <= 8"),
    "oversized batch": ("tiny_generator", lambda: [latent(np.zeros((65536, Z), np.float32))], INVALID, "batch-size must be <= 8"),
    "no inputs": ("tiny_generator", lambda: [], INVALID, "missing required input(s) ['latent']"),
    "extra input beside latent": ("tiny_generator", lambda: [latent(np.zeros((1, Z), np.float32)), inp("z", np.zeros((1, Z), np.float32))], INVALID, "expected 1 inputs but got 2 inputs"),
    "wrong input name": ("tiny_generator", lambda: [inp("z", np.zeros((1, Z), np.float32))], INVALID, "unexpected inference input 'z'"),
    "truncated bytes": ("tiny_generator", lambda: [inp("latent", dtype="FP32", shape=[2, Z], raw=b"\0" * 100)], INVALID, "Expected 128, got 100"),
    "trailing bytes": ("tiny_generator", lambda: [inp("latent", dtype="FP32", shape=[2, Z], raw=b"\0" * 200)], INVALID, "Expected 128, got 200"),
    "NaN latent": ("tiny_generator", lambda: [latent(np.full((1, Z), np.nan, np.float32))], INVALID, "input 'latent': contains NaN or infinite values"),
    "infinite latent": ("tiny_generator", lambda: [latent(np.full((1, Z), np.inf, np.float32))], INVALID, "contains NaN or infinite values"),
    # names
    "unknown model": ("nope", lambda: [seed(1), index()], NOT_FOUND, "Request for unknown model: 'nope' is not found"),
    "empty model name": ("", lambda: [seed(1), index()], NOT_FOUND, "Request for unknown model: '' is not found"),
}


@pytest.fixture(scope="module")
def raw(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def good_request_works(raw):
    out = raw.infer("tiny", [seed(5, rows=2), index(2)]).as_numpy("image")
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8


def test_there_are_at_least_thirty_malformed_requests():
    assert len(CASES) + 2 >= 30  # + unknown version, unknown output below


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_request_is_refused_and_the_server_keeps_serving(raw, case):
    model, build, status, message = CASES[case]
    with pytest.raises(InferenceServerException) as err:
        raw.infer(model, build())
    assert err.value.status() == status
    assert message in err.value.message()
    good_request_works(raw)


def test_unknown_version_is_not_found(raw):
    with pytest.raises(InferenceServerException) as err:
        raw.infer("tiny_generator", [latent(np.zeros((1, Z), np.float32))], model_version="7")
    assert err.value.status() == NOT_FOUND
    assert "'tiny_generator' version 7 is not found" in err.value.message()
    good_request_works(raw)


def test_unknown_output_is_refused(raw):
    with pytest.raises(InferenceServerException) as err:
        raw.infer("tiny_generator", [latent(np.zeros((1, Z), np.float32))],
                  outputs=[grpcclient.InferRequestedOutput("nope")])
    assert err.value.status() == INVALID
    assert "unexpected inference output 'nope'" in err.value.message()
    good_request_works(raw)


def test_a_bad_request_batched_with_good_ones_fails_alone(server):
    """Concurrent good and NaN requests land in the same dynamic batch: only the bad one fails."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            z = np.full((1, Z), np.nan if i % 4 == 0 else 0.1 * i, np.float32)
            return i, c.infer("tiny_generator", [latent(z)]).as_numpy("image")
        except InferenceServerException as exc:
            return i, exc
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        results = dict(pool.map(one, range(32)))
    for i, r in results.items():
        if i % 4 == 0:
            assert isinstance(r, InferenceServerException) and "NaN" in r.message()
        else:
            assert isinstance(r, np.ndarray) and r.shape == (1, 64, 64, 3)
