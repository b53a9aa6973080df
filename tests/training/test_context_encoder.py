"""The context encoder (training/context_encoder.py): its loss, a short run, the CLI, the export
and two ranks. Each test runs in seconds on a CPU: tiny networks, 32 px tiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ganforge.training.context_encoder import (ContextEncoderTrainConfig, Critic, HoledImages,
                                               UNet, UNetConfig, completed, hole, train_context_encoder)

ROOT = Path(__file__).resolve().parents[2]
TINY = UNetConfig(width=8, depth=3, dilations=(1, 2), d_width=8)


def tiny(**kw) -> ContextEncoderTrainConfig:
    base = dict(steps=2, batch_size=4, tile=32, n_images=64, threads=1, doctor="off", log_every=1,
                network=TINY)
    return ContextEncoderTrainConfig(**{**base, **kw})


def _ganforge(*args: str):
    return subprocess.run([sys.executable, "-m", "ganforge", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def _batch(n: int = 4, t: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, t, t, generator=g) * 2 - 1
    m = torch.zeros(n, 1, t, t)
    m[..., t // 4: 3 * t // 4, t // 4: 3 * t // 4] = 1
    return x, m


def test_the_adversarial_term_sends_a_gradient_to_the_generator():
    torch.manual_seed(0)
    G, D = UNet(TINY), Critic(TINY)
    x, m = _batch()
    d_gen = D(completed(x, G(x * (1 - m), m), m))
    l_adv = torch.nn.functional.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
    l_adv.backward()
    grads = [p.grad.abs().sum().item() for p in G.parameters() if p.grad is not None]
    assert len(grads) == len(list(G.parameters())) and sum(grads) > 0


def test_the_reconstruction_loss_ignores_the_pixels_outside_the_hole():
    from ganforge.training.autoencoders import masked_mse

    x, m = _batch()
    pred = torch.zeros_like(x)
    other = torch.where(m.bool().expand_as(x), x, -x + 0.3)     # the same hole, another surrounding
    assert masked_mse(pred, x, m).item() == masked_mse(pred, other, m).item()
    changed_hole = torch.where(m.bool().expand_as(x), x + 0.1, x)
    assert masked_mse(pred, changed_hole, m).item() != masked_mse(pred, x, m).item()


@pytest.mark.parametrize("lambda_adv", [0.0, 0.001])
def test_the_loss_over_the_hole_falls_over_a_short_run(tmp_path, lambda_adv):
    """Hole MSE on held-out shapes with fixed holes: the trained F against the same F untrained."""
    from ganforge import masks as maskgen
    from ganforge.training import datasets
    from ganforge.training.autoencoders import masked_mse
    from ganforge.training.gan import load_checkpoint
    from ganforge.training.gan_task import to_tensor

    cfg = tiny(steps=40, lr=3e-3, lambda_adv=lambda_adv, log_every=10, holes="centre")
    summary = train_context_encoder(cfg, tmp_path / "run", progress=False)
    torch.manual_seed(cfg.seed)
    untrained = UNet(TINY)                                              # the run's initial weights
    trained = UNet(TINY)
    trained.load_state_dict(load_checkpoint(tmp_path / "run", ("context-encoder",))["state"]["net"])
    x = to_tensor(datasets.shapes(32, 32, seed=99).images)
    m = torch.from_numpy(maskgen.centre(32, 32, 0.3)).float().div(255).expand(32, 1, 32, 32)
    with torch.no_grad():
        before, after = (masked_mse(net(x * (1 - m), m), x, m).item() for net in (untrained, trained))
    assert after < 0.6 * before, (before, after)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 40 and all(r["l_adv"] > 0 for r in rows)     # D's verdict is measured either way


def test_holes_are_drawn_per_item_and_cover_the_shares_asked_for():
    from ganforge.training import data as tdata

    rng = np.random.default_rng(0)
    centre = [(hole(64, "centre", rng) > 0).mean() for _ in range(50)]
    assert 0.19 <= min(centre) and max(centre) <= 0.41
    random = [(hole(64, "random", rng) > 0).mean() for _ in range(50)]
    assert 0.19 <= min(random) and np.mean(random) < 0.35
    images = tdata.gan_images("shapes", 8, 32, 0)
    items = HoledImages(images, 32, "mixed", seed=3)
    a, b = items[(2, 0)][0], items[(2, 0)][0]
    assert a.shape == (32, 32, 4) and np.array_equal(a, b)             # same item, same hole
    others = [items[(2, epoch)][0][..., 3] for epoch in range(1, 4)] + [items[(i, 0)][0][..., 3] for i in range(3, 6)]
    assert not all(np.array_equal(o, a[..., 3]) for o in others)       # another epoch or item, another hole


def test_ganforge_train_context_encoder_as_typed_writes_a_run_directory(tmp_path):
    from ganforge.training.gan import load_checkpoint
    from ganforge.training.options import train_command

    out = tmp_path / "run"
    r = _ganforge("train", "context-encoder", "--steps", "2", "--batch-size", "4", "--tile", "32", "--n-images", "16",
                  "--width", "8", "--d-width", "8", "--dilations", "1,2", "--holes", "random", "--lambda-adv", "0.01",
                  "--doctor", "report", "--doctor-every", "2", "--threads", "1", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("trained 2 steps in ")
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "train.json", "metrics.jsonl", "samples.png",
                                               "samples", "doctor.md", "scores.png"}
    payload = load_checkpoint(out, ("context-encoder",))
    assert payload["kind"] == "context-encoder" and set(payload["state"]) == {"net", "D"}
    assert payload["config"]["dilations"] == (1, 2) and payload["train"]["holes"] == "random"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"l_rec", "l_adv", "loss_D", "hole_psnr", "s_G", "s_D"} <= set(rows[-1])
    command = train_command("context-encoder", payload["train"], out)
    assert "--lambda-adv 0.01" in command and "--dilations 1,2" in command and "--holes random" in command


def test_ganforge_train_context_encoder_lists_its_own_options_and_refuses_others(tmp_path):
    r = _ganforge("train", "context-encoder", "--help")
    assert r.returncode == 0
    for flag in ("--lambda-rec", "--lambda-adv", "--holes", "--tile", "--width", "--depth", "--dilations",
                 "--d-width", "--doctor", "--doctor-every", "--data", "--n-images", "--lr-d"):
        assert f"  {flag} " in r.stdout or f"  {flag}," in r.stdout, flag
    for other in ("--prefill", "--head", "--patch", "--ngf", "--lambda-l1", "--blend-validate"):
        assert other not in r.stdout, other
    r = _ganforge("train", "context-encoder", "--prefill", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr == "Error: unrecognized arguments: --prefill\n"
    r = _ganforge("train", "context-encoder", "--holes", "edge", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr == ("Error: argument --holes: invalid choice: 'edge' (choose from 'centre', "
                                              "'random', 'mixed')\n")
    r = _ganforge("train", "context-encoder", "--tile", "36", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr == "Error: --tile: 36 is not allowed with --depth 3; must be a multiple of 8\n"


def test_the_presets_load_and_the_default_is_the_defaults():
    from ganforge.training import options

    assert options.config_from(ContextEncoderTrainConfig, "context-encoder", "default") == ContextEncoderTrainConfig()
    shapes = options.config_from(ContextEncoderTrainConfig, "context-encoder", "shapes")
    assert (shapes.data, shapes.holes, shapes.tile, shapes.lambda_rec, shapes.lambda_adv) == ("shapes", "centre", 64,
                                                                                             0.999, 0.001)
    assert options.config_from(ContextEncoderTrainConfig, "context-encoder", "photos").data == "photos"


def test_export_matches_torch_within_a_grey_level_and_keeps_the_known_pixels(tmp_path):
    import onnxruntime as ort

    from ganforge.export.image import UInt8Inpaint
    from ganforge.export.triton import export_run
    from ganforge.training.gan import load_checkpoint

    train_context_encoder(tiny(steps=3), tmp_path / "run", progress=False)
    summary = export_run(tmp_path / "run", tmp_path / "repo", tile=32, log=lambda *a: None)
    assert summary["model"] == "context_encoder_shapes" and summary["parity"]["max_abs_diff"] <= 1
    sess = ort.InferenceSession(summary["onnx"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "mask"] and sess.get_outputs()[0].name == "inpainted"
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mask = np.zeros((3, 32, 32, 1), np.uint8)
    mask[:, 8:24, 6:26] = 255
    got = sess.run(["inpainted"], {"image": image, "mask": mask})[0]
    known = np.broadcast_to(mask == 0, got.shape)
    assert np.array_equal(got[known], image[known])                     # byte for byte outside the hole
    payload = load_checkpoint(tmp_path / "run", ("context-encoder",))
    net = UNet(UNetConfig(**payload["config"]))
    net.load_state_dict(payload["state"]["net"])
    with torch.no_grad():
        ref = UInt8Inpaint(net.eval())(torch.from_numpy(image), torch.from_numpy(mask)).numpy()
    assert np.abs(ref.astype(int) - got.astype(int)).max() <= 1
    assert not np.array_equal(got[~known], image[~known])              # the hole is painted


def test_two_gloo_ranks_train_as_one_process_does(tmp_path):
    from tests.training.test_engine import TOLERANCE, max_diff, run_ranks

    cfg = {"steps": 3, "batch_size": 4, "tile": 32, "n_images": 16, "log_every": 1, "doctor_every": 2,
           "checkpoint_every": 100, "instance_noise": 0.1,
           "network": {"width": 8, "depth": 3, "dilations": [1, 2], "d_width": 8}}
    one = run_ranks(1, "context-encoder", tmp_path / "one" / "run", cfg)[0]
    two = run_ranks(2, "context-encoder", tmp_path / "two" / "run", cfg)
    assert max_diff(two[0]["state"], two[1]["state"]) == 0
    assert max_diff(one["state"], two[0]["state"]) < TOLERANCE
    assert one["summary"]["l_rec"] == pytest.approx(two[0]["summary"]["l_rec"], abs=1e-5)
