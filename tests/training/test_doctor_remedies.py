"""The doctor's remedies on the DCGAN: failure presets diagnosed, knobs that change the trainer,
restarts with changed networks from the checkpoint before the failure, the best weights kept."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from ganforge.training import options
from ganforge.training.gan import DCGANConfig, Discriminator, LeakyDropout, build_dcgan, load_checkpoint
from ganforge.training.loop import GANTrainer, TrainConfig, train_dcgan
from ganforge.training.monitor import Diagnosis, Thresholds
from ganforge.training.remedies import BestWeights, transplant
from ganforge.training.reports import report_for_run

SHORT = {"steps": 60, "batch_size": 16, "n_images": 256, "doctor_every": 5, "checkpoint_every": 5,
         "log_every": 10, "sample_every": 1000, "threads": 1, "thresholds": "collapse_diversity=0.1"}


def config(preset: str, **over) -> TrainConfig:
    network = over.pop("network", {})
    cfg = options.config_from(TrainConfig, "dcgan", preset, overrides={**SHORT, **over})
    cfg.network = dataclasses.replace(cfg.network, resolution=16, **network)
    return cfg


@pytest.fixture(scope="module")
def report_runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("presets")
    return {name: train_dcgan(config(name, doctor="report"), root / name, progress=False)
            for name in ("healthy", "d-dominates", "g-dominates", "mode-collapse")}


@pytest.mark.parametrize("preset,failure", [("d-dominates", "d_dominates"), ("g-dominates", "g_dominates"),
                                            ("mode-collapse", "mode_collapse")])
def test_each_failure_preset_is_diagnosed_in_a_short_run(report_runs, preset, failure):
    assert failure in report_runs[preset]["diagnoses"]


def test_the_healthy_preset_stays_undiagnosed_over_a_short_run(report_runs):
    assert report_runs["healthy"]["diagnoses"] == []


@pytest.fixture
def trainer(tmp_path):
    torch.set_num_threads(1)
    return GANTrainer(config("healthy", doctor="auto", checkpoint_every=2,
                             network={"ngf": 8, "ndf": 8, "z_dim": 16}), tmp_path)


def test_d_dominates_flips_labels_turns_dropout_on_and_slows_d(trainer):
    task = trainer.task
    assert task.knobs()["d_dropout"] == 0.0 and task.knobs()["label_flip"] == 0.0
    task.watch.doctor.remedy(Diagnosis("d_dominates", 4, {}, "forced", 2), task, {"ndf": 8, "ngf": 8})
    k = task.knobs()
    assert k["label_flip"] == 0.05 and k["d_steps_every"] == 2 and k["lr_d"] == pytest.approx(1e-4)
    assert k["lr_g"] == pytest.approx(2e-4)    # G already within 4x of D's rate: left alone
    assert [m.p for m in task.D.modules() if isinstance(m, LeakyDropout)] == [0.2, 0.2]
    d0 = [p.clone() for p in task.D.parameters()]
    trainer.train_step()                       # step 0: D trained, with dropout and flipped labels
    assert not all(torch.equal(a, b) for a, b in zip(d0, task.D.parameters()))


def test_d_dominates_brings_a_slow_g_within_four_times_ds_new_rate(trainer):
    task = trainer.task
    task.set_knob("lr_d", 2e-3)
    task.set_knob("lr_g", 2e-5)
    task.watch.doctor.remedy(Diagnosis("d_dominates", 4, {}, "forced", 2), task, {"ndf": 8, "ngf": 8})
    assert task.knobs()["lr_d"] == pytest.approx(1e-3) and task.knobs()["lr_g"] == pytest.approx(2.5e-4)
    assert [g["lr"] for g in task.opt_G.param_groups] == [pytest.approx(2.5e-4)]
    done = [(i.knob, i.old, i.new) for i in task.watch.doctor.interventions if i.knob == "lr_g"]
    assert done == [("lr_g", 2e-5, pytest.approx(2.5e-4))]


def test_d_skips_its_update_on_the_steps_between(trainer):
    task = trainer.task
    task.set_knob("d_steps_every", 2)
    trainer.train_step()                       # step 0: D updated
    before = [p.clone() for p in task.D.parameters()]
    trainer.train_step()                       # step 1: D left alone
    assert all(torch.equal(a, b) for a, b in zip(before, task.D.parameters()))


def test_label_flips_change_the_d_loss(trainer):
    task = trainer.task
    x = torch.zeros(16, 3, 16, 16)
    task.D_train = lambda t: torch.full((t.shape[0],), 6.0)      # D sure everything is real
    clean, _, _ = task._d_loss(x, x, trainer.engine)
    task.set_knob("label_flip", 0.4)
    noisy, _, _ = task._d_loss(x, x, trainer.engine)
    assert float(noisy) != pytest.approx(float(clean))


def test_g_dominates_slows_g_and_brings_d_up_to_its_rate(trainer):
    task = trainer.task
    task.set_knob("lr_d", 1e-7)
    task.set_knob("lr_g", 2e-3)
    task.watch.doctor.remedy(Diagnosis("g_dominates", 4, {}, "forced", 2), task, {"ndf": 8})
    assert task.knobs()["lr_g"] == pytest.approx(1e-3) and task.knobs()["lr_d"] == pytest.approx(2e-3)
    assert task.watch.doctor.pending["changes"] == {"ndf": 16}


def test_a_restart_rewinds_to_the_checkpoint_before_the_failure_with_the_changed_networks(trainer, tmp_path):
    eng, task = trainer.engine, trainer.task
    for _ in range(4):
        trainer.train_step()
        if eng.step % 2 == 0:
            eng.save(task)
    assert eng.rewind_steps() == [0, 2, 4]
    task.watch.doctor.remedy(Diagnosis("mode_collapse", 4, {}, "forced", onset=3), task,
                             {"z_dim": 16, "ngf": 8, "mbstd": False})
    decision = eng._restart_point(task.restart_decision())
    assert decision["from_step"] == 2 and decision["changes"] == {"z_dim": 32, "ngf": 16, "mbstd": True}
    kept = load_checkpoint(tmp_path / "rewind" / "step_000002.pt")
    eng.rebuild(task, decision)
    assert eng.step == 2 and eng.batch_in_epoch == kept["resume"]["batch_in_epoch"]
    assert task.G.cfg.z_dim == 32 and task.G.cfg.ngf == 16 and task.D.cfg.mbstd
    assert task.held_z.shape == (64, 32) and task.watch.monitor.z.shape == (64, 32)
    assert task.watch.judge.z.shape == (256, 32)
    d_new, d_old = task.D.state_dict(), kept["state"]["D"]
    last = [k for k in d_new if k.endswith("weight")][-1]
    for k, v in d_new.items():                 # D's filters unchanged: every tensor as checkpointed ...
        if k != last:
            assert torch.equal(v, d_old[k]), k
    assert d_new[last].shape[1] == d_old[last].shape[1] + 1        # ... but its last layer: one more input
    assert torch.equal(d_new[last][:, :-1], d_old[last])
    g_first = task.G.state_dict()["main.0.weight"]                 # (z, ngf*2, 4, 4): the old corner kept
    old_first = kept["state"]["G"]["main.0.weight"]
    assert torch.equal(g_first[:16, :16], old_first)
    assert task.opt_G.param_groups[0]["params"][0] is next(task.G.parameters())
    assert task.watch.doctor.restarts[0]["from_step"] == 2
    assert eng.rewind_steps() == [0, 2]        # the abandoned step's checkpoint is gone
    trainer.train_step()
    final = eng.save(task)
    payload = load_checkpoint(final)
    assert payload["config"]["z_dim"] == 32 and payload["config"]["mbstd"] is True
    assert payload["train"]["network"]["ngf"] == 8    # the settings the run was started with
    build_dcgan(payload)                       # export rebuilds from the config


def test_an_auto_run_restarts_and_says_so(tmp_path):
    torch.set_num_threads(1)
    s = train_dcgan(config("d-dominates", doctor="auto", steps=60), tmp_path, progress=False)
    assert s["restarts"] and s["restarts"][0]["changes"] == {"ndf": 32, "ngf": 16}
    r = s["restarts"][0]
    assert r["from_step"] < r["step"] and len(s["restarts"]) <= 2    # at most 2, one per failure
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    final = {k: v for restart in s["restarts"] for k, v in restart["changes"].items()}
    assert {k: payload["config"][k] for k in final} == final and payload["step"] == 60
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    marks = [row for row in rows if "rewound_to" in row]
    assert marks[0]["rewound_to"] == r["from_step"] and marks[0]["restart"] == {"ndf": 32, "ngf": 16}
    assert "s_D" in marks[0] and marks[0]["interventions"]["label_flip"] == 0.05
    report = (tmp_path / "doctor.md").read_text()
    assert "## Restarts" in report and f"restarted from the checkpoint of step {r['from_step']}" in report
    # `ganforge doctor RUN --thresholds`: re-diagnosed through the restarts, as the run diagnosed
    saved = json.loads((tmp_path / "doctor.json").read_text())
    assert report_for_run(tmp_path, Thresholds(**saved["thresholds"])) == report
    again = train_dcgan(config("d-dominates", doctor="auto", steps=70), tmp_path, progress=False, resume=True)
    assert again["steps"] == 70                 # resumed with the restarted networks


def test_the_final_checkpoint_holds_the_best_weights_when_the_last_are_worse(trainer, tmp_path):
    task = trainer.task
    for _ in range(3):
        trainer.train_step()
    task.watch.observe(3, task.D, task.G, task, {}, nets=task.nets)
    best_fd = task.watch.monitor.last["fd"]
    best = {k: v.clone() for k, v in task.G.state_dict().items()}
    with torch.no_grad():                      # G ruined: every image white
        task.G.main[-4].weight.zero_()
        task.G.main[-4].bias.fill_(1.0)
        task.G.main[-2].weight.fill_(1.0)
    row = task.watch.observe(task.cfg.steps, task.D, task.G, task, {}, nets=task.nets)
    assert task.watch.monitor.last["fd"] > 1.1 * best_fd
    assert row["kept_step"] == 3 and task.watch.doctor.kept["kept"]
    assert all(torch.equal(v, best[k]) for k, v in task.G.state_dict().items())


def test_on_the_shapes_the_best_weights_are_judged_by_the_classifiers_fd_of_g_in_eval_mode(trainer, tmp_path):
    """The DCGAN's best weights are judged as ProGAN's are on the shapes: the shapes classifier's
    FD of G in eval mode (as exported) on 256 fixed latents; G is left training. Elsewhere: the
    monitor's FD."""
    from ganforge.training import metrics

    task = trainer.task
    for _ in range(3):
        trainer.train_step()
    row = task.watch.observe(3, task.D, task.G, task, {}, nets=task.nets)
    judge = task.watch.judge
    assert task.G.training and judge.name == "FD of the shipped G, shapes-classifier features, 256 samples"
    classifier, _ = metrics.load_classifier(s=metrics.settings_for(16))
    real = metrics.features(classifier, judge.reals)
    with torch.no_grad():
        task.G.eval()
        shipped = metrics.frechet_distance(metrics.features(classifier, task.G(judge.z).clamp(-1, 1)), real)
        task.G.train()
        training = metrics.frechet_distance(metrics.features(classifier, task.G(judge.z).clamp(-1, 1)), real)
    assert row["shipped_fd"] == pytest.approx(shipped, rel=1e-4) and task.watch.best.fd == pytest.approx(shipped)
    assert abs(training - shipped) > 1e-3 * shipped        # batch statistics would give another figure
    digits = GANTrainer(config("healthy", doctor="auto", data="stacked_digits", n_images=64,
                               network={"ngf": 8, "ndf": 8, "z_dim": 16}), tmp_path / "digits")
    assert digits.task.watch.judge is None
    row = digits.task.watch.observe(0, digits.task.D, digits.task.G, digits.task, {}, nets=digits.task.nets)
    assert "shipped_fd" not in row and digits.task.watch.best.fd == row["fd"]


