"""Progressive GAN: fade-in, growth, equalized LR, pixel norm, minibatch stddev, resume, the
command line, 2 ranks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ganforge.training.gan import load_checkpoint
from ganforge.training.progan import ProGANTrainConfig, ProGANTrainer, schedule, stage_birth, train_progan
from ganforge.training.progan_nets import (Discriminator, EqualizedConv2d, EqualizedLinear, Generator,
                                           MinibatchStd, PixelNorm, ProGANConfig, build_progan)
from tests.conftest import run_cli

TINY = ProGANConfig(z_dim=8, resolution=16, fmap_base=64, fmap_max=16, fmap_min=8)


def tiny_train(**kw) -> ProGANTrainConfig:
    base = dict(steps=12, batch_size=8, n_images=32, stable_images=24, fade_images=32, r1_every=4,
                sample_every=100, log_every=1, checkpoint_every=100, threads=2, device="cpu", network=TINY)
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
    trainer.task.before_step(trainer.step, trainer.engine)   # 3 x 8 = 24 images shown: stage 1
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


def test_g_ema_moves_towards_g_by_the_half_life_ramped_up_from_each_blocks_birth(tmp_path):
    cfg = tiny_train(ema_images=64, ema_rampup=0.5)      # stages born at 0, 24 and 80 images
    assert [stage_birth(k, cfg.stable_images, cfg.fade_images) for k in range(3)] == [0, 24, 80]
    trainer = ProGANTrainer(cfg, tmp_path).task
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


def test_train_cli_as_typed_writes_a_run_and_a_larger_steps_continues_it(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "progan", "--resolution", "8", "--fmap-max", "0", "--out", str(out))
    assert r.returncode == 2 and "fmap_max must be >= 1, got 0" in r.stderr
    args = ["train", "progan", "--data", "shapes", "--resolution", "8", "--batch-size", "4", "--n-images", "16",
            "--stable-images", "4", "--fade-images", "4", "--z-dim", "8", "--fmap-base", "64", "--fmap-max", "12",
            "--fmap-min", "4", "--d-fmap-min", "10", "--device", "cpu", "--out", str(out), "--quiet"]
    r = run_cli(*args, "--steps", "2", "--resume")          # nothing to resume: a new run
    assert r.returncode == 0, r.stderr
    assert f"--resume: no checkpoint in {out}; starting a new run" in r.stderr
    r = run_cli(*args, "--steps", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert "grown to stage 1, 8 px, alpha 1.00; resumed from step 2" in r.stdout
    assert "doctor (report): diagnoses" in r.stdout
    for name in ("checkpoint.pt", "samples.png", "train.json", "metrics.jsonl", "doctor.md", "scores.png"):
        assert (out / name).is_file(), name
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "train.json").read_text())["steps"] == 3

    ckpt = load_checkpoint(out)
    assert (ckpt["kind"], ckpt["step"], ckpt["shown"], ckpt["stage"], ckpt["alpha"]) == ("progan", 3, 12, 1, 1.0)
    net = ckpt["config"]
    assert (net["fmap_base"], net["fmap_max"], net["fmap_min"], net["d_fmap_min"]) == (64, 12, 4, 10)
    # 12 maps at 4 px (64 / 4 = 16, capped), 8 at 8 px: the widths reached the layers
    assert {v.shape[0] for k, v in ckpt["state"]["G"].items() if k.endswith("weight") and v.ndim == 4} >= {12, 8}
    # D's own minimum reached D alone: 10 maps out of its 8 px fromRGB, where G's toRGB reads 8
    assert ckpt["state"]["D"]["from_rgb.1.weight"].shape[0] == 10
    assert ckpt["state"]["G"]["to_rgb.1.weight"].shape[1] == 8


def parsed_back(model: str, cls, command: str):
    """The config a recorded `ganforge train` command gives when typed again."""
    import shlex

    from ganforge.cli import parse_train_args
    from ganforge.training import options

    ns = vars(parse_train_args(shlex.split(command)[1:]))
    return options.config_from(cls, model, overrides=options.typed_values(cls, ns))


def test_reproduction_commands_carry_the_weight_average_and_the_widths():
    """The train command recorded in a manifest names every setting that changes the weights:
    parsed back by the CLI it gives the run's ProGAN half-life and widths."""
    import dataclasses

    from ganforge.training.options import train_command

    progan = ProGANTrainConfig(ema_images=2500, stable_images=6400, network=ProGANConfig(
        resolution=8, fmap_base=256, fmap_max=32, fmap_min=8, d_fmap_min=16))
    command = train_command("progan", dataclasses.asdict(progan), "runs/p")
    assert "--ema-images 2500 " in command and "--d-fmap-min 16 " in command and command.endswith("--out runs/p")
    assert parsed_back("progan", ProGANTrainConfig, command) == progan
    # a run recorded before some options existed: those are left out, the rest still parses
    old = {k: v for k, v in dataclasses.asdict(progan).items() if k not in ("lr_schedule", "grad_clip", "sync_bn")}
    old["network"] = {k: v for k, v in old["network"].items() if k != "mbstd_group"}
    assert parsed_back("progan", ProGANTrainConfig, train_command("progan", old, "runs/p")) == progan


