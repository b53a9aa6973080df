"""The training doctor: score formulas, evidence, diagnoses on real runs, auto remedies, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ganforge.errors import UsageError
from ganforge.training import options
from ganforge.training.mixtures import MixtureTrainConfig, mixture, train_mixture
from ganforge.training.monitor import Monitor, Thresholds, check, diversity, scores
from tests.conftest import run_cli


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# -- scores -----------------------------------------------------------------------------------

def test_scores_match_hand_computed_values():
    s = scores([0.9, 0.7], [0.2, 0.4])
    assert s["s_G"] == pytest.approx(0.3)                        # mean(0.2, 0.4)
    assert s["s_D"] == pytest.approx(0.5 * 0.8 + 0.5 * 0.7)      # ½·mean(real) + ½·mean(1 - fake)


def test_monitor_takes_d_outputs_as_probabilities_on_the_held_out_batch():
    real, z = torch.zeros(8, 2), torch.ones(8, 2)

    def D(x):  # D(real) = 0.8, D(fake) = 0.1, as logits
        return torch.where(x[:, 0] < 0.5, logit(0.8), logit(0.1))

    rec = Monitor(real, z, every=1).measure(7, D, lambda z: z * 1.0)
    assert rec["step"] == 7
    assert rec["s_G"] == pytest.approx(0.1, abs=1e-5)
    assert rec["s_D"] == pytest.approx(0.5 * 0.8 + 0.5 * 0.9, abs=1e-5)


def test_diversity_is_one_on_the_real_set_and_zero_with_all_duplicates():
    real = np.random.default_rng(0).standard_normal((64, 4))
    assert diversity(real, real)["diversity"] == pytest.approx(1.0)
    assert diversity(real, real)["duplicates"] == 0.0
    same = np.repeat(real[:1], 64, 0)
    assert diversity(same, real) == {"diversity": 0.0, "duplicates": 1.0}


# -- mixture metrics --------------------------------------------------------------------------

@pytest.mark.parametrize("name,n", [("ring", 8), ("grid", 25)])
def test_mixture_coverage_counts_every_mode_one_mode_and_off_mode_samples(name, n):
    mix = mixture(name)
    assert mix.coverage(mix.centres) == {"modes": n, "hq": 1.0}
    one = np.repeat(mix.centres[:1], 100, 0) + 0.5 * mix.std
    assert mix.coverage(one) == {"modes": 1, "hq": 1.0}
    off = mix.centres + 4 * mix.std  # 4·√2 std away from every centre: none high quality
    assert mix.coverage(off) == {"modes": 0, "hq": 0.0}
    mixed = np.concatenate([mix.centres[:3], off[:1]])
    assert mix.coverage(mixed) == {"modes": 3, "hq": 0.75}


# -- thresholds -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("d_dom_s_D=2", "threshold d_dom_s_D: 2.0 is not allowed; must be in [0, 1]"),
    ("d_dom_s_D=0.4", "threshold d_dom_s_D: 0.4 is not allowed; must be > 0.5"),
    ("patience=0", "threshold patience: 0 is not allowed; must be an integer >= 1"),
    ("speed=3", "is not NAME=VALUE with NAME one of"),
    ("s_G=high", "is not NAME=VALUE"),
    ("patience=x", "--thresholds: patience='x' is not a number"),
])
def test_nonsense_thresholds_are_refused_with_their_name(text, message):
    with pytest.raises(UsageError, match=None) as exc:
        Thresholds.parse(text)
    assert message in str(exc.value)


def test_default_thresholds():
    th = Thresholds()
    assert (th.d_dom_s_D, th.d_dom_s_G, th.g_dom_s_G, th.g_dom_s_D) == (0.9, 0.1, 0.52, 0.48)
    assert (th.early_fraction, th.collapse_after, th.collapse_diversity, th.collapse_duplicates,
            th.collapse_modes, th.dup_radius, th.patience) == (0.3, 0.25, 0.5, 0.5, 0.75, 0.1, 3)


def record(step: int, s_G: float, s_D: float, **evidence) -> dict:
    return {"step": step, "s_G": s_G, "s_D": s_D, "diversity": 0.9, "duplicates": 0.0, **evidence}


def test_g_dominates_is_not_named_at_the_equilibrium_but_is_at_the_presets_scores():
    """D(x) = ½ everywhere (G matches the data, or D learns nothing) puts s_G and s_D at ½ up to
    the held-out batch's noise: not G dominating. The G-dominates presets sit at s_G 0.55-0.67,
    s_D 0.41-0.47 from the first observation."""
    mon = Monitor.offline(Thresholds(), total_steps=1000)    # early: steps <= 300
    for step, (dg, dd) in zip(range(50, 301, 50), [(3, -3), (2, -1), (3, -3), (-1, 2), (3, -3), (0, 0)]):
        assert mon.diagnose(record(step, 0.5 + dg / 1000, 0.5 + dd / 1000)) == []
    mon = Monitor.offline(Thresholds(), total_steps=1000)
    found = [d.failure for step in (50, 100, 150) for d in mon.diagnose(record(step, 0.55, 0.45))]
    assert found == ["g_dominates"]
    assert "s_G 0.550 >= 0.52 and s_D 0.450 <= 0.48" in mon.diagnoses[0].reason


def test_a_restart_gives_the_rebuilt_networks_the_runs_grace_before_collapse_is_judged():
    """Collapse is judged after collapse_after (25 %) of the run; after a restart from step 450
    of 2,000, after 25 % of the 1,550 steps left (from step 837.5): a rebuilt G still spreading
    out over the modes right after the restart is not named collapsed again."""
    collapsed = lambda steps: [record(s, 0.2, 0.8, modes=4, n_modes=8, modes_share=0.5) for s in steps]
    fresh = Monitor.offline(Thresholds(), total_steps=2000).replay(collapsed((500, 550, 600)))
    assert [(d.failure, d.step, d.onset) for d in fresh.diagnoses] == [("mode_collapse", 600, 500)]
    mon = Monitor.offline(Thresholds(), total_steps=2000).replay(collapsed((500, 550, 600)))
    mon.records = mon.records[:0]                                # rewound to step 450's checkpoint
    mon.restarted(450)
    assert mon.rebuilt == 450
    mon.replay(collapsed(range(500, 801, 50)))
    assert len(mon.diagnoses) == 1                               # the first collapse only
    mon.replay(collapsed((850, 900, 950)))
    assert [(d.failure, d.step, d.onset) for d in mon.diagnoses[1:]] == [("mode_collapse", 950, 850)]
    assert check(collapsed([600])[0], Thresholds(), 2000, rebuilt=450) == {}
    assert "mode_collapse" in check(collapsed([850])[0], Thresholds(), 2000, rebuilt=450)


# -- diagnoses on real runs -------------------------------------------------------------------

# a healthy ring run covers all 8 modes from about 200 steps (at 150: 7 on one machine, 4.8 %
# of its points within 3 std of a mode)
MIX_STEPS = 250


@pytest.fixture(scope="module")
def mixture_runs(tmp_path_factory):
    """Each 2-D preset trained for a few hundred steps, doctor in auto mode."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for name in ("healthy", "d-dominates", "g-dominates", "mode-collapse"):
        cfg = options.config_from(MixtureTrainConfig, "mlpgan", name, overrides={
            "data": "ring", "steps": MIX_STEPS, "doctor_every": 10, "doctor": "auto", "threads": 1})
        out[name] = (train_mixture(cfg, root / name, progress=False), root / name)
    return out