def test_best_weights_keep_the_lowest_fd_and_forget_on_a_restart():
    net = nn.Linear(2, 2)
    best = BestWeights()
    assert best.offer(1, 5.0, {"G": net}) and not best.offer(2, 6.0, {"G": net})
    assert best.better_than(5.6) and not best.better_than(5.4)
    best.reset()
    assert best.step is None and not best.better_than(100.0)


def test_transplant_copies_equal_tensors_and_overlapping_slices():
    small, big = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 8, 3)
    counts = transplant(big, small.state_dict())
    assert counts == {"equal": 0, "sliced": 2, "fresh": 0}
    assert torch.equal(big.weight[:4], small.weight) and torch.equal(big.bias[:4], small.bias)


def test_a_discriminator_saved_with_separate_dropout_layers_still_loads():
    cfg = DCGANConfig(z_dim=8, ngf=4, ndf=4, resolution=16, d_dropout=0.3)
    old = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1, bias=False), nn.LeakyReLU(0.2), nn.Dropout2d(0.3),
                        nn.Conv2d(4, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
                        nn.Dropout2d(0.3), nn.Conv2d(8, 1, 4, 1, 0, bias=False)).eval()
    D = Discriminator(cfg).eval()
    D.load_state_dict({"main." + k: v for k, v in old.state_dict().items()})
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(D(x), old(x).view(4))


