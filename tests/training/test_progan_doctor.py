"""The training doctor on the Progressive GAN: scores per stage and alpha, per-stage diagnoses,
the report with its stages, `ganforge doctor`, --doctor auto, resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ganforge.errors import CheckpointError
from ganforge.training import datasets
from ganforge.training.doctor import Doctor
from ganforge.training.gan import load_checkpoint
from ganforge.training.monitor import Diagnosis, Monitor, Thresholds, stage_at
from ganforge.training.progan import (Discriminator, Generator, ProGANConfig, ProGANTrainConfig,
                                      ProGANTrainer, stage_spans, train_progan)
from tests.conftest import run_cli

TINY = ProGANConfig(z_dim=8, resolution=16, fmap_base=64, fmap_max=16, fmap_min=8)
# "G dominates early" forced to hold at every observation that is early in its stage, so which
# observations are diagnosed shows where the stages re-arm the detectors and where "early" ends
FORCED = Thresholds(g_dom_s_G=0.0, g_dom_s_D=1.0, early_fraction=0.5, patience=1)


def tiny_train(**kw) -> ProGANTrainConfig:
    # 8 images a step; stage 0: steps 1-6, stage 1: 7-18 (fade-in 7-12), stage 2: 19-22 (fade-in
    # 19-22: the run ends mid fade-in, at alpha 0.5)
    base = dict(steps=22, batch_size=8, n_images=32, stable_images=48, fade_images=48, r1_every=4,
                sample_every=100, log_every=1, checkpoint_every=100, threads=2, device="cpu", network=TINY,
                doctor_every=2)
    return ProGANTrainConfig(**{**base, **kw})


def lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "progan"
    summary = train_progan(tiny_train(thresholds=FORCED), out, progress=False)
    return out, summary


def test_stage_spans_follow_the_schedule_step_by_step():
    assert stage_spans(tiny_train()) == [
        {"stage": 0, "side": 4, "start": 1, "end": 6, "fade_end": None},
        {"stage": 1, "side": 8, "start": 7, "end": 18, "fade_end": 12},
        {"stage": 2, "side": 16, "start": 19, "end": 22, "fade_end": 22}]


def test_stage_spans_of_a_run_resumed_with_another_batch_size():
    # 5 steps of 8 images (40 shown), then 16 a step: shown before steps 6.. = 40, 56, 72, ...
    resumed = [{"stage": 0, "side": 4, "start": 1, "end": 6, "fade_end": None},
               {"stage": 1, "side": 8, "start": 7, "end": 12, "fade_end": 9},
               {"stage": 2, "side": 16, "start": 13, "end": 14, "fade_end": 14}]
    assert stage_spans(tiny_train(batch_size=16), 14, resumed=(5, 40)) == resumed
    # the spans the checkpoint recorded (of a run planned for 22 steps) are kept up to its step
    assert stage_spans(tiny_train(batch_size=16), 14, resumed=(5, 40), past=stage_spans(tiny_train())) == resumed
    # resumed twice: 10 steps of 4 images (40), 4 of 16 (104), then 32 a step; where the
    # batches of 4 and of 16 fell is only known from the recorded spans
    first = stage_spans(tiny_train(batch_size=16), 14, resumed=(10, 40), past=stage_spans(tiny_train(batch_size=4), 10))
    assert first == [{"stage": 0, "side": 4, "start": 1, "end": 11, "fade_end": None},
                     {"stage": 1, "side": 8, "start": 12, "end": 14, "fade_end": 14}]
    again = stage_spans(tiny_train(batch_size=32), 16, resumed=(14, 104), past=first)
    assert again == [first[0], {"stage": 1, "side": 8, "start": 12, "end": 16, "fade_end": 14}]
    assert stage_spans(tiny_train(batch_size=32), 16, resumed=(14, 104))[1]["start"] == 8   # 7.4 a step


def test_resumed_with_another_batch_size_the_stages_match_the_measurements(tmp_path):
    train_progan(tiny_train(steps=5, doctor_every=1), tmp_path, progress=False)
    train_progan(tiny_train(steps=14, batch_size=16, doctor_every=1), tmp_path, resume=True,
                 progress=False)
    stages = json.loads((tmp_path / "doctor.json").read_text())["stages"]
    measured = [r for r in lines(tmp_path) if "s_G" in r]
    assert [r["step"] for r in measured] == list(range(1, 15))
    assert [r["stage"] for r in measured] == [stage_at(stages, r["step"])["stage"] for r in measured]
    assert "| 2 | 16 px | 13–14 | 13–14 | 2 |" in (tmp_path / "doctor.md").read_text()


def test_measurement_lines_record_scores_stage_and_alpha_in_range(run):
    out, _ = run
    measured = [r for r in lines(out) if "s_G" in r]
    # every doctor_every (2) steps; each stage's last step (6, 18) and the run's last are even too
    assert [r["step"] for r in measured] == list(range(2, 23, 2))
    for r in measured:
        for key in ("s_G", "s_D", "alpha"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert r["stage"] in (0, 1, 2) and r["side"] == 4 * 2 ** r["stage"]
    by_step = {r["step"]: r for r in measured}
    assert (by_step[6]["stage"], by_step[8]["stage"], by_step[20]["stage"]) == (0, 1, 2)
    assert by_step[22]["alpha"] == 0.5          # mid fade-in: step 22 trains at 168 images shown
    assert all("s_G" not in r for r in lines(out) if r["step"] % 2)


def test_s_d_is_the_formula_on_d_probabilities_for_the_held_batch_at_the_stage_and_alpha(run):
    """The last measurement (step 22: stage 2, 16 px, alpha 0.5) recomputed by hand from the
    checkpoint's weights (taken after step 22, the ones measured) on the held-out batch."""
    out, _ = run
    last = [r for r in lines(out) if "s_G" in r][-1]
    stage, alpha = last["stage"], last["alpha"]
    assert (last["step"], stage, alpha) == (22, 2, 0.5)
    payload = load_checkpoint(out)
    G, D = Generator(TINY), Discriminator(TINY)
    G.load_state_dict(payload["state"]["G"])
    D.load_state_dict(payload["state"]["D"])
    # the held-out batch as the trainer builds it: 64 shapes drawn with seed + 7919, latents seed + 2
    held = datasets.load_images("shapes", 64, 16, 0 + 7919)
    sharp = torch.from_numpy(held).permute(0, 3, 1, 2).float() / 127.5 - 1.0      # 16 px = stage 2's side
    low = sharp.reshape(64, 3, 8, 2, 8, 2).mean(dim=(3, 5))                      # 2x2 box average
    low_up = low.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)          # nearest upsample
    blended = low_up + (sharp - low_up) * alpha
    z = torch.from_numpy(np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32))
    with torch.no_grad():
        p_real = torch.sigmoid(D(blended, stage=stage, alpha=alpha)).numpy().astype(np.float64)
        p_fake = torch.sigmoid(D(G(z, stage=stage, alpha=alpha), stage=stage, alpha=alpha)).numpy()
        p_sharp = torch.sigmoid(D(sharp, stage=stage, alpha=alpha)).numpy().astype(np.float64)
    s_G = p_fake.astype(np.float64).mean()
    s_D = 0.5 * p_real.mean() + 0.5 * (1.0 - p_fake.astype(np.float64)).mean()
    assert last["s_G"] == pytest.approx(s_G, abs=2e-5)
    assert last["s_D"] == pytest.approx(s_D, abs=2e-5)
    # the blend matters: the same formula on the unblended images gives another s_D
    assert abs(0.5 * p_sharp.mean() + 0.5 * (1.0 - p_fake).mean() - last["s_D"]) > 1e-4


