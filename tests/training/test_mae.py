"""The masked autoencoder (training/mae.py) and the context encoder started from it
(`--init-from`): its loss, its masks, a short run, the options' errors, the hand-over of the
weights. Each test runs in seconds on a CPU: tiny networks, 32 px tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ganforge.cli import main
from ganforge.training import data as tdata
from ganforge.training.context_encoder import ContextEncoderTask, ContextEncoderTrainConfig, UNet, UNetConfig
from ganforge.training.engine import Engine
from ganforge.training.gan import load_checkpoint
from ganforge.training.mae import (MAETrainConfig, MAEUNetConfig, MaskedPatches, mae_loss, patch_mask,
                                   train_mae)

TINY = dict(width=8, depth=3, dilations=(1, 2))


def tiny(**kw) -> MAETrainConfig:
    base = dict(steps=2, batch_size=4, tile=32, patch=4, n_images=16, threads=1, log_every=1,
                network=MAEUNetConfig(**TINY))
    return MAETrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    """A 3-step masked autoencoder run: (its directory, its summary)."""
    out = tmp_path_factory.mktemp("mae") / "run"
    return out, train_mae(tiny(steps=3, sample_every=2), out, progress=False)


def test_the_loss_ignores_what_the_network_answers_on_visible_patches():
    rng = np.random.default_rng(0)
    m = torch.from_numpy(np.stack([patch_mask(32, 4, 0.75, rng) for _ in range(4)])).float().div(255)[:, None]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    pred = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    other = torch.where(m.bool().expand_as(pred), pred, torch.rand(4, 3, 32, 32, generator=g) * 2 - 1)
    assert not torch.equal(other, pred)
    assert mae_loss(other, x, m).item() == mae_loss(pred, x, m).item()     # visible patches: no say
    hidden_changed = torch.where(m.bool().expand_as(pred), pred + 0.1, pred)
    assert mae_loss(hidden_changed, x, m).item() != mae_loss(pred, x, m).item()


@pytest.mark.parametrize("ratio, patch", [(0.75, 4), (0.5, 8), (0.25, 2)])
def test_every_mask_hides_the_share_of_patches_asked_for_whole_patches_at_a_time(ratio, patch):
    rng = np.random.default_rng(1)
    side = 32 // patch
    for _ in range(20):
        m = patch_mask(32, patch, ratio, rng)
        cells = m.reshape(side, patch, side, patch).transpose(0, 2, 1, 3).reshape(side * side, -1)
        assert ((cells == 0) | (cells == 255)).all() and (cells.min(1) == cells.max(1)).all()   # whole patches
        assert (cells[:, 0] > 0).mean() == ratio


def test_patches_are_drawn_per_item_and_epoch():
    items = MaskedPatches(tdata.gan_images("shapes", 8, 32, 0), 32, 4, 0.75, seed=3)
    a, b = items[(2, 0)][0], items[(2, 0)][0]
    assert a.shape == (32, 32, 4) and np.array_equal(a, b)
    assert not np.array_equal(items[(2, 1)][0][..., 3], a[..., 3])
    assert not np.array_equal(items[(3, 0)][0][..., 3], a[..., 3])


def test_a_short_run_writes_a_checkpoint_with_the_context_encoders_network_and_samples(mae_run):
    out, summary = mae_run
    assert summary["steps"] == 3 and {p.name for p in out.iterdir()} >= {
        "checkpoint.pt", "train.json", "metrics.jsonl", "samples.png", "summary.json"}
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000002.png", "step_000003.png"]
    payload = load_checkpoint(out, ("mae",))
    assert set(payload["state"]) == {"net"} and set(payload["config"]) == {"width", "depth", "dilations", "d_width"}
    UNet(UNetConfig(**payload["config"])).load_state_dict(payload["state"]["net"])     # the context encoder's F
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--patch", "5"], "--patch: 5 is not allowed with --tile 32; the tile must divide by it"),
    (["--mask-ratio", "0.005"], "--mask-ratio: 0.005 is not allowed with 64 patches of --patch 4 px; must hide at "
                               "least one patch and leave one visible"),
    (["--mask-ratio", "1"], "--mask-ratio: 1.0 is not allowed; must be < 1"),
])
def test_bad_options_are_one_error_line_naming_the_flag_and_exit_2(tmp_path, capsys, args, message):
    code = main(["train", "mae", "--tile", "32", "--patch", "4", *args, "--out", str(tmp_path / "r")])
    assert code == 2 and capsys.readouterr().err == f"Error: {message}\n"


def _context_encoder(**kw) -> ContextEncoderTrainConfig:
    return ContextEncoderTrainConfig(**{**dict(steps=1, batch_size=4, tile=32, n_images=16, threads=1,
                                               doctor="off", network=UNetConfig(**TINY, d_width=8)), **kw})


def test_init_from_starts_the_context_encoders_generator_with_the_maes_weights(mae_run, tmp_path):
    out, _ = mae_run
    mae = load_checkpoint(out, ("mae",))["state"]["net"]
    cfg = _context_encoder(init_from=str(out))
    task = ContextEncoderTask(cfg, progress=False)
    Engine(cfg, tmp_path / "ce", progress=False).start(task)                   # set up, before step 0
    got = task.G.state_dict()
    assert set(got) == set(mae) and all(torch.equal(got[k], mae[k]) for k in mae)
    scratch = ContextEncoderTask(_context_encoder(), progress=False)
    Engine(scratch.cfg, tmp_path / "scratch", progress=False).start(scratch)
    assert not torch.equal(scratch.G.state_dict()["stem.0.weight"], mae["stem.0.weight"])
    assert all(torch.equal(a, b) for a, b in zip(task.D.state_dict().values(), scratch.D.state_dict().values()))


def test_init_from_is_recorded_in_the_checkpoint_and_the_summary(mae_run, tmp_path):
    from ganforge.training.context_encoder import train_context_encoder

    out, _ = mae_run
    summary = train_context_encoder(_context_encoder(init_from=str(out)), tmp_path / "ce", progress=False)
    assert summary["init_from"] == str(out)
    assert load_checkpoint(tmp_path / "ce", ("context-encoder",))["train"]["init_from"] == str(out)


def test_init_from_a_network_of_another_shape_is_refused_naming_the_flag_and_the_fields(mae_run, tmp_path, capsys):
    out, _ = mae_run
    code = main(["train", "context-encoder", "--init-from", str(out), "--tile", "32", "--width", "8",
                 "--dilations", "1,2", "--depth", "4", "--out", str(tmp_path / "r")])
    assert code == 2 and capsys.readouterr().err == (
        f"Error: --init-from: {out} holds a U-Net with depth 3; this context encoder has depth 4; give the same "
        f"--depth\n")
    code = main(["train", "context-encoder", "--init-from", str(tmp_path / "none"), "--out", str(tmp_path / "r")])
    assert code == 2 and capsys.readouterr().err.startswith("Error: --init-from: ")