@pytest.mark.parametrize("preset,failure", [("d-dominates", "d_dominates"),
                                            ("g-dominates", "g_dominates"),
                                            ("mode-collapse", "mode_collapse")])
def test_each_failure_is_diagnosed_on_a_real_run_of_its_preset(mixture_runs, preset, failure):
    summary, run = mixture_runs[preset]
    assert failure in summary["diagnoses"]
    report = (run / "doctor.md").read_text()
    assert "remedies:" in report
    assert (run / "scores.png").stat().st_size > 1000


def test_a_healthy_run_gets_no_diagnosis(mixture_runs):
    summary, run = mixture_runs["healthy"]
    assert summary["diagnoses"] == []
    assert summary["modes"] == 8
    assert "None: no failure condition held" in (run / "doctor.md").read_text()


def test_auto_applies_and_logs_remedies_with_step_and_reason(mixture_runs):
    _, run = mixture_runs["d-dominates"]
    doc = json.loads((run / "doctor.json").read_text())
    first = doc["diagnoses"][0]
    assert first["failure"] == "d_dominates"
    applied = [i for i in doc["interventions"] if i["failure"] == "d_dominates"]
    by_knob = {i["knob"]: i for i in applied if i["action"] == "set"}
    assert by_knob["label_smoothing"]["old"] == 0.0 and by_knob["label_smoothing"]["new"] == 0.2
    assert by_knob["lr_d"]["new"] == pytest.approx(by_knob["lr_d"]["old"] / 2)
    assert all(i["step"] == first["step"] and i["reason"] == first["reason"] for i in applied)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"s_G", "s_D", "diversity", "duplicates", "modes"} <= set(rows[-1])
    assert f"step {first['step']}: set label_smoothing 0.0 -> 0.2" in (run / "doctor.md").read_text()


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory):
    from ganforge.training import options
    from ganforge.training.loop import TrainConfig, train_dcgan

    root = tmp_path_factory.mktemp("img")
    out = {}
    for name in ("healthy", "d-dominates", "g-dominates"):
        small = {"steps": 50, "batch_size": 16, "n_images": 128, "sample_every": 50, "doctor_every": 5,
                 "threads": 1, "network": {"z_dim": 16, "resolution": 16}}
        if name == "healthy":
            small["network"].update(ngf=8, ndf=8)
        cfg = options.config_from(TrainConfig, "dcgan", name, overrides=small)
        out[name] = (train_dcgan(cfg, root / name, progress=False), root / name)
    return out


