"""`ganforge bench progan` end to end at a tiny size: both arms train in turn against one clock,
the JSON holds the fields the comparison is read from, and the ProGAN's widths are flags."""

import json

import torch

from ganforge.benchmarks.progan import Arm, first_time_at_or_below, lr_factor, speedup
from tests.conftest import run_cli


def test_bench_progan_tiny_run_writes_both_curves_and_records_the_widths(tmp_path, shapes_cache):
    out = tmp_path / "progan.json"
    r = run_cli("bench", "progan", "--resolution", "8", "--seconds", "2", "--eval-every", "1",
                "--slice", "0.5", "--n-fd", "64", "--n-images", "64", "--batch-size", "8",
                "--phase-images", "16", "--lr", "0.002", "--decay-from", "0.25", "--fmap-base", "64", "--fmap-max", "16", "--fmap-min", "4",
                "--d-fmap-min", "8",
                "--cache-dir", str(shapes_cache), "--json", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for arm in ("dcgan", "progan"):
        seconds = res[arm]["seconds"]
        # at 0 s, then after each second of the arm's training (a step can outlast a second on a
        # loaded host, which skips a mark), and at the end: at least the first and the last
        assert len(seconds) == len(res[arm]["fd"]) >= 2 and seconds[0] == 0.0, arm
        assert all(b - a >= 1.0 for a, b in zip(seconds[:-2], seconds[1:-1])), (arm, seconds)
        assert seconds == sorted(seconds) and seconds[-1] >= 2.0 and res[arm]["steps"] > 0, arm
    assert res["dcgan_final_fd"] == res["dcgan"]["fd"][-1]
    assert "speedup_to_dcgan_final" in res and res["progan"]["final_stage_side"] == 8
    s = res["settings"]
    assert (s["fmap_base"], s["fmap_max"], s["fmap_min"], s["d_fmap_min"]) == (64, 16, 4, 8)
    assert (s["lr"], s["dcgan_lr"], s["decay_from"]) == (0.002, 2e-4, 0.25)
    assert res["progan"]["adam_lr"] == {"G": 0.002, "D": 0.002}
    assert res["dcgan"]["adam_lr"] == {"G": 2e-4, "D": 2e-4}
    for arm in ("dcgan", "progan"):      # both arms evaluate their weight average
        assert res[arm]["evaluated"] == "G_ema (half-life 10000 images)", arm
    m3 = res["median_of_3"]
    assert set(m3) == {"dcgan_final_fd", "seconds_to_dcgan_final", "speedup_to_dcgan_final"}
    assert min(res["dcgan"]["fd"][-3:]) <= m3["dcgan_final_fd"] <= max(res["dcgan"]["fd"][-3:])
    assert set(res["classifier_accuracy"]) == {"shape", "outline", "colour", "both"}
    assert (tmp_path / "progan.png").stat().st_size > 0


def test_bench_progan_refuses_a_bad_width_before_training(tmp_path):
    r = run_cli("bench", "progan", "--fmap-base", "0", "--json", str(tmp_path / "x.json"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "Error: --fmap-base: must be >= 1, got 0"
    assert not (tmp_path / "x.json").exists()


def test_bench_progan_refuses_a_bad_learning_rate_before_training(tmp_path):
    for flag in ("--lr", "--dcgan-lr"):
        r = run_cli("bench", "progan", flag, "-0.001", "--json", str(tmp_path / "x.json"))
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1] == f"Error: {flag}: -0.001 is not allowed; must be > 0"
    assert not (tmp_path / "x.json").exists()


def test_bench_progan_refuses_a_decay_start_outside_the_budget(tmp_path):
    r = run_cli("bench", "progan", "--decay-from", "1.5", "--json", str(tmp_path / "x.json"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "Error: --decay-from: 1.5 is not allowed; must be in [0, 1]"
    assert not (tmp_path / "x.json").exists()


def test_budgeted_linear_decay_holds_then_falls_to_zero_at_the_budget():
    assert lr_factor(0, 900, 0.5) == lr_factor(450, 900, 0.5) == 1.0
    assert lr_factor(675, 900, 0.5) == 0.5 and lr_factor(900, 900, 0.5) == 0.0
    assert lr_factor(950, 900, 0.5) == 0.0             # a step that overruns the budget
    assert lr_factor(225, 900, 0.0) == 0.75
    assert lr_factor(899, 900, 1.0) == 1.0             # 1: constant


def test_an_arm_scales_every_param_group_from_its_base_rate_on_its_own_clock():
    w = torch.nn.Parameter(torch.zeros(1))
    opt_a, opt_b = torch.optim.SGD([w], lr=0.1), torch.optim.Adam([w], lr=0.004)
    seen = []
    arm = Arm("x", lambda: seen.append((opt_a.param_groups[0]["lr"], opt_b.param_groups[0]["lr"])),
              None, None, (opt_a, opt_b), budget=0.4, decay_from=0.5)
    arm.train_for(0.2)                                  # the first half: constant
    assert set(seen) == {(0.1, 0.004)}
    n = len(seen)
    arm.train_for(0.2)                                  # the second half: falls towards 0
    a, b = zip(*seen[n:])
    assert list(a) == sorted(a, reverse=True) and a[-1] < 0.02 and b[-1] < 0.0008
    assert all(abs(x / 0.1 - y / 0.004) < 1e-9 for x, y in zip(a, b))   # one factor for all groups
    assert [base for _, base in arm.groups] == [0.1, 0.004]


def test_an_arm_on_the_training_engine_scales_its_rates_through_the_engine(tmp_path):
    from ganforge.training.progan import ProGANConfig, ProGANTrainConfig, ProGANTrainer

    pg = ProGANTrainer(ProGANTrainConfig(batch_size=4, n_images=8, lr=0.002, device="cpu", threads=1,
                                         network=ProGANConfig(z_dim=8, resolution=8, fmap_base=32, fmap_max=8,
                                                              fmap_min=4)), tmp_path)
    arm = Arm("progan", pg.train_step, None, None, engine=pg.engine, budget=1.0, decay_from=0.5)
    arm.clock = 2.0                                     # past the budget: the rate is 0
    arm.train_for(0.01)
    assert pg.step >= 1 and pg.opt_G.param_groups[0]["lr"] == pg.opt_D.param_groups[0]["lr"] == 0.0
    # the base rates stay the engine's (and the doctor's): the schedule scales them
    assert pg.engine.lr_scale == 0.0 and pg.opt_G.param_groups[0]["base_lr"] == 0.002


def test_time_to_quality_on_single_evaluations_and_on_3_evaluation_medians():
    seconds = [0, 60, 120, 180, 240, 300]
    dcgan = [600.0, 40.0, 90.0, 80.0, 35.0, 45.0]   # one lucky early evaluation at 60 s
    progan = [900.0, 100.0, 30.0, 20.0, 25.0, 10.0]
    assert first_time_at_or_below(seconds, dcgan, 45.0) == 60
    assert first_time_at_or_below(seconds, progan, 45.0) == 120
    assert speedup(60, 120) == 0.5
    # medians of 3: the DCGAN's [80, 35, 45] first holds at 300 s, the ProGAN's [100, 30, 20] at 180 s
    target = 45.0
    assert first_time_at_or_below(seconds, dcgan, target, window=3) == 300
    assert first_time_at_or_below(seconds, progan, target, window=3) == 180
    assert speedup(300, 180) == 1.667
    assert first_time_at_or_below(seconds, dcgan, 1.0, window=3) is None
    assert speedup(None, 180) is None