def test_two_ranks_restart_at_the_same_step_and_stay_identical(tmp_path):
    from tests.training.test_engine import max_diff, run_ranks

    d_dominates = {"steps": 30, "batch_size": 16, "n_images": 64, "doctor": "auto", "doctor_every": 5,
                   "checkpoint_every": 5, "sample_every": 1000, "sync_bn": True, "lr_d": 2e-3, "lr_g": 2e-5,
                   "label_smoothing": 0.0, "instance_noise": 0.0,
                   "network": {"ndf": 64, "ngf": 4, "z_dim": 16, "resolution": 16}}
    ranks = run_ranks(2, "dcgan", tmp_path / "run", d_dominates)
    assert ranks[0]["summary"]["restarts"][0]["changes"] == {"ndf": 32, "ngf": 16}
    assert ranks[1]["state"]["D"]["main.0.weight"].shape[0] == 32       # rebuilt on rank 1 too
    assert ranks[0]["knobs"] == ranks[1]["knobs"]
    assert max_diff(ranks[0]["state"], ranks[1]["state"]) == 0.0


def test_a_collapsed_gs_larger_latent_is_at_least_sixteen_wide():
    from ganforge.training.doctor import MIN_RESTART_Z, RESTART_REMEDIES

    grow = dict((name, fn) for name, fn, _ in RESTART_REMEDIES["mode_collapse"])["z_dim"]
    assert [grow(z) for z in (1, 2, 8, 16, 128)] == [MIN_RESTART_Z, MIN_RESTART_Z, 16, 32, 256]


