"""Models exported with --any-size, served by the real tritonserver: `Client.inpaint`, `ganforge
inpaint` and a batch job send each hole's window at the photo's own resolution (padded to the
stride), one request per window shape; outside the holes the bytes are the input's; the
any-size denoiser answers a whole photo as torch does."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from ganforge.export.triton import export_run
from ganforge.serving.client import Client
from ganforge.serving.inpaint import AnySize, plan_any_size
from ganforge.serving.server import LocalServer, ServerOptions, free_port
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
TILE, STRIDE = 32, 8


@pytest.fixture(scope="module")
def any_repo(tmp_path_factory):
    from ganforge.training.autoencoders import DenoiserConfig, DenoiserTrainConfig, train_denoiser
    from ganforge.training.context_encoder import ContextEncoderTrainConfig, UNetConfig, train_context_encoder

    tmp = tmp_path_factory.mktemp("any-size-served")
    train_context_encoder(ContextEncoderTrainConfig(
        steps=2, batch_size=4, tile=TILE, n_images=32, threads=1, doctor="off", log_every=1,
        network=UNetConfig(width=8, depth=3, dilations=(1, 2), d_width=8)), tmp / "ce", progress=False)
    train_denoiser(DenoiserTrainConfig(steps=2, batch_size=4, patch=24, threads=1,
                                       network=DenoiserConfig(width=8, depth=3)), tmp / "dn", progress=False)
    repo = tmp / "model_repository"
    quiet = lambda m: None
    export_run(tmp / "ce", repo, name="ce_any", max_batch_size=4, any_size=True, log=quiet)
    export_run(tmp / "dn", repo, name="dn_any", max_batch_size=4, any_size=True, log=quiet)
    return tmp, repo


@pytest.fixture(scope="module")
def any_server(any_repo):
    _, repo = any_repo
    srv = LocalServer(ServerOptions(model_repository=repo, grpc_port=free_port(), http_port=free_port(),
                                    metrics_port=free_port(), exit_timeout_s=5)).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(any_server):
    with Client(any_server.grpc_url) as c:
        yield c


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(7 * xx + seed), np.cos(5 * yy - seed), np.sin(9 * (xx + yy))], -1)
    noise = np.random.default_rng(seed).normal(0, 10, (h, w, 3))
    return np.clip(127 + 100 * base + noise, 0, 255).astype(np.uint8)


def _two_holes(h: int = 220, w: int = 300) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[24:40, 32:48] = 255          # small: a window of the least side
    mask[120:180, 160:250] = 255      # large: a window of its own, wider than the tile
    return mask


def _stats(url: str, model: str) -> tuple[int, int]:
    """(requests answered, executions) of `model`, from the server's statistics."""
    import tritonclient.grpc as grpcclient

    raw = grpcclient.InferenceServerClient(url)
    try:
        s = raw.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        raw.close()
    return int(s["inference_stats"]["success"].get("count", 0)), int(s.get("execution_count", 0))


