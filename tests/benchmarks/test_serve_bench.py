"""`ganforge bench serve` end to end on the committed repository, at a tiny size: every kind is
measured against the real tritonserver with zero failed requests, and the JSON carries the
headline ratios, the per-kind summary and the ceiling."""

import json

from tests.conftest import run_cli


def test_bench_serve_measures_every_kind_without_errors(tmp_path):
    out = tmp_path / "serve.json"
    r = run_cli("bench", "serve", "--quick", "--seconds", "0.2", "--rounds", "1",
                "--json", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["summary"]) == {"generate", "generator", "denoise", "inpaint"}
    assert res["errors"] == 0
    for kind, s in res["summary"].items():
        assert s["served_vs_inprocess_ratio"] > 0, kind
        assert s["dynamic_batching_ratio"] > 0, kind
        assert s["gflop_per_image"] > 0, kind
        assert res["kinds"][kind]["embedded"]["batch1_by_concurrency"]["32"]["requests"] > 0, kind
        # each round's served figures sit between in-process ones (before, between, after)
        brackets = s["rounds"]["inprocess_batch16_rounds"]
        assert len(brackets) == 1 and len(brackets[0]) == 3 and min(brackets[0]) > 0, kind
    assert res["ceiling"]["matmul_gflops"] > 0
    assert (tmp_path / "serve.png").stat().st_size > 0
