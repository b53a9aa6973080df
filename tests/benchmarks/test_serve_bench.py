"""`ganforge bench serve` end to end on the committed repository, at a tiny size: every kind is
measured against the real tritonserver with zero failed requests, and the JSON carries the
headline ratios, the per-kind summary and the ceiling."""

import json
import platform
import shutil

import pytest

from ganforge.benchmarks._loadgen import perf_analyzer_path, served_perf_analyzer
from ganforge.benchmarks._workloads import Workload
from ganforge.serving.server import LocalServer, ServerOptions, free_port
from tests.conftest import run_cli

# `make venv` installs Triton's perf_analyzer on Linux x86-64 (scripts/install_perf_analyzer.sh)
PERF_ANALYZER_EXPECTED = platform.system() == "Linux" and platform.machine() == "x86_64"


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
        # every load generator measured the headline, inside the same brackets
        for name in res["clients"]:
            c = s["by_client"][name]
            assert c["served_vs_inprocess_ratio"] > 0 and c["dynamic_batching_ratio"] > 0, (kind, name)
            assert res["kinds"][kind]["headline"]["by_client"][name]["requests"] > 0, (kind, name)
    assert res["ceiling"]["matmul_gflops"] > 0
    if PERF_ANALYZER_EXPECTED:
        assert res["clients"] == ["python", "perf_analyzer"] and res["client"] == "perf_analyzer"
        assert res["served_vs_inprocess_ratio"] == res["summary"]["generate"]["by_client"]["perf_analyzer"][
            "served_vs_inprocess_ratio"]
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_perf_analyzer_measures_and_reports_a_failed_measurement(tmp_path):
    """perf_analyzer against the real server: a good measurement, with time windows and with
    count windows sized from an expected rate, has throughput and ordered latency percentiles;
    one it cannot make (a batch over the model's max_batch_size of 64) is an error with
    perf_analyzer's message, never a figure."""
    pa = perf_analyzer_path()
    if pa is None:
        assert not PERF_ANALYZER_EXPECTED, "make venv installs perf_analyzer on Linux x86-64"
        pytest.skip("perf_analyzer is not built for this platform")
    shutil.copytree("model_repository/dcgan_shapes", tmp_path / "dcgan_shapes")
    opts = ServerOptions(model_repository=tmp_path, grpc_port=free_port(), http_port=free_port(),
                         metrics_port=free_port())
    w = Workload(kind="generate", model="dcgan_shapes", inputs={}, max_batch=64)
    with LocalServer(opts) as server:
        timed = served_perf_analyzer(pa, server.grpc_url, "dcgan_shapes", w, 4, 2, 0.3)
        counted = served_perf_analyzer(pa, server.grpc_url, "dcgan_shapes", w, 4, 2, 0.3,
                                       expected_images_per_s=timed["images_per_s"])
        for m in (timed, counted):
            assert m["errors"] == 0 and m["images_per_s"] > 0 and m["requests"] >= 3 * 8, m
            assert 0 < m["p50_ms"] <= m["p95_ms"] <= m["p99_ms"], m
        over = served_perf_analyzer(pa, server.grpc_url, "dcgan_shapes", w, 65, 1, 0.3)
        assert over["errors"] == 1 and over["images_per_s"] == 0.0, over
        assert over["error_messages"][0].startswith("perf_analyzer exit "), over


def test_workloads_leave_out_any_size_models_whose_request_has_no_one_shape():
    from ganforge.benchmarks._workloads import discover
    from tests.conftest import ROOT

    found = discover(ROOT / "model_repository")
    assert found["inpaint"].model == "fill_thinplate"   # inpainter_photos / _shapes take any size
    for w in found.values():
        assert all(d > 0 for _, dims in w.inputs.values() for d in dims), w.model
