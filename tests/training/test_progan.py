"""Progressive GAN: fade-in, growth, equalized LR, pixel norm, minibatch stddev, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ganforge.training.gan import load_checkpoint
from ganforge.training.progan import (Discriminator, EqualizedConv2d, EqualizedLinear, Generator,
                                      MinibatchStd, PixelNorm, ProGANConfig, ProGANTrainConfig,
                                      ProGANTrainer, build_progan, schedule, stage_birth, train_progan)

TINY = ProGANConfig(z_dim=8, resolution=16, fmap_base=64, fmap_max=16, fmap_min=8)


def tiny_train(**kw) -> ProGANTrainConfig:
    base = dict(steps=12, batch_size=8, n_images=32, stable_images=24, fade_images=32, r1_every=4,
                sample_every=100, log_every=1, checkpoint_every=100, threads=2, network=TINY)
    return ProGANTrainConfig(**{**base, **kw})


def test_fade_in_at_alpha_0_is_the_upsampled_lower_stage_and_at_alpha_1_the_new_block():
    torch.manual_seed(0)
    G = Generator(TINY).eval()
    z = torch.randn(4, TINY.z_dim)
    with torch.no_grad():
        low = G(z, stage=1, alpha=1.0)                                  # (4, 3, 8, 8)
        faded0 = G(z, stage=2, alpha=0.0)
        faded1 = G(z, stage=2, alpha=1.0)
        new = G.to_rgb[2](G.blocks[2](G.blocks[1](G.blocks[0](z))))
        half = G(z, stage=2, alpha=0.5)
    assert low.shape == (4, 3, 8, 8) and faded0.shape == (4, 3, 16, 16)
    torch.testing.assert_close(faded0, F.interpolate(low, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(faded1, new)
    torch.testing.assert_close(half, 0.5 * (faded0 + faded1))
    assert not torch.allclose(faded0, faded1)


def test_d_fade_in_at_alpha_0_sees_the_downsampled_image_through_the_old_from_rgb():
    torch.manual_seed(0)
    D = Discriminator(TINY).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(D(x, stage=2, alpha=0.0), D(F.avg_pool2d(x, 2), stage=1, alpha=1.0))
        assert not torch.allclose(D(x, stage=2, alpha=1.0), D(x, stage=2, alpha=0.0))


def test_schedule_walks_stable_fade_stable_and_stays_on_the_last_stage():
    args = (3, 100, 50)  # 3 stages, 100 stable, 50 fade
    assert schedule(0, *args) == (0, 1.0)
    assert schedule(99, *args) == (0, 1.0)
    assert schedule(100, *args) == (1, 0.0)
    assert schedule(125, *args) == (1, 0.5)
    assert schedule(150, *args) == (1, 1.0)
    assert schedule(250, *args) == (2, 0.0)
    assert schedule(10_000, *args) == (2, 1.0)


def test_equalized_lr_scales_weights_by_he_constant_at_run_time():
    lin = EqualizedLinear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[1.0, 1.0, 1.0]])
    c = math.sqrt(2) / math.sqrt(3)
    torch.testing.assert_close(lin(x), torch.tensor([[6 * c + 0.5, 0 * c - 0.5]]))
    conv = EqualizedConv2d(2, 1, 3, gain=1.0)
    assert conv.scale == pytest.approx(1 / math.sqrt(18))
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    y = conv(torch.ones(1, 2, 3, 3))
    assert float(y[0, 0, 1, 1].detach()) == pytest.approx(18 / math.sqrt(18))   # centre sees all 18 taps
    assert float(y[0, 0, 0, 0].detach()) == pytest.approx(8 / math.sqrt(18))    # corner: 2 x 2 x 2 taps
    # the stored weights are N(0, 1): the scale lives in the forward pass, not the init
    big = EqualizedConv2d(64, 64, 3)
    assert float(big.weight.std()) == pytest.approx(1.0, abs=0.05)


def test_pixel_norm_divides_each_pixel_by_its_rms_over_channels():
    x = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    rms = math.sqrt((9 + 16) / 2)
    torch.testing.assert_close(PixelNorm(eps=0.0)(x), torch.tensor([3 / rms, 4 / rms]).view(1, 2, 1, 1))
    y = PixelNorm()(torch.randn(2, 5, 4, 4) * 7)
    torch.testing.assert_close(y.pow(2).mean(1), torch.ones(2, 4, 4), atol=1e-4, rtol=1e-4)


def test_minibatch_std_appends_the_group_std_averaged_over_features():
    x = torch.zeros(8, 2, 2, 2)
    x[:4, 0] = torch.tensor([0.0, 2.0, 0.0, 2.0]).view(4, 1, 1)  # group 0: samples 0..3
    out = MinibatchStd(group=4, eps=0.0)(x)
    assert out.shape == (8, 3, 2, 2)
    torch.testing.assert_close(out[:, :2], x)
    # groups are (b, b+2, b+4, b+6) over slot b % 2: slot 0 holds samples 0, 2, 4, 6 -> values
    # (0, 0, 0, 0) in channel 0; slot 1 holds 1, 3, 5, 7 -> (2, 2, 0, 0): std 1 in channel 0 and 0
    # in channel 1, averaged over 2 channels -> 0.5
    expect = torch.tensor([0.0, 0.5] * 4).view(8, 1, 1, 1).expand(8, 1, 2, 2)
    torch.testing.assert_close(out[:, 2:], expect)
    assert MinibatchStd(4)(torch.randn(6, 2, 4, 4)).shape == (6, 3, 4, 4)  # 6 % 4: groups of 3


def test_growing_keeps_the_trained_weights(tmp_path):
    trainer = ProGANTrainer(tiny_train(), tmp_path)
    for _ in range(3):
        trainer.train_step()
    assert trainer.stage == 0
    before = {k: v.clone() for k, v in trainer.G.state_dict().items()}
    z = torch.randn(4, TINY.z_dim)
    with torch.no_grad():
        low = trainer.G(z, stage=0, alpha=1.0)
    trainer._set_stage()                                  # 3 x 8 = 24 images shown: stage 1
    assert (trainer.stage, trainer.alpha) == (1, 0.0)
    for k, v in trainer.G.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)
    with torch.no_grad():
        grown = trainer.G(z)
    torch.testing.assert_close(grown, F.interpolate(low, scale_factor=2, mode="nearest"))
    assert before["blocks.0.conv1.weight"].abs().sum() > 0


def test_resume_mid_stage_continues_from_the_recorded_stage_and_alpha(tmp_path):
    full = tmp_path / "full"
    train_progan(tiny_train(steps=8), full, progress=False)
    cut = tmp_path / "cut"
    train_progan(tiny_train(steps=5), cut, progress=False)
    payload = load_checkpoint(cut, kinds=("progan",))
    assert (payload["stage"], payload["alpha"], payload["shown"]) == (1, 0.5, 40)   # mid fade-in
    G, _ = build_progan(payload)
    assert (G.stage, G.alpha) == (1, 0.5)
    summary = train_progan(tiny_train(steps=8), cut, resume=True, progress=False)
    assert summary["resumed_from"] == 5 and summary["steps"] == 8
    a, b = load_checkpoint(full), load_checkpoint(cut)
    assert (a["stage"], a["alpha"], a["shown"]) == (b["stage"], b["alpha"], b["shown"])
    for name in ("G", "G_ema"):                   # resumed run == uninterrupted run
        for k, v in a["state"][name].items():
            torch.testing.assert_close(b["state"][name][k], v, msg=f"{name}.{k}")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == list(range(1, 9))


def test_g_ema_moves_towards_g_by_the_half_life_ramped_up_from_each_blocks_birth():
    cfg = tiny_train(ema_images=64, ema_rampup=0.5)      # stages born at 0, 24 and 80 images
    assert [stage_birth(k, cfg.stable_images, cfg.fade_images) for k in range(3)] == [0, 24, 80]
    trainer = ProGANTrainer(cfg, ".")
    assert {id(p) for k in range(3) for m in (trainer.G.blocks[k], trainer.G.to_rgb[k])
            for p in m.parameters()} == {id(p) for p in trainer.G.parameters()}

    def per_stage(net):
        return [[p.detach().clone() for m in (net.blocks[k], net.to_rgb[k]) for p in m.parameters()]
                for k in range(3)]

    w = per_stage(trainer.G_ema)
    for p in trainer.G.parameters():                      # pretend a step moved G by +1
        p.data += 1.0
    trainer.shown = 40
    trainer.update_ema()
    # half-lives min(64, 0.5 * images since birth): stage 0 20 images, stage 1 8, stage 2 not
    # born yet (copied); batch 8
    betas = [0.5 ** (8 / 20), 0.5 ** (8 / 8), 0.0]
    for beta, old, new, g in zip(betas, w, per_stage(trainer.G_ema), per_stage(trainer.G)):
        for o, n, gg in zip(old, new, g):
            torch.testing.assert_close(n, beta * o + (1 - beta) * gg)
    trainer.shown = 10_000                                # ramp-up over: the 64-image half-life
    before = per_stage(trainer.G_ema)
    for p in trainer.G.parameters():
        p.data += 1.0
    trainer.update_ema()
    beta = 0.5 ** (8 / 64)
    for old, new, g in zip(before, per_stage(trainer.G_ema), per_stage(trainer.G)):
        for o, n, gg in zip(old, new, g):
            torch.testing.assert_close(n, beta * o + (1 - beta) * gg)


def test_samples_and_export_use_g_ema_and_ema_0_uses_g(tmp_path):
    train_progan(tiny_train(steps=6), tmp_path / "ema", progress=False)
    payload = load_checkpoint(tmp_path / "ema", kinds=("progan",))
    assert set(payload["state"]) == {"G", "D", "G_ema"}
    G, _ = build_progan(payload)
    trained = Generator(TINY)
    trained.load_state_dict(payload["state"]["G"])
    z = torch.randn(3, TINY.z_dim)
    with torch.no_grad():
        assert not torch.allclose(G(z), trained.eval()(z, stage=G.stage, alpha=G.alpha))
    for k, v in G.state_dict().items():
        torch.testing.assert_close(v, payload["state"]["G_ema"][k], msg=k)
    train_progan(tiny_train(steps=6, ema_images=0), tmp_path / "plain", progress=False)
    plain = load_checkpoint(tmp_path / "plain", kinds=("progan",))
    assert set(plain["state"]) == {"G", "D"}
    G, _ = build_progan(plain)
    for k, v in G.state_dict().items():
        torch.testing.assert_close(v, plain["state"]["G"][k], msg=k)


def test_train_cli_runs_and_resume_without_a_checkpoint_is_a_usage_error(tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "run"
    r = run_cli("train", "progan", "--resume", "--out", str(out), "--resolution", "8")
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli("train", "progan", "--resolution", "8", "--fmap-max", "0", "--out", str(out))
    assert r.returncode == 2 and "fmap_max must be >= 1, got 0" in r.stderr
    r = run_cli("train", "progan", "--data", "shapes", "--resolution", "8", "--steps", "3",
                "--batch-size", "4", "--n-images", "16", "--stable-images", "4",
                "--fade-images", "4", "--z-dim", "8", "--fmap-base", "64", "--fmap-max", "12",
                "--fmap-min", "4", "--d-fmap-min", "10", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "stage 1, 8 px" in r.stdout
    assert (out / "checkpoint.pt").is_file() and (out / "samples.png").is_file()
    from ganforge.training.gan import load_checkpoint

    ckpt = load_checkpoint(out)
    net = ckpt["config"]
    assert (net["fmap_base"], net["fmap_max"], net["fmap_min"], net["d_fmap_min"]) == (64, 12, 4, 10)
    # 12 maps at 4 px (64 / 4 = 16, capped), 8 at 8 px: the widths reached the layers
    assert {v.shape[0] for k, v in ckpt["state"]["G"].items() if k.endswith("weight") and v.ndim == 4} >= {12, 8}
    # D's own minimum reached D alone: 10 maps out of its 8 px fromRGB, where G's toRGB reads 8
    assert ckpt["state"]["D"]["from_rgb.1.weight"].shape[0] == 10
    assert ckpt["state"]["G"]["to_rgb.1.weight"].shape[1] == 8


def test_reproduction_commands_carry_the_weight_average_and_the_thin_plate_steps():
    """The train command recorded in a manifest names every setting that changes the weights:
    parsed back by the CLI it gives the run's ProGAN half-life and widths and the inpainter's
    CG steps."""
    import dataclasses
    import shlex

    from ganforge.cli import build_parser
    from ganforge.training.inpainting import ContextEncoderConfig, InpaintTrainConfig
    from ganforge.training.loop import train_command
    from ganforge.training.progan import ProGANConfig, ProGANTrainConfig

    progan = ProGANTrainConfig(ema_images=2500, network=ProGANConfig(resolution=8, fmap_base=256, fmap_max=32,
                                                                    fmap_min=8, d_fmap_min=16))
    args = build_parser().parse_args(shlex.split(train_command("progan", dataclasses.asdict(progan), "runs/p"))[1:])
    assert (args.ema_images, args.stable_images, args.resolution) == (2500, progan.stable_images, 8)
    assert (args.fmap_base, args.fmap_max, args.fmap_min, args.d_fmap_min) == (256, 32, 8, 16)
    plain = build_parser().parse_args(["train", "progan", "--out", "runs/p"])   # the CLI's defaults are the network's
    assert (plain.fmap_base, plain.fmap_max, plain.fmap_min, plain.d_fmap_min) == (
        ProGANConfig.fmap_base, ProGANConfig.fmap_max, ProGANConfig.fmap_min, ProGANConfig.d_fmap_min)
    old = {k: v for k, v in dataclasses.asdict(progan).items() if k != "ema_images"}  # a run from before
    assert "--ema-images 0 " in train_command("progan", old, "runs/p")

    inpainter = InpaintTrainConfig(network=ContextEncoderConfig(prefill=True, fill="cascade", thinplate=50))
    args = build_parser().parse_args(shlex.split(train_command("inpainter", dataclasses.asdict(inpainter), "runs/i"))[1:])
    assert (args.prefill, args.fill, args.thinplate) == (True, "cascade", 50)
    blend = InpaintTrainConfig(pool=2048, network=ContextEncoderConfig(prefill=True, fill="cascade", thinplate=50,
                                                                    head="blend", blend_thinplate=120))
    args = build_parser().parse_args(shlex.split(train_command("inpainter", dataclasses.asdict(blend), "runs/b"))[1:])
    assert (args.head, args.blend_thinplate, args.pool, args.thinplate) == ("blend", 120, 2048, 50)


def test_a_discriminator_minimum_widens_only_the_discriminator_at_the_top_sides():
    cfg = ProGANConfig(z_dim=8, resolution=64, fmap_base=512, fmap_max=64, fmap_min=16, d_fmap_min=32)
    assert [cfg.nf(k) for k in range(cfg.n_stages)] == [64, 64, 32, 16, 16]
    assert [cfg.d_nf(k) for k in range(cfg.n_stages)] == [64, 64, 32, 32, 32]
    assert [ProGANConfig(fmap_base=512).d_nf(k) for k in range(5)] == [64, 64, 32, 16, 16]  # 0: G's
    D = Discriminator(cfg)
    assert D.from_rgb[4].weight.shape[0] == 32 and D(torch.zeros(4, 3, 64, 64)).shape == (4,)
    with pytest.raises(ValueError, match="d_fmap_min must be >= 0"):
        ProGANConfig(d_fmap_min=-1)
