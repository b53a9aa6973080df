"""The MLP GAN on 2-D mixtures through the training engine: the command line as typed, its
presets and errors, 2 ranks == 1 process through a doctor restart, SIGTERM and resume."""

import dataclasses
import json
import os
import re
import shlex
import signal

import numpy as np
import pytest
import torch

from ganforge.cli import parse_train_args
from ganforge.training import options
from ganforge.training.engine import Engine
from ganforge.training.gan import MLPDiscriminator, MLPGANConfig, MLPGenerator, load_checkpoint
from ganforge.training.options import train_command
from ganforge.training.remedies import transplant
from ganforge.training.mixtures import MixturePoints, MixtureTask, MixtureTrainConfig, mixture
from tests.conftest import run_cli
from tests.training.test_engine import run_ranks

# a collapse diagnosed at the first observation: the doctor (auto) decides a restart with a
# larger z_dim, a wider G and packing, and turns on D's dropout and instance noise
RESTART = {"steps": 6, "batch_size": 16, "n_points": 256, "d_steps": 2, "doctor": "auto", "doctor_every": 2,
           "thresholds": "patience=1,collapse_after=0", "sync_bn": True, "log_every": 1,
           "checkpoint_every": 100, "threads": 1, "network": {"ngf": 8, "ndf": 8}}


def logged_rows_agree(one, two, steps: list[int]) -> list[dict]:
    """The metrics.jsonl rows of runs `one` and `two` (1 process and 2 ranks) are logged at
    `steps` with the same values (losses, scores, decisions) up to 1e-5; returns one's rows."""
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == steps
    for a, b in zip(*rows):
        assert set(a) == set(b)
        for k, v in a.items():
            if k == "seconds":
                continue
            assert b[k] == (pytest.approx(v, abs=1e-5) if isinstance(v, float) else v), (a["step"], k)
    return rows[0]


