"""`ganforge tune`: a configuration search on the real tritonserver, written through Triton's
schema into a copy of the repository; the shipped repository is never touched."""

import json
import shutil
import subprocess
import sys

import pytest

from ganforge.serving import repository as repo
from ganforge.serving import tune
from tests.conftest import ROOT, run_cli

MODEL = "dcgan_shapes_generator"   # the smallest shipped model: about 2 ms a request
SLOW_DELAY_US = 400_000            # the batcher holds a lone request this long
P99_MS = "200"


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory):
    """A copy of the shipped generator whose config holds each request 400 ms in the dynamic
    batcher (one instance): at concurrency 1 its p99 is at least 400 ms, over the 200 ms limit,
    so a candidate must win and be written. Its manifest records this config and its files."""
    root = tmp_path_factory.mktemp("slow") / "model_repository"
    d = root / MODEL
    shutil.copytree(ROOT / "model_repository" / MODEL, d)
    for extra in [p for p in d.iterdir() if p.is_dir() and p.name != "1"]:
        shutil.rmtree(extra)   # version 1 alone: one session per instance, whatever else ships
    cfg = repo.read_config(d / "config.pbtxt")
    cfg.ClearField("version_policy")
    cfg.instance_group[0].count = 1
    cfg.dynamic_batching.max_queue_delay_microseconds = SLOW_DELAY_US
    repo.write_config(d, cfg)
    info = json.loads((d / repo.MANIFEST).read_text())
    info.pop("files")
    repo.write_manifest(d, info)
    return root


def fresh_copy(src, dest):
    shutil.copytree(src, dest)
    return dest


@pytest.fixture(scope="module")
def tuned(slow_repo, tmp_path_factory):
    """One tune run: the shipped (slow) configuration and two candidates, concurrency 1, 0.5 s."""
    tmp = tmp_path_factory.mktemp("tuned")
    root = fresh_copy(slow_repo, tmp / "model_repository")
    out = tmp / "tune.json"
    r = run_cli("tune", MODEL, "--repo", str(root), "--p99-ms", P99_MS, "--instances", "1",
                "--max-batch", "8", "--queue-delay-us", "0,100", "--concurrency", "1",
                "--seconds", "0.5", "--json", str(out), timeout=180)
    return r, root, json.loads(out.read_text()) if out.is_file() else None


@pytest.mark.slow
def test_tune_reports_every_configuration_and_concurrency(tuned):
    r, _, result = tuned
    assert r.returncode == 0, r.stderr
    assert result["model"] == MODEL and result["p99_limit_ms"] == 200.0
    assert result["shipped"] == {"instances": 1, "max_batch_size": 64, "max_queue_delay_us": SLOW_DELAY_US}
    assert [c["config"] for c in result["configs"]] == ["shipped", "i1_b8_d0", "i1_b8_d100"]
    assert len(result["rows"]) == 3
    for row in result["rows"]:
        assert row["concurrency"] == 1 and row["errors"] == 0 and row["requests"] > 0
        assert row["images_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["meets_p99"] == (row["p99_ms"] <= 200)
    shipped = result["rows"][0]
    assert shipped["shipped"] and shipped["vs_shipped"] == 1.0
    # the batcher held every shipped request for 400 ms, so the shipped config meets nothing
    assert shipped["p99_ms"] >= SLOW_DELAY_US / 1000 and result["shipped_best"] is None
    assert result["best_vs_shipped"] is None
    best = result["best"]
    assert best["images_per_s"] == max(r["images_per_s"] for r in result["rows"] if r["meets_p99"])
    assert result["best_vs_shipped_same_concurrency"] == round(best["images_per_s"] / shipped["images_per_s"], 3)
    # progress lines while it ran, the table and the verdict at the end
    assert "[1/3] shipped instances=1 max_batch=64 delay=400000us: starting tritonserver" in r.stdout
    assert f"* {best['config']}" in r.stdout
    assert "the shipped configuration meets p99 <= 200 ms at no concurrency measured" in r.stdout


@pytest.mark.slow
def test_tune_writes_the_best_row_meeting_the_limit_into_config_pbtxt(tuned):
    r, root, result = tuned
    best = result["best"]
    assert best["meets_p99"] and best["p99_ms"] <= 200 and not best["shipped"]
    d = root / MODEL
    cfg = repo.read_config(d / "config.pbtxt")   # Triton's schema parses it back
    assert cfg.max_batch_size == best["max_batch_size"] == 8
    assert cfg.instance_group[0].count == best["instances"] == 1
    assert cfg.dynamic_batching.max_queue_delay_microseconds == best["max_queue_delay_us"]
    assert [w.batch_size for w in cfg.model_warmup] == [1, 8]
    assert [i.name for i in cfg.input] == ["latent"] and cfg.output[0].name == "image"
    assert result["written"] == str(d / "config.pbtxt")
    repo.check_repository(root)   # the manifest agrees: `ganforge serve` accepts the directory
    tuned = json.loads((d / repo.MANIFEST).read_text())["tuned"]
    assert tuned["max_queue_delay_us"] == best["max_queue_delay_us"] and tuned["p99_limit_ms"] == 200.0
    assert f"wrote {d / 'config.pbtxt'}" in r.stdout


@pytest.mark.slow
def test_dry_run_prints_the_change_and_leaves_the_files_byte_identical(slow_repo, tmp_path):
    root = fresh_copy(slow_repo, tmp_path / "model_repository")
    before = {p: (root / MODEL / p).read_bytes() for p in ("config.pbtxt", repo.MANIFEST)}
    r = run_cli("tune", MODEL, "--repo", str(root), "--p99-ms", P99_MS, "--instances", "1",
                "--max-batch", "64", "--queue-delay-us", "0", "--concurrency", "1", "--seconds", "0.5",
                "--dry-run", timeout=180)
    assert r.returncode == 0, r.stderr
    assert {p: (root / MODEL / p).read_bytes() for p in before} == before
    assert f"--dry-run: {root / MODEL / 'config.pbtxt'} left unchanged; tune would write:" in r.stdout
    # a delay of 0 is protobuf's default, so the field goes: `dynamic_batching {}` in the file
    assert f"-  max_queue_delay_microseconds: {SLOW_DELAY_US}\n }}\n" in r.stdout
    assert "+  max_queue_delay_microseconds" not in r.stdout


@pytest.mark.slow
def test_when_no_configuration_meets_the_limit_it_says_so_and_writes_nothing(slow_repo, tmp_path):
    root = fresh_copy(slow_repo, tmp_path / "model_repository")
    before = (root / MODEL / "config.pbtxt").read_bytes()
    # the grid is the shipped configuration alone: one server, every request held 400 ms
    r = run_cli("tune", MODEL, "--repo", str(root), "--p99-ms", P99_MS, "--instances", "1",
                "--max-batch", "64", "--queue-delay-us", str(SLOW_DELAY_US), "--concurrency", "1",
                "--seconds", "0.5", timeout=120)
    assert r.returncode == 1
    assert "no configuration meets p99 <= 200 ms at any concurrency measured" in r.stdout
    assert r.stderr.strip().startswith(f"Error: no configuration meets --p99-ms 200; "
                                       f"{root / MODEL / 'config.pbtxt'} left unchanged")
    assert (root / MODEL / "config.pbtxt").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0"], "Error: --max-batch: 0 is not allowed; give comma-separated integers in "
                           "[1, 1024], e.g. --max-batch 8,16"),
    (["--instances", ""], "Error: --instances: '' is an empty list; give comma-separated integers in "
                          "[1, 64], e.g. --instances 1,2"),
    (["--concurrency", "4,-1"], "Error: --concurrency: -1 is not allowed; give comma-separated integers "
                                "in [1, 1024], e.g. --concurrency 1,4,16"),
    (["--seconds", "0"], "Error: --seconds: 0.0 is not allowed; must be a number > 0"),
])
def test_a_bad_value_is_a_usage_error_naming_the_flag(args, message):
    r = run_cli("tune", MODEL, "--p99-ms", "100", *args)
    assert r.returncode == 2
    assert r.stderr.strip() == message


