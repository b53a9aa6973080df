"""`ganforge bench modes --mixtures stacked`: a tiny real run, its JSON and files; bad input."""

import json

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


@pytest.mark.parametrize("args, message", [
    (["--mixtures", "ring,mnist"], "--mixtures: 'mnist' is not one of ring, grid, stacked"),
    (["--mixtures", "stacked", "--variants", "pacgan2"],
     "--variants: 'pacgan2' is not available for stacked (the DCGAN has no packing); "
     "allowed there: vanilla, doctor-auto"),
    (["--mixtures", "stacked", "--variants", "doctor"],
     "--variants: 'doctor' is not one of vanilla, doctor-auto, pacgan2"),
    (["--mixtures", "stacked", "--samples", "0"], "--samples: 0 is not allowed; must be >= 1"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, args, message):
    r = run_cli("bench", "modes", "--json", str(tmp_path / "x.json"), *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"Error: {message}"]
