"""Denoiser and inpainter, served by the real tritonserver: parity torch vs ONNX Runtime vs
Triton, tiling, crop-around-hole and paste-back, known pixels byte-identical, bad input."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from ganforge.export.image import UInt8Denoise, UInt8Inpaint
from ganforge.export.triton import export_run
from ganforge.serving.client import Client
from ganforge.serving.inpaint import plan_windows
from ganforge.serving.server import LocalServer, ServerOptions, free_port
from ganforge.training.autoencoders import DenoiserConfig, DenoiserTrainConfig, train_denoiser
from ganforge.training.gan import load_checkpoint
from ganforge.training.inpainting import ContextEncoderConfig, InpaintTrainConfig, train_inpainter
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
TILE = 32


@pytest.fixture(scope="module")
def image_repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image-models")
    train_denoiser(DenoiserTrainConfig(steps=3, batch_size=4, patch=24, threads=2,
                                       network=DenoiserConfig(width=8, depth=3)), tmp / "dn", progress=False)
    train_inpainter(InpaintTrainConfig(steps=2, batch_size=4, tile=TILE, threads=2,
                                       network=ContextEncoderConfig(width=8, dilations=(2,), d_width=8)),
                    tmp / "ce", progress=False)
    train_inpainter(InpaintTrainConfig(steps=2, batch_size=4, tile=TILE, threads=2, pool=4, lr=1e-2,
                                       network=ContextEncoderConfig(width=8, prefill=True, fill="cascade",
                                                                    diffuse=2, bilaplace=2, thinplate=3,
                                                                    head="blend", blend_thinplate=3, d_width=8)),
                    tmp / "blend", progress=False)
    repo = tmp / "model_repository"
    quiet = lambda m: None
    export_run(tmp / "dn", repo, name="dn", tile=TILE, max_batch_size=4, log=quiet)
    export_run(tmp / "ce", repo, name="ce", tile=TILE, max_batch_size=4, log=quiet)
    export_run(tmp / "blend", repo, name="blend", tile=TILE, max_batch_size=4, log=quiet)
    return tmp, repo


@pytest.fixture(scope="module")
def image_server(image_repo):
    _, repo = image_repo
    srv = LocalServer(ServerOptions(model_repository=repo, grpc_port=free_port(), http_port=free_port(),
                                    metrics_port=free_port(), exit_timeout_s=5)).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(image_server):
    with Client(image_server.grpc_url) as c:
        yield c


def _nets(tmp):
    from ganforge.training.autoencoders import Denoiser

    p = load_checkpoint(tmp / "dn")
    dn = Denoiser(DenoiserConfig(**p["config"]))
    dn.load_state_dict(p["state"]["net"])
    return dn.eval(), _inpainter(tmp / "ce")


def _inpainter(run):
    from ganforge.training.inpainting import ContextEncoder

    q = load_checkpoint(run)
    cfg = q["config"]
    ce = ContextEncoder(ContextEncoderConfig(**{**cfg, "dilations": tuple(cfg["dilations"])}))
    ce.load_state_dict(q["state"]["net"])
    return ce.eval()


def test_torch_onnxruntime_and_triton_agree_on_both_models(image_repo, client):
    tmp, repo = image_repo
    dn, ce = _nets(tmp)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, TILE, TILE, 3), dtype=np.uint8)
    mask = np.zeros((3, TILE, TILE, 1), np.uint8)
    mask[:, 8:20, 6:26] = 255
    with torch.no_grad():
        t_dn = UInt8Denoise(dn)(torch.from_numpy(img)).numpy()
        t_ce = UInt8Inpaint(ce)(torch.from_numpy(img), torch.from_numpy(mask)).numpy()
    o_dn = ort.InferenceSession(str(repo / "dn/1/model.onnx")).run(None, {"image": img})[0]
    o_ce = ort.InferenceSession(str(repo / "ce/1/model.onnx")).run(None, {"image": img, "mask": mask})[0]
    s_dn = client.infer("dn", {"image": img}, ["denoised"])["denoised"]
    s_ce = client.infer("ce", {"image": img, "mask": mask}, ["inpainted"])["inpainted"]
    blend = _inpainter(tmp / "blend")       # the classical fills' blend, its fills in the graph
    with torch.no_grad():
        t_bl = UInt8Inpaint(blend)(torch.from_numpy(img), torch.from_numpy(mask)).numpy()
    o_bl = ort.InferenceSession(str(repo / "blend/1/model.onnx")).run(None, {"image": img, "mask": mask})[0]
    s_bl = client.infer("blend", {"image": img, "mask": mask}, ["inpainted"])["inpainted"]
    for a, b in ((t_dn, o_dn), (o_dn, s_dn), (t_ce, o_ce), (o_ce, s_ce), (t_bl, o_bl), (o_bl, s_bl)):
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # compositing is in the graph: outside the hole the bytes are the input's
    keep = mask[..., 0] == 0
    assert np.array_equal(s_ce[keep], img[keep])


def test_tiled_denoising_reproduces_a_whole_image_run(image_repo, client):
    tmp, _ = image_repo
    dn, _ = _nets(tmp)
    image = np.random.default_rng(1).integers(0, 256, (75, 101, 3), dtype=np.uint8)
    served = client.denoise("dn", image)
    with torch.no_grad():
        whole = UInt8Denoise(dn)(torch.from_numpy(image[None])).numpy()[0]
    assert served.shape == image.shape
    # stated tolerance: 1 grey level (blend weights average identical predictions; rounding)
    assert np.abs(served.astype(int) - whole.astype(int)).max() <= 1


def test_inpainting_a_large_image_changes_only_the_holes(client):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (900, 1300, 3), dtype=np.uint8)
    mask = np.zeros((900, 1300), np.uint8)
    mask[100:120, 150:190] = 255        # a small hole: one tile-sized window
    mask[600:850, 900:1250] = 255       # a large one: a window bigger than the tile, resized
    assert len(plan_windows(mask, TILE)) == 2
    out = client.inpaint("ce", image, mask)
    keep = mask == 0
    assert np.array_equal(out[keep], image[keep])
    assert not np.array_equal(out[~keep], image[~keep])


def test_a_mask_without_a_hole_returns_the_image_unchanged(client):
    image = np.random.default_rng(3).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    assert np.array_equal(client.inpaint("ce", image, np.zeros((50, 60), np.uint8)), image)


def test_calling_a_model_with_the_wrong_inputs_is_a_usage_error(client):
    from ganforge.errors import UsageError

    with pytest.raises(UsageError, match=r"model 'ce' takes inputs \['image', 'mask'\]"):
        client.denoise("ce", np.zeros((40, 40, 3), np.uint8))


# -- malformed requests to the image models, sent with nothing but tritonclient -----------------

def _tensor(name, array):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


def _tile(rows=1, side=TILE):
    return np.random.default_rng(rows).integers(0, 256, (rows, side, side, 3), dtype=np.uint8)


def _hole(rows=1, side=TILE, value=255, dtype=np.uint8):
    m = np.zeros((rows, side, side, 1), dtype)
    m[:, side // 4: side // 2, side // 4: side // 2] = value
    return m


IMAGE_CASES = {
    "mask of the wrong size": ("ce", lambda: {"image": _tile(), "mask": _hole(side=TILE // 2)},
                               f"unexpected shape for input 'mask' for model 'ce'. Expected [-1,{TILE},{TILE},1], got [1,{TILE // 2},{TILE // 2},1]"),
    "mask value 7": ("ce", lambda: {"image": _tile(), "mask": _hole(value=7)},
                     f"ce: input 'mask': value 7 at [0, {TILE // 4}, {TILE // 4}, 0] is not allowed; send only 0, 255"),
    "mask value 128": ("ce", lambda: {"image": _tile(), "mask": _hole(value=128)}, "value 128 at"),
    "mask as float": ("ce", lambda: {"image": _tile(), "mask": _hole(dtype=np.float32)},
                      "input 'mask' data-type is 'FP32', but model 'ce' expects 'UINT8'"),
    "mask without its channel": ("ce", lambda: {"image": _tile(), "mask": _hole()[..., 0]},
                                 f"Expected [-1,{TILE},{TILE},1], got [1,{TILE},{TILE}]"),
    "mask missing": ("ce", lambda: {"image": _tile()}, "missing required input(s) ['mask']"),
    "image and mask rows differ": ("ce", lambda: {"image": _tile(2), "mask": _hole(3)}, "batch size does not match other inputs"),
    "inpainter tile of the wrong size": ("ce", lambda: {"image": _tile(side=TILE + 1), "mask": _hole()},
                                         f"Expected [-1,{TILE},{TILE},3], got [1,{TILE + 1},{TILE + 1},3]"),
    "inpainter batch over the limit": ("ce", lambda: {"image": _tile(5), "mask": _hole(5)}, "batch-size must be <= 4"),
    "denoiser given a mask": ("dn", lambda: {"image": _tile(), "mask": _hole()}, "expected 1 inputs but got 2 inputs"),
    "denoiser image as int32": ("dn", lambda: {"image": _tile().astype(np.int32)}, "input 'image' data-type is 'INT32', but model 'dn' expects 'UINT8'"),
    "denoiser greyscale tile": ("dn", lambda: {"image": _tile()[..., :1]}, f"Expected [-1,{TILE},{TILE},3], got [1,{TILE},{TILE},1]"),
}


def test_exported_inpainters_take_only_binary_masks(image_repo):
    from ganforge.serving.repository import read_config

    _, repo = image_repo
    for name in ("ce", "blend"):
        assert read_config(repo / name / "config.pbtxt").parameters["allowed_values"].string_value == "mask=0,255"
    assert "allowed_values" not in read_config(repo / "dn" / "config.pbtxt").parameters


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_malformed_image_request_is_refused_and_the_server_keeps_serving(image_server, case):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    model, build, message = IMAGE_CASES[case]
    raw = grpcclient.InferenceServerClient(image_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as err:
            raw.infer(model, [_tensor(k, v) for k, v in build().items()])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert message in err.value.message()
        good = raw.infer("ce", [_tensor("image", _tile(2)), _tensor("mask", _hole(2))]).as_numpy("inpainted")
        assert good.shape == (2, TILE, TILE, 3)
    finally:
        raw.close()


# -- CLI ---------------------------------------------------------------------------------------

def _save(path, array, mode=None):
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def photo(tmp_path):
    return np.random.default_rng(4).integers(0, 256, (70, 90, 3), dtype=np.uint8)


def test_cli_denoise_and_inpaint_write_their_outputs(image_server, tmp_path, photo):
    src = _save(tmp_path / "in.png", photo)
    m = np.zeros((70, 90), np.uint8)
    m[20:40, 30:60] = 255
    msk = _save(tmp_path / "m.png", m)
    url = image_server.grpc_url
    r = run_cli("denoise", src, "-o", str(tmp_path / "d.png"), "--url", url, "--model", "dn")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"denoised {src} (90x70) with dn -> {tmp_path / 'd.png'}"
    r = run_cli("inpaint", src, "--mask", msk, "-o", str(tmp_path / "i.png"), "--url", url, "--model", "ce")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"inpainted 9.5% of {src} (90x70) with ce -> {tmp_path / 'i.png'}"
    out = np.asarray(Image.open(tmp_path / "i.png"))
    assert np.array_equal(out[m == 0], photo[m == 0])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_cli_inpaint_converts_grey_rgba_palette_and_16_bit_images(image_server, tmp_path, mode):
    rng = np.random.default_rng(5)
    if mode == "I;16":
        src = tmp_path / "in.png"
        Image.fromarray(rng.integers(0, 65535, (40, 50), np.uint16)).save(src)
    else:
        src = tmp_path / "in.png"
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).convert(mode).save(src)
    m = np.zeros((40, 50), np.uint8)
    m[10:20, 10:30] = 255
    r = run_cli("inpaint", str(src), "--mask", _save(tmp_path / "m.png", m), "-o", str(tmp_path / "o.png"),
                "--url", image_server.grpc_url, "--model", "ce")
    assert r.returncode == 0, r.stderr
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (40, 50, 3)


def test_cli_inpaint_bad_input_gets_one_clear_line(image_server, tmp_path, photo):
    url = image_server.grpc_url
    src = _save(tmp_path / "in.png", photo)
    small = _save(tmp_path / "small.png", np.zeros((10, 10), np.uint8))
    empty = _save(tmp_path / "empty.png", np.zeros((70, 90), np.uint8))
    full = _save(tmp_path / "full.png", np.full((70, 90), 255, np.uint8))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    out = str(tmp_path / "o.png")
    cases = [
        (["inpaint", src, "--mask", small, "-o", out], 2, "Error: --mask: size 10x10 differs from the image's 90x70"),
        (["inpaint", src, "--mask", full, "-o", out], 2, f"Error: --mask: every pixel of {full} is a hole; there is nothing to inpaint from"),
        (["inpaint", str(broken), "--mask", empty, "-o", out], 2, f"Error: {broken}: not a readable image"),
        (["inpaint", src, "--mask", empty, "-o", out, "--max-pixels", "100"], 2, f"Error: {src}: 90x70 is larger than the limit of 100 pixels"),
        (["denoise", str(tmp_path / "missing.png"), "-o", out], 2, f"Error: {tmp_path / 'missing.png'}: no such file"),
    ]
    for args, code, line in cases:
        r = run_cli(*args, "--url", url, "--model", "ce" if args[0] == "inpaint" else "dn")
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.strip().startswith(line), (args, r.stderr)
    r = run_cli("inpaint", src, "--mask", empty, "-o", out, "--url", url, "--model", "ce")
    assert r.returncode == 0
    assert r.stdout.strip() == f"mask {empty} has no hole: {src} written unchanged to {out}"
    assert np.array_equal(np.asarray(Image.open(out)), photo)