def test_early_is_judged_from_each_stages_start_and_each_stage_reports_its_own(run):
    out, summary = run
    # early = the first half of each stage: stage 0 steps <= 3, stage 1 steps 7..12, stage 2 19..20;
    # the condition holds there, so each stage reports it once, at its first early observation
    # (judged over the whole run, "early" would end at step 11: one diagnosis, at step 2)
    assert summary["diagnoses"] == [("g_dominates", 0), ("g_dominates", 1), ("g_dominates", 2)]
    doc = json.loads((out / "doctor.json").read_text())
    assert [(d["failure"], d["step"], d["evidence"]["stage"]) for d in doc["diagnoses"]] == [
        ("g_dominates", 2, 0), ("g_dominates", 8, 1), ("g_dominates", 20, 2)]
    assert doc["stages"] == stage_spans(tiny_train())
    assert doc["interventions"] == []                          # report mode: advised only


def test_doctor_md_names_the_stages_and_the_diagnoses_with_their_stage(run):
    out, _ = run
    report = (out / "doctor.md").read_text()
    assert "## Stages" in report
    assert "| 0 | 4 px | 1–6 | - | 3 |" in report
    assert "| 1 | 8 px | 7–18 | 7–12 | 6 |" in report
    assert "| 2 | 16 px | 19–22 | 19–22 | 2 |" in report
    assert "step 8 (stage 1, 8 px, alpha 0.17): the generator dominates early" in report
    assert "step 20 (stage 2, 16 px, alpha 0.17): the generator dominates early" in report
    assert (out / "scores.png").stat().st_size > 1000


