"""A pix2pix inpainter served by the real tritonserver: the same contract as the context
encoder, torch vs ONNX Runtime vs Triton, known pixels byte-identical through Client.inpaint."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ganforge.export.image import UInt8Inpaint
from ganforge.export.triton import export_run
from ganforge.serving.client import Client
from ganforge.serving.server import LocalServer, ServerOptions, free_port
from ganforge.training.gan import load_checkpoint
from ganforge.training.pix2pix import Pix2PixConfig, Pix2PixTrainConfig, UNet, train_pix2pix

pytestmark = pytest.mark.slow
TILE = 32


@pytest.fixture(scope="module")
def p2p(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p2p-served")
    train_pix2pix(Pix2PixTrainConfig(steps=2, batch_size=2, tile=TILE, n_images=8, threads=2, doctor_every=10,
                                     network=Pix2PixConfig(ngf=4, ndf=4, depth=5)), tmp / "run", progress=False)
    summary = export_run(tmp / "run", tmp / "repo", name="p2p", tile=TILE, max_batch_size=4, log=lambda m: None)
    srv = LocalServer(ServerOptions(model_repository=tmp / "repo", grpc_port=free_port(), http_port=free_port(),
                                    metrics_port=free_port(), exit_timeout_s=5)).start()
    yield tmp, summary, srv
    srv.stop()


def test_torch_onnxruntime_and_triton_agree_on_a_pix2pix_inpainter(p2p):
    tmp, summary, srv = p2p
    p = load_checkpoint(tmp / "run")
    net = UNet(Pix2PixConfig(**p["config"]))
    net.load_state_dict(p["state"]["net"])
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (3, TILE, TILE, 3), dtype=np.uint8)
    mask = np.zeros((3, TILE, TILE, 1), np.uint8)
    mask[:, 4:20, 6:26] = 255
    with torch.no_grad():
        ref = UInt8Inpaint(net.eval())(torch.from_numpy(image), torch.from_numpy(mask)).numpy()
    onnx = ort.InferenceSession(summary["onnx"], providers=["CPUExecutionProvider"]).run(
        None, {"image": image, "mask": mask})[0]
    with Client(srv.grpc_url) as c:
        served = c.infer("p2p", {"image": image, "mask": mask}, ["inpainted"])["inpainted"]
    assert np.abs(onnx.astype(int) - ref.astype(int)).max() <= 1
    assert np.array_equal(served, onnx)
    known = mask[..., 0] == 0
    assert np.array_equal(served[known], image[known])


def test_a_large_photo_inpainted_through_pix2pix_keeps_every_known_byte(p2p):
    _, _, srv = p2p
    rng = np.random.default_rng(2)
    photo = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    mask = np.zeros((300, 500), np.uint8)
    mask[10:20, 10:40] = 255        # small hole: one tile window
    mask[100:260, 200:420] = 255    # large hole: window resized down to the tile
    with Client(srv.grpc_url) as c:
        out = c.inpaint("p2p", photo, mask)
    assert out.shape == photo.shape
    assert np.array_equal(out[mask == 0], photo[mask == 0])
    assert not np.array_equal(out[mask > 0], photo[mask > 0])