def test_an_unknown_model_is_a_usage_error_listing_the_models(tmp_path):
    shutil.copytree(ROOT / "model_repository" / MODEL, tmp_path / MODEL)
    r = run_cli("tune", "nosuch", "--repo", str(tmp_path), "--p99-ms", "100")
    assert r.returncode == 2
    assert r.stderr.strip() == f"Error: MODEL: 'nosuch' is not a model of {tmp_path}; choose from {MODEL}"


def test_a_candidate_changes_only_its_fields_and_the_warmups_that_follow_max_batch():
    cfg = repo.read_config(ROOT / "model_repository" / "inpainter_photos" / "config.pbtxt")
    new = tune.apply(cfg, tune.Candidate(instances=2, max_batch_size=4, max_queue_delay_us=500))
    assert (new.max_batch_size, new.instance_group[0].count) == (4, 2)
    assert new.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(w.name, w.batch_size) for w in new.model_warmup] == [("warmup_batch_1", 1), ("warmup_batch_4", 4)]
    for field in ("name", "platform", "backend", "input", "output", "parameters", "default_model_filename"):
        assert getattr(new, field) == getattr(cfg, field), field
    assert tune.shipped_candidate(cfg) == tune.Candidate(1, 16, 100)
    one = tune.apply(cfg, tune.Candidate(1, 1, 0))
    assert [w.batch_size for w in one.model_warmup] == [1]   # the two samples became one


def test_the_best_row_is_the_fastest_within_the_limit_and_none_when_no_row_meets_it():
    def conf(key, shipped, images_per_s, p99_ms):
        m = {"images_per_s": images_per_s, "p50_ms": p99_ms / 2, "p95_ms": p99_ms, "p99_ms": p99_ms,
             "requests": 10, "errors": 0}
        values = {"instances": 1, "max_batch_size": 8, "max_queue_delay_us": 0}
        return {"key": key, "shipped": shipped, "values": values, "rounds": [{"by_concurrency": {4: m}}]}

    configs = [conf("shipped", True, 100.0, 50.0), conf("fast", False, 300.0, 120.0),
               conf("quick", False, 200.0, 80.0)]
    rows = tune.rows_of(configs, [4], p99_ms=100.0)
    assert tune.choose(rows)["config"] == "quick" and rows[2]["vs_shipped"] == 2.0
    assert tune.choose(tune.rows_of(configs, [4], p99_ms=10.0)) is None


def test_tune_imports_no_torch():
    code = ("import sys; import ganforge.serving.tune, ganforge.benchmarks.serve; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
