"""`ganforge bench doctor` end to end at a tiny size, on the shapes and on a 2-D mixture: every
seed of every mode measured, the figures and the samples behind them written (the mixture's
figures recomputed from its samples); bad flags refused before training."""

import dataclasses
import json

import numpy as np
import pytest

from tests.conftest import run_cli


def test_bench_doctor_tiny_run_writes_per_seed_figures_and_their_samples(tmp_path, shapes_cache):
    out = tmp_path / "doctor.json"
    r = run_cli("bench", "doctor", "--data", "shapes", "--presets", "g-dominates", "--steps", "40", "--seeds", "2",
                "--samples", "16", "--cache-dir", str(shapes_cache), "--classifier-seeds", "7",
                "--json", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    p = res["presets"]["g-dominates"]
    assert p["failure"] == "g_dominates" and set(p["runs"]) == {"report", "auto"}
    for mode, runs in p["runs"].items():
        assert [run["seed"] for run in runs] == [0, 1], mode
        for run in runs:
            assert np.load(run["samples"]).shape == (16, 16, 16, 3)
            assert run["fd"] > 0 and run["pooled_fd"] > 0 and run["optimizer_steps"] >= 40
            assert all({"failure", "step", "onset"} <= set(d) for d in run["diagnoses"])
    real = np.load(tmp_path / "doctor_samples" / "real.npy")
    assert real.shape == (16, 16, 16, 3)
    # the sample grid: a row of the real shapes, then seed 0's report and auto rows, 4x enlarged
    from ganforge.images import read_image
    picture = read_image(tmp_path / "doctor_shapes.png")
    assert picture.shape == (3 * 66 + 2, 16 * 66 + 2, 3)
    assert np.array_equal(picture[2:66, 2:66], real[0].repeat(4, 0).repeat(4, 1))
    auto = np.load(p["runs"]["auto"][0]["samples"])
    assert np.array_equal(picture[134:198, 68:132], auto[1].repeat(4, 0).repeat(4, 1))
    assert set(p["summary"]) >= {"report_named", "auto_better", "auto_better_pooled", "auto_cleared"}
    assert any(k.startswith("g-dominates: named in report runs") for k in res["criteria"])
    assert "auto better pooled fd" in r.stdout and "mixtures" not in res
    # the samples measured again with a classifier trained from seed 7: other distances, the
    # same samples behind them
    from ganforge.training import metrics
    again = p["summary"]["by_classifier_seed"]["7"]
    assert res["settings"]["classifier_seeds"] == [7] and again["accuracy"]["colour"] > 0.9
    seven, _ = metrics.load_classifier(shapes_cache, dataclasses.replace(metrics.settings_for(16), seed=7))
    fd = metrics.frechet_distance(metrics.features(seven, auto), metrics.features(seven, real))
    assert again["fd_auto"][0] == pytest.approx(fd, rel=1e-4)
    assert again["fd_auto"] != p["summary"]["fd_auto"] and again["auto_better"] in (0, 1, 2)
    assert "classifier fd by the classifier's seed (standard 1234)" in r.stdout


def test_bench_doctor_refuses_an_unknown_preset_in_one_line(tmp_path):
    r = run_cli("bench", "doctor", "--presets", "healthy,wobbly", "--json", str(tmp_path / "x.json"))
    assert r.returncode == 2
    assert r.stderr == ("Error: --presets: 'wobbly' is not one of healthy, d-dominates, g-dominates, "
                        "mode-collapse\n")
    r = run_cli("bench", "doctor", "--classifier-seeds", "1235,x", "--json", str(tmp_path / "x.json"))
    assert r.returncode == 2
    assert r.stderr == ("Error: --classifier-seeds: '1235,x' is not allowed; must be comma-separated "
                        "integers, e.g. 1235,1236\n")


def test_bench_doctor_on_a_mixture_keeps_per_seed_figures_that_its_samples_reproduce(tmp_path):
    from ganforge.training.mixtures import mixture

    out = tmp_path / "mix.json"
    r = run_cli("bench", "doctor", "--data", "ring", "--presets", "d-dominates", "--mixture-steps", "200",
                "--seeds", "2", "--json", str(out), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "presets" not in res and res["settings"]["data"] == ["ring"]     # no shapes part
    assert res["mixture_settings"]["steps"] == 200 and res["mixture_settings"]["samples"] == 2500
    p = res["mixtures"]["ring"]["presets"]["d-dominates"]
    assert p["failure"] == "d_dominates" and set(p["runs"]) == {"report", "auto"}
    for mode, runs in p["runs"].items():
        assert [run["seed"] for run in runs] == [0, 1], mode
        for run in runs:
            points = np.load(run["samples"])
            assert points.shape == (2500, 2)
            c = mixture("ring").coverage(points)
            assert (c["modes"], round(c["hq"], 4)) == (run["modes"], run["hq"])
            assert all({"failure", "step", "onset"} <= set(d) for d in run["diagnoses"])
            assert all({"step", "failure", "knob", "old", "new"} <= set(i) for i in run["interventions"])
            assert run["optimizer_steps"] >= 200 and "cleared" in run
    assert "d_dominates" in {d["failure"] for d in p["runs"]["report"][0]["diagnoses"]}
    auto = p["runs"]["auto"][0]
    assert auto["interventions"] and set(auto["cleared"]) == {i["failure"] for i in auto["interventions"]}
    assert set(p["summary"]) >= {"modes_report", "modes_auto", "hq_report", "hq_auto", "report_named",
                                 "auto_better", "auto_treated", "auto_cleared"}
    assert "ring d-dominates: auto better (modes, then high quality) >= 2/2" in res["criteria"]
    assert (tmp_path / "mix_ring.png").stat().st_size > 1000
    assert "modes report" in r.stdout and "hq % auto" in r.stdout


def test_bench_doctor_refuses_an_unknown_data_set_in_one_line(tmp_path):
    r = run_cli("bench", "doctor", "--data", "ring,moons", "--json", str(tmp_path / "x.json"))
    assert r.returncode == 2
    assert r.stderr == "Error: --data: 'moons' is not one of shapes, ring, grid\n"