def test_ganforge_doctor_prints_the_report_and_re_diagnoses_stage_by_stage(run):
    out, _ = run
    r = run_cli("doctor", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == (out / "doctor.md").read_text()
    # the recorded scores re-diagnosed with the thresholds of the run: the same report
    r = run_cli("doctor", str(out), "--thresholds",
                "g_dom_s_G=0,g_dom_s_D=1,early_fraction=0.5,patience=1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (out / "doctor.md").read_text()


def test_doctor_off_measures_nothing_and_writes_no_report(tmp_path):
    train_progan(tiny_train(steps=4, doctor="off"), tmp_path, progress=False)
    assert all("s_G" not in r for r in lines(tmp_path))
    assert not (tmp_path / "doctor.md").exists() and not (tmp_path / "scores.png").exists()


def test_auto_remedies_go_through_the_trainer_and_survive_a_checkpoint(tmp_path):
    trainer = ProGANTrainer(tiny_train(r1_gamma=0.0), tmp_path)
    task = trainer.task
    doctor = Doctor(Monitor(task.held_at_stage(), task.held_z), "auto")
    d = Diagnosis("d_dominates", 3, {"stage": 0}, "forced")
    done = doctor.remedy(d, task, {"z_dim": 8})
    assert [(i.knob, i.old, i.new) for i in done] == [
        ("label_smoothing", 0.0, 0.2), ("label_flip", 0.0, 0.05), ("instance_noise", 0.0, 0.1),
        ("d_dropout", 0.0, 0.2), ("lr_d", 1e-3, 5e-4), ("d_steps_every", 1, 2)]
    assert task.knobs() == {"label_smoothing": 0.2, "label_flip": 0.05, "instance_noise": 0.1, "d_dropout": 0.2,
                            "lr_g": 1e-3, "lr_d": 5e-4, "d_steps_every": 2}
    rec = trainer.train_step()                                 # trains with them
    assert np.isfinite(rec["loss_D"]) and np.isfinite(rec["loss_G"])
    assert trainer.opt_D.param_groups[0]["lr"] == 5e-4
    trainer.engine.save(task)
    again = ProGANTrainer(tiny_train(r1_gamma=0.0), tmp_path, resume=True)
    assert again.step == 1 and again.task.knobs() == task.knobs()
    with pytest.raises(CheckpointError, match="was trained with network"):   # another network
        ProGANTrainer(tiny_train(network=dataclasses.replace(TINY, z_dim=4)), tmp_path, resume=True)
    # mode collapse: a larger latent is a restart decision
    done = doctor.remedy(Diagnosis("mode_collapse", 4, {}, "forced"), task, {"z_dim": 8})
    assert [(i.action, i.knob, i.new) for i in done if i.action == "restart"] == [("restart", "z_dim", 16)]


def test_auto_on_a_run_applies_a_remedy_per_stage_and_a_resumed_run_matches(tmp_path):
    """--doctor auto, forced "G dominates" (early everywhere, patience 2): the condition holds
    at every observation, so only the stage change and the restart re-arm it. The first
    diagnosis strengthens D by a restart (D twice as wide, rewound to the start), and every
    diagnosis halves G's learning rate and doubles D's. A run cut at a stage's first step and
    resumed reports and trains exactly as the uninterrupted one (the detector's streak and the
    restart are carried over the resume)."""
    forced = Thresholds(g_dom_s_G=0.0, g_dom_s_D=1.0, early_fraction=1.0, patience=2)
    kw = dict(doctor="auto", doctor_every=1, thresholds=forced)
    full = tmp_path / "full"
    train_progan(tiny_train(steps=10, **kw), full, progress=False)
    doc = json.loads((full / "doctor.json").read_text())
    assert [(d["step"], d["evidence"]["stage"]) for d in doc["diagnoses"]] == [(2, 0), (2, 0), (8, 1)]
    assert [(r["step"], r["from_step"], r["changes"]) for r in doc["restarts"]] == [(2, 0, {"ndf": 16})]
    assert [(i["step"], i["knob"], i["old"], i["new"]) for i in doc["interventions"] if i["action"] == "set"] == [
        (2, "lr_g", 1e-3, 5e-4), (2, "lr_d", 1e-3, 2e-3), (2, "lr_g", 5e-4, 2.5e-4), (2, "lr_d", 2e-3, 4e-3),
        (8, "lr_g", 2.5e-4, 1.25e-4), (8, "lr_d", 4e-3, 8e-3)]
    assert load_checkpoint(full)["resume"]["optimizers"]["D"]["param_groups"][0]["lr"] == 8e-3
    assert load_checkpoint(full)["config"]["d_fmap_min"] == 16
    assert "step 2: restarted from the checkpoint of step 0 with ndf=16" in (full / "doctor.md").read_text()

    cut = tmp_path / "cut"
    train_progan(tiny_train(steps=7, **kw), cut, progress=False)      # stage 1 began at step 7
    train_progan(tiny_train(steps=10, **kw), cut, resume=True, progress=False)
    assert (cut / "doctor.md").read_text() == (full / "doctor.md").read_text()
    a, b = load_checkpoint(full), load_checkpoint(cut)
    for k, v in a["state"]["G"].items():
        torch.testing.assert_close(b["state"]["G"][k], v, msg=k)


def test_cli_doctor_flags_reach_progan(tmp_path):
    out = tmp_path / "run"
    common = ["train", "progan", "--data", "shapes", "--resolution", "8", "--steps", "4",
              "--batch-size", "4", "--n-images", "16", "--stable-images", "8", "--fade-images", "4",
              "--z-dim", "8", "--out", str(out), "--quiet"]
    r = run_cli(*common, "--thresholds", "patience=0")
    assert r.returncode == 2
    assert r.stderr == "Error: threshold patience: 0 is not allowed; must be an integer >= 1\n"
    r = run_cli(*common, "--doctor", "auto", "--doctor-every", "1",
                "--thresholds", "g_dom_s_G=0,g_dom_s_D=1,early_fraction=1,patience=1")
    assert r.returncode == 0, r.stderr
    # stage 0's diagnosis restarts with a wider D, rewound to the start, and is made again
    assert "doctor (auto): diagnoses g_dominates (stage 0), g_dominates (stage 0), g_dominates (stage 1);" in r.stdout
    doc = json.loads((out / "doctor.json").read_text())
    assert doc["mode"] == "auto" and [i["knob"] for i in doc["interventions"] if i["action"] == "set"] == [
        "lr_g", "lr_d"] * 3
    assert [(r["from_step"], r["changes"]) for r in doc["restarts"]] == [(0, {"ndf": 32})]
    assert [r["step"] for r in lines(out) if "s_G" in r] == [1, 1, 2, 3, 4]
