"""The training engine: 2 gloo ranks == 1 process, rank 0 alone writes, the doctor's decision
reaches every rank, SIGTERM checkpoints and a resumed run ends where an uninterrupted one ends
(also across world sizes), streamed folders with corrupt files, devices and precisions."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

WORKER = str(Path(__file__).parent / "ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]

DCGAN = {"steps": 4, "batch_size": 8, "n_images": 32, "doctor": "off", "sync_bn": True, "log_every": 1,
         "sample_every": 100, "checkpoint_every": 100, "network": {"z_dim": 8, "ngf": 4, "ndf": 4, "resolution": 16}}
DENOISER = {"steps": 4, "batch_size": 4, "patch": 16, "pool": 16, "log_every": 1, "checkpoint_every": 100,
            "network": {"width": 8, "depth": 3}}
# 2 ranks vs 1 process: the same arithmetic summed in another order, amplified a little by Adam
TOLERANCE = 2e-4


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def run_ranks(n: int, model: str, out: Path, overrides: dict, resume: bool = False) -> list[dict]:
    """Train in `n` processes (torchrun, gloo) or in this machine's one plain process (n=1);
    return what each rank held at the end."""
    results = out.parent / f"{out.name}_ranks"
    env = _env(**({"RESUME": "1"} if resume else {}))
    args = [model, str(out), str(results), json.dumps(overrides)]
    if n == 1:
        cmd = [sys.executable, WORKER, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", WORKER, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(results / f"rank{i}.pt", weights_only=True) for i in range(n)]


def max_diff(a: dict, b: dict) -> float:
    return max((a[n][k].double() - b[n][k].double()).abs().max().item()
               for n in a for k in a[n] if a[n][k].is_floating_point())


@pytest.fixture(scope="module")
def dcgan_1(tmp_path_factory):
    return run_ranks(1, "dcgan", tmp_path_factory.mktemp("one") / "run", DCGAN)[0]


@pytest.fixture(scope="module")
def dcgan_2(tmp_path_factory):
    return run_ranks(2, "dcgan", tmp_path_factory.mktemp("two") / "run", DCGAN), tmp_path_factory.getbasetemp()


def test_two_gloo_ranks_end_with_the_weights_of_one_process_for_a_gan(dcgan_1, dcgan_2, tmp_path):
    ranks, _ = dcgan_2
    assert max_diff(ranks[0]["state"], ranks[1]["state"]) == 0.0      # DDP keeps the ranks identical
    assert max_diff(dcgan_1["state"], ranks[0]["state"]) < TOLERANCE
    # the tolerance means something: without synchronised BatchNorm the ranks normalise by
    # their half-batch's statistics and the run drifts well outside it
    unsynced = run_ranks(2, "dcgan", tmp_path / "unsynced", {**DCGAN, "sync_bn": False})
    assert max_diff(dcgan_1["state"], unsynced[0]["state"]) > 5 * TOLERANCE


def test_two_gloo_ranks_end_with_the_weights_of_one_process_for_an_autoencoder(tmp_path):
    one = run_ranks(1, "denoiser", tmp_path / "one", DENOISER)[0]
    two = run_ranks(2, "denoiser", tmp_path / "two", DENOISER)
    assert max_diff(one["state"], two[0]["state"]) < TOLERANCE
    assert one["summary"]["world_size"] == 1 and two[0]["summary"]["world_size"] == 2


def test_only_rank_0_writes_files(dcgan_2):
    ranks, base = dcgan_2
    run = base / "two0" / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]        # one row per step: one writer
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "samples", "samples.png", "summary.json",
                                                    "train.json"]
    assert not list(run.glob("*.partial"))
    assert ranks[0]["summary"]["checkpoint"] == ranks[1]["summary"]["checkpoint"]


def test_a_doctor_decision_reaches_every_rank(tmp_path):
    # a dominating D, diagnosed at the first observation (patience 1): the remedies are decided on
    # rank 0 and must be the knobs of rank 1 too
    cfg = {**DCGAN, "steps": 6, "doctor": "auto", "doctor_every": 2, "lr_d": 2e-3, "lr_g": 2e-5,
           "label_smoothing": 0.0, "instance_noise": 0.0,
           "thresholds": "d_dom_s_D=0.51,d_dom_s_G=0.99,patience=1,collapse_after=1"}
    ranks = run_ranks(2, "dcgan", tmp_path / "doc", cfg)
    assert ranks[0]["summary"]["interventions"] > 0
    assert ranks[0]["knobs"] == ranks[1]["knobs"]
    assert ranks[0]["knobs"]["label_smoothing"] > 0 and ranks[0]["knobs"]["lr_d"] < 2e-3
    assert max_diff(ranks[0]["state"], ranks[1]["state"]) == 0.0


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_ranks(dcgan_1, tmp_path, first, second):
    half = {**DCGAN, "steps": 2}
    run_ranks(first, "dcgan", tmp_path / "run", half)
    resumed = run_ranks(second, "dcgan", tmp_path / "run", DCGAN, resume=True)
    assert resumed[0]["summary"]["steps"] == 4
    assert max_diff(dcgan_1["state"], resumed[0]["state"]) < TOLERANCE


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ganforge", *args], env=_env(), capture_output=True,
                          text=True, timeout=kw.pop("timeout", 300), **kw)


SIGTERM_RUN = ["--steps", "300", "--batch-size", "16", "--n-images", "64", "--z-dim", "16", "--ngf", "16",
               "--ndf", "16", "--resolution", "32", "--log-every", "1", "--checkpoint-every", "1000",
               "--doctor-every", "20", "--threads", "1", "--quiet"]


def test_sigterm_checkpoints_and_the_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path):
    ref = _cli("train", "dcgan", "--out", str(tmp_path / "ref"), *SIGTERM_RUN)
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "ganforge", "train", "dcgan", "--out", str(run), *SIGTERM_RUN],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = metrics.read_text().splitlines() if metrics.is_file() else []
        if len(rows) >= 30:
            break
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10           # well inside a pod's 30 s grace period
    assert proc.returncode == 0, err
    assert "stopped on SIGTERM at step" in out and "--resume" in out
    cut = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 30 <= cut["step"] < 300 and cut["resume"]["finished"] is False

    again = _cli("train", "dcgan", "--out", str(run), "--resume", *SIGTERM_RUN)
    assert again.returncode == 0, again.stderr
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert b["step"] == 300
    for net in ("G", "D"):
        for k, v in a["state"][net].items():
            assert torch.equal(v, b["state"][net][k]), (net, k)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 301))
    # the doctor's observations across the cut are the uninterrupted run's
    ref_doc = json.loads((tmp_path / "ref" / "doctor.json").read_text())
    cut_doc = json.loads((run / "doctor.json").read_text())
    assert ref_doc["diagnoses"] == cut_doc["diagnoses"]


def _folder(root: Path, n: int, side: int, corrupt: bool) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"part{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            sub / f"img{i:05d}.{'jpg' if i % 2 else 'png'}", quality=80)
    if corrupt:
        (root / "bad_bytes.png").write_bytes(b"not an image at all")
        (root / "empty.webp").write_bytes(b"")
        good = (root / "part1" / "img00001.jpg").read_bytes()
        (root / "part2" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def test_a_streamed_folder_with_corrupt_files_trains_and_names_them(tmp_path):
    folder = _folder(tmp_path / "photos", 1200, 24, corrupt=True)
    r = _cli("train", "dcgan", "--data", str(folder), "--out", str(tmp_path / "run"), "--resolution", "8",
             "--z-dim", "8", "--ngf", "4", "--ndf", "4", "--batch-size", "100", "--steps", "13", "--workers", "2",
             "--doctor", "off", "--quiet")
    assert r.returncode == 0, r.stderr
    bad = json.loads((tmp_path / "run" / "bad_files.json").read_text())
    assert sorted(Path(p).name for p in bad) == ["bad_bytes.png", "empty.webp", "truncated.jpg"]
    assert "skipped 3 unreadable files" in r.stdout


def test_a_streamed_folder_holds_paths_not_images(tmp_path):
    from ganforge.training import data

    folder = _folder(tmp_path / "many", 3000, 16, corrupt=False)
    ds = data.gan_images(str(folder), 0, 8, 0)
    assert len(ds) == 3000
    assert len(pickle.dumps(ds)) < 300 * 1000       # about a path per file, no pixels
    # the same list as a .jsonl manifest
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"path": p}) + "\n" for p in ds.files[:50]))
    assert data.gan_images(str(manifest), 0, 8, 0)[(0, 0)][0].shape == (8, 8, 3)


def test_memory_does_not_grow_with_the_folder(tmp_path):
    peak = {}
    for n in (200, 1600):
        folder = _folder(tmp_path / f"f{n}", n, 128, corrupt=False)
        out = tmp_path / f"run{n}"
        r = _cli("train", "dcgan", "--data", str(folder), "--out", str(out), "--resolution", "8", "--z-dim", "8",
                 "--ngf", "4", "--ndf", "4", "--batch-size", "100", "--steps", "2", "--doctor", "off", "--quiet",
                 "--threads", "1")
        assert r.returncode == 0, r.stderr
        peak[n] = float(r.stdout.split("peak memory ")[1].split(" MB")[0])
    # 1,400 more 128x128 photos are 69 MB decoded; a streamed run holds none of them
    assert peak[1600] - peak[200] < 25, peak


def test_bad_engine_settings_are_one_line_usage_errors(tmp_path):
    cases = [
        (["--device", "tpu"], "Error: --device: 'tpu' is not allowed; must be auto, cpu, cuda or cuda:N"),
        (["--batch-size", "0"], "Error: --batch-size: 0 is not allowed; must be >= 2"),
        (["--workers", "-1"], "Error: --workers: -1 is not allowed; must be >= 0"),
        (["--patch", "32"], "Error: unrecognized arguments: --patch 32"),     # the denoiser's, not the DCGAN's
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "Error: --device: 'cuda' is not available here"))
    for args, line in cases:
        r = _cli("train", "dcgan", "--out", str(tmp_path / "r"), "--steps", "1", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith(line) and r.stderr.count("\n") == 1, (args, r.stderr)


def test_each_model_lists_its_own_options_only():
    r = _cli("train", "dcgan", "--help")
    assert r.returncode == 0 and "--ngf" in r.stdout and "--label-smoothing" in r.stdout
    assert "--patch" not in r.stdout and "--sigma" not in r.stdout
    r = _cli("train", "denoiser", "--help")
    assert r.returncode == 0 and "--patch" in r.stdout and "--sigma" in r.stdout
    assert "--ngf" not in r.stdout and "--doctor" not in r.stdout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu(tmp_path, precision):
    from ganforge.training.autoencoders import DenoiserTrainConfig, train_denoiser
    from ganforge.training import options

    cfg = options.config_from(DenoiserTrainConfig, "denoiser", overrides={**DENOISER, "precision": precision})
    s = train_denoiser(cfg, tmp_path / precision, progress=False)
    assert s["precision"] == precision and np.isfinite(s["loss"])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_in_each_precision(tmp_path, precision):
    from ganforge.training import options
    from ganforge.training.loop import TrainConfig, train_dcgan

    cfg = options.config_from(TrainConfig, "dcgan", overrides={**DCGAN, "doctor": "report", "doctor_every": 2,
                                                              "device": "cuda", "precision": precision})
    s = train_dcgan(cfg, tmp_path / precision, progress=False)
    assert s["device"].startswith("cuda") and s["precision"] == precision
    assert np.isfinite(s["loss_D"]) and "diagnoses" in s
