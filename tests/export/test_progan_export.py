"""A tiny ProGAN: ONNX export parity with torch, and generation by seed through a real
tritonserver serving the exported ensemble."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ganforge.serving.sampler import sample_latents
from ganforge.training.gan import load_checkpoint
from ganforge.training.gan_task import to_uint8
from ganforge.training.progan import ProGANTrainConfig, train_progan
from ganforge.training.progan_nets import ProGANConfig, Upsampled, build_progan

NET = ProGANConfig(z_dim=8, resolution=16, fmap_base=64, fmap_max=16, fmap_min=8)


@pytest.fixture(scope="module")
def progan_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "progan"
    cfg = ProGANTrainConfig(steps=8, batch_size=8, n_images=32, stable_images=16, fade_images=16,
                            sample_every=100, checkpoint_every=100, threads=2, network=NET)
    train_progan(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def progan_repo(progan_run, tmp_path_factory):
    from ganforge.export.triton import export_generator

    repository = tmp_path_factory.mktemp("repo") / "model_repository"
    summary = export_generator(progan_run, repository, name="tinypro", max_batch_size=8,
                               log=lambda m: None)
    return repository, summary


@pytest.fixture(scope="module")
def progan_server(progan_repo):
    from ganforge.serving.server import LocalServer, ServerOptions, free_port

    repository, _ = progan_repo
    srv = LocalServer(ServerOptions(model_repository=repository, grpc_port=free_port(),
                                    http_port=free_port(), metrics_port=free_port(),
                                    exit_timeout_s=5)).start()
    yield srv
    srv.stop()


def test_progan_onnx_matches_torch_within_one_grey_level(progan_run, progan_repo):
    repository, summary = progan_repo
    assert summary["parity"]["max_abs_diff"] <= 1
    payload = load_checkpoint(progan_run)
    assert payload["kind"] == "progan" and payload["stage"] == 2
    G, _ = build_progan(payload)
    z = np.random.default_rng(5).standard_normal((6, NET.z_dim)).astype(np.float32)
    with torch.no_grad():
        ref = to_uint8(Upsampled(G)(torch.from_numpy(z)))
    got = ort.InferenceSession(str(repository / "tinypro_generator/1/model.onnx")).run(
        ["image"], {"latent": z})[0]
    assert got.dtype == np.uint8 and got.shape == (6, 16, 16, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert got.std() > 0


def test_progan_manifest_records_stage_and_alpha(progan_repo):
    import json

    repository, _ = progan_repo
    manifest = json.loads((repository / "tinypro_generator" / "manifest.json").read_text())
    assert manifest["kind"] == "progan" and manifest["stage"] == 2 and "alpha" in manifest
    # the command that trains the same weights again, every option explicit
    command = manifest["train_command"]
    assert command.startswith("ganforge train progan ") and "--stable-images 16 --fade-images 16" in command
    assert "--fmap-base 64 --fmap-max 16 --fmap-min 8" in command


def test_served_progan_by_seed_is_deterministic_and_matches_onnx(progan_server, progan_repo):
    from ganforge.serving.client import Client

    repository, _ = progan_repo
    with Client(progan_server.grpc_url, timeout=30) as c:
        a = c.generate("tinypro", seed=7, count=3)
        b = c.generate("tinypro", seed=7, count=3)
        other = c.generate("tinypro", seed=8, count=3)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)
    sess = ort.InferenceSession(str(repository / "tinypro_generator/1/model.onnx"))
    local = sess.run(["image"], {"latent": sample_latents(7, 3, NET.z_dim)})[0]
    assert np.abs(a.astype(int) - local.astype(int)).max() <= 1