def _expected_holes(onnx_path, image, mask, spec) -> np.ndarray:
    """Each window run by ONNX Runtime here at native size (padded to the stride), pasted."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = image.copy()
    for p in plan_any_size(mask, spec):
        pad = ((0, p.shape[0] - p.h), (0, p.shape[1] - p.w))
        crop = np.pad(image[p.y:p.y + p.h, p.x:p.x + p.w], (*pad, (0, 0)), mode="edge")
        m = np.pad(mask[p.y:p.y + p.h, p.x:p.x + p.w], pad)
        res = sess.run(None, {"image": crop[None], "mask": m[None, ..., None]})[0][0]
        hole = m[:p.h, :p.w] > 0
        out[p.y:p.y + p.h, p.x:p.x + p.w][hole] = res[:p.h, :p.w][hole]
    return out


def test_two_holes_are_inpainted_at_native_size_one_request_per_window_shape(any_repo, any_server, client):
    _, repo = any_repo
    image, mask = _photo(220, 300, 0), _two_holes()
    spec = AnySize(STRIDE, TILE)
    pieces = plan_any_size(mask, spec)
    assert len(pieces) == 2 and all(p.native for p in pieces)
    assert len({p.shape for p in pieces}) == 2 and max(max(p.shape) for p in pieces) > TILE
    before = _stats(any_server.grpc_url, "ce_any")
    out = client.inpaint("ce_any", image, mask)
    after = _stats(any_server.grpc_url, "ce_any")
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)      # one request per shape
    keep = mask == 0
    assert out.shape == image.shape and np.array_equal(out[keep], image[keep])
    expected = _expected_holes(repo / "ce_any/1/model.onnx", image, mask, spec)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(out[~keep], image[~keep])


def test_ganforge_inpaint_writes_what_the_client_answers_and_refuses_a_cap_below_min_side(
        any_server, client, tmp_path):
    image, mask = _photo(220, 300, 1), _two_holes()
    Image.fromarray(image).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = run_cli("inpaint", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"), "-o",
                str(tmp_path / "out.png"), "--model", "ce_any", "--url", any_server.grpc_url)
    assert r.returncode == 0, r.stderr
    written = np.asarray(Image.open(tmp_path / "out.png"))
    assert np.array_equal(written, client.inpaint("ce_any", image, mask))
    r = run_cli("inpaint", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"), "-o",
                str(tmp_path / "bad.png"), "--model", "ce_any", "--url", any_server.grpc_url, "--max-side", "16")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "Error: --max-side: 16 is not allowed; must be an integer in [32, 4096] "
        "(32: the min_side of model 'ce_any')"]
    assert not (tmp_path / "bad.png").exists()


def test_a_window_over_max_side_is_resized_down_and_the_other_stays_native(client):
    image, mask = _photo(220, 300, 2), _two_holes()
    small, large = sorted(plan_any_size(mask, AnySize(STRIDE, TILE, max_side=64)), key=lambda p: p.h)
    assert small.native and (large.h, large.scaled) == (192, (64, 64))
    capped = client.inpaint("ce_any", image, mask, max_side=64)
    native = client.inpaint("ce_any", image, mask)
    keep = mask == 0
    assert np.array_equal(capped[keep], image[keep])
    in_small = np.zeros_like(keep)
    in_small[small.y:small.y + small.h, small.x:small.x + small.w] = True
    assert np.array_equal(capped[in_small], native[in_small])          # the same request as before
    assert not np.array_equal(capped[~keep & ~in_small], native[~keep & ~in_small])


def test_a_batch_job_through_an_any_size_model_matches_the_client(any_server, client, tmp_path):
    from ganforge.serving import jobs

    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    photos = {"a": (_photo(220, 300, 3), _two_holes()), "b": (_photo(90, 70, 4), _two_holes(90, 70))}
    photos["b"][1][60:80, 10:30] = 255
    for name, (img, m) in photos.items():
        Image.fromarray(img).save(src / f"{name}.png")
        Image.fromarray(m).save(src / f"{name}_mask.png")
    items, bad = jobs.discover(src, dst)
    summary = jobs.run_job(items, dst, jobs.JobOptions(url=any_server.grpc_url, model="ce_any", progress=False),
                           failures=bad)
    assert (summary.done, summary.failed) == (2, 0)
    for name, (img, m) in photos.items():
        assert np.array_equal(np.asarray(Image.open(dst / f"{name}.png")), client.inpaint("ce_any", img, m))


def test_the_any_size_denoiser_answers_a_whole_photo_as_torch_does(any_repo, client):
    from ganforge.export.image import UInt8Denoise
    from ganforge.training.autoencoders import Denoiser, DenoiserConfig
    from ganforge.training.gan import load_checkpoint

    tmp, _ = any_repo
    payload = load_checkpoint(tmp / "dn")
    net = Denoiser(DenoiserConfig(**payload["config"]))
    net.load_state_dict(payload["state"]["net"])
    image = _photo(75, 101, 5)
    served = client.denoise("dn_any", image)
    with torch.no_grad():
        whole = UInt8Denoise(net.eval())(torch.from_numpy(image[None])).numpy()[0]
    assert served.shape == image.shape
    assert np.abs(served.astype(int) - whole.astype(int)).max() <= 1


def test_a_side_off_the_stride_is_refused_by_name_and_the_server_keeps_serving(any_server, client):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    raw = grpcclient.InferenceServerClient(any_server.grpc_url)
    try:
        inputs = [grpcclient.InferInput("image", [1, 36, 40, 3], "UINT8"),
                  grpcclient.InferInput("mask", [1, 36, 40, 1], "UINT8")]
        inputs[0].set_data_from_numpy(np.zeros((1, 36, 40, 3), np.uint8))
        inputs[1].set_data_from_numpy(np.zeros((1, 36, 40, 1), np.uint8))
        with pytest.raises(InferenceServerException) as err:
            raw.infer("ce_any", inputs)
    finally:
        raw.close()
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "height and width must be multiples of 8 (the model's stride)" in err.value.message()
    image, mask = _photo(64, 64, 3), _two_holes(64, 64)
    assert client.inpaint("ce_any", image, mask).shape == image.shape
