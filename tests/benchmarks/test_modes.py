"""`ganforge bench modes`: tiny real runs (2-D mixture, stacked digits), their JSON and files;
bad input."""

import json

import numpy as np
import pytest

from ganforge.benchmarks import modes as bench
from tests.conftest import run_cli


def test_a_tiny_stacked_run_writes_the_json_fields_and_files(tmp_path, digit_cache):
    out = tmp_path / "res" / "modes.json"
    assert bench.run(["--json", str(out), "--mixtures", "stacked", "--steps", "4", "--seeds", "2",
                      "--width", "8", "--samples", "300", "--cache-dir", str(digit_cache)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"settings", "stacked", "wall_seconds"}
    s = results["settings"]["stacked"]
    assert (s["steps"], s["seeds"], s["width"], s["samples"], s["resolution"]) == (4, 2, 8, 300, 16)
    assert s["classifier_accuracy"] >= 0.95 and results["settings"]["quick"] is False
    assert set(results["stacked"]) == {"vanilla", "doctor-auto"}
    for v, row in results["stacked"].items():
        assert len(row["modes"]) == len(row["kl"]) == 2
        assert all(1 <= m <= 300 for m in row["modes"])
        assert all(0 <= kl <= 6.908 for kl in row["kl"])
        assert (out.parent / f"modes_stacked_{v}.png").stat().st_size > 0
        assert (out.parent / "modes_runs" / f"stacked_{v}_seed1" / "checkpoint.pt").is_file()
        assert (out.parent / "modes_samples" / f"stacked_{v}_seed0.npy").is_file()


def test_a_tiny_ring_run_samples_the_doctors_g_a_second_time_with_rejection(tmp_path):
    out = tmp_path / "modes.json"
    assert bench.run(["--json", str(out), "--mixtures", "ring", "--steps", "30", "--seeds", "2",
                      "--width", "16", "--variants", "doctor-auto,doctor-auto+drs"]) == 0
    results = json.loads(out.read_text())
    assert results["settings"]["ring"] == {"steps": 30, "width": 16, "seeds": 2}
    auto, drs = results["ring"]["doctor-auto"], results["ring"]["doctor-auto+drs"]
    assert drs["seconds"] == auto["seconds"]  # one training per seed, sampled both ways
    assert len(drs["accepted"]) == 2 and all(0 < a <= 1 for a in drs["accepted"])
    assert "accepted" not in auto
    for v in ("doctor-auto", "doctor-auto+drs"):
        assert all(0 <= m <= 8 for m in results["ring"][v]["modes"])
        for seed in (0, 1):
            x = np.load(out.parent / "modes_samples" / f"ring_{v}_seed{seed}.npy")
            assert x.shape == (2500, 2)
    a = np.load(out.parent / "modes_samples" / "ring_doctor-auto_seed0.npy")
    b = np.load(out.parent / "modes_samples" / "ring_doctor-auto+drs_seed0.npy")
    assert not np.array_equal(a, b)
    assert (out.parent / "modes_ring.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--mixtures", "ring,mnist"], "--mixtures: 'mnist' is not one of ring, grid, stacked"),
    (["--mixtures", "stacked", "--variants", "pacgan2"],
     "--variants: 'pacgan2' is not available for stacked (the DCGAN has no packing); "
     "allowed there: vanilla, doctor-auto"),
    (["--mixtures", "stacked", "--variants", "doctor-auto+drs"],
     "--variants: 'doctor-auto+drs' is not available for stacked (rejection sampling is run on the "
     "2-D mixtures only); allowed there: vanilla, doctor-auto"),
    (["--mixtures", "stacked", "--variants", "doctor"],
     "--variants: 'doctor' is not one of vanilla, doctor-auto, doctor-auto+drs, pacgan2"),
    (["--mixtures", "stacked", "--samples", "0"], "--samples: 0 is not allowed; must be >= 1"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, args, message):
    r = run_cli("bench", "modes", "--json", str(tmp_path / "x.json"), *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"Error: {message}"]