def test_reproduction_commands_carry_the_thin_plate_steps():
    """... and the inpainter's prefill and CG steps."""
    import dataclasses

    from ganforge.training.inpainting import ContextEncoderConfig, InpaintTrainConfig
    from ganforge.training.options import train_command

    inpainter = InpaintTrainConfig(network=ContextEncoderConfig(prefill=True, fill="cascade", thinplate=50))
    command = train_command("inpainter", dataclasses.asdict(inpainter), "runs/i")
    assert parsed_back("inpainter", InpaintTrainConfig, command) == inpainter
    blend = InpaintTrainConfig(pool=2048, network=ContextEncoderConfig(prefill=True, fill="cascade", thinplate=50,
                                                                    head="blend", blend_thinplate=120))
    command = train_command("inpainter", dataclasses.asdict(blend), "runs/b")
    assert "--head blend " in command and "--blend-thinplate 120 " in command and "--pool 2048 " in command
    assert parsed_back("inpainter", InpaintTrainConfig, command) == blend
    # a run recorded before the engine (its own clip, no doctor options): what it has, it keeps
    old = {k: v for k, v in dataclasses.asdict(blend).items()
           if k not in ("doctor", "thresholds", "grad_clip", "lr_schedule", "sync_bn", "sample_every",
                        "checkpoint_every", "device", "precision", "workers")}
    old["clip"] = 1.0
    assert parsed_back("inpainter", InpaintTrainConfig, train_command("inpainter", old, "runs/b")) == blend


def test_a_discriminator_minimum_widens_only_the_discriminator_at_the_top_sides():
    cfg = ProGANConfig(z_dim=8, resolution=64, fmap_base=512, fmap_max=64, fmap_min=16, d_fmap_min=32)
    assert [cfg.nf(k) for k in range(cfg.n_stages)] == [64, 64, 32, 16, 16]
    assert [cfg.d_nf(k) for k in range(cfg.n_stages)] == [64, 64, 32, 32, 32]
    assert [ProGANConfig(fmap_base=512).d_nf(k) for k in range(5)] == [64, 64, 32, 16, 16]  # 0: G's
    D = Discriminator(cfg)
    assert D.from_rgb[4].weight.shape[0] == 32 and D(torch.zeros(4, 3, 64, 64)).shape == (4,)
    with pytest.raises(ValueError, match="d_fmap_min must be >= 0"):
        ProGANConfig(d_fmap_min=-1)


def test_train_help_shows_only_progan_options_and_another_models_option_is_refused(tmp_path):
    r = run_cli("train", "progan", "--help")
    assert r.returncode == 0
    for flag in ("--stable-images", "--fade-images", "--ema-images", "--fmap-base", "--d-fmap-min", "--doctor",
                 "--preset {bench,default,shipped}"):
        assert flag in r.stdout, flag
    for flag in ("--ngf", "--patch", "--lr-g", "--channels"):
        assert flag not in r.stdout, flag
    r = run_cli("train", "progan", "--ngf", "8", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr == "Error: unrecognized arguments: --ngf 8\n"
    assert not (tmp_path / "x").exists()


def test_presets_build_valid_configs():
    from ganforge.training import options

    shipped = options.config_from(ProGANTrainConfig, "progan", "shipped")
    assert (shipped.steps, shipped.stable_images, shipped.network.fmap_base, shipped.network.fmap_min) == (
        10000, 6400, 256, 8)
    bench = options.config_from(ProGANTrainConfig, "progan", "bench")
    assert (bench.lr, bench.network.d_fmap_min, bench.lr_schedule) == (3e-3, 32, "linear-decay")
    assert options.config_from(ProGANTrainConfig, "progan", "default") == ProGANTrainConfig()


def test_two_gloo_ranks_follow_one_process_through_a_fade_in(tmp_path):
    """Data order, noise, R1, the schedule and G_ema do not depend on the number of ranks. The
    minibatch standard deviation is taken over each rank's own slice of the batch (as each GPU's
    in the paper's code), so it is set to groups of 1 here, where the slices of 2 ranks would
    otherwise group other images than one process does."""
    from tests.training.test_engine import TOLERANCE, max_diff, run_ranks

    run = {"steps": 6, "batch_size": 8, "n_images": 32, "stable_images": 16, "fade_images": 16, "r1_every": 2,
           "instance_noise": 0.1, "doctor_every": 2, "log_every": 1, "sample_every": 100, "device": "cpu",
           "network": {"z_dim": 8, "resolution": 8, "fmap_base": 64, "fmap_max": 16, "fmap_min": 8,
                       "mbstd_group": 1}}
    from ganforge.training import options

    one = train_progan(options.config_from(ProGANTrainConfig, "progan", overrides=run), tmp_path / "one",
                       progress=False)
    two = run_ranks(2, "progan", tmp_path / "two", run)
    assert max_diff(two[0]["state"], two[1]["state"]) == 0.0
    state = load_checkpoint(tmp_path / "one")["state"]
    assert set(state) == {"G", "D", "G_ema"}
    assert max_diff(state, two[0]["state"]) < TOLERANCE
    assert one["stage"] == two[0]["summary"]["stage"] == 1
    stages = [json.loads(line)["stage"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert stages == [0, 0, 1, 1, 1, 1]
