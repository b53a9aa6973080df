"""pix2pix: U-Net with skips, 70x70 PatchGAN, dropout as noise, a tiny run exported and checked."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ganforge.errors import UsageError
from ganforge.export.image import UInt8Inpaint
from ganforge.export.triton import export_run
from ganforge.training.gan import load_checkpoint
from ganforge.training.pix2pix import (PatchGAN, Pix2PixConfig, Pix2PixTrainConfig, UNet, edge_map,
                                       receptive_field, train_pix2pix)

TINY = dict(ngf=4, ndf=4, depth=5)


def test_the_patchgan_sees_70x70_windows_and_answers_per_patch():
    D = PatchGAN(Pix2PixConfig(ndf=8))
    assert receptive_field(D) == 70
    logits = D(torch.zeros(2, 4, 64, 64), torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)          # one logit per patch, not one per image


def test_the_unet_maps_a_tile_to_a_tile_and_uses_its_skips():
    G = UNet(Pix2PixConfig(**TINY)).eval()
    x, m = torch.rand(1, 3, 64, 64) * 2 - 1, torch.zeros(1, 1, 64, 64)
    y = G(x, m)
    assert y.shape == (1, 3, 64, 64) and y.abs().max() <= 1
    # a skip from the first stage carries a local change to the output without the bottleneck
    x2 = x.clone()
    x2[..., 10, 10] = -x2[..., 10, 10]
    assert not torch.equal(G(x2, m), y)


def test_dropout_is_the_noise_in_training_and_off_in_eval():
    G = UNet(Pix2PixConfig(**TINY))
    x, m = torch.rand(2, 3, 64, 64), torch.zeros(2, 1, 64, 64)
    G.train()
    torch.manual_seed(0)
    a = G(x, m)
    b = G(x, m)
    assert not torch.equal(a, b)
    G.eval()
    assert torch.equal(G(x, m), G(x, m))


def test_edge_maps_are_binary_and_find_a_step():
    img = np.zeros((1, 16, 16, 3), np.uint8)
    img[:, :, 8:] = 200
    e = edge_map(img)
    assert e.shape == (1, 16, 16, 1) and set(np.unique(e)) <= {0, 255}
    assert e[0, :, 7:9].all() and not e[0, :, :5].any()


def test_bad_settings_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="--task"):
        train_pix2pix(Pix2PixTrainConfig(network=Pix2PixConfig(task="colour")), tmp_path)
    with pytest.raises(UsageError, match="tile 40"):
        train_pix2pix(Pix2PixTrainConfig(tile=40), tmp_path)


@pytest.fixture(scope="module")
def tiny_p2p(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p2p")
    train_pix2pix(Pix2PixTrainConfig(steps=2, batch_size=2, tile=32, n_images=16, threads=2,
                                     network=Pix2PixConfig(**TINY)), tmp / "run", progress=False)
    return tmp


def test_a_tiny_inpainting_run_exports_with_known_pixels_byte_identical(tiny_p2p):
    summary = export_run(tiny_p2p / "run", tiny_p2p / "repo", name="p2p", tile=32, max_batch_size=4,
                         log=lambda m: None)
    assert summary["parity"]["max_abs_diff"] <= 1
    p = load_checkpoint(tiny_p2p / "run")
    assert p["kind"] == "pix2pix" and p["command"].startswith("ganforge train pix2pix --task inpaint")
    net = UNet(Pix2PixConfig(**p["config"]))
    net.load_state_dict(p["state"]["net"])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mask = np.zeros((3, 32, 32, 1), np.uint8)
    mask[:, 8:20, 4:30] = 255
    sess = ort.InferenceSession(summary["onnx"], providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": image, "mask": mask})[0]
    with torch.no_grad():
        ref = UInt8Inpaint(net.eval())(torch.from_numpy(image), torch.from_numpy(mask)).numpy()
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    known = mask[..., 0] == 0
    assert np.array_equal(out[known], image[known])


def test_an_edges_model_trains_but_has_no_served_contract(tiny_p2p):
    train_pix2pix(Pix2PixTrainConfig(steps=1, batch_size=2, tile=32, n_images=8, threads=2,
                                     network=Pix2PixConfig(task="edges", **TINY)), tiny_p2p / "edges",
                  progress=False)
    with pytest.raises(UsageError, match="only task 'inpaint'"):
        export_run(tiny_p2p / "edges", tiny_p2p / "repo", name="edges", tile=32, log=lambda m: None)


def test_the_doctor_watches_the_adversarial_part_of_both_inpainters(tmp_path):
    import json

    from ganforge.training.inpainting import ContextEncoderConfig, InpaintTrainConfig, train_inpainter

    train_pix2pix(Pix2PixTrainConfig(steps=2, batch_size=2, tile=32, n_images=8, threads=2, doctor_every=1,
                                     network=Pix2PixConfig(**TINY)), tmp_path / "p2p", progress=False)
    train_inpainter(InpaintTrainConfig(steps=2, batch_size=2, tile=32, threads=2, doctor_every=1,
                                       network=ContextEncoderConfig(width=4, dilations=(2,), d_width=4)),
                    tmp_path / "ce", progress=False)
    for run in ("p2p", "ce"):
        recs = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == [1, 2]
        assert all(0 <= r["s_G"] <= 1 and 0 <= r["s_D"] <= 1 and "diversity" in r for r in recs)
        assert (tmp_path / run / "scores.png").is_file() and (tmp_path / run / "doctor.md").is_file()
