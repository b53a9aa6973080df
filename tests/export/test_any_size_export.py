"""`ganforge export RUN --any-size`: a context encoder (and the denoiser) exported with dynamic
height and width, run by ONNX Runtime at sizes other than the training tile, its config and
manifest; models that cannot take it are refused with one line."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ganforge.export.image import UInt8Denoise, UInt8Inpaint
from ganforge.export.triton import export_run
from ganforge.serving import repository as repo
from ganforge.training.gan import load_checkpoint
from tests.conftest import run_cli

TILE = 32    # the training tile, and the least side served
STRIDE = 8   # depth 3: 2**3


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    """A tiny context encoder trained for two steps."""
    from ganforge.training.context_encoder import ContextEncoderTrainConfig, UNetConfig, train_context_encoder

    run = tmp_path_factory.mktemp("any-size") / "ce"
    train_context_encoder(ContextEncoderTrainConfig(
        steps=2, batch_size=4, tile=TILE, n_images=32, threads=1, doctor="off", log_every=1,
        network=UNetConfig(width=8, depth=3, dilations=(1, 2), d_width=8)), run, progress=False)
    return run


@pytest.fixture(scope="module")
def ce_any(ce_run, tmp_path_factory):
    repository = tmp_path_factory.mktemp("repo")
    summary = export_run(ce_run, repository, name="ce_any", max_batch_size=4, any_size=True, log=lambda m: None)
    return repository, summary


def _unet(run):
    from ganforge.training.context_encoder import UNet, UNetConfig

    payload = load_checkpoint(run, ("context-encoder",))
    net = UNet(UNetConfig(**payload["config"]))
    net.load_state_dict(payload["state"]["net"])
    return net.eval()


@pytest.mark.parametrize("h, w", [(TILE, TILE), (40, 72), (96, 56)])
def test_onnx_runtime_inpaints_at_sizes_other_than_the_tile_as_torch_does(ce_run, ce_any, h, w):
    repository, _ = ce_any
    sess = ort.InferenceSession(str(repository / "ce_any/1/model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    mask = np.zeros((2, h, w, 1), np.uint8)
    mask[:, h // 4: h // 2, w // 3: 2 * w // 3] = 255
    got = sess.run(["inpainted"], {"image": image, "mask": mask})[0]
    assert got.shape == (2, h, w, 3) and got.dtype == np.uint8
    known = np.broadcast_to(mask == 0, got.shape)
    assert np.array_equal(got[known], image[known])                     # byte for byte outside the hole
    with torch.no_grad():
        ref = UInt8Inpaint(_unet(ce_run))(torch.from_numpy(image), torch.from_numpy(mask)).numpy()
    assert np.abs(ref.astype(int) - got.astype(int)).max() <= 1
    assert not np.array_equal(got[~known], image[~known])              # the hole is painted


def test_the_config_has_variable_dims_and_the_stride_and_the_manifest_says_any_size(ce_any):
    repository, summary = ce_any
    cfg = repo.read_config(repository / "ce_any/config.pbtxt")            # Triton's schema
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("image", [-1, -1, 3]), ("mask", [-1, -1, 1])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("inpainted", [-1, -1, 3])]
    assert cfg.parameters["stride"].string_value == str(STRIDE)
    assert cfg.parameters["min_side"].string_value == str(TILE)
    assert cfg.parameters["allowed_values"].string_value == "mask=0,255"
    # warm-up samples need whole shapes: the least side stands for the variable dims
    assert {tuple(w.inputs["image"].dims) for w in cfg.model_warmup} == {(TILE, TILE, 3)}
    manifest = json.loads((repository / "ce_any/manifest.json").read_text())
    assert (manifest["any_size"], manifest["stride"], manifest["min_side"]) == (True, STRIDE, TILE)
    assert "tile" not in manifest
    sizes = manifest["parity"]["sizes"]
    assert set(sizes) == {f"{TILE}x{TILE}", f"{TILE + STRIDE}x{2 * TILE}"}   # one square, one not
    assert all(s["max_abs_diff"] <= 1 for s in sizes.values())
    assert summary["parity"]["max_abs_diff"] == max(s["max_abs_diff"] for s in sizes.values())


def test_the_denoiser_exports_at_any_size_with_stride_one(tmp_path):
    from ganforge.training.autoencoders import Denoiser, DenoiserConfig, DenoiserTrainConfig, train_denoiser

    train_denoiser(DenoiserTrainConfig(steps=2, batch_size=4, patch=24, threads=1,
                                       network=DenoiserConfig(width=8, depth=3)), tmp_path / "dn", progress=False)
    summary = export_run(tmp_path / "dn", tmp_path / "repo", name="dn_any", max_batch_size=4, any_size=True,
                         log=lambda m: None)
    assert (summary["stride"], summary["min_side"]) == (1, 24)
    cfg = repo.read_config(tmp_path / "repo/dn_any/config.pbtxt")
    assert list(cfg.input[0].dims) == [-1, -1, 3] and cfg.parameters["stride"].string_value == "1"
    payload = load_checkpoint(tmp_path / "dn")
    net = Denoiser(DenoiserConfig(**payload["config"]))
    net.load_state_dict(payload["state"]["net"])
    image = np.random.default_rng(3).integers(0, 256, (1, 37, 53, 3), dtype=np.uint8)   # odd sides
    got = ort.InferenceSession(summary["onnx"]).run(None, {"image": image})[0]
    with torch.no_grad():
        ref = UInt8Denoise(net.eval())(torch.from_numpy(image)).numpy()
    assert got.shape == image.shape and np.abs(ref.astype(int) - got.astype(int)).max() <= 1


def test_cli_export_any_size_refuses_a_model_that_is_not_fully_convolutional(tiny_run, tmp_path):
    r = run_cli("export", str(tiny_run), "--repository", str(tmp_path / "r"), "--any-size")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"Error: --any-size: {tiny_run / 'checkpoint.pt'} holds a 'dcgan' model, which is not exported at "
        f"any size; allowed for context-encoder and denoiser models (fully convolutional)"]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--precision", "int8"], "Error: --precision: int8 is not allowed with --any-size (calibration takes one "
                              "tile size); leave --precision fp32"),
    (["--format", "tensorrt"], "Error: --any-size: not allowed with --format tensorrt; it exports to ONNX "
                               "(--format onnx)"),
], ids=["precision-int8", "format-tensorrt"])
def test_cli_export_any_size_refuses_what_it_cannot_go_with(ce_run, tmp_path, flags, message):
    r = run_cli("export", str(ce_run), "--repository", str(tmp_path / "r"), "--any-size", *flags)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "r").exists()


def test_an_any_size_directory_is_refused_where_one_tile_size_is_needed(ce_any):
    from ganforge.errors import UsageError
    from ganforge.serving.jobs import OnnxEngine

    repository, _ = ce_any
    r = run_cli("export", str(repository / "ce_any"), "--precision", "int8")
    assert r.returncode == 2
    assert r.stderr == (f"Error: --precision: int8 is not allowed for {repository / 'ce_any'}, exported with "
                        f"--any-size; export the run again with --tile N for a reduced-precision version\n")
    with pytest.raises(UsageError, match="takes images of any size"):
        OnnxEngine(repository / "ce_any/1/model.onnx")