def test_a_collapsed_g_is_restarted_at_least_sixteen_wide_and_four_deep_where_depth_is_a_setting(trainer):
    from ganforge.training.doctor import MIN_RESTART_G_LAYERS, MIN_RESTART_NGF, RESTART_REMEDIES

    grow = {name: fn for name, fn, _ in RESTART_REMEDIES["mode_collapse"]}
    assert (MIN_RESTART_NGF, MIN_RESTART_G_LAYERS) == (16, 4)
    assert [grow["ngf"](v) for v in (1, 4, 8, 16, 64)] == [16, 16, 16, 32, 128]
    # the G a dominating D's restart grows: the same floor (the DCGAN d-dominates preset's 4 -> 16)
    d_dom = {name: fn for name, fn, _ in RESTART_REMEDIES["d_dominates"]}
    assert [d_dom["ngf"](v) for v in (1, 4, 8, 16, 64)] == [16, 16, 16, 32, 128]
    assert [grow["g_layers"](v) for v in (1, 3, 4, 6)] == [4, 4, 4, 6]
    doctor = trainer.task.watch.doctor
    doctor.remedy(Diagnosis("mode_collapse", 4, {}, "forced", 2), trainer.task,
                  {"z_dim": 1, "ngf": 8, "g_layers": 1, "pack": 1})     # the MLP GAN's mode-collapse G
    assert doctor.take_restart()["changes"] == {"z_dim": 16, "ngf": 16, "g_layers": 4, "pack": 2}
    doctor.remedy(Diagnosis("mode_collapse", 4, {}, "forced", 2), trainer.task,
                  {"z_dim": 1, "ngf": 4, "mbstd": False})               # the DCGAN's: only wider
    assert doctor.take_restart()["changes"] == {"z_dim": 16, "ngf": 16, "mbstd": True}


def test_a_dominated_d_is_restarted_at_least_sixteen_wide_and_three_deep_where_depth_is_a_setting(trainer):
    from ganforge.training.doctor import MIN_RESTART_D_LAYERS, MIN_RESTART_NDF, RESTART_REMEDIES

    grow = {name: fn for name, fn, _ in RESTART_REMEDIES["g_dominates"]}
    assert (MIN_RESTART_NDF, MIN_RESTART_D_LAYERS) == (16, 3)
    assert [grow["ndf"](v) for v in (1, 2, 4, 8, 16, 64)] == [16, 16, 16, 16, 32, 128]
    assert [grow["d_layers"](v) for v in (1, 2, 3, 5)] == [3, 3, 3, 5]
    doctor = trainer.task.watch.doctor
    doctor.remedy(Diagnosis("g_dominates", 4, {}, "forced", 2), trainer.task, {"ndf": 2, "d_layers": 1})
    assert doctor.take_restart()["changes"] == {"ndf": 16, "d_layers": 3}   # the MLP GAN's g-dominates D
    doctor.remedy(Diagnosis("g_dominates", 4, {}, "forced", 2), trainer.task, {"ndf": 64})
    assert doctor.take_restart()["changes"] == {"ndf": 128}                 # a DCGAN: only wider