@pytest.mark.parametrize("preset,failure", [("d-dominates", "d_dominates"),
                                            ("g-dominates", "g_dominates")])
def test_dcgan_presets_are_diagnosed_and_the_healthy_dcgan_is_not(image_runs, preset, failure):
    assert failure in image_runs[preset][0]["diagnoses"]
    assert failure not in image_runs["healthy"][0]["diagnoses"]


def test_every_dcgan_run_directory_gets_scores_plot_grids_and_report(image_runs):
    _, run = image_runs["healthy"]
    for name in ("metrics.jsonl", "scores.png", "samples.png", "doctor.md", "doctor.json"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "s_G" in r]
    assert [r["step"] for r in scored] == list(range(5, 51, 5))


# -- CLI --------------------------------------------------------------------------------------

def test_doctor_prints_the_report_of_a_past_run(image_runs):
    _, run = image_runs["d-dominates"]
    r = run_cli("doctor", str(run))
    assert r.returncode == 0, r.stderr
    assert "the discriminator dominates" in r.stdout
    assert "Sønderby et al. 2017" in r.stdout


def test_doctor_without_metrics_is_a_one_line_usage_error(tmp_path):
    r = run_cli("doctor", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr == (f"Error: doctor: {tmp_path} has no metrics.jsonl; "
                        "is it a ganforge training run?\n")


def test_doctor_on_a_non_gan_checkpoint_is_a_one_line_error(tmp_path):
    from ganforge.training.gan import save_checkpoint

    @dataclass(frozen=True)
    class PCAConfig:
        k: int = 2

    save_checkpoint(tmp_path / "checkpoint.pt", "pca", PCAConfig(), {"P": torch.nn.Linear(2, 2)})
    r = run_cli("doctor", str(tmp_path / "checkpoint.pt"))
    assert r.returncode == 2
    assert r.stderr.startswith(f"Error: doctor: {tmp_path / 'checkpoint.pt'} holds a 'pca' model, not a GAN")
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("args,line", [
    (["--preset", "crazy"], "Error: argument --preset: invalid choice: 'crazy' (choose from 'd-dominates', "
                            "'default', 'demo', 'g-dominates', 'healthy', 'mode-collapse', 'stacked-digits')"),
    (["--thresholds", "d_dom_s_G=-1"], "Error: threshold d_dom_s_G: -1.0 is not allowed; must be in [0, 1]"),
    (["--doctor", "maybe"], "Error: argument --doctor: invalid choice: 'maybe' (choose from 'auto', 'report', 'off')"),
])
def test_train_refuses_nonsense_doctor_settings(tmp_path, args, line):
    r = run_cli("train", "dcgan", "--steps", "1", "--out", str(tmp_path / "r"), *args)
    assert r.returncode == 2
    assert r.stderr.strip() == line