def test_mlpgan_trains_from_the_command_line_into_a_run_directory(tmp_path):
    out = tmp_path / "ring"
    r = run_cli("train", "mlpgan", "--preset", "mode-collapse", "--steps", "20", "--batch-size", "32",
                "--n-points", "512", "--doctor-every", "10", "--threads", "1", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("trained 20 steps in ")
    assert re.search(r"^\d of 8 modes covered, \d+\.\d % high-quality samples \(2,500 points of G: "
                     + re.escape(str(out / "samples.npy")) + r"\)$", r.stdout, re.M), r.stdout
    assert f"report {out / 'doctor.md'}" in r.stdout
    assert {p.name for p in out.iterdir()} >= {
        "checkpoint.pt", "doctor.json", "doctor.md", "metrics.jsonl", "samples.npy", "samples.png", "scores.png",
        "train.json"}
    train = json.loads((out / "train.json").read_text())
    assert (train["data"], train["lr_d"], train["steps"]) == ("ring", 3e-3, 20)
    assert (train["network"]["z_dim"], train["network"]["ngf"], train["network"]["g_layers"]) == (1, 8, 1)
    ckpt = load_checkpoint(out)
    assert ckpt["kind"] == "mlpgan" and set(ckpt["state"]) == {"G", "D"}
    assert ckpt["config"] == train["network"] and ckpt["step"] == 20 and ckpt["data"] == "ring"
    assert np.load(out / "samples.npy").shape == (2500, 2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [10, 20]
    assert {"loss_D", "loss_G", "s_G", "s_D", "modes", "modes_share"} <= set(rows[-1])


def test_mlpgan_help_shows_its_own_options_and_refuses_another_models():
    r = run_cli("train", "mlpgan", "--help")
    assert r.returncode == 0
    for flag in ("--n-points", "--d-steps", "--lr-floor", "--pack", "--z-dim", "--doctor", "--preset"):
        assert flag in r.stdout
    for flag in ("--tile", "--lambda-l1", "--n-images", "--resolution"):
        assert flag not in r.stdout
    r = run_cli("train", "mlpgan", "--tile", "32", "--out", "runs/never")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["Error: unrecognized arguments: --tile 32"]


@pytest.mark.parametrize("args,line", [
    (["--data", "moon"], "Error: argument --data: invalid choice: 'moon' (choose from 'ring', 'grid')"),
    (["--pack", "2", "--batch-size", "33"], "Error: --batch-size: 33 is not allowed; must be divisible by --pack 2"),
    (["--n-points", "100"], "Error: --n-points: 100 is not allowed; must be >= --batch-size x --d-steps (256)"),
    (["--dim", "3"], "Error: --dim: 3 is not allowed; must be 2 (the mixtures are 2-D)"),
])
def test_bad_mlpgan_settings_are_one_error_line_and_exit_2(tmp_path, args, line):
    r = run_cli("train", "mlpgan", *args, "--out", str(tmp_path / "r"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "r").exists()


def test_the_failure_presets_are_files_over_the_defaults():
    assert options.preset_names("mlpgan") == ["d-dominates", "default", "g-dominates", "healthy", "mode-collapse"]
    base = MixtureTrainConfig()
    assert options.config_from(MixtureTrainConfig, "mlpgan", "healthy") == base
    d = options.config_from(MixtureTrainConfig, "mlpgan", "d-dominates")
    assert (d.lr_d, d.lr_g, d.d_steps, d.network.ndf, d.network.ngf) == (1e-2, 1e-5, 3, 128, 16)
    g = options.config_from(MixtureTrainConfig, "mlpgan", "g-dominates", overrides={"data": "grid"})
    assert (g.data, g.lr_d, g.lr_g, g.network.ndf, g.network.d_layers) == ("grid", 1e-6, 1e-2, 2, 1)


def test_the_training_set_is_points_drawn_once_per_seed():
    mix = mixture("grid")
    a, b = MixturePoints(mix, 600, seed=3, per_item=3), MixturePoints(mix, 600, seed=3, per_item=3)
    assert len(a) == 200 and a[(7, 0)][0].shape == (3, 2) and a[(7, 0)][0].dtype == np.float32
    assert np.array_equal(a[(7, 0)][0], a[(7, 5)][0]) and np.array_equal(a.points, b.points)
    assert not np.array_equal(a.points, MixturePoints(mix, 600, seed=4, per_item=3).points)
    cover = mix.coverage(a.points.reshape(-1, 2))     # within 3 std in 2-D: 98.9 % of the points
    assert cover["modes"] == 25 and 0.97 < cover["hq"] < 1


def test_the_reproduction_command_gives_back_the_config(tmp_path):
    cfg = options.config_from(MixtureTrainConfig, "mlpgan", "d-dominates", overrides={
        "data": "grid", "seed": 4, "lr_decay": False, "thresholds": "patience=2"})
    import dataclasses

    cmd = train_command("mlpgan", json.loads(json.dumps(dataclasses.asdict(cfg))), tmp_path / "r")
    assert cmd.startswith("ganforge train mlpgan ") and "--no-lr-decay" in cmd and "--d-steps 3" in cmd
    ns = vars(parse_train_args(shlex.split(cmd)[1:]))
    assert ns.pop("out") == str(tmp_path / "r")
    again = options.config_from(MixtureTrainConfig, "mlpgan", overrides=options.typed_values(MixtureTrainConfig, ns))
    assert again == dataclasses.replace(cfg, device="auto", precision="auto", workers=0, threads=0)


def test_two_gloo_ranks_follow_one_process_through_a_doctor_restart(tmp_path):
    one = run_ranks(1, "mlpgan", tmp_path / "one", RESTART)[0]
    two = run_ranks(2, "mlpgan", tmp_path / "two", RESTART)
    for s in (one["summary"], two[0]["summary"]):
        assert s["restarted"] and s["restart"] == {"z_dim": 16, "ngf": 16, "pack": 2}
        assert s["network"]["pack"] == 2 and s["world_size"] in (1, 2)
    assert two[0]["knobs"] == two[1]["knobs"] == one["knobs"]
    assert one["knobs"]["d_dropout"] > 0 and one["knobs"]["instance_noise"] > 0   # D's dropout was on
    for n in ("G", "D"):   # DDP keeps the ranks identical
        for k, v in two[0]["state"][n].items():
            assert torch.equal(v, two[1]["state"][n][k]), (n, k)
    # decided at step 2, the run rewinds to its start (the last checkpoint before the failure)
    rows = logged_rows_agree(tmp_path / "one", tmp_path / "two", steps=[1, 2, 1, 2, 3, 4, 5, 6])
    assert rows[1]["restart"] == {"z_dim": 16, "ngf": 16, "pack": 2} and rows[1]["rewound_to"] == 0


class _CutAt(MixtureTask):
    """The task, stopped by a SIGTERM after step `cut` (as a preempted pod is)."""

    def __init__(self, cfg, cut: int):
        super().__init__(cfg, progress=False)
        self.cut = cut

    def after_step(self, step, eng):
        if step == self.cut:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("cut", [1, 3])   # before the restart (decided at step 2), after it
def test_a_run_cut_by_sigterm_resumes_through_the_restart_to_the_uninterrupted_result(tmp_path, cut):
    cfg = options.config_from(MixtureTrainConfig, "mlpgan", overrides={**RESTART, "sync_bn": False})
    ref = Engine(cfg, tmp_path / "ref", progress=False).fit(MixtureTask(cfg, progress=False))
    first = Engine(cfg, tmp_path / "cut", progress=False).fit(_CutAt(cfg, cut))
    assert first["interrupted"] == "SIGTERM" and first["steps"] == cut
    again = Engine(cfg, tmp_path / "cut", progress=False, resume=True).fit(MixtureTask(cfg, progress=False))
    assert again["steps"] == 6 and again["restarted"] and again["network"] == ref["network"]
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(tmp_path / "cut")
    assert a["config"] == b["config"]
    for n in ("G", "D"):
        for k, v in a["state"][n].items():
            assert torch.equal(v, b["state"][n][k]), (n, k)
    assert (tmp_path / "ref" / "metrics.jsonl").read_text().count("\n") == 8   # steps 1, 2, rewind, 1..6
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                         for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert strip("ref") == strip("cut")
    doc = lambda run: json.loads((tmp_path / run / "doctor.json").read_text())
    assert doc("ref")["diagnoses"] == doc("cut")["diagnoses"]
    assert doc("ref")["interventions"] == doc("cut")["interventions"]
    assert np.array_equal(np.load(tmp_path / "ref" / "samples.npy"), np.load(tmp_path / "cut" / "samples.npy"))


@pytest.mark.parametrize("name,build,deepen", [("G", MLPGenerator, "g_layers"), ("D", MLPDiscriminator, "d_layers")])
def test_a_restart_that_deepens_a_network_keeps_its_first_and_output_layers_and_adds_fresh_ones(name, build, deepen):
    """Layer i goes to layer i and the output layer to the output layer; the layers the restart
    adds keep their fresh initialisation instead of a slice of the old output layer."""
    before = MLPGANConfig(z_dim=1, ngf=8, ndf=8, **{deepen: 1})
    after = MLPGANConfig(z_dim=16, ngf=16, ndf=16, **{deepen: 4})
    torch.manual_seed(0)
    old, new = build(before), build(after)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    cfg = options.config_from(MixtureTrainConfig, "mlpgan", overrides={"network": dataclasses.asdict(after)})
    moved = MixtureTask(cfg, progress=False).carried(name, old.state_dict(), dataclasses.asdict(before))
    transplant(new, moved)
    assert torch.equal(new.main[12].weight[:, :8], old.main[3].weight)       # the output layer
    assert torch.equal(new.main[12].bias, old.main[3].bias)
    assert torch.equal(new.main[0].weight[:8, :old.main[0].weight.shape[1]], old.main[0].weight)
    for i in (3, 6, 9):                                                     # the added layers
        assert torch.equal(new.main[i].weight, fresh[f"main.{i}.weight"]), i

