"""`ganforge bench doctor` end to end at a tiny size: every seed of every mode measured, the
figures and the samples behind them written; bad flags refused before training."""

import json

import numpy as np

from tests.conftest import run_cli


def test_bench_doctor_tiny_run_writes_per_seed_figures_and_their_samples(tmp_path, shapes_cache):
    out = tmp_path / "doctor.json"
    r = run_cli("bench", "doctor", "--presets", "g-dominates", "--steps", "40", "--seeds", "2",
                "--samples", "16", "--cache-dir", str(shapes_cache), "--json", str(out), timeout=600)
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
    assert np.load(tmp_path / "doctor_samples" / "real.npy").shape == (16, 16, 16, 3)
    assert set(p["summary"]) >= {"report_named", "auto_better", "auto_better_pooled", "auto_cleared"}
    assert any(k.startswith("g-dominates: named in report runs") for k in res["criteria"])
    assert "auto better pooled fd" in r.stdout


def test_bench_doctor_refuses_an_unknown_preset_in_one_line(tmp_path):
    r = run_cli("bench", "doctor", "--presets", "healthy,wobbly", "--json", str(tmp_path / "x.json"))
    assert r.returncode == 2
    assert r.stderr == ("Error: --presets: 'wobbly' is not one of healthy, d-dominates, g-dominates, "
                        "mode-collapse\n")
