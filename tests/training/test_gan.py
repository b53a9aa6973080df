import json

import numpy as np
import pytest
import torch

from ganforge.errors import CheckpointError
from ganforge.training.gan import (DCGANConfig, Discriminator, Generator, build_dcgan,
                                   load_checkpoint, save_checkpoint)


@pytest.mark.parametrize("resolution", [32, 64])
def test_generator_and_discriminator_shapes(resolution):
    cfg = DCGANConfig(z_dim=8, ngf=4, ndf=4, resolution=resolution)
    z = torch.randn(3, 8)
    x = Generator(cfg)(z)
    assert x.shape == (3, 3, resolution, resolution)
    assert float(x.abs().max()) <= 1.0
    assert Discriminator(cfg)(x).shape == (3,)


@pytest.mark.parametrize("kwargs, message", [
    ({"resolution": 48}, "power of two"),
    ({"z_dim": 0}, "z_dim must be >= 1"),
    ({"d_dropout": 1.0}, "d_dropout must be in"),
])
def test_bad_network_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DCGANConfig(**kwargs)


def test_checkpoint_round_trip_restores_identical_outputs(tmp_path):
    cfg = DCGANConfig(z_dim=8, ngf=4, ndf=4, resolution=32)
    torch.manual_seed(0)
    G, D = Generator(cfg).eval(), Discriminator(cfg).eval()
    path = save_checkpoint(tmp_path / "c.pt", "dcgan", cfg, {"G": G, "D": D}, step=7, data="shapes")
    payload = load_checkpoint(path)
    assert payload["config"] == {"z_dim": 8, "ngf": 4, "ndf": 4, "resolution": 32, "channels": 3,
                                 "d_dropout": 0.0, "mbstd": False}
    G2, D2 = build_dcgan(payload)
    z = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(G(z), G2(z))
        assert torch.equal(D(G(z)), D2(G(z)))
    assert payload["step"] == 7


def test_files_that_are_not_ganforge_checkpoints_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt is not a ganforge checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no 'ganforge-checkpoint' format marker"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def test_training_writes_checkpoint_metrics_and_sample_grids(tiny_run):
    assert (tiny_run / "checkpoint.pt").is_file()
    lines = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4, 6]
    assert all(np.isfinite(l["loss_D"]) and np.isfinite(l["loss_G"]) for l in lines)
    assert sorted(p.name for p in (tiny_run / "samples").iterdir()) == ["step_000003.png",
                                                                        "step_000006.png"]
    assert load_checkpoint(tiny_run)["step"] == 6
