"""A model shipped as two versions (model_repository/denoiser_photos: 1 FP32, 2 INT8) served by
the real tritonserver: a request naming a version gets that version's graph, a request naming
none gets the INT8 one, and a version that is not served is a clear error that leaves the
server serving. A batch-inpaint job sends every request to the version it names."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ganforge.errors import ModelNotFound, UsageError
from ganforge.export.quantize import session
from ganforge.serving.client import Client, map_error
from ganforge.serving.repository import write_manifest
from ganforge.serving.server import LocalServer, ServerOptions, free_port
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow   # starts a server
SHIPPED = ROOT / "model_repository" / "denoiser_photos"
INPAINTER = ROOT / "model_repository" / "fill_thinplate"


def passthrough_inpainter(path) -> None:
    """An inpainting graph that answers with the image it was sent: a second version of the
    inpainter that no request can mistake for the first."""
    import onnx
    from onnx import TensorProto, helper

    tile = [None, 64, 64]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["inpainted"])], "passthrough",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [*tile, 3]),
         helper.make_tensor_value_info("mask", TensorProto.UINT8, [*tile, 1])],
        [helper.make_tensor_value_info("inpainted", TensorProto.UINT8, [*tile, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("versions") / "model_repository"
    shutil.copytree(SHIPPED, repo / "denoiser_photos")
    shutil.copytree(INPAINTER, repo / "fill_thinplate")
    passthrough_inpainter(repo / "fill_thinplate" / "2" / "model.onnx")
    config = repo / "fill_thinplate" / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy { all { } }\n")
    manifest = json.loads((repo / "fill_thinplate" / "manifest.json").read_text())
    write_manifest(repo / "fill_thinplate", {k: v for k, v in manifest.items() if k != "files"})
    srv = LocalServer(ServerOptions(model_repository=repo, grpc_port=free_port(), http_port=free_port(),
                                    metrics_port=free_port(), exit_timeout_s=5)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    from skimage import data

    photo = data.chelsea()   # held out from training
    noisy = photo + np.random.default_rng(0).normal(0, 25, photo.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)[None, :128, :128]


def expected(version: str, tiles: np.ndarray) -> np.ndarray:
    return session(SHIPPED / version / "model.onnx").run(None, {"image": tiles})[0]


def test_a_request_naming_a_version_gets_that_versions_graph(server, tiles):
    with Client(server.grpc_url) as c:
        assert c.versions("denoiser_photos") == ["1", "2"]
        got = {v: c.infer("denoiser_photos", {"image": tiles}, ["denoised"], model_version=v)["denoised"]
               for v in ("1", "2")}
    assert not np.array_equal(got["1"], got["2"])   # two different graphs answer
    for v in ("1", "2"):
        np.testing.assert_array_equal(got[v], expected(v, tiles))


def test_a_request_naming_no_version_gets_the_int8_version(server, tiles):
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    assert manifest["versions"]["1"]["precision"] == "fp32"
    assert manifest["versions"]["2"]["precision"] == "int8" and manifest["default_version"] == 2
    assert manifest["versions"]["2"]["quality"]["within_limit"]
    with Client(server.grpc_url) as c:
        got = c.infer("denoiser_photos", {"image": tiles}, ["denoised"])["denoised"]
    np.testing.assert_array_equal(got, expected("2", tiles))


def test_the_cli_asks_for_the_named_version(server, tiles, tmp_path):
    Image.fromarray(tiles[0]).save(tmp_path / "noisy.png")
    out = run_cli("denoise", str(tmp_path / "noisy.png"), "-o", str(tmp_path / "v1.png"),
                  "--model-version", "1", "--url", server.grpc_url)
    assert out.returncode == 0, out.stderr
    assert "with denoiser_photos version 1 ->" in out.stdout
    with Client(server.grpc_url) as c:
        want = c.denoise("denoiser_photos", tiles[0], model_version=1)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "v1.png")), want)


def test_a_version_that_is_not_served_is_a_clear_error_and_the_server_goes_on(server, tiles, tmp_path):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    Image.fromarray(tiles[0]).save(tmp_path / "noisy.png")
    out = run_cli("denoise", str(tmp_path / "noisy.png"), "-o", str(tmp_path / "v7.png"),
                  "--model-version", "7", "--url", server.grpc_url)
    assert out.returncode == 1 and not (tmp_path / "v7.png").exists()
    assert out.stderr.strip().splitlines() == [
        f"Error: model 'denoiser_photos' version 7 is not served at {server.grpc_url}; it serves versions 1, 2"]
    out = run_cli("denoise", str(tmp_path / "noisy.png"), "-o", str(tmp_path / "v0.png"), "--model-version", "0")
    assert out.returncode == 2
    assert out.stderr.strip() == "Error: argument --model-version: 0 is below the minimum 1"
    with pytest.raises(UsageError, match=r"model_version: 'two' is not allowed; must be an integer >= 1"):
        Client(server.grpc_url).infer("denoiser_photos", {"image": tiles}, ["denoised"], model_version="two")

    # a raw request for the missing version reaches the server: its refusal, named
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    image = grpcclient.InferInput("image", list(tiles.shape), "UINT8")
    image.set_data_from_numpy(tiles)
    with pytest.raises(InferenceServerException) as refused:
        raw.infer("denoiser_photos", [image], model_version="7")
    err = map_error(refused.value, "denoiser_photos", server.grpc_url, version="7")
    assert isinstance(err, ModelNotFound)
    assert str(err).startswith(f"model 'denoiser_photos' version 7 is not served at {server.grpc_url}: ")
    # and it goes on serving
    np.testing.assert_array_equal(raw.infer("denoiser_photos", [image]).as_numpy("denoised"), expected("2", tiles))


def test_a_batch_job_sends_every_request_to_the_version_it_names(server, tmp_path):
    from skimage import data

    photo = data.coffee()[100:196, 200:296]
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[30:60, 30:60] = 255
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(photo).save(inputs / "a.png")
    Image.fromarray(mask).save(inputs / "a_mask.png")
    outs = {}
    for v in ("1", "2"):
        out = run_cli("batch-inpaint", str(inputs), "-o", str(tmp_path / f"v{v}"), "--model", "fill_thinplate",
                      "--model-version", v, "--url", server.grpc_url, "-q")
        assert out.returncode == 0, out.stderr
        assert json.loads((tmp_path / f"v{v}" / "summary.json").read_text())["model_version"] == v
        outs[v] = np.asarray(Image.open(tmp_path / f"v{v}" / "a.png"))
    hole = mask > 0
    assert np.array_equal(outs["1"][~hole], photo[~hole]) and np.array_equal(outs["2"][~hole], photo[~hole])
    assert not np.array_equal(outs["1"][hole], outs["2"][hole])   # version 1 paints the hole
    out = run_cli("batch-inpaint", str(inputs), "-o", str(tmp_path / "v7"), "--model", "fill_thinplate",
                  "--model-version", "7", "--url", server.grpc_url, "-q", "--wait-for-server", "1")
    assert out.returncode == 1
    assert "version 7 is not served" in out.stdout + out.stderr, out.stdout + out.stderr
